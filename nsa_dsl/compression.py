"""Compression phi: each block of l consecutive tokens (stride d) -> one key or value (the paper's Eq. 7).

Compressed block i of a sequence covers exactly its tokens [i*d, i*d + l) (SEMANTICS.md); there are
Tc = floor((T - l)/d) + 1 of them (0 if T < l). Functions (``spec.compression.function``):

* ``mean``: phi(x_1..x_l) = mean of the tokens (no parameters).
* ``linear``: phi = W [x_1 + p_1; ...; x_l + p_l] + b over the flattened l*D block (p: intra-block position
  embedding, when ``position_encoding``). W starts as mean pooling (W = [I/l, ..., I/l], b = 0).
* ``mlp``: phi = W2 GELU(W1 [x_1 + p_1; ...; x_l + p_l] + b1) + b2 (the paper's MLP with intra-block position
  encoding), hidden width ``mlp_hidden`` (default l*D).

The parameters are shared by all heads (one phi for keys, one for values). ``compress_blocks`` applies phi
to explicit blocks of l tokens; ``compress`` gathers the blocks of whole (or packed varlen) sequences and
calls it, so incremental decoding that compresses one block at a time runs the same function on the same
tokens (equal to prefill up to floating-point reassociation in the matmuls).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .spec import NSASpec

__all__ = ["Compressor", "compress", "compress_blocks", "compressed_block_starts", "compressed_positions"]

log = logging.getLogger("nsa_dsl.compression")


def _block_tokens(T: int, spec: NSASpec, cu_seqlens: Tensor | None, device) -> tuple[Tensor, Tensor]:  # noqa: N803
    """(starts [Tc_total] packed token index of each block's first token, positions [Tc_total] of that token
    inside its own sequence)."""
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741
    if cu_seqlens is None:
        tc = spec.num_compressed(T)
        starts = torch.arange(tc, device=device) * d
        return starts, starts.clone()
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    tcs = torch.where(lens >= l, torch.div(lens - l, d, rounding_mode="floor") + 1, torch.zeros_like(lens))
    total = int(tcs.sum())
    seq_of = torch.repeat_interleave(torch.arange(len(tcs), device=device), tcs, output_size=total)
    first = torch.cumsum(tcs, 0) - tcs
    i = torch.arange(total, device=device) - first[seq_of]
    pos = i * d
    return cu[:-1][seq_of] + pos, pos


def compressed_block_starts(T: int, spec: NSASpec, cu_seqlens: Tensor | None = None) -> Tensor:  # noqa: N803
    """Packed token index of the first token of every compressed block, [Tc_total] int64 (varlen: in the order
    of ``nsa_dsl.reference.compressed_cu_seqlens``)."""
    return _block_tokens(T, spec, cu_seqlens, None if cu_seqlens is None else cu_seqlens.device)[0]


def compressed_positions(T: int, spec: NSASpec, cu_seqlens: Tensor | None = None) -> Tensor:  # noqa: N803
    """Position (inside its own sequence) of the first token of every compressed block, [Tc_total] int64."""
    return _block_tokens(T, spec, cu_seqlens, None if cu_seqlens is None else cu_seqlens.device)[1]


def _get(params: Mapping[str, Tensor], name: str, fn: str) -> Tensor:
    if name not in params:
        raise ValueError(f"params: compression.function '{fn}' needs '{name}', got keys {sorted(params)}")
    return params[name]


def compress_blocks(
    blocks: Tensor, spec: NSASpec, params: Compressor | Mapping[str, Tensor] | None = None
) -> Tensor:
    """phi on explicit blocks: blocks [..., l, D] -> [..., D].

    ``params``: a ``Compressor`` or a mapping with its parameter names (``pos`` [l, D] when position encoding
    is on; linear: ``weight`` [D, l*D], ``bias`` [D]; mlp: ``w1`` [hidden, l*D], ``b1``, ``w2`` [D, hidden],
    ``b2``); ignored (may be None) for ``mean``.
    """
    c = spec.compression
    l = c.block  # noqa: E741
    if not isinstance(blocks, torch.Tensor) or blocks.dim() < 2 or blocks.shape[-2] != l:
        shape = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"blocks: expected [..., l={l}, D], got {shape}")
    fn = c.function
    if isinstance(params, Compressor):
        fn = params.function
        pe = params.position_encoding
        params = dict(params.named_parameters())
    else:
        pe = c.position_encoding
    if fn == "mean":
        return blocks.mean(-2)
    if params is None:
        raise ValueError(f"params: compression.function '{fn}' needs parameters (a Compressor or a mapping)")
    D = blocks.shape[-1]  # noqa: N806
    x = blocks
    if pe:
        pos = _get(params, "pos", fn)
        if pos.shape != (l, D):
            raise ValueError(f"params.pos: expected shape {(l, D)}, got {tuple(pos.shape)}")
        x = x + pos.to(x.dtype)
    x = x.reshape(*x.shape[:-2], l * D)
    if fn == "linear":
        w, b = _get(params, "weight", fn), _get(params, "bias", fn)
        if w.shape[1] != l * D:
            raise ValueError(f"params.weight: expected [D_out, l*D = {l * D}], got {tuple(w.shape)}")
        return F.linear(x, w.to(x.dtype), b.to(x.dtype))
    if fn == "mlp":
        w1, b1 = _get(params, "w1", fn), _get(params, "b1", fn)
        w2, b2 = _get(params, "w2", fn), _get(params, "b2", fn)
        if w1.shape[1] != l * D:
            raise ValueError(f"params.w1: expected [hidden, l*D = {l * D}], got {tuple(w1.shape)}")
        h = F.gelu(F.linear(x, w1.to(x.dtype), b1.to(x.dtype)))
        return F.linear(h, w2.to(x.dtype), b2.to(x.dtype))
    raise ValueError(f"compression.function: must be one of mean, linear, mlp, got {fn!r}")


def compress(
    k: Tensor,
    spec: NSASpec,
    params: Compressor | Mapping[str, Tensor] | None = None,
    *,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Compress keys (or values) k [B, T, H, D] -> [B, Tc, H, D_out] over blocks [i*d, i*d + l).

    With ``cu_seqlens`` (int32 [N+1], B = 1) every sequence is compressed on its own and the results are
    packed at ``nsa_dsl.reference.compressed_cu_seqlens(cu_seqlens, spec)``; no block crosses a boundary.
    """
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        shape = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise ValueError(f"k: expected 4 dimensions [B, T, H, D], got {shape}")
    if not k.is_floating_point():
        raise ValueError(f"k: expected a floating-point dtype, got {k.dtype}")
    B, T, H, D = k.shape  # noqa: N806
    if cu_seqlens is not None:
        from .reference import _check_cu_seqlens

        _check_cu_seqlens(cu_seqlens, k, "k")
    if isinstance(params, Compressor) and params.dim != D:
        raise ValueError(
            f"k: expected head dim D = {params.dim} (the Compressor's dim), got shape {tuple(k.shape)}"
        )
    starts, _ = _block_tokens(T, spec, cu_seqlens, k.device)
    l = spec.compression.block  # noqa: E741
    idx = starts[:, None] + torch.arange(l, device=k.device)  # [Tc, l]
    blocks = k[:, idx.reshape(-1)].reshape(B, len(starts), l, H, D).transpose(2, 3)  # [B, Tc, H, l, D]
    out = compress_blocks(blocks, spec, params)
    return out


