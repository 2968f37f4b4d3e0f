"""An inserted-adapter method for the training-cost benchmark: ST-Adapter-style bottleneck adapters inside
every block of a frozen open_clip ViT (Pan et al., "ST-Adapter", NeurIPS 2022; AIM, Yang et al., ICLR 2023,
inserts similar bottlenecks). The backbone's weights stay frozen, but the adapters sit *inside* it, so
their gradients flow back through every block after them: the backward pass runs through the whole
backbone and its activations must be kept, which is what makes these methods cost far more than an
adapter trained on cached features.

Each block becomes  x -> block(x + up(dwconv_t(down(x))))  on the patch tokens (the class token passes
through): a linear bottleneck (width/4 by default), a depthwise temporal convolution (kernel 3) over the
clip's frames at every token position, and a zero-initialised up projection, so the network starts as
the frozen backbone. Not a product feature: it exists to be timed.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class STAdapter(nn.Module):
    def __init__(self, width: int, bottleneck: int, frames: int, kernel: int = 3):
        super().__init__()
        self.frames = frames
        self.down = nn.Linear(width, bottleneck)
        self.conv = nn.Conv1d(bottleneck, bottleneck, kernel, padding=kernel // 2, groups=bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B*T, 1+N, D), batch first -> the same shape."""
        BT, L, D = x.shape
        T = self.frames
        B = BT // T
        h = self.down(x[:, 1:])                                         # (BT, N, b)
        b = h.shape[-1]
        h = h.reshape(B, T, L - 1, b).permute(0, 2, 3, 1).reshape(B * (L - 1), b, T)
        h = self.conv(h)                                                # depthwise over time
        h = h.reshape(B, L - 1, b, T).permute(0, 3, 1, 2).reshape(BT, L - 1, b)
        return torch.cat([x[:, :1], x[:, 1:] + self.up(h)], dim=1)


class AdaptedBlock(nn.Module):
    """A frozen open_clip ResidualAttentionBlock with an ST-Adapter before it (same call signature)."""

    def __init__(self, block: nn.Module, adapter: STAdapter, batch_first: bool):
        super().__init__()
        self.block, self.adapter, self.batch_first = block, adapter, batch_first

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        x = q_x if self.batch_first else q_x.transpose(0, 1)
        x = self.adapter(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.block(x, k_x, v_x, attn_mask=attn_mask)


def insert_st_adapters(visual: nn.Module, frames: int, ratio: float = 0.25) -> list[nn.Parameter]:
    """Freeze `visual` (an open_clip VisionTransformer) and wrap each block with an ST-Adapter; returns the
    adapters' (trainable) parameters."""
    visual.requires_grad_(False)
    tr = visual.transformer
    width = int(tr.width)
    batch_first = bool(getattr(tr, "batch_first", True))
    params = []
    for i, blk in enumerate(tr.resblocks):
        if isinstance(blk, AdaptedBlock):
            raise ValueError("adapters are already inserted")
        ad = STAdapter(width, max(8, int(width * ratio)), frames).to(next(blk.parameters()).device)
        tr.resblocks[i] = AdaptedBlock(blk, ad, batch_first)
        params += list(ad.parameters())
    return params
