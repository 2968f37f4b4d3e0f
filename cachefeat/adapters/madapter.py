"""`madapter`: M-adapter (Li et al., CVIU 249:104150, 2024): a parallel branch built from hierarchically
combined multi-level output adapters, each "a fusion module and a temporal module".

Only the abstract and highlights of the paper could be read (no code, no full text: see
../shared/reference/adapters.md section 3), so the internals are our reading of it:
  - levels: the layers read are split into `levels` groups of consecutive blocks, shallow to deep;
  - fusion module of a level: a learnt softmax-weighted sum of that group's layer outputs, LayerNorm and a
    linear map to the branch width, added into the branch state (the first level starts the branch);
  - temporal module: the shared temporal block (depthwise temporal conv + self-attention over time +
    MLP) at every token position;
  - levels are chained shallow -> deep, so each level refines what the shallower ones built;
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
from .blocks import LinearHead, TemporalBlock, default_heads, init_weights
from .registry import register


class Fusion(nn.Module):
    """Merge one level's backbone outputs (B, T, M, g, D) into the branch (B, T, M, dim)."""

    def __init__(self, group: int, width: int, dim: int):
        super().__init__()
        self.mix = nn.Parameter(torch.zeros(group))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, dim)

    def forward(self, branch: torch.Tensor | None, feats: torch.Tensor) -> torch.Tensor:
        z = (feats * self.mix.softmax(0).view(-1, 1)).sum(dim=-2)
        u = self.proj(self.norm(z))
        return u if branch is None else branch + u


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
        dim: int = 256           # branch width
        heads: int = 0           # 0 = dim // 64
        mlp_ratio: float = 4.0
        conv_kernel: int = 3     # depthwise temporal conv in each temporal module (0 = none)
        dropout: float = 0.1
        head_dropout: float = 0.0

    @classmethod
    def needs(cls, config, spec: FeatureSpec) -> Needs:
        if config.tokens not in ("cls", "patch"):
            raise AdapterError(f"madapter: tokens={config.tokens!r}: expected cls or patch")
        if config.levels < 1:
            raise AdapterError("madapter: levels must be at least 1")
        layers = select_layers("madapter", config.layers, spec)
        return Needs(cls_layers=tuple(layers), token_layers=tuple(layers) if config.tokens == "patch" else ())

    def __init__(self, config, spec: FeatureSpec):
        super().__init__(config, spec)
        layers = list(self.needs(config, spec).cls_layers)
        groups = [g for g in np.array_split(np.arange(len(layers)), min(config.levels, len(layers)))]
        self.groups = [(int(g[0]), int(g[-1]) + 1) for g in groups]   # slices into the layer axis
        dim, heads = config.dim, config.heads or default_heads(config.dim)
        self.fusion = nn.ModuleList(Fusion(b - a, spec.width, dim) for a, b in self.groups)
        self.temporal = nn.ModuleList(TemporalBlock(dim, heads, config.mlp_ratio, config.dropout, config.conv_kernel)
                                      for _ in self.groups)
        self.pos = nn.Parameter(torch.zeros(1, spec.frames, 1, dim))
        self.head = LinearHead(dim, spec.num_classes, config.head_dropout)
        init_weights(self)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos"} | {f"fusion.{i}.mix" for i in range(len(self.groups))}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["cls"].unsqueeze(2)                                       # (B, T, 1, L, D)
        if self.config.tokens == "patch":
            x = torch.cat([x, batch["tokens"].transpose(2, 3)], dim=2)      # (B, T, 1+N, L, D)
        B, T, M = x.shape[:3]
        h = None
        for i, ((a, b), fuse, temporal) in enumerate(zip(self.groups, self.fusion, self.temporal)):
            h = fuse(h, x[..., a:b, :])
            if i == 0:
                h = h + self.pos                                            # frame order enters the branch once
            seq = h.permute(0, 2, 1, 3).reshape(B * M, T, -1)                # time sequences per token
            h = temporal(seq).view(B, M, T, -1).permute(0, 2, 1, 3)
        return self.head(h.mean(dim=(1, 2)))
