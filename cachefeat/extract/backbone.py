"""The frozen image tower: loading by name, the families it can be, and the tapped forward that extraction runs.

Families (FAMILIES below; docs/backbones.md says more): open_clip's own ViTs; open_clip towers whose image
trunk is a timm ViT (SigLIP / SigLIP2, EVA02-CLIP, PE-Core); and any timm ViT, `--model timm:NAME` (DINOv2
with or without registers, AugReg, DeiT, CLIP ViTs in timm form, EVA, PE), image-only. Each family is one
small `Tower` class; everything else is shared.

Layer i is the output of block i (0-indexed), the raw residual stream before the tower's final norm, as the
model's own `forward_intermediates` returns it. `tokens` are its patch tokens (optionally average-pooled to a
smaller grid); the prefix tokens (class token, registers) are never among them. `cls` holds, per layer, the
class token where the tower has one whose output the head reads, otherwise the mean of the patch tokens
(towers without a class token, such as SigLIP, and towers that pool by average, such as CLIPA); the choice is
recorded in the metadata (`model.cls`). Register tokens are dropped (their count is recorded). `embed` is the
tower's pooled output: open_clip's `encode_image` (pooling or attention pool, norm, projection; not
L2-normalised), timm's pre-logits features (`forward_head(..., pre_logits=True)`). One forward computes all.

Weights: for open_clip names, an open_clip pretrained tag (a tag trained with QuickGELU, such as `openai`,
selects the QuickGELU variant of the model, or the features would be wrong), a local checkpoint file, an
`hf-hub:` or `local-dir:` model name; for `timm:NAME[.TAG]`, a timm pretrained tag (`--pretrained lvd142m`)
or a checkpoint file (state dict, or Google's .npz); `none` for random weights drawn from a fixed seed (so
every process, and every resumed run, builds the same network). The weights' SHA-256 goes into the metadata.

A checkpoint file is read here, never by the libraries, and without running code from it (`read_weights`):
safetensors as they are, a torch.save state dict through torch.load(weights_only=True), .npz without pickled
arrays. A file that needs a full unpickle (TorchScript archives such as OpenAI's original CLIP .pt, pickled
modules) is refused unless the caller trusts it (`trust=True`, the CLI's --trust-pretrained).
"""
from __future__ import annotations

import difflib
import hashlib
import logging
import os
import pickle  # nosec B403
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..devices import autocast, resolve_device, resolve_precision
from ..specs import TokenSpec
from .preprocess import Preprocessing

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False

TIMM = "timm:"
# B105: the name of a token of a ViT, not a password
CLASS_TOKEN = "class token"  # nosec B105
MEAN_PATCH = "mean patch token"
CLS_CHOICES = (CLASS_TOKEN, MEAN_PATCH)
# timm modules whose models are ViTs this tool taps (blocks over one token sequence, forward_intermediates
# with prefix tokens split off): VisionTransformer and Eva, and the package's tiny test members of both
_TIMM_VIT_MODULES = ("vision_transformer", "eva", "tiny")


class BackboneError(ValueError):
    """A model name, weights source or setting that cannot be used; the message says why."""


@dataclass(frozen=True)
class Family:
    """A family of backbones and what each option of cachefeat does with it (`cachefeat models` prints these)."""
    name: str
    example: str          # a recommended model, as --model/--pretrained
    cls: str              # what the cache's `cls` holds
    prefix: str           # prefix tokens besides the class token
    text: bool            # a text tower: class-name embeddings, zeroshot, dist head=text
    tca: str              # EVL's temporal cross-attention (q/k rebuilt from the frozen blocks)
    extras: str = "-"     # the pip extra of cachefeat it needs beyond the base install, and for what


FAMILIES = (
    Family("open_clip ViT", "ViT-B-16 --pretrained laion2b_s34b_b88k", "class token (CLIPA: mean patch token)",
           "-", True, "yes"),
    Family("SigLIP / SigLIP2", "ViT-B-16-SigLIP2 --pretrained webli", "mean patch token (no class token)",
           "-", True, "yes", "siglip (text tokenizer)"),
    Family("EVA02-CLIP", "EVA02-B-16 --pretrained merged2b_s8b_b131k", "class token", "-", True,
           "yes (rotary q/k)"),
    Family("PE-Core", "PE-Core-B-16 --pretrained meta", "class token", "-", True, "yes (rotary q/k)"),
    Family("DINOv2 (timm)", "timm:vit_base_patch14_reg4_dinov2 --pretrained lvd142m", "class token",
           "4 registers, dropped", False, "yes"),
    Family("timm ViT", "timm:vit_base_patch16_224 --pretrained augreg_in21k", "class token (avg-pool models: "
           "mean patch token)", "as the model has", False, "yes (EVA/PE: rotary q/k)"),
)