class Compressor(nn.Module):
    """Learnable phi for one of K or V (``dim`` = its head dimension), shared by all heads.

    ``forward(k, cu_seqlens=None)`` = ``compress(k, spec, self, cu_seqlens=...)``; ``compress_block(tokens)``
    compresses explicit blocks [..., l, D] (used by incremental decoding).
    """

    def __init__(
        self,
        spec: NSASpec,
        dim: int,
        *,
        function: str | None = None,
        position_encoding: bool | None = None,
        mlp_hidden: int | None = None,
    ):
        super().__init__()
        c = spec.compression
        self.spec = spec
        self.dim = int(dim)
        self.block = c.block
        self.function = function or c.function
        if self.function not in ("mean", "linear", "mlp"):
            raise ValueError(f"function: must be one of mean, linear, mlp, got {self.function!r}")
        pe = c.position_encoding if position_encoding is None else position_encoding
        self.position_encoding = bool(pe) and self.function != "mean"
        l, D = c.block, self.dim  # noqa: E741, N806
        if self.position_encoding:
            self.pos = nn.Parameter(torch.randn(l, D) * 0.02)
        if self.function == "linear":
            self.weight = nn.Parameter(torch.eye(D).repeat(1, l) / l + torch.randn(D, l * D) * (0.02 / l))
            self.bias = nn.Parameter(torch.zeros(D))
        elif self.function == "mlp":
            hidden = mlp_hidden or c.mlp_hidden or l * D
            self.hidden = hidden
            self.w1 = nn.Parameter(torch.empty(hidden, l * D))
            self.b1 = nn.Parameter(torch.zeros(hidden))
            self.w2 = nn.Parameter(torch.empty(D, hidden))
            self.b2 = nn.Parameter(torch.zeros(D))
            nn.init.kaiming_uniform_(self.w1, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.w2, a=math.sqrt(5))

    def compress_block(self, tokens: Tensor) -> Tensor:
        """tokens [..., l, D] -> [..., D]."""
        return compress_blocks(tokens, self.spec, self)

    def forward(self, k: Tensor, *, cu_seqlens: Tensor | None = None) -> Tensor:
        return compress(k, self.spec, self, cu_seqlens=cu_seqlens)

    def extra_repr(self) -> str:
        return f"function={self.function}, l={self.block}, dim={self.dim}, pe={self.position_encoding}"
