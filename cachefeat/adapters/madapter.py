"""`madapter`: M-adapter (Li et al., CVIU 249:104150, 2024): a parallel branch built from hierarchically
combined multi-level output adapters, each "a fusion module and a temporal module".

Only the abstract and highlights of the paper could be read (no code, no full text: see
../shared/reference/adapters.md section 3), so the internals are our design, and each choice below is the
one that won an ablation on the synthetic temporal sets (`benchmarks/run.py --sections madapter`; the
result file and the table are in docs/adapters.md):
  - levels (`levels`): the layers read are split into groups of consecutive blocks, shallow to deep;
  - fusion module of a level (`fusion`): `weighted`, a learnt softmax-weighted sum of the group's layer
    outputs, then LayerNorm and a linear map to the branch width; or `concat`, each layer its own
    LayerNorm and linear map, summed (a linear map of the concatenation). The result is added into the
    branch state (the first level starts the branch);
  - temporal module of a level (`temporal`): `attn`, the shared temporal block (depthwise temporal conv,
    self-attention over time, MLP); `conv`, a depthwise temporal conv and an MLP (no attention); `mlp`, an
    MLP only (frame order then enters only through the position embedding: the ablation's floor);
  - hierarchy (`combine`): `chain`, levels in sequence shallow -> deep, each refining what the shallower
    ones built; or `parallel`, each level its own branch from its own layers, averaged before the head;
  - head: LayerNorm, mean over tokens and time, linear.
`tokens=cls` reads the class token of each layer per frame (18 KiB per frame for all 12 layers of
B/16, so every layer can be cached); `tokens=patch` adds the patch tokens (then the temporal module runs
at every token position and spatial mixing is left to the frozen backbone).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .base import Adapter, AdapterError, FeatureSpec, Needs, select_layers
from .blocks import LinearHead, Mlp, TemporalBlock, TemporalConv, default_heads, init_weights
from .registry import register

FUSIONS = ("weighted", "concat")
TEMPORALS = ("attn", "conv", "mlp")
COMBINES = ("chain", "parallel")


class Fusion(nn.Module):
    """Merge one level's backbone outputs (B, T, M, g, D) into the branch (B, T, M, dim)."""

    def __init__(self, group: int, width: int, dim: int, kind: str = "weighted"):
        super().__init__()
        self.kind = kind
        if kind == "weighted":
            self.mix = nn.Parameter(torch.zeros(group))
            self.norm = nn.LayerNorm(width)
            self.proj = nn.Linear(width, dim)
        else:   # concat: a LayerNorm and a linear map per layer, summed
            self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(group))
            self.projs = nn.ModuleList(nn.Linear(width, dim, bias=i == 0) for i in range(group))

    def forward(self, branch: torch.Tensor | None, feats: torch.Tensor) -> torch.Tensor:
        if self.kind == "weighted":
            z = (feats * self.mix.softmax(0).view(-1, 1)).sum(dim=-2)
            u = self.proj(self.norm(z))
        else:
            u = sum(p(n(feats[..., i, :])) for i, (n, p) in enumerate(zip(self.norms, self.projs)))
        return u if branch is None else branch + u