def register_model_configs() -> None:
    """Make the package's own tiny models known to open_clip's factory (model_configs/*.json) and to timm's
    registry (tiny.py)."""
    global _registered
    if not _registered:
        import open_clip

        from . import tiny
        tiny.register()
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


# ------------------------------------------------------------------------------------------- names
def resolve_model_name(name: str) -> str:
    """`ViT-L/14` -> `ViT-L-14`, `ViT-L/14@336px` -> `ViT-L-14-336`; schemas (hf-hub:, local-dir:) pass through;
    `timm:ARCH` -> `timm:ARCH.TAG` with timm's default tag (the data config is the tag's). Unknown names raise
    BackboneError listing close matches."""
    import open_clip
    register_model_configs()
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    if name.startswith(TIMM):
        return _timm_name(name)
    cleaned = re.sub(r"@(\d+)px$", r"-\1", name.strip()).replace("/", "-")
    models = open_clip.list_models()
    if cleaned in models:
        return cleaned
    lower = {m.lower(): m for m in models}
    if cleaned.lower() in lower:
        return lower[cleaned.lower()]
    close = difflib.get_close_matches(cleaned, models, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `cachefeat models` lists them (or use timm:NAME)"
    raise BackboneError(f"unknown model {name!r}{hint}")


def timm_tags(arch: str) -> list[str]:
    """The pretrained tags timm registers for an architecture (its data configs; most also have weights)."""
    from timm.models import get_arch_pretrained_cfgs
    return [n.split(".", 1)[1] for n in get_arch_pretrained_cfgs(arch)]


def _timm_name(name: str, tag: str | None = None) -> str:
    """`timm:ARCH[.TAG]` checked against timm's registry -> `timm:ARCH.TAG` (`tag` given: that one, and the
    name's own must not differ; else the name's, else timm's default)."""
    import timm
    from timm.models import get_pretrained_cfg, is_model_in_modules
    arch, _, own = name[len(TIMM):].strip().partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        raise BackboneError(f"unknown timm model {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                             "; timm.list_models() lists them"))
    if not is_model_in_modules(arch, _TIMM_VIT_MODULES):
        raise BackboneError(f"timm:{arch} is not a plain ViT (cachefeat taps the blocks of a ViT's token "
                            f"sequence: timm's VisionTransformer and Eva models)")
    tags = timm_tags(arch)
    if tag and own and own != tag:
        raise BackboneError(f"--model {name} names the tag {own!r} and --pretrained the tag {tag!r}: give one")
    tag = tag or own
    if tag and tag not in tags:
        raise BackboneError(f"timm:{arch} has no pretrained tag {tag!r}; tags: {', '.join(tags) or 'none'}")
    if not tag:
        cfg = get_pretrained_cfg(arch)
        tag = cfg.tag if cfg is not None else ""
    return f"{TIMM}{arch}.{tag}" if tag else f"{TIMM}{arch}"


def open_clip_tower(name: str) -> str | None:
    """The kind of image tower an open_clip config name builds: "vit" (open_clip's own ViT), "timm" (a timm
    ViT trunk: SigLIP, EVA02, PE-Core, ...), or None (ResNets, ConvNeXt, hybrids: not tapped here)."""
    import open_clip
    from timm.models import is_model_in_modules
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        return None
    v = cfg.get("vision_cfg", {})
    if "timm_model_name" in v:
        return "timm" if is_model_in_modules(v["timm_model_name"], _TIMM_VIT_MODULES) else None
    return "vit" if isinstance(v.get("layers"), int) else None   # ResNets list stage depths


def config_family(show_all: bool = False) -> list[tuple[str, str, list[str]]]:
    """(name, family, pretrained tags) of every open_clip model this tool can use, read from the configs (nothing
    is built); without `show_all` only those with pretrained tags (the package's tiny test models only with it)."""
    import open_clip
    register_model_configs()
    out = []
    for name in open_clip.list_models():
        kind = open_clip_tower(name)
        tags = open_clip.list_pretrained_tags_by_model(name)
        if kind is None or not (tags or show_all) or (name.startswith("cachefeat-tiny") and not show_all):
            continue
        v = open_clip.get_model_config(name)["vision_cfg"]
        if kind == "vit":
            family = "open_clip ViT" + (", avg pool" if v.get("pool_type") == "avg" else "")
        else:
            trunk = v["timm_model_name"]
            family = ("PE-Core" if "pe_core" in trunk else "EVA02-CLIP" if "eva02" in trunk else
                      "EVA-CLIP" if "eva" in trunk else "SigLIP / SigLIP2" if "siglip" in trunk else "timm ViT trunk")
        out.append((name, family, tags))
    return out


def timm_models(pattern: str) -> list[tuple[str, list[str]]]:
    """(architecture, pretrained tags) of the timm ViTs matching `pattern` (fnmatch, e.g. '*dinov2*')."""
    import timm
    from timm.models import is_model_in_modules
    register_model_configs()
    return [(arch, timm_tags(arch)) for arch in timm.list_models(pattern)
            if is_model_in_modules(arch, _TIMM_VIT_MODULES)]


def _not_a_vit(name: str) -> BackboneError:
    return BackboneError(f"{name} is not a ViT (cachefeat taps transformer blocks); `cachefeat models` lists "
                         f"the families it can use")


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
    """Depth, width, heads, patch grid, embedding size and whether it has a text tower, of a model without
    loading weights (for --dry-run):
    an open_clip ViT from its config; a timm trunk built on the meta device (no memory, no weights). Schema
    names (hf-hub:, local-dir:) are built with random weights to find out."""
    import open_clip
    name = resolve_model_name(model)
    if name.startswith(("hf-hub:", "local-dir:")):
        b = load_backbone(name, "none", device="cpu")
        t, text = b.tower, b.has_text_tower
    elif name.startswith(TIMM):
        t, text = TimmViT(_create_timm(name[len(TIMM):], device="meta"), None), False
    else:
        kind = open_clip_tower(name)
        cfg = open_clip.get_model_config(name)
        v = cfg["vision_cfg"]
        if kind is None:
            raise _not_a_vit(name)
        if kind == "timm":
            import timm
            trunk = timm.create_model(v["timm_model_name"], pretrained=False, device="meta")
            g = TimmViT.geometry(trunk)
            return {"name": name, **g, "embed_dim": int(cfg["embed_dim"]), "text": "text_cfg" in cfg}
        size = v["image_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        patch = v["patch_size"]
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        width = int(v["width"])
        return {"name": name, "depth": int(v["layers"]), "width": width,
                "heads": width // int(v.get("head_width", 64)),
                "patch_grid": [size[0] // patch[0], size[1] // patch[1]], "embed_dim": int(cfg["embed_dim"]),
                "text": "text_cfg" in cfg}
    return {"name": name, "depth": t.depth, "width": t.width, "heads": t.heads, "patch_grid": list(t.patch_grid),
            "embed_dim": t.embed_dim, "text": text}


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the module's state dict (names, dtypes, shapes and bytes), in key order."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- towers
@dataclass
class AttentionQK:
    """How block i computes its attention q and k from its input tokens, as frozen tensors (float32, CPU):
    q, k = split(weight @ LayerNorm(x) + bias), per head; then rotated by `rope` (N patch positions x 2*head
    dim: sin then cos, timm's layout; "interleaved" or "half" pairing) where the tower uses rotary
    embeddings. EVL's temporal cross-attention recomputes them from cached block outputs."""
    norm_weight: torch.Tensor      # (D,)
    norm_bias: torch.Tensor        # (D,)
    eps: float
    weight: torch.Tensor           # (2D, D): q rows then k rows
    bias: torch.Tensor             # (2D,)
    heads: int
    rope: torch.Tensor | None = None
    rope_pairing: str | None = None


class Tower:
    """One family of image tower: its blocks and geometry, and its tapped forward. Subclasses set the
    attributes in __init__ and implement `run` and `attention_qk`."""
    family: str
    module: nn.Module               # what runs the forward (open_clip's model.visual, or the timm model)
    depth: int
    width: int
    heads: int
    patch_size: tuple[int, int]
    patch_grid: tuple[int, int]
    embed_dim: int
    class_token: bool               # the token sequence starts with a class token
    registers: int                  # prefix tokens after it (DINOv2's registers), dropped
    cls: str                        # what the cache's `cls` holds: CLASS_TOKEN or MEAN_PATCH
    rope: str | None = None         # rotary q/k embedding: None, "interleaved" or "half"

    def run(self, x: torch.Tensor, layers: list[int]):
        """Normalised images (B, 3, h, w) -> (prefix tokens per layer [(B, P, D)] or None, patch tokens per
        layer [(B, N, D)], pooled embedding (B, E))."""
        raise NotImplementedError

    def attention_qk(self, block: int) -> AttentionQK:
        raise NotImplementedError


class OpenClipViT(Tower):
    """open_clip's own VisionTransformer: one class token; CLIPA-style towers pool by average (their class
    token's output is never read by the head, so `cls` is the mean patch token there)."""

    def __init__(self, visual):
        self.family, self.module = "open_clip ViT", visual
        self.blocks = visual.transformer.resblocks
        self.depth, self.width = len(self.blocks), int(visual.transformer.width)
        self.heads = int(self.blocks[0].attn.num_heads)
        self.patch_size = tuple(int(p) for p in visual.patch_size)
        self.patch_grid = tuple(int(g) for g in visual.grid_size)
        self.embed_dim = int(visual.output_dim)
        self.class_token, self.registers = True, 0
        self.cls = MEAN_PATCH if getattr(visual, "pool_type", "tok") == "avg" else CLASS_TOKEN

    def run(self, x, layers):
        out = self.module.forward_intermediates(x, indices=list(layers), output_fmt="NLC", output_extra_tokens=True,
                                                normalize_intermediates=False)
        return out["image_intermediates_prefix"], out["image_intermediates"], out["image_features"]

    def attention_qk(self, block: int) -> AttentionQK:
        blk = self.blocks[block]
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None or attn.in_proj_bias is None:
            raise BackboneError(f"{self.family} block {block} does not use a packed q/k/v projection")
        d = self.width
        return AttentionQK(_cpu(blk.ln_1.weight), _cpu(blk.ln_1.bias), float(blk.ln_1.eps),
                           _cpu(attn.in_proj_weight[: 2 * d]), _cpu(attn.in_proj_bias[: 2 * d]), self.heads)


class TimmViT(Tower):
    """A timm VisionTransformer or Eva: bare (`timm:NAME`, embed = pre-logits features) or as the trunk of an
    open_clip tower (`wrapper` = open_clip's TimmModel, embed = its image features: pool/attention pool and
    projection, as encode_image). Prefix tokens: an optional class token, then registers."""

    def __init__(self, trunk, wrapper=None, family: str | None = None):
        self.trunk, self.wrapper = trunk, wrapper
        self.module = wrapper if wrapper is not None else trunk
        g = self.geometry(trunk)
        self.depth, self.width, self.heads = g["depth"], g["width"], g["heads"]
        self.patch_grid = tuple(g["patch_grid"])
        self.patch_size = tuple(int(p) for p in _pair(trunk.patch_embed.patch_size))
        self.class_token = getattr(trunk, "cls_token", None) is not None
        self.registers = int(trunk.num_prefix_tokens) - int(self.class_token)
        self.cls = CLASS_TOKEN if self.class_token and getattr(trunk, "global_pool", "token") != "avg" else MEAN_PATCH
        attn = trunk.blocks[0].attn
        if getattr(trunk, "rope", None) is not None:
            self.rope = "half" if getattr(attn, "rotate_half", False) else "interleaved"
        self.embed_dim = _pooled_width(trunk, wrapper)
        self.family = family or _timm_family(trunk, wrapper)

    @staticmethod
    def geometry(trunk) -> dict:
        if not hasattr(trunk, "blocks") or not hasattr(trunk, "forward_intermediates"):
            raise BackboneError(f"timm model {type(trunk).__name__} is not a plain ViT")
        return {"depth": len(trunk.blocks), "width": int(trunk.embed_dim), "heads": int(trunk.blocks[0].attn.num_heads),
                "patch_grid": [int(g) for g in trunk.patch_embed.grid_size]}

    def run(self, x, layers):
        has_prefix = self.trunk.num_prefix_tokens > 0
        if self.wrapper is not None:
            out = self.wrapper.forward_intermediates(x, indices=list(layers), output_fmt="NLC",
                                                     output_extra_tokens=has_prefix, normalize_intermediates=False)
            return out.get("image_intermediates_prefix"), out["image_intermediates"], out["image_features"]
        final, inter = self.trunk.forward_intermediates(x, indices=list(layers), return_prefix_tokens=has_prefix,
                                                        norm=False, output_fmt="NLC")
        prefix = [p for _, p in inter] if has_prefix else None
        patches = [t for t, _ in inter] if has_prefix else inter
        return prefix, patches, self.trunk.forward_head(final, pre_logits=True)

    def attention_qk(self, block: int) -> AttentionQK:
        blk = self.trunk.blocks[block]
        attn, norm = getattr(blk, "attn", None), getattr(blk, "norm1", None)
        where = f"{self.family} block {block}"
        if attn is None or not isinstance(norm, nn.LayerNorm):
            raise BackboneError(f"{where} has no LayerNorm-then-attention this tool can rebuild")
        if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity):
            raise BackboneError(f"{where} normalises q and k per head (qk_norm), which is not rebuilt")
        d = self.width
        if attn.num_heads * attn.head_dim != d or getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
            raise BackboneError(f"{where}: attention width differs from the token width (or grouped k/v heads)")
        if getattr(attn, "qkv", None) is not None:
            weight = attn.qkv.weight[: 2 * d]
            if attn.qkv.bias is not None:
                bias = attn.qkv.bias[: 2 * d]
            elif getattr(attn, "q_bias", None) is not None:        # EVA: q and v biases, k none
                bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias)])
            else:
                bias = torch.zeros(2 * d)
        else:                                                       # separate q/k/v projections (EVA02)
            weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight])
            bias = torch.cat([p.bias if p.bias is not None else torch.zeros(d) for p in (attn.q_proj, attn.k_proj)])
        rope = None
        if self.rope:
            if getattr(self.trunk, "rope_mixed", False) or not hasattr(self.trunk.rope, "feat_shape") or \
                    getattr(self.trunk, "dynamic_img_size", False):
                raise BackboneError(f"{where}: its rotary embedding varies by depth or image size (not rebuilt)")
            rope = _cpu(self.trunk.rope.get_embed())
        return AttentionQK(_cpu(norm.weight), _cpu(norm.bias), float(norm.eps), _cpu(weight), _cpu(bias),
                           self.heads, rope, self.rope)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).clone()


