"""Rotary position embedding (RoPE), rotate-half convention (GPT-NeoX / Llama), over the full head dimension.

``positions`` are token positions inside their own sequence (varlen sequences restart at 0). Positions may be
any integers, e.g. the position of a compressed block's last token (see SEMANTICS.md, "RoPE").
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rope_cos_sin", "apply_rope", "sequence_positions"]


def rope_cos_sin(positions: Tensor, dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32):
    """cos, sin of shape [*positions.shape, dim] for angles pos * theta^(-2i/dim), i < dim/2 (each repeated
    for the two halves). Computed in float64 and cast to ``dtype``."""
    if dim % 2:
        raise ValueError(f"dim: RoPE needs an even head dimension, got {dim}")
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    ang = positions.to(torch.float64)[..., None] * inv_freq
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D] with cos/sin [B or 1, T, D] (or [T, D]) -> rotated x (same dtype as x)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def sequence_positions(T: int, cu_seqlens: Tensor | None = None, device=None) -> Tensor:  # noqa: N803
    """[T] int64 positions of packed tokens inside their own sequence (0..L_s-1 per sequence)."""
    pos = torch.arange(T, device=device)
    if cu_seqlens is None:
        return pos
    cu = cu_seqlens.to(device=pos.device, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lens, output_size=T)
    return pos - starts
