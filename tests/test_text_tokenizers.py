"""Text towers whose tokenizer needs another package (SigLIP / SigLIP2: transformers and the Hugging Face hub).

A tiny SigLIP-style open_clip model in a `local-dir:` folder names a Hugging Face tokenizer, as the real
ViT-B-16-SigLIP2 config names `timm/ViT-B-16-SigLIP2`. The tokenizer is built here with the `tokenizers`
library and put into a Hugging Face cache, so it loads offline the way a user's pre-downloaded one does."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch

from cachefeat.extract.backbone import register_model_configs
from cachefeat.store import open_cache

from helpers import invoke, on_contract

REPO = "cachefeat-test/tiny-siglip"
WORDS = ["<pad>", "<eos>", "<unk>", "moving", "right", "left", "down", "up"]


def _siglip_folder(folder: Path, tokenizer: bool = True) -> Path:
    """What a hub repo of an open_clip SigLIP2 model holds: open_clip_config.json (the tiny SigLIP2 model, its
    text config naming REPO's tokenizer), the weights, and the tokenizer files with timm's config.json."""
    register_model_configs()
    cfg = json.loads(json.dumps(open_clip.get_model_config("cachefeat-tiny-SigL2")))
    cfg["text_cfg"].update(hf_tokenizer_name=REPO, vocab_size=len(WORDS), tokenizer_kwargs={"clean": "canonicalize"})
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"architecture": "cachefeat_tiny_siglip2"}))
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                unk_token="<unk>").save_pretrained(folder)
    return folder


def _hf_cache(root: Path, tokenizer: bool = True) -> Path:
    """A Hugging Face cache (HF_HOME) holding REPO, laid out as the hub client writes it."""
    commit = "0" * 40
    repo = root / "hub" / f"models--{REPO.replace('/', '--')}"
    _siglip_folder(repo / "snapshots" / commit, tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def _extract(manifest, out, model, env, *extra):
    """`cachefeat extract` in a fresh process: the hub client reads HF_HUB_OFFLINE when it is imported."""
    cmd = [sys.executable, "-m", "cachefeat", "extract", str(manifest), "--out", str(out), "--model", model,
           "--pretrained", "none", "--quiet", "--decode-workers", "1", "--frames", "2", *extra]
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def _check_text(cache_path: Path) -> None:
    cache = open_cache(cache_path)
    text = cache.text_embeddings()
    assert text.shape[0] == len(cache.classes) and np.isfinite(text).all()
    assert len({row.tobytes() for row in text}) == len(cache.classes)   # each class name tokenized to its own ids


def test_a_missing_transformers_names_the_extra_and_no_text(synth_small, tmp_path, monkeypatch):
    folder = _siglip_folder(tmp_path / "tiny-siglip")
    monkeypatch.setitem(sys.modules, "transformers", None)   # what an install without the extra has
    args = ["extract", synth_small / "train.txt", "--out", tmp_path / "c.zarr", "--model", f"local-dir:{folder}",
            "--pretrained", "none", "--quiet", "--decode-workers", "1", "--frames", "2"]
    line = on_contract(invoke(*args), (2,), "SigLIP text without transformers")
    assert "cachefeat[siglip]" in line and "--no-text" in line and "transformers" in line, line
    assert not (tmp_path / "c.zarr").exists()
    res = invoke(*args, "--no-text")
    assert res.exit_code == 0, res.output
    assert open_cache(tmp_path / "c.zarr").text is None


def test_the_tokenizer_loads_from_a_local_folder(synth_small, tmp_path):
    """local-dir: a folder holding the model and its tokenizer files; no Hugging Face cache involved."""
    folder = _siglip_folder(tmp_path / "tiny-siglip")
    res = _extract(synth_small / "train.txt", tmp_path / "c.zarr", f"local-dir:{folder}",
                   {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    _check_text(tmp_path / "c.zarr")


def test_hf_hub_models_load_offline_from_the_hugging_face_cache(synth_small, tmp_path):
    env = {"HF_HOME": str(_hf_cache(tmp_path / "hf")), "HF_HUB_OFFLINE": "1"}
    res = _extract(synth_small / "train.txt", tmp_path / "c.zarr", f"hf-hub:{REPO}", env)
    assert res.returncode == 0, res.stderr
    _check_text(tmp_path / "c.zarr")

    # offline, the model cached but not its tokenizer: one line naming the offline setting and --no-text
    env = {"HF_HOME": str(_hf_cache(tmp_path / "hf2", tokenizer=False)), "HF_HUB_OFFLINE": "1"}
    res = _extract(synth_small / "train.txt", tmp_path / "d.zarr", f"hf-hub:{REPO}", env)
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "HF_HUB_OFFLINE" in err[0] and "--no-text" in err[0], err[0]
    assert not (tmp_path / "d.zarr").exists()
    res = _extract(synth_small / "train.txt", tmp_path / "d.zarr", f"hf-hub:{REPO}", env, "--no-text")
    assert res.returncode == 0, res.stderr
