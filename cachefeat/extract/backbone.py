"""The frozen open_clip image tower: loading by name, and the tapped forward that extraction runs.

Layer i is the output of visual block i (0-indexed), the raw residual stream before ln_post, as
`forward_intermediates` returns it; `cls` is its class token (prefix position 0), `tokens` its patch tokens
(optionally average-pooled to a smaller grid), and `embed` is what `encode_image` returns (pooled, ln_post,
proj; not L2-normalised). One forward computes all three.

Weights: an open_clip pretrained tag (a tag trained with QuickGELU, such as `openai`, selects the
QuickGELU variant of the model, or the features would be wrong), a local checkpoint file, an `hf-hub:` or
`local-dir:` model name, or `none` for random weights drawn from a fixed seed (so every process, and every
resumed run, builds the same network). The weights' SHA-256 goes into the cache metadata.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import autocast, resolve_device, resolve_precision
from ..specs import TokenSpec
from .preprocess import Preprocessing

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


class BackboneError(ValueError):
    """A model name, weights source or setting that cannot be used; the message says why."""


def register_model_configs() -> None:
    """Make the package's own model configs (the tiny test ViT) known to open_clip's factory."""
    global _registered
    if not _registered:
        import open_clip
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def resolve_model_name(name: str) -> str:
    """`ViT-L/14` -> `ViT-L-14`, `ViT-L/14@336px` -> `ViT-L-14-336`; schemas (hf-hub:, local-dir:) pass through.
    Unknown names raise BackboneError listing close matches."""
    import open_clip
    register_model_configs()
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    cleaned = re.sub(r"@(\d+)px$", r"-\1", name.strip()).replace("/", "-")
    models = open_clip.list_models()
    if cleaned in models:
        return cleaned
    lower = {m.lower(): m for m in models}
    if cleaned.lower() in lower:
        return lower[cleaned.lower()]
    close = difflib.get_close_matches(cleaned, models, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `cachefeat models` lists them"
    raise BackboneError(f"unknown model {name!r}{hint}")


def is_vit(name: str) -> bool:
    import open_clip
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        return False
    v = cfg.get("vision_cfg", {})
    return "timm_model_name" not in v and isinstance(v.get("layers"), int)  # ResNets list stage depths


def _pick_quickgelu(name: str, tag: str) -> tuple[str, bool]:
    """The model name to build for weights `tag`, and whether QuickGELU must be forced on it."""
    import open_clip
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg or not tag_cfg.get("quick_gelu", False):
        return name, False
    if open_clip.get_model_config(name).get("quick_gelu", False):
        return name, False
    if f"{name}-quickgelu" in open_clip.list_models():
        return f"{name}-quickgelu", False
    return name, True


def model_geometry(model: str) -> dict:
    """Depth, width, patch grid and embedding size of a model, read from its config without building it
    (for --dry-run). Schema names (hf-hub:, local-dir:) are built with random weights to find out."""
    import open_clip
    name = resolve_model_name(model)
    if name.startswith(("hf-hub:", "local-dir:")):
        b = load_backbone(name, "none", device="cpu")
        return {"name": name, "depth": b.depth, "width": b.width, "patch_grid": list(b.patch_grid),
                "embed_dim": b.embed_dim}
    if not is_vit(name):
        raise BackboneError(f"{name} is not a ViT (cachefeat taps transformer blocks); pick a ViT model")
    cfg = open_clip.get_model_config(name)
    v = cfg["vision_cfg"]
    size = v["image_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = v["patch_size"]
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return {"name": name, "depth": int(v["layers"]), "width": int(v["width"]),
            "patch_grid": [size[0] // patch[0], size[1] // patch[1]], "embed_dim": int(cfg["embed_dim"])}


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the module's state dict (names, dtypes, shapes and bytes), in key order."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Backbone:
    model: torch.nn.Module          # the whole open_clip model (text tower kept on CPU for class-name embeddings)
    name: str
    pretrained: str                 # tag, checkpoint path, or "none"
    init_seed: int | None
    quick_gelu: bool
    device: torch.device
    precision: str
    preprocessing: Preprocessing
    weights_sha256: str

    @property
    def visual(self):
        return self.model.visual

    @property
    def depth(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return int(self.visual.transformer.width)

    @property
    def patch_grid(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.visual.grid_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(int(p) for p in self.visual.patch_size)

    @property
    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    def describe(self) -> dict:
        """The metadata that identifies this feature space (goes into the cache attrs)."""
        import open_clip
        return {
            "name": self.name, "pretrained": self.pretrained, "init_seed": self.init_seed,
            "quick_gelu": self.quick_gelu, "weights_sha256": self.weights_sha256,
            "open_clip_version": open_clip.__version__, "torch_version": torch.__version__,
            "image_size": list(self.preprocessing.size), "patch_size": list(self.patch_size),
            "patch_grid": list(self.patch_grid), "width": self.width, "depth": self.depth,
            "embed_dim": self.embed_dim, "heads": int(self.visual.transformer.resblocks[0].attn.num_heads),
        }

    # -- the text tower (stays on the CPU: it runs once per class list)
    @property
    def has_text_tower(self) -> bool:
        return hasattr(self.model, "encode_text") and (hasattr(self.model, "text") or
                                                       hasattr(self.model, "token_embedding"))

    @torch.inference_mode()
    def text_embeddings(self, prompts: list[str], batch_size: int = 256) -> np.ndarray:
        """`encode_text` of each prompt (not L2-normalised), float32 (len(prompts), E)."""
        import open_clip
        tokenizer = open_clip.get_tokenizer(self.name)
        out = [self.model.encode_text(tokenizer(prompts[i:i + batch_size])).float()
               for i in range(0, len(prompts), batch_size)]
        return torch.cat(out).numpy()

    # -- the forward that extraction runs
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, h, w, 3) on any device -> normalised float32 (B, 3, h, w) on the compute device,
        the same arithmetic as torchvision's ToTensor + Normalize."""
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(self.preprocessing.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocessing.std, device=self.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    @torch.inference_mode()
    def features(self, pixels: torch.Tensor, layers: list[int], tokens: TokenSpec) -> dict[str, torch.Tensor]:
        """Tapped forward of a batch of frames.

        Returns float tensors on the compute device: cls (B, L, D), embed (B, E) and, unless tokens is
        `cls`, tokens (B, L, N, D) with N patch tokens (pooled when asked)."""
        x = self.normalize(pixels)
        with autocast(self.device, self.precision):
            out = self.visual.forward_intermediates(x, indices=list(layers), output_fmt="NLC",
                                                    output_extra_tokens=True, normalize_intermediates=False)
        res = {"cls": torch.stack([p[:, 0] for p in out["image_intermediates_prefix"]], dim=1),
               "embed": out["image_features"]}
        if tokens.kind != "cls":
            patches = torch.stack(out["image_intermediates"], dim=1)  # (B, L, N, D)
            if tokens.kind == "pooled":
                patches = pool_patches(patches, self.patch_grid, tokens.grid)
            res["tokens"] = patches
        return res


def pool_patches(patches: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> torch.Tensor:
    """(..., gh*gw, D) patch tokens -> (..., oh*ow, D) by adaptive average pooling over the 2-D grid."""
    *lead, n, d = patches.shape
    gh, gw = grid
    x = patches.reshape(-1, gh, gw, d).permute(0, 3, 1, 2).float()
    x = F.adaptive_avg_pool2d(x, out_grid)
    return x.permute(0, 2, 3, 1).reshape(*lead, out_grid[0] * out_grid[1], d)


def load_backbone(model: str, pretrained: str | None = "none", device: str = "auto", precision: str = "auto",
                  seed: int = 0, quick_gelu: bool | None = None, cache_dir: str | None = None) -> Backbone:
    """Build a frozen open_clip model. `pretrained`: a tag (e.g. openai, laion2b_s34b_b88k), a checkpoint
    path, or none/None for random weights from `seed`. Model names may be hf-hub:ORG/REPO or local-dir:PATH."""
    import open_clip
    register_model_configs()
    name = resolve_model_name(model)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev, gpu_auto="fp16")
    pre = "none" if pretrained in (None, "", "none", "None") else pretrained
    force_qg = bool(quick_gelu)
    schema = name.startswith(("hf-hub:", "local-dir:"))
    if not schema:
        if not is_vit(name):
            raise BackboneError(f"{name} is not a ViT (cachefeat taps transformer blocks); pick a ViT model")
        if pre != "none" and not os.path.isfile(pre):
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pre not in tags:
                raise BackboneError(f"--pretrained {pre!r} is neither a file nor a known tag for {name}; "
                                    f"tags: {', '.join(tags) or 'none'}")
            if quick_gelu is None:
                name, force_qg = _pick_quickgelu(name, pre)
    kwargs = dict(force_quick_gelu=force_qg, device="cpu", precision="fp32")
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    prev = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs "no pretrained weights" for random init
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if schema:
                clip = open_clip.create_model(name, **kwargs)
            else:
                clip = open_clip.create_model(name, pretrained=None if pre == "none" else pre,
                                              require_pretrained=pre != "none", **kwargs)
    except BackboneError:
        raise
    except Exception as e:
        where = "its pretrained weights" if pre != "none" or schema else "it"
        raise BackboneError(f"could not build {name} with {where}: {type(e).__name__}: {str(e).splitlines()[0]}"
                            + (" (no network? pass a local checkpoint path to --pretrained)" if pre != "none" else "")
                            ) from None
    finally:
        logging.getLogger().setLevel(prev)
    clip.eval().requires_grad_(False)
    qg = bool(force_qg or name.endswith("-quickgelu") or
              (not schema and open_clip.get_model_config(name).get("quick_gelu", False)))
    digest = weights_digest(clip.visual)
    clip.visual.to(dev)
    prep = Preprocessing.from_open_clip(dict(clip.visual.preprocess_cfg))
    return Backbone(model=clip, name=name, pretrained=pre, init_seed=seed if pre == "none" and not schema else None,
                    quick_gelu=qg, device=dev, precision=prec, preprocessing=prep, weights_sha256=digest)
