"""Building blocks shared by the adapters, written once (timm's `layers/` idea): attention, MLP, the
temporal block, depthwise temporal convolution, cross-attention pooling and the two classifier heads.

Shapes: a "frame sequence" is (B, T, D); blocks that mix over time take (B, T, D) and the caller folds
any other axis (tokens, layers) into B.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class QuickGELU(nn.Module):
    """CLIP's GELU approximation, used by EVL and DiST for their MLPs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None, dropout: float = 0.0, act=QuickGELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (queries and keys may come from different
    sequences): q (B, Lq, D), kv (B, Lk, D) -> (B, Lq, D)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        B, Lq, D = q.shape
        Lk, H = kv.shape[1], self.heads
        qh = self.q(q).view(B, Lq, H, D // H).transpose(1, 2)
        kh = self.k(kv).view(B, Lk, H, D // H).transpose(1, 2)
        vh = self.v(kv).view(B, Lk, H, D // H).transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, Lq, D))


class TemporalConv(nn.Module):
    """Depthwise convolution over time at every token position (EVL's temporal conv): x (B, T, ..., D)."""

    def __init__(self, dim: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, *mid, D = x.shape
        y = x.reshape(B, T, -1, D).permute(0, 2, 3, 1).reshape(-1, D, T)       # (B*M, D, T)
        y = self.conv(y).reshape(B, -1, D, T).permute(0, 3, 1, 2)               # (B, T, M, D)
        return y.reshape(x.shape)


class TemporalBlock(nn.Module):
    """The temporal block every sequence adapter uses: optional depthwise temporal conv (residual), then
    pre-LN self-attention over time and an MLP. x (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, conv_kernel: int = 0):
        super().__init__()
        self.conv = TemporalConv(dim, conv_kernel) if conv_kernel else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=dropout, act=nn.GELU)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = x + self.conv(x)
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h))
        return x + self.drop(self.mlp(self.norm2(x)))


class CrossAttentionBlock(nn.Module):
    """Queries attend to a token set, then an MLP; pre-LN on the queries and on the tokens (EVL's decoder
    layer, DiST's pooling blocks). q (B, Lq, D), tokens (B, Lk, D) -> (B, Lq, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, act=QuickGELU):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=dropout, act=act)

    def forward(self, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm_q(q), self.norm_kv(tokens))
        return q + self.mlp(self.norm2(q))


class LinearHead(nn.Module):
    """LayerNorm, dropout, linear classifier."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0, norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x)))


class TextHead(nn.Module):
    """Cosine similarity against fixed class-name text embeddings, times a fixed scale (CLIP's zero-shot
    head, as DiST uses it): x (B, D) -> (B, classes). The text embeddings are a buffer (saved with the
    adapter, never trained); only the projection D -> E is learnt."""

    def __init__(self, dim: int, num_classes: int, embed_dim: int, scale: float = 100.0):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(dim, embed_dim) * dim ** -0.5)
        self.register_buffer("text", torch.zeros(num_classes, embed_dim))
        self.scale = scale

    def set_text(self, text: torch.Tensor) -> None:
        self.text.copy_(F.normalize(text.float(), dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = F.normalize(x @ self.proj, dim=-1)
        return self.scale * v @ self.text.t()


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform weights for linear and (non-depthwise) conv layers, zero biases, unit LayerNorms.
    Xavier keeps the signal's scale through a chain of layers; the ViT recipe (truncated normal, std 0.02)
    shrinks it ~0.16x per 64-wide layer, which stalls adapters whose branch passes through several MLPs
    without a residual (DiST's integration chain) on anything but very large data sets."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv3d)):
            if not (isinstance(m, nn.Conv1d) and m.groups > 1):   # depthwise convs keep torch's default
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def default_heads(dim: int, head_dim: int = 64) -> int:
    """Heads of width 64 like CLIP, at least one; the largest divisor of dim not above dim // head_dim."""
    h = max(1, dim // head_dim)
    while dim % h:
        h -= 1
    return h
