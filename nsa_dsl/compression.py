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
tokens (equal to prefill up to floating-point reassociation in the matmuls). On a varlen pack the block
indices are built on the device; given ``max_seqlen`` they have the static size ``compressed_capacity``
(T // d slots, the empty ones masked), so nothing is read back from the device (no host sync).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reference import _check_cu_seqlens, check_cu_seqlens_static, check_max_seqlen
from .spec import NSASpec

__all__ = [
    "Compressor",
    "compress",
    "compress_blocks",
    "compressed_block_starts",
    "compressed_capacity",
    "compressed_positions",
]

log = logging.getLogger("nsa_dsl.compression")


def compressed_capacity(T: int, spec: NSASpec) -> int:  # noqa: N803
    """Static number of compressed slots of a pack of T tokens: T // d, an upper bound of the packed count
    sum_s Tc_s for any ``cu_seqlens`` (Tc_s = floor((L_s - l)/d) + 1 <= L_s // d, as d divides l)."""
    return int(T) // spec.compression.stride


def _block_tokens(
    T: int, spec: NSASpec, cu_seqlens: Tensor | None, device, capacity: int | None = None  # noqa: N803
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(starts [S] packed token index of each block's first token, positions [S] of that token inside its
    own sequence, valid [S] bool or None).

    Varlen: slot j holds the j-th packed block (sequence s = #{ends <= j}, ends = cumsum of Tc_s). Without
    ``capacity`` S = sum_s Tc_s (read from the device: a sync) and ``valid`` is None; with it S = capacity
    (static: nothing is read back), slots j >= sum_s Tc_s are marked invalid and point at token 0."""
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741
    if cu_seqlens is None:
        tc = spec.num_compressed(T)
        starts = torch.arange(tc, device=device) * d
        return starts, starts.clone(), None
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    tcs = torch.where(lens >= l, torch.div(lens - l, d, rounding_mode="floor") + 1, torch.zeros_like(lens))
    ends = torch.cumsum(tcs, 0)
    size = int(ends[-1]) if capacity is None else int(capacity)
    j = torch.arange(size, device=device)
    seq_of = torch.searchsorted(ends, j, right=True).clamp_(max=len(tcs) - 1)
    pos = (j - (ends - tcs)[seq_of]) * d
    starts = cu[:-1][seq_of] + pos
    if capacity is None:
        return starts, pos, None
    valid = j < ends[-1]
    return torch.where(valid, starts, 0), torch.where(valid, pos, 0), valid


def compressed_block_starts(
    T: int, spec: NSASpec, cu_seqlens: Tensor | None = None, *, max_seqlen: int | None = None  # noqa: N803
) -> Tensor:
    """Packed token index of the first token of every compressed block, [Tc_total] int64 (varlen: in the order
    of ``nsa_dsl.reference.compressed_cu_seqlens``). With ``cu_seqlens`` and ``max_seqlen``: nothing is read
    back, [compressed_capacity(T)] with 0 in the slots past the packed blocks."""
    return _slots(T, spec, cu_seqlens, max_seqlen)[0]


def compressed_positions(
    T: int, spec: NSASpec, cu_seqlens: Tensor | None = None, *, max_seqlen: int | None = None  # noqa: N803
) -> Tensor:
    """Position (inside its own sequence) of the first token of every compressed block, [Tc_total] int64
    (with ``cu_seqlens`` and ``max_seqlen``: as ``compressed_block_starts``, 0 in the empty slots)."""
    return _slots(T, spec, cu_seqlens, max_seqlen)[1]


def _slots(
    T: int, spec: NSASpec, cu_seqlens: Tensor | None, max_seqlen: int | None, device=None  # noqa: N803
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``_block_tokens`` on cu_seqlens' device (else on ``device``: built there, no host-to-device copy, so
    that a CUDA-graph capture of the decode step's compression works); static-size (``compressed_capacity``)
    with ``max_seqlen``."""
    if cu_seqlens is None:
        return _block_tokens(T, spec, None, device)
    cap = None if max_seqlen is None else compressed_capacity(T, spec)
    return _block_tokens(T, spec, cu_seqlens, cu_seqlens.device, cap)


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
    max_seqlen: int | None = None,
) -> Tensor:
    """Compress keys (or values) k [B, T, H, D] -> [B, Tc, H, D_out] over blocks [i*d, i*d + l).

    With ``cu_seqlens`` (int32 [N+1], B = 1) every sequence is compressed on its own and the results are
    packed at ``nsa_dsl.reference.compressed_cu_seqlens(cu_seqlens, spec)``; no block crosses a boundary.
    ``max_seqlen`` (with ``cu_seqlens``; the longest sequence, as in flash-attn): nothing is read back from
    the device (no host sync; the offsets are trusted, not validated) and the output has the static size
    Tc = ``compressed_capacity(T, spec)`` = T // d: the packed blocks, then zero rows (which get no gradient).
    """
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        shape = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise ValueError(f"k: expected 4 dimensions [B, T, H, D], got {shape}")
    if not k.is_floating_point():
        raise ValueError(f"k: expected a floating-point dtype, got {k.dtype}")
    B, T, H, D = k.shape  # noqa: N806
    if cu_seqlens is None:
        max_seqlen = None
    elif max_seqlen is None:
        _check_cu_seqlens(cu_seqlens, k, "k")
    else:
        check_cu_seqlens_static(cu_seqlens, k, "k")
        check_max_seqlen(max_seqlen, T)
    if isinstance(params, Compressor) and params.dim != D:
        raise ValueError(
            f"k: expected head dim D = {params.dim} (the Compressor's dim), got shape {tuple(k.shape)}"
        )
    starts, _, valid = _slots(T, spec, cu_seqlens, max_seqlen, k.device)
    starts = starts.to(k.device)
    l = spec.compression.block  # noqa: E741
    idx = starts[:, None] + torch.arange(l, device=k.device)  # [Tc, l]
    if valid is not None:
        idx = idx.clamp_(0, max(T - 1, 0))  # the empty slots' blocks (T < l) stay inside the pack
    blocks = k[:, idx.reshape(-1)].reshape(B, len(starts), l, H, D).transpose(2, 3)  # [B, Tc, H, l, D]
    out = compress_blocks(blocks, spec, params)
    if valid is not None:
        out = torch.where(valid.to(k.device)[None, :, None, None], out, 0.0)
    return out


class Compressor(nn.Module):
    """Learnable phi for one of K or V (``dim`` = its head dimension), shared by all heads.

    ``forward(k, cu_seqlens=None, max_seqlen=None)`` = ``compress(k, spec, self, ...)``;
    ``compress_block(tokens)`` compresses explicit blocks [..., l, D] (used by incremental decoding).
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

    def forward(
        self, k: Tensor, *, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None
    ) -> Tensor:
        return compress(k, self.spec, self, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def extra_repr(self) -> str:
        return f"function={self.function}, l={self.block}, dim={self.dim}, pe={self.position_encoding}"