def _pair(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _pooled_width(trunk, wrapper) -> int:
    """Width of the pooled embedding: the last projection of open_clip's head, else timm's classifier when
    open_clip kept it as the projection, else the trunk's pre-logits width."""
    if wrapper is not None:
        linears = [m for m in wrapper.head.modules() if isinstance(m, nn.Linear)]
        if linears:
            return int(linears[-1].out_features)
        if isinstance(trunk.head, nn.Linear):
            return int(trunk.head.out_features)
    return int(getattr(trunk, "head_hidden_size", trunk.num_features))


def _timm_family(trunk, wrapper) -> str:
    from timm.layers import AttentionRope
    from timm.models.eva import Eva
    attn = trunk.blocks[0].attn
    if wrapper is not None:
        if isinstance(trunk, Eva):
            return "PE-Core" if isinstance(attn, AttentionRope) else "EVA02-CLIP"
        return "SigLIP / SigLIP2" if getattr(trunk, "cls_token", None) is None else "open_clip timm ViT"
    if isinstance(trunk, Eva):
        return "timm EVA"
    return "DINOv2 (timm)" if trunk.num_prefix_tokens > 1 else "timm ViT"


def _tower_of(visual, name: str) -> Tower:
    """The Tower for an open_clip model's image tower, or BackboneError (after building: hf-hub:/local-dir:)."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    if isinstance(visual, OpenClipVisionTransformer):
        return OpenClipViT(visual)
    if isinstance(visual, TimmModel) and isinstance(visual.trunk, (VisionTransformer, Eva)):
        return TimmViT(visual.trunk, visual)
    raise _not_a_vit(name)


# ------------------------------------------------------------------------------------------- the backbone
@dataclass
class Backbone:
    model: torch.nn.Module          # the whole model: open_clip's (text tower kept on CPU) or the timm model
    tower: Tower
    name: str
    pretrained: str                 # tag, checkpoint path, or "none"
    init_seed: int | None
    quick_gelu: bool
    device: torch.device
    precision: str
    preprocessing: Preprocessing
    weights_sha256: str
    cls: str = CLASS_TOKEN          # what `cls` holds (the tower's choice; a cache's recorded one when rebuilt)

    def __post_init__(self):
        if self.cls not in CLS_CHOICES or (self.cls == CLASS_TOKEN and not self.tower.class_token):
            raise BackboneError(f"{self.name}: cls {self.cls!r} cannot be computed (tower has "
                                f"{'a' if self.tower.class_token else 'no'} class token)")

    @property
    def visual(self):
        return self.tower.module

    @property
    def depth(self) -> int:
        return self.tower.depth

    @property
    def width(self) -> int:
        return self.tower.width

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.tower.patch_grid

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.tower.patch_size

    @property
    def embed_dim(self) -> int:
        return self.tower.embed_dim

    def describe(self) -> dict:
        """The metadata that identifies this feature space (goes into the cache attrs)."""
        import open_clip
        import timm
        t = self.tower
        return {
            "name": self.name, "pretrained": self.pretrained, "init_seed": self.init_seed,
            "quick_gelu": self.quick_gelu, "weights_sha256": self.weights_sha256,
            "open_clip_version": open_clip.__version__, "timm_version": timm.__version__,
            "torch_version": torch.__version__,
            "image_size": list(self.preprocessing.size), "patch_size": list(self.patch_size),
            "patch_grid": list(self.patch_grid), "width": self.width, "depth": self.depth,
            "embed_dim": self.embed_dim, "heads": t.heads, "family": t.family, "cls": self.cls,
            "class_token": t.class_token, "register_tokens": t.registers, "rope": t.rope,
            "text_tower": self.has_text_tower,
        }

    # -- the text tower (stays on the CPU: it runs once per class list)
    @property
    def has_text_tower(self) -> bool:
        return hasattr(self.model, "encode_text") and (hasattr(self.model, "text") or
                                                       hasattr(self.model, "token_embedding"))

    def tokenizer(self):
        """open_clip's tokenizer for this model (loaded once); BackboneError in one line when it cannot load."""
        import open_clip
        if getattr(self, "_tokenizer", None) is None:
            try:
                self._tokenizer = open_clip.get_tokenizer(self.name)
            except ModuleNotFoundError as e:   # SigLIP's and others' Hugging Face tokenizers need transformers
                raise BackboneError(f"the text tokenizer of {self.name} needs the package {e.name}: pip install "
                                    f"'cachefeat[siglip]' (or make install EXTRAS=siglip), or extract with --no-text "
                                    f"(no class-name embeddings)") from None
            except Exception as e:   # e.g. offline, with the tokenizer not in the Hugging Face cache
                raise BackboneError(f"could not load the text tokenizer of {self.name}: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''} (offline: HF_HUB_OFFLINE=1 with "
                                    f"the tokenizer in the Hugging Face cache, see docs/backbones.md; --no-text "
                                    f"extracts without class-name embeddings)") from None
        return self._tokenizer

    @torch.inference_mode()
    def text_embeddings(self, prompts: list[str], batch_size: int = 256) -> np.ndarray:
        """`encode_text` of each prompt (not L2-normalised), float32 (len(prompts), E)."""
        tokenizer = self.tokenizer()
        out = [self.model.encode_text(tokenizer(prompts[i:i + batch_size])).float()
               for i in range(0, len(prompts), batch_size)]
        return torch.cat(out).numpy()

    # -- what adapters rebuild from the frozen blocks
    def attention_qk(self, block: int) -> AttentionQK:
        return self.tower.attention_qk(block)

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
            prefix, patches, embed = self.tower.run(x, layers)
        if self.cls == CLASS_TOKEN:
            cls = torch.stack([p[:, 0] for p in prefix], dim=1)
        else:
            cls = torch.stack([p.float().mean(dim=1) for p in patches], dim=1)
        res = {"cls": cls, "embed": embed}
        if tokens.kind != "cls":
            patches = torch.stack(patches, dim=1)  # (B, L, N, D)
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


# ------------------------------------------------------------------------------------------- loading
def load_backbone(model: str, pretrained: str | None = "none", device: str = "auto", precision: str = "auto",
                  seed: int = 0, quick_gelu: bool | None = None, cache_dir: str | None = None,
                  cls: str | None = None, trust_pretrained: bool = False) -> Backbone:
    """Build a frozen backbone. open_clip names: `pretrained` a tag (e.g. openai, laion2b_s34b_b88k), a
    checkpoint path, or none/None for random weights from `seed`; names may be hf-hub:ORG/REPO or
    local-dir:PATH. `timm:ARCH[.TAG]`: `pretrained` a timm tag of ARCH, a checkpoint path, or none. `cls`:
    what `cls` holds (default: the tower's own choice, see the module doc). `trust_pretrained`: a checkpoint
    file that needs a full unpickle is loaded (running any code it holds) instead of refused (read_weights)."""
    register_model_configs()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev, gpu_auto="fp16")
    pre = "none" if pretrained in (None, "", "none", "None") else pretrained
    if model.startswith(TIMM):
        whole, tower, name, prep, qg, seeded = _load_timm(model, pre, seed, cache_dir, trust_pretrained)
    else:
        whole, tower, name, prep, qg, seeded = _load_open_clip(model, pre, seed, quick_gelu, cache_dir,
                                                               trust_pretrained)
    whole.eval().requires_grad_(False)
    digest = weights_digest(tower.module)
    tower.module.to(dev)
    return Backbone(model=whole, tower=tower, name=name, pretrained=pre, init_seed=seed if seeded else None,
                    quick_gelu=qg, device=dev, precision=prec, preprocessing=prep, weights_sha256=digest,
                    cls=cls or tower.cls)


