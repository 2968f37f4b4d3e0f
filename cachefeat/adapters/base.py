"""The adapter interface: what an adapter needs from a cache, the feature space it is built for, and the
checks that refuse a cache which cannot provide it.

An adapter is an nn.Module with a `Config` dataclass (every setting with its default in plain sight), a
class method `needs(config, spec) -> Needs` naming the arrays it reads (layers, CLS or patch tokens,
pixels, text), and `forward(batch) -> logits`. A batch is a dict of float tensors with the clip axis first
and time second:
    embed  (B, T, E)          encode_image output per frame
    cls    (B, T, L, D)       class token of the `needs.cls_layers`, in that order
    tokens (B, T, L', N, D)   patch tokens of the `needs.token_layers`, in that order
    pixels (B, T*K, S, S, 3)  small frames, already normalised with the model's mean/std
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn as nn

from ..specs import TokenSpec


class AdapterError(ValueError):
    """An unknown adapter, a bad adapter option, or a cache an adapter cannot use (one line)."""


class CacheMismatch(AdapterError):
    """A cache that cannot provide what an adapter (or a trained checkpoint) needs."""


@dataclass(frozen=True)
class FeatureSpec:
    """The shape of the feature space an adapter is built for, read from a cache's metadata. A checkpoint
    keeps the metadata of its training cache, so eval and predict rebuild the same adapter."""
    num_classes: int
    frames: int
    width: int
    embed_dim: int
    depth: int
    heads: int
    layers: tuple[int, ...]           # blocks the cache tapped
    tokens: TokenSpec                 # what it kept of each tapped layer
    patch_grid: tuple[int, int]       # the model's patch grid
    pixels: dict | None = None        # {"size": S, "factor": K} when the cache holds `pixels`
    has_text: bool = False            # `text/embed` present
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rope: str | None = None           # the blocks rotate q/k (EVA02, PE-Core): "interleaved" or "half"

    @classmethod
    def from_meta(cls, meta: dict) -> FeatureSpec:
        model, lay, prep = meta["model"], meta["layout"], meta["preprocessing"]
        return cls(num_classes=len(meta.get("classes") or []), frames=int(lay["frames"]), width=int(lay["width"]),
                   embed_dim=int(lay["embed_dim"]), depth=int(model["depth"]), heads=int(model["heads"]),
                   layers=tuple(lay["layers"]), tokens=TokenSpec.from_dict(lay["tokens"]),
                   patch_grid=tuple(model["patch_grid"]), pixels=meta.get("pixels") or None,
                   has_text=bool(meta.get("text")), mean=tuple(prep["mean"]), std=tuple(prep["std"]),
                   rope=model.get("rope"))

    @property
    def token_grid(self) -> tuple[int, int] | None:
        return self.tokens.grid


@dataclass(frozen=True)
class Needs:
    """The arrays an adapter reads for every clip (plus what it needs once, at construction)."""
    embed: bool = False
    cls_layers: tuple[int, ...] = ()
    token_layers: tuple[int, ...] = ()
    pixels: bool = False
    text: bool = False                # class-name text embeddings (read once into the adapter)
    backbone_weights: bool = False    # frozen backbone weights (rebuilt from the cache metadata)

    def describe(self) -> str:
        parts = []
        if self.embed:
            parts.append("final embedding")
        if self.cls_layers:
            parts.append(f"CLS of layers {list(self.cls_layers)}")
        if self.token_layers:
            parts.append(f"patch tokens of layers {list(self.token_layers)}")
        if self.pixels:
            parts.append("pixels")
        if self.text:
            parts.append("class-name text embeddings")
        if self.backbone_weights:
            parts.append("frozen block weights")
        return ", ".join(parts) or "nothing"

    def problems(self, adapter: str, meta: dict, trained: FeatureSpec | None = None) -> list[str]:
        """Why a cache (its metadata) cannot feed these needs; empty when it can. With `trained` (the spec an
        adapter was built for), the cache must also have the same shapes: frames, token grid, pixel size."""
        problems = []
        layers = list(meta["layers"])
        tokens = TokenSpec.from_dict(meta["tokens"])
        want = sorted(set(self.cls_layers) | set(self.token_layers))
        missing = [l for l in want if l not in layers]
        if missing:
            problems.append(f"{adapter} needs layers {missing}, but the cache holds layers {_short_list(layers)} "
                            f"(extract with --layers including them)")
        if self.token_layers and tokens.kind == "cls":
            problems.append(f"{adapter} needs patch tokens, but the cache has CLS tokens only "
                            f"(extract with --tokens all or pooled:HxW)")
        if self.pixels and not meta.get("pixels"):
            problems.append(f"{adapter} needs the cached pixels, but the cache has none (extract with --pixels)")
        if self.text and not meta.get("text"):
            if meta.get("model", {}).get("text_tower") is False:
                problems.append(f"{adapter} needs class-name text embeddings, but {meta['model']['name']} has no "
                                f"text tower (image-only; use a linear head)")
            else:
                problems.append(f"{adapter} needs class-name text embeddings (text/embed), but the cache has none "
                                f"(needs a model with a text tower and a class list)")
        if trained is not None:
            if int(meta["frames"]) != trained.frames:
                problems.append(f"the adapter was trained on {trained.frames} frames per clip, "
                                f"this cache has {meta['frames']}")
            if self.token_layers and tokens.kind != "cls" and tuple(tokens.grid) != tuple(trained.tokens.grid):
                problems.append(f"the adapter was trained on tokens {trained.tokens}, this cache has tokens {tokens}")
            if self.pixels and meta.get("pixels") and _pix(meta["pixels"]) != _pix(trained.pixels):
                problems.append(f"the adapter was trained on pixels {_pix(trained.pixels)}, "
                                f"this cache has {_pix(meta['pixels'])}")
        return problems

    def bytes_per_clip(self, meta: dict) -> int:
        """Bytes one clip of the arrays read takes in memory (int8 caches are dequantized to float16)."""
        lay = meta["layout"]
        item = 4 if lay["dtype"] == "float32" else 2
        T, D = int(lay["frames"]), int(lay["width"])
        n = (T * int(lay["embed_dim"]) if self.embed else 0) + T * len(self.cls_layers) * D
        n += T * len(self.token_layers) * TokenSpec.from_dict(lay["tokens"]).num_patch_tokens * D
        total = n * item
        if self.pixels:
            p = meta["pixels"]
            total += T * int(p["factor"]) * int(p["size"]) ** 2 * 3
        return total


def _pix(p: dict | None) -> str:
    return "none" if not p else f"{p['size']}x{p['size']} at {p['factor']}x frames"


def _short_list(xs: list[int]) -> str:
    if len(xs) > 3 and xs == list(range(xs[0], xs[-1] + 1)):
        return f"{xs[0]}..{xs[-1]}"
    return str(xs)


def select_layers(adapter: str, spec_str: str, spec: FeatureSpec) -> list[int]:
    """`cached` (every layer the cache holds), `all` (every block of the model), `last:K` or `i,j,k`."""
    from ..specs import SpecError, parse_layers
    if spec_str.strip().lower() == "cached":
        return list(spec.layers)
    try:
        return parse_layers(spec_str, spec.depth)
    except SpecError as e:
        raise AdapterError(f"{adapter}: layers {str(e).split(': ', 1)[-1]}") from None


class Adapter(nn.Module):
    """Base class. Subclasses set `name`, `summary`, `Config`, and implement `needs` and `forward`."""
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    reads: ClassVar[str] = ""          # what it needs from a cache, in words (for `cachefeat adapters`)
    Config: ClassVar[type] = object

    def __init__(self, config, spec: FeatureSpec):
        super().__init__()
        self.config = config
        self.spec = spec

    @classmethod
    def needs(cls, config, spec: FeatureSpec) -> Needs:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # -- what some adapters need once, at construction (saved in their state dict as buffers)
    def set_text(self, text: torch.Tensor) -> None:
        """Class-name text embeddings (num_classes, E), for adapters whose needs include text."""

    def set_backbone(self, backbone) -> None:
        """The frozen backbone (extract.backbone.Backbone, rebuilt from the cache metadata), for adapters whose
        needs include backbone weights: they take what they need from it (e.g. `attention_qk(block)`)."""

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay besides biases and norms (queries, position embeddings)."""
        return set()


def config_fields(config_cls) -> list:
    return list(fields(config_cls))
