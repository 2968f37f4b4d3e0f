"""`evl`: EVL-style decoder (Lin et al., ECCV 2022; OpenGVLab/efficient-video-recognition `model.py`).

One learnable video query passes through K decoder layers (default 4); decoder layer i reads the i-th of
the last K blocks (shallowest first): all its tokens (CLS + patches) of every frame, to which it adds
  - a depthwise temporal convolution (kernel 3) over time at every token position,
  - a learnable temporal position embedding (T x D), separate per layer,
  - temporal cross-attention (TCA): for frame t, the head-averaged softmax(q_t . k_{t-1}) over patch
    tokens (CLS excluded), contracted with a learnable table indexed by the 2-D offset between query and
    key patch ((2h-1)(2w-1) x D), and the same with t+1 through a second table;
then the query cross-attends (pre-LN) to all T x (1+N) tokens, followed by a 4x MLP (QuickGELU, dropout
0.5). Head: LayerNorm, dropout 0.5, linear.

TCA needs each block's own attention q/k. A cache holds block outputs, not q/k, so they are recomputed
as the block computes them: q, k = the q/k rows of its projection applied to LayerNorm(block input), where
the block input is the previous block's output, then (EVA02, PE-Core) rotated by the tower's rotary
embedding at each patch position. That needs one earlier cached layer (block L-K-1 for the first tap)
and the frozen block's norm and q/k weights (open_clip's ln_1 + in_proj; timm's norm1 + fused qkv, or
EVA's separate q_proj/k_proj) and rotary table, which the backbone rebuilt from the cache metadata (its
weights hash checked) hands over (`Backbone.attention_qk`) and which are kept as frozen buffers, saved
with the adapter. With `--tokens pooled:HxW` the q/k are computed from pooled tokens: an approximation
(the paper's TCA is on full patch grids); on a rotary tower that is refused (the rotation is defined per
patch of the full grid). Prefix tokens (class token, registers) take no part, as in the paper's
patch-only TCA.

Differences from the official code: the decoder runs in the adapter's precision (the paper casts the
backbone to fp16 and the features to fp32, which a float16 cache does too); CLS enters as the cached
layer's `cls`: the class token, identical to the block output's position 0, or on towers without one
(SigLIP) the mean patch token, which the cache records (`model.cls`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Adapter, AdapterError, CacheMismatch, FeatureSpec, Needs
from .blocks import CrossAttentionBlock, LinearHead, TemporalConv
from .registry import register


def _offset_index(grid: tuple[int, int]) -> torch.Tensor:
    """(N, N) index of the 2-D offset between query patch q and key patch k into a (2h-1)(2w-1) table."""
    h, w = grid
    qi, qj = torch.div(torch.arange(h * w), w, rounding_mode="floor"), torch.arange(h * w) % w
    di = qi[:, None] - qi[None, :] + h - 1
    dj = qj[:, None] - qj[None, :] + w - 1
    return di * (2 * w - 1) + dj


class TemporalCrossAttention(nn.Module):
    """EVL's TCA for one decoder layer, with the block's frozen q/k projection held as buffers."""

    def __init__(self, grid: tuple[int, int], dim: int, heads: int, rope: str | None = None):
        super().__init__()
        size = (2 * grid[0] - 1) * (2 * grid[1] - 1)
        self.w1 = nn.Parameter(torch.zeros(size, dim))   # attention to the previous frame
        self.w2 = nn.Parameter(torch.zeros(size, dim))   # attention to the next frame
        self.register_buffer("index", _offset_index(grid), persistent=False)
        self.heads = heads
        self.eps = 1e-5
        # the frozen block's norm and the q/k rows of its projection (filled by load_block); rotary towers
        # also the sin/cos table of the patch positions, and how the rotation pairs channels
        self.register_buffer("ln_weight", torch.ones(dim))
        self.register_buffer("ln_bias", torch.zeros(dim))
        self.register_buffer("qk_weight", torch.zeros(2 * dim, dim))
        self.register_buffer("qk_bias", torch.zeros(2 * dim))
        self.rope_pairing = rope
        if rope:
            self.register_buffer("rope", torch.zeros(grid[0] * grid[1], 2 * (dim // heads)))

    @torch.no_grad()
    def load_block(self, qk) -> None:
        """`qk`: the block's backbone.AttentionQK."""
        if qk.heads != self.heads:
            raise AdapterError(f"evl: the block has {qk.heads} heads, the cache metadata says {self.heads}")
        if (qk.rope is not None) != bool(self.rope_pairing) or qk.rope_pairing != self.rope_pairing:
            raise AdapterError(f"evl: the block's rotary embedding ({qk.rope_pairing}) is not the one the cache "
                               f"metadata records ({self.rope_pairing})")
        self.ln_weight.copy_(qk.norm_weight)
        self.ln_bias.copy_(qk.norm_bias)
        self.eps = qk.eps
        self.qk_weight.copy_(qk.weight)
        self.qk_bias.copy_(qk.bias)
        if self.rope_pairing:
            self.rope.copy_(qk.rope)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """timm's apply_rot_embed_cat: x (..., N, d) rotated by the (N, 2d) sin/cos table."""
        sin, cos = self.rope.chunk(2, dim=-1)
        if self.rope_pairing == "half":
            x1, x2 = x.chunk(2, dim=-1)
            turned = torch.cat([-x2, x1], dim=-1)
        else:
            turned = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
        return x * cos + turned * sin

    def _qk(self, x: torch.Tensor):
        """Block input patch tokens (B, T, N, D) -> its attention q and k, (B, T, H, N, D/H) each."""
        B, T, N, D = x.shape
        h = F.layer_norm(x.float(), (D,), self.ln_weight, self.ln_bias, self.eps)
        qk = F.linear(h, self.qk_weight, self.qk_bias).view(B, T, N, 2, self.heads, D // self.heads)
        qk = qk.permute(3, 0, 1, 4, 2, 5)
        if self.rope_pairing:
            return self._rotate(qk[0]), self._rotate(qk[1])
        return qk[0], qk[1]

    def _half(self, q: torch.Tensor, k: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        attn = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5        # (B, T', H, Nq, Nk)
        attn = attn.softmax(dim=-1).mean(dim=2)                         # over keys, then average heads
        return torch.einsum("btqk,qkc->btqc", attn.to(table.dtype), table[self.index])

    def forward(self, block_input: torch.Tensor) -> torch.Tensor:
        """Patch tokens entering the block (B, T, N, D) -> additive features (B, T, 1+N, D) (zero at CLS)."""
        q, k = self._qk(block_input)
        prev = self._half(q[:, 1:], k[:, :-1], self.w1)                 # frames 1..T-1 look back
        nxt = self._half(q[:, :-1], k[:, 1:], self.w2)                  # frames 0..T-2 look ahead
        out = F.pad(prev, (0, 0, 0, 0, 1, 0)) + F.pad(nxt, (0, 0, 0, 0, 0, 1))
        return F.pad(out, (0, 0, 1, 0))                                 # no TCA term at CLS


@register
class EVL(Adapter):
    name = "evl"
    summary = "EVL decoder: a video query cross-attending to all tokens of the last K blocks, with temporal modules"
    reads = ("CLS and patch tokens of the last K blocks; with tca, also the patch tokens of the block before "
             "them and the frozen blocks' q/k weights (rebuilt from the cache metadata)")

    @dataclass(frozen=True)
    class Config:
        layers: int = 4             # K: decoder layers, reading the model's last K blocks
        heads: int = 0              # 0 = the backbone's heads
        mlp_ratio: float = 4.0
        mlp_dropout: float = 0.5
        head_dropout: float = 0.5
        temporal_conv: bool = True
        temporal_pos: bool = True
        tca: bool = True            # temporal cross-attention (recomputes q/k from one earlier layer)

    @classmethod
    def taps(cls, config, spec: FeatureSpec) -> list[int]:
        if not 1 <= config.layers <= spec.depth:
            raise CacheMismatch(f"evl: layers={config.layers} must be between 1 and the model's {spec.depth} blocks")
        return list(range(spec.depth - config.layers, spec.depth))

    @classmethod
    def needs(cls, config, spec: FeatureSpec) -> Needs:
        taps = cls.taps(config, spec)
        token_layers = list(taps)
        if config.tca:
            if taps[0] == 0:
                raise CacheMismatch(f"evl: TCA recomputes block {taps[0]}'s q/k from the block before it, and "
                                    f"block 0 has none cached; use layers<={spec.depth - 1} or tca=false")
            token_layers = [taps[0] - 1] + token_layers
            if spec.rope and spec.tokens.kind == "pooled" and tuple(spec.token_grid) != tuple(spec.patch_grid):
                raise CacheMismatch(f"evl: TCA on this tower rotates q/k by a rotary embedding defined on the full "
                                    f"{spec.patch_grid[0]}x{spec.patch_grid[1]} patch grid; extract with --tokens "
                                    f"all, or use tca=false")
        return Needs(cls_layers=tuple(taps), token_layers=tuple(token_layers), backbone_weights=config.tca)

    def __init__(self, config, spec: FeatureSpec):
        super().__init__(config, spec)
        D, K, T = spec.width, config.layers, spec.frames
        heads = config.heads or spec.heads
        self.blocks_read = self.taps(config, spec)
        self.query = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.decoder = nn.ModuleList(CrossAttentionBlock(D, heads, config.mlp_ratio, config.mlp_dropout)
                                     for _ in range(K))
        self.tconv = nn.ModuleList(TemporalConv(D, 3) for _ in range(K)) if config.temporal_conv else None
        self.tpos = nn.Parameter(torch.zeros(K, T, D)) if config.temporal_pos else None
        self.tca = (nn.ModuleList(TemporalCrossAttention(spec.token_grid, D, spec.heads, spec.rope) for _ in range(K))
                    if config.tca else None)
        self.head = LinearHead(D, spec.num_classes, config.head_dropout)
        for blk in self.decoder:     # EVL initialises its attention and MLP projections with xavier_uniform
            for m in blk.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"query", "tpos"}

    def set_backbone(self, backbone) -> None:
        if self.tca is not None:
            for module, block in zip(self.tca, self.blocks_read):
                try:
                    qk = backbone.attention_qk(block)
                except ValueError as e:     # BackboneError: a block whose q/k this cannot rebuild
                    raise AdapterError(f"evl: {e}; use tca=false") from None
                module.load_block(qk)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cls, tokens = batch["cls"], batch["tokens"]     # (B, T, K, D), (B, T, K[+1], N, D)
        B, T, _, D = cls.shape
        skip = 1 if self.tca is not None else 0          # tokens[:, :, 0] is the earlier layer, for TCA only
        x = self.query.expand(B, 1, D)
        for i, layer in enumerate(self.decoder):
            out = torch.cat([cls[:, :, i:i + 1], tokens[:, :, i + skip]], dim=2)   # block output (B, T, 1+N, D)
            feats = out
            if self.tconv is not None:
                feats = feats + self.tconv[i](out)
            if self.tpos is not None:
                feats = feats + self.tpos[i].view(1, T, 1, D)
            if self.tca is not None:
                feats = feats + self.tca[i](tokens[:, :, i]).to(feats.dtype)     # q/k from the block's input
            x = layer(x, feats.flatten(1, 2))
        return self.head(x[:, 0])