def _quiet_build(build, name: str, pre: str, remote: bool):
    """Run `build()` with the root logger quiet (the libraries log "no pretrained weights" for random init);
    its failures become one-line BackboneErrors."""
    prev = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        return build()
    except BackboneError:
        raise
    except Exception as e:
        where = "its pretrained weights" if remote else "it"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        msg = " ".join(lines[:2])[:300] if lines and lines[0].endswith(":") else (lines[0] if lines else "")
        hint = "" if pre == "none" else (" (weights for another model?)" if os.path.isfile(pre) else
                                         " (no network? pass a local checkpoint path to --pretrained)")
        raise BackboneError(f"could not build {name} with {where}: {type(e).__name__}: {msg}{hint}") from None
    finally:
        logging.getLogger().setLevel(prev)


# ------------------------------------------------------------------------------------------- weights files
TRUST_FLAG = "--trust-pretrained"
# where a checkpoint dict keeps its state dict, first match wins: open_clip's training checkpoints, and timm's
# (the EMA weights first, as timm's own loader takes them)
OPEN_CLIP_CONTAINERS = ("state_dict",)
TIMM_CONTAINERS = ("state_dict_ema", "model_ema", "state_dict", "model")
_JIT_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size")   # OpenAI's TorchScript CLIP attributes
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")                             # DDP and torch.compile


