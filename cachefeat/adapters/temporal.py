"""`temporal`: a small transformer over the per-frame class tokens of the last block, the common temporal
baseline (e.g. CLIP4Clip's "seqTransf", ActionCLIP's temporal transformer).

CLS of block `layer` per frame (B, T, D) -> LayerNorm, linear to `dim`, + learnt temporal position
embedding -> `depth` temporal blocks (self-attention over time) -> mean over time -> LayerNorm, linear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import Adapter, CacheMismatch, FeatureSpec, Needs
from .blocks import LinearHead, TemporalBlock, default_heads, init_weights
from .registry import register


@register
class Temporal(Adapter):
    name = "temporal"
    summary = "small transformer over the per-frame CLS tokens of the last block"
    reads = "CLS of the last block (or of block `layer`)"

    @dataclass(frozen=True)
    class Config:
        layer: int = -1          # block whose CLS is read; negative counts from the model's last block
        dim: int = 256           # transformer width
        depth: int = 2           # temporal blocks
        heads: int = 0           # 0 = dim // 64
        mlp_ratio: float = 4.0
        dropout: float = 0.1
        conv_kernel: int = 0     # >0 adds a depthwise temporal conv to each block
        head_dropout: float = 0.0

    @classmethod
    def block(cls, config, spec: FeatureSpec) -> int:
        b = config.layer + spec.depth if config.layer < 0 else config.layer
        if not 0 <= b < spec.depth:
            raise CacheMismatch(f"temporal: layer={config.layer} is outside the model's blocks 0..{spec.depth - 1}")
        return b

    @classmethod
    def needs(cls, config, spec: FeatureSpec) -> Needs:
        return Needs(cls_layers=(cls.block(config, spec),))

    def __init__(self, config, spec: FeatureSpec):
        super().__init__(config, spec)
        dim = config.dim
        self.norm_in = nn.LayerNorm(spec.width)
        self.proj = nn.Linear(spec.width, dim)
        self.pos = nn.Parameter(torch.zeros(1, spec.frames, dim))
        heads = config.heads or default_heads(dim)
        self.blocks = nn.ModuleList(TemporalBlock(dim, heads, config.mlp_ratio, config.dropout, config.conv_kernel)
                                    for _ in range(config.depth))
        self.head = LinearHead(dim, spec.num_classes, config.head_dropout)
        init_weights(self)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos"}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.proj(self.norm_in(batch["cls"][:, :, 0])) + self.pos   # (B, T, dim)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(dim=1))