class ConvTemporal(nn.Module):
    """Depthwise temporal conv (residual) and an MLP, no attention: x (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, kernel: int, mlp_ratio: float, dropout: float, conv: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if conv else None
        self.conv = TemporalConv(dim, kernel) if conv else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=dropout, act=nn.GELU)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = x + self.conv(self.norm1(x))
        return x + self.drop(self.mlp(self.norm2(x)))


@register
class MAdapter(Adapter):
    name = "madapter"
    summary = "M-adapter: per-level fusion + temporal modules over multi-level outputs, chained shallow to deep"
    reads = "CLS of every layer read (tokens=patch: and their patch tokens)"

    @dataclass(frozen=True)
    class Config:
        layers: str = "cached"   # cached (every layer in the cache), all, last:K or i,j,k
        levels: int = 4          # M-adapters, each over a group of consecutive layers
        tokens: str = "cls"      # cls, or patch (class + patch tokens)
        fusion: str = "weighted"  # weighted (softmax over the level's layers) or concat (a map per layer)
        temporal: str = "attn"   # attn (conv + self-attention + MLP), conv (conv + MLP) or mlp
        combine: str = "chain"   # chain (levels in sequence, shallow -> deep) or parallel (averaged)
        dim: int = 256           # branch width
        heads: int = 0           # 0 = dim // 64
        mlp_ratio: float = 4.0
        conv_kernel: int = 3     # depthwise temporal conv in each temporal module (0 = none)
        dropout: float = 0.1
        head_dropout: float = 0.0

    @classmethod
    def needs(cls, config, spec: FeatureSpec) -> Needs:
        for key, allowed in (("tokens", ("cls", "patch")), ("fusion", FUSIONS), ("temporal", TEMPORALS),
                             ("combine", COMBINES)):
            if getattr(config, key) not in allowed:
                raise AdapterError(f"madapter: {key}={getattr(config, key)!r}: expected {' or '.join(allowed)}")
        if config.levels < 1:
            raise AdapterError("madapter: levels must be at least 1")
        if config.temporal == "conv" and config.conv_kernel < 1:
            raise AdapterError("madapter: temporal=conv needs conv_kernel >= 1")
        layers = select_layers("madapter", config.layers, spec)
        return Needs(cls_layers=tuple(layers), token_layers=tuple(layers) if config.tokens == "patch" else ())

    def __init__(self, config, spec: FeatureSpec):
        super().__init__(config, spec)
        layers = list(self.needs(config, spec).cls_layers)
        groups = [g for g in np.array_split(np.arange(len(layers)), min(config.levels, len(layers)))]
        self.groups = [(int(g[0]), int(g[-1]) + 1) for g in groups]   # slices into the layer axis
        dim, heads = config.dim, config.heads or default_heads(config.dim)
        self.fusion = nn.ModuleList(Fusion(b - a, spec.width, dim, config.fusion) for a, b in self.groups)
        self.temporal = nn.ModuleList(self._temporal_module(config, dim, heads) for _ in self.groups)
        self.pos = nn.Parameter(torch.zeros(1, spec.frames, 1, dim))
        self.head = LinearHead(dim, spec.num_classes, config.head_dropout)
        init_weights(self)
        nn.init.trunc_normal_(self.pos, std=0.02)

    @staticmethod
    def _temporal_module(config, dim: int, heads: int) -> nn.Module:
        if config.temporal == "attn":
            return TemporalBlock(dim, heads, config.mlp_ratio, config.dropout, config.conv_kernel)
        return ConvTemporal(dim, config.conv_kernel, config.mlp_ratio, config.dropout, conv=config.temporal == "conv")

    def no_weight_decay(self) -> set[str]:
        return {"pos"} | {f"fusion.{i}.mix" for i in range(len(self.groups))}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["cls"].unsqueeze(2)                                       # (B, T, 1, L, D)
        if self.config.tokens == "patch":
            x = torch.cat([x, batch["tokens"].transpose(2, 3)], dim=2)      # (B, T, 1+N, L, D)
        B, T, M = x.shape[:3]
        chain = self.config.combine == "chain"
        h, outs = None, []
        for i, ((a, b), fuse, temporal) in enumerate(zip(self.groups, self.fusion, self.temporal)):
            h = fuse(h if chain else None, x[..., a:b, :])
            if i == 0 or not chain:
                h = h + self.pos                                            # frame order enters each branch once
            seq = h.permute(0, 2, 1, 3).reshape(B * M, T, -1)                # time sequences per token
            h = temporal(seq).view(B, M, T, -1).permute(0, 2, 1, 3)
            outs.append(h)
        h = h if chain else torch.stack(outs).mean(0)
        return self.head(h.mean(dim=(1, 2)))
