# %% [markdown]
# # cachefeat from Python
# A tiny end-to-end tour, runnable on a laptop CPU in well under a minute: make a synthetic data set, cache
# the features of a tiny random-weight ViT (the test model; use e.g. `ViT-B-16` / `openai` for real work),
# then read the cache (metadata, NumPy arrays, a torch Dataset), train an adapter on it, load the trained
# adapter back from its run folder and run it on cached features.
#
#     python examples/api_example.py [WORKDIR]        # default: a temporary folder
# Each `# %%` starts a cell (VS Code, Jupyter via jupytext, Spyder run them one by one).

# %%
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import cachefeat
from cachefeat.cli import cli
from cachefeat.synth import generate
from cachefeat.train import TrainConfig, open_run, train

work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="cachefeat-api-"))
work.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)   # tiny models run fastest on one thread

# %% [markdown]
# ## 1. A data set and its cache (stage one)
# The synthetic classes differ only in temporal order. Extraction is a CLI command; from Python, call the
# same command (or use `subprocess`). Every tapped layer, all patch tokens, 8 frames. `--decode-workers 0`
# decodes in this process: worker processes would re-run a script that has no `if __name__ == "__main__"`.

# %%
generate(work / "data", num_classes=4, videos_per_class=8, frames=16, size=64, seed=0, progress=False)
for split in ("train", "val"):
    cli.main(["extract", str(work / "data" / f"{split}.txt"), "--out", str(work / f"{split}.zarr"),
              "--model", "cachefeat-tiny-ViT", "--pretrained", "none", "--layers", "all", "--tokens", "all",
              "--frames", "8", "--decode-workers", "0", "--quiet", "--overwrite"], standalone_mode=False)

# %% [markdown]
# ## 2. Open a cache: metadata and NumPy arrays

# %%
cache = cachefeat.open_cache(work / "train.zarr")
print("model:", cache.meta["model"]["name"], "| layers:", cache.layers, "| tokens:", cache.tokens,
      "| frames:", cache.frames, "| views:", cache.views)
print("classes:", cache.classes)
print("arrays:", cache.array_names())
valid = cache.valid()                                   # clips decoded, extracted, in finished shards
labels = cache.labels()                                 # class index per clip (-1: unknown)
cls_last = cache.read_cls(layers=[cache.layers[-1]])    # (clips, frames, 1, width): CLS of the last block
tokens = cache.read(f"tokens/{cache.layers[-1]}", rows=slice(0, 4))   # (4, frames, patches, width)
embed = cache.read("embed")                             # (clips, frames, embed_dim): encode_image per frame
print("valid clips:", int(valid.sum()), "| CLS:", cls_last.shape, "| tokens:", tokens.shape, "| embed:", embed.shape)
print("failures:", cache.failures())

# %% [markdown]
# A quick NumPy baseline straight from the arrays: nearest class mean of the time-averaged embedding.

# %%
x = embed[valid].astype(np.float32).mean(axis=1)
x /= np.linalg.norm(x, axis=1, keepdims=True)
means = np.stack([x[labels[valid] == c].mean(0) for c in range(len(cache.classes))])
print("nearest-mean train accuracy:", float(((x @ means.T).argmax(1) == labels[valid]).mean()))

# %% [markdown]
# ## 3. A torch Dataset of chosen layers and tokens
# Only the selected arrays are read (held in RAM when they fit).

# %%
ds = cachefeat.open_dataset(cache, cls_layers=cache.layers[-2:], token_layers=[cache.layers[-1]])
item = ds[0]
print(len(ds), "clips;", {k: tuple(v.shape) if hasattr(v, "shape") else v for k, v in item.items()})
loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
print("a batch of CLS:", tuple(next(iter(loader))["cls"].shape))

# %% [markdown]
# ## 4. Train an adapter on the cache (stage two)

# %%
cfg = TrainConfig(adapter="temporal", adapter_opts={"dim": 32}, epochs=6, batch_size=8, lr=3e-3, warmup_epochs=1)
run = open_run(cfg, work / "train.zarr", work / "val.zarr")
# writes checkpoint/, metrics.jsonl, summary.json, curves.png
result = train(run, work / "runs" / "temporal", log=print)
print("files:", result.summary["files"])

# %% [markdown]
# ## 5. Load the trained adapter from its run folder and run it on cached features

# %%
adapter = cachefeat.load_adapter(work / "runs" / "temporal")
print(adapter.name, "reads", adapter.needs.describe(), "|", adapter.model.num_trainable(), "trainable parameters")
val = adapter.dataset(work / "val.zarr")               # checks the cache fits the adapter, reads what it needs
batch = val.gather(val.rows)                            # every valid val clip, as NumPy arrays
logits = adapter.logits(batch)                          # (clips, classes)
accuracy = float((logits.argmax(1).numpy() == batch["label"]).mean())
print("val clips:", len(val), "| accuracy:", round(accuracy, 3))
print("first clip:", adapter.predict({k: v[:1] for k, v in batch.items()}, top=2)[0])