def _file_kind(path: str) -> str | None:
    """"torchscript" (a TorchScript archive: it holds code), "torch" (a torch.save file: a zip archive, or a
    legacy file, which starts with a pickle), or None (neither)."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return None
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "torch" if any(n.endswith("/data.pkl") for n in names) else None
    with open(path, "rb") as f:
        return "torch" if f.read(1) == b"\x80" else None


def _needs_trust(path: str, what: str) -> BackboneError:
    return BackboneError(f"--pretrained {path}: {what}, which only a full unpickle can load, and that runs any code "
                         f"the file holds; pass {TRUST_FLAG} if you trust the file, or load it once where you trust "
                         f"it and save its state dict as .safetensors")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def read_weights(path: str, trust: bool = False, containers: tuple[str, ...] = OPEN_CLIP_CONTAINERS
                 ) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file, on the CPU, read without running code from it: .safetensors as
    they are; a torch.save file through torch.load(weights_only=True) (a checkpoint dict's first entry of
    `containers` that holds a dict is the state dict; DDP/compile prefixes are removed). A file that needs a
    full unpickle (a TorchScript archive, a pickled module, any object torch's restricted unpickler refuses)
    raises BackboneError naming --trust-pretrained, unless `trust`: it is then loaded in full, as open_clip
    and timm would, which runs whatever code it holds. `.npz` files: check_npz."""
    where = f"--pretrained {path}"
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise BackboneError(f"{where}: not a readable safetensors file ({_first_line(e)})") from None
    kind = _file_kind(path)
    if kind is None:
        raise BackboneError(f"{where}: not a weights file (expected .safetensors, a torch.save state dict or .npz)")
    ckpt = None
    if kind == "torch":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            if not trust:
                raise _needs_trust(path, "it holds pickled objects besides tensors (a pickled module?)") from None
        except Exception as e:   # a damaged or cut-off archive: torch raises RuntimeError, EOFError, ...
            raise BackboneError(f"{where}: cannot be read as a torch.save file ({_first_line(e)})") from None
    elif not trust:
        raise _needs_trust(path, "it is a TorchScript archive (such as OpenAI's original CLIP .pt files)")
    if ckpt is None:   # trusted by the caller: the libraries' own full load
        try:
            if kind == "torchscript":
                ckpt = torch.jit.load(path, map_location="cpu")
            else:
                # B614: the user passed --trust-pretrained
                ckpt = torch.load(path, map_location="cpu", weights_only=False)  # nosec B614
        except Exception as e:
            raise BackboneError(f"{where}: cannot be loaded, even in full ({_first_line(e)})") from None
    if isinstance(ckpt, nn.Module):
        ckpt = ckpt.state_dict()
        for key in _JIT_NOT_WEIGHTS if kind == "torchscript" else ():
            ckpt.pop(key, None)
    if isinstance(ckpt, dict):
        ckpt = next((ckpt[k] for k in containers if isinstance(ckpt.get(k), dict)), ckpt)
    if not isinstance(ckpt, dict) or not ckpt or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.items()):
        raise BackboneError(f"{where}: holds no state dict (a mapping of parameter names to tensors"
                            + (f", or one under {' or '.join(repr(k) for k in containers)})" if containers else ")"))
    out = {}
    for k, v in ckpt.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def check_npz(path: str) -> None:
    """Refuse an .npz that is not one, or whose arrays would need unpickling (object arrays): every array is
    read with allow_pickle=False. The libraries' own .npz loaders (Google's big_vision / JAX layout) then read
    it, also without pickle."""
    try:
        w = np.load(path, allow_pickle=False)
        if not isinstance(w, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with w:
            for k in w.files:
                w[k]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:   # object arrays: ValueError
        raise BackboneError(f"--pretrained {path}: not an .npz of plain arrays ({_first_line(e)})") from None


def _open_clip_weights(model, path: str, state: dict | None) -> None:
    """Load weights read by read_weights into an open_clip model as open_clip.load_checkpoint does (its
    steps after reading the file, the same in open_clip 2.32 to 3.3); state None: an .npz checked by
    check_npz, through open_clip's big_vision converter."""
    if state is None:
        from open_clip.convert import load_big_vision_weights
        load_big_vision_weights(model, path)
        return
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed
    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        if key in state and getattr(model, key, None) is not None and getattr(model, key).ndim != state[key].ndim:
            state[key] = state[key].reshape(getattr(model, key).shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    # a TorchScript archive also holds the model's non-persistent buffers (attn_mask): not weights
    transient = {n for n, _ in model.named_buffers()} - model.state_dict().keys()
    state = {k: v for k, v in state.items() if k not in transient}
    position_ids = "text.transformer.embeddings.position_ids"
    if position_ids in state and not hasattr(model, position_ids):
        del state[position_ids]
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def _load_open_clip(model: str, pre: str, seed: int, quick_gelu: bool | None, cache_dir: str | None,
                    trust: bool = False):
    import open_clip
    name = resolve_model_name(model)
    force_qg = bool(quick_gelu)
    schema = name.startswith(("hf-hub:", "local-dir:"))
    is_file = not schema and pre != "none" and os.path.isfile(pre)
    if not schema:
        if open_clip_tower(name) is None:
            raise _not_a_vit(name)
        if pre != "none" and not is_file:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pre not in tags:
                raise BackboneError(f"--pretrained {pre!r} is neither a file nor a known tag for {name}; "
                                    f"tags: {', '.join(tags) or 'none'}")
            if quick_gelu is None:
                name, force_qg = _pick_quickgelu(name, pre)
    state = None
    if is_file:   # read here, not by open_clip: see read_weights
        if pre.endswith(".npz"):
            check_npz(pre)
        else:
            state = read_weights(pre, trust, OPEN_CLIP_CONTAINERS)
    kwargs = dict(force_quick_gelu=force_qg, device="cpu", precision="fp32")
    if cache_dir:
        kwargs["cache_dir"] = cache_dir

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if schema:   # open_clip reads a local-dir: checkpoint with torch.load(weights_only=True): its
                return open_clip.create_model(name, **kwargs)   # default (load_weights_only in 2.32)
            if is_file:
                clip = open_clip.create_model(name, pretrained=None, **kwargs)
                _open_clip_weights(clip, pre, state)
                return clip
            return open_clip.create_model(name, pretrained=None if pre == "none" else pre,
                                          require_pretrained=pre != "none", **kwargs)

    clip = _quiet_build(build, name, pre, remote=pre != "none" or schema)
    tower = _tower_of(clip.visual, name)
    qg = bool(force_qg or name.endswith("-quickgelu") or
              (not schema and open_clip.get_model_config(name).get("quick_gelu", False)))
    prep = Preprocessing.from_open_clip(dict(clip.visual.preprocess_cfg))
    return clip, tower, name, prep, qg, pre == "none" and not schema


def _create_timm(arch_tag: str, **kwargs):
    import timm
    return timm.create_model(arch_tag, num_classes=0, **kwargs)


def _load_timm(model: str, pre: str, seed: int, cache_dir: str | None, trust: bool = False):
    """`timm:ARCH[.TAG]` -> the timm model (classifier removed: the embedding is its pre-logits features)."""
    from timm.data import resolve_model_data_config
    register_model_configs()
    is_file = pre != "none" and os.path.isfile(pre)
    name = _timm_name(model, None if pre == "none" or is_file else pre)
    arch_tag = name[len(TIMM):]
    kwargs = {}
    if is_file:       # the tag's data config, weights from the file through timm's filter (read here: read_weights)
        if pre.endswith(".npz"):    # Google's format: timm's own loader of it
            check_npz(pre)
            overlay = dict(file=os.path.abspath(pre), custom_load=True)
        else:
            overlay = dict(state_dict=read_weights(pre, trust, TIMM_CONTAINERS))
        kwargs = dict(pretrained=True, pretrained_cfg_overlay=overlay)
    elif pre != "none":
        kwargs = dict(pretrained=True, cache_dir=cache_dir) if cache_dir else dict(pretrained=True)

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _create_timm(arch_tag, **kwargs)

    net = _quiet_build(build, name, pre, remote=pre != "none")
    for cfg in (getattr(net, "pretrained_cfg", None), getattr(net, "default_cfg", None)):
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)     # timm keeps the overlay: a second copy of the weights
    tower = TimmViT(net, None)
    prep = Preprocessing.from_timm(resolve_model_data_config(net))
    return net, tower, name, prep, False, pre == "none"
