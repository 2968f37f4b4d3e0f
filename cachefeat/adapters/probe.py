"""`probe`: a linear classifier on the time-averaged final embedding (encode_image output).

The frame-averaging baseline: averaging over time throws the order of frames away, so on classes that
are each other's time reversal it cannot beat chance. Every temporal adapter is measured against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import Adapter, FeatureSpec, Needs
from .registry import register


@register
class Probe(Adapter):
    name = "probe"
    summary = "linear classifier on the time-averaged final embedding (frame-averaging baseline)"
    reads = "the final embedding (embed)"

    @dataclass(frozen=True)
    class Config:
        dropout: float = 0.0     # on the averaged embedding

    @classmethod
    def needs(cls, config, spec: FeatureSpec) -> Needs:
        return Needs(embed=True)

    def __init__(self, config, spec: FeatureSpec):
        super().__init__(config, spec)
        self.drop = nn.Dropout(config.dropout)
        self.fc = nn.Linear(spec.embed_dim, spec.num_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(self.drop(batch["embed"].mean(dim=1)))
