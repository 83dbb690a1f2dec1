"""The PyTorch reference of Native Sparse Attention: the ground truth every kernel is tested against.

Semantics are pinned in ``nsa_dsl/SEMANTICS.md``; in short (tokens 0-indexed, query t sees keys 0..t):

* compressed block i covers tokens [i*d, i*d + l); Tc = floor((T - l)/d) + 1 (0 if T < l); query t sees
  block i iff i*d + l - 1 <= t; no visible block -> o_cmp = 0, lse_cmp = +inf.
* p_cmp = softmax of the scaled logits over the visible compressed blocks (per query head);
  p_slc[j] = sum_k overlap[k] * p_cmp[j*ratio + overlap_offset + k] (``nsa_dsl.derived``), summed over the
  G query heads of a KV head; valid selection blocks for query t: j <= floor(t / l').
* top-n among the valid blocks, forced blocks (0..force_initial-1 and the force_local most recent valid ones)
  always in; ties broken by the lower block index; indices returned in ascending order, -1 in unused slots.
* selection attends to the tokens of the selected blocks with index <= t (one softmax); window to tokens
  max(0, t-w+1)..t; o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win.

Precision: float64 inputs are computed in float64 (exact up to rounding); float32/float16/bfloat16 inputs are
computed in float32 and the outputs cast back to the input dtype. LSEs are returned in the compute dtype
(float32, or float64 for float64 inputs). Everything is differentiable except the top-n selection (indices
carry no gradient, as in the paper); gradients reach q, k, v, k_cmp, v_cmp and g.

Memory stays bounded: every branch is computed in chunks of queries (selection gathers the selected blocks'
keys per query; the window reads a band; the compressed branch is dense over Tc).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from .derived import derive
from .spec import NSASpec

__all__ = [
    "nsa_attention",
    "nsa_branches",
    "combine_branches",
    "compressed_attention",
    "compression_probs",
    "selection_scores",
    "select_blocks",
    "selection_indices",
    "selected_attention",
    "window_attention",
    "compressed_cu_seqlens",
    "overlap_matrix",
]

log = logging.getLogger("nsa_dsl.reference")

# Bytes of intermediate data one chunk of queries may hold (per branch). Keeps T = 4096+ runs within RAM.
# Small chunks are much faster than big ones on CPUs (temporaries stay in cache and in the allocator's free
# lists); _MIN_CHUNK queries per chunk bound the Python loop. Both only change speed, never results.
_CHUNK_BYTES = 4 * 2**20
_MIN_CHUNK = 64
# Selection branch strategy: None = "union" (default); "gather" = per-query gathers (tests run both).
_SELECTION_PATH: str | None = None
_INF = float("inf")


# --------------------------------------------------------------------------------------------------
# validation helpers (each error is one line naming the argument and the rule)
# --------------------------------------------------------------------------------------------------


def _check_tensor(name: str, x: Any, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions {layout}, got shape {tuple(x.shape)}")


def _check_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point dtype, got {x.dtype}")


def _check_dim(name: str, x: Tensor, axis: int, expected: int, what: str) -> None:
    if x.shape[axis] != expected:
        raise ValueError(f"{name}: expected {what} = {expected} at dim {axis}, got shape {tuple(x.shape)}")


def _check_same_device(ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (like {ref_name}), got {t.device}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _resolve_scale(spec: NSASpec, scale: float | None) -> float:
    if scale is None:
        return float(spec.scale)
    if (
        not isinstance(scale, (int, float))
        or isinstance(scale, bool)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"scale: expected a positive finite number or None, got {scale!r}")
    return float(scale)


def _check_spec(spec: Any) -> None:
    if not isinstance(spec, NSASpec):
        raise ValueError(f"spec: expected an NSASpec (see nsa_dsl.load_spec), got {type(spec).__name__}")


def _check_q(q: Tensor, spec: NSASpec) -> None:
    _check_tensor("q", q, 4, "[B, T, Hq, dk]")
    _check_float("q", q)
    _check_dim("q", q, 2, spec.attention.heads, "attention.heads (Hq)")
    _check_dim("q", q, 3, spec.attention.head_dim_qk, "attention.head_dim_qk (dk)")


def _check_kv(q: Tensor, k: Tensor, v: Tensor, spec: NSASpec) -> None:
    _check_tensor("k", k, 4, "[B, T, Hkv, dk]")
    _check_tensor("v", v, 4, "[B, T, Hkv, dv]")
    _check_same_device("q", q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        _check_float(name, t)
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (like q), got {t.dtype}")
        if t.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"{name}: expected [B, T] = {tuple(q.shape[:2])} (like q), got shape {tuple(t.shape)}"
            )
        _check_dim(name, t, 2, spec.attention.kv_heads, "attention.kv_heads (Hkv)")
    _check_dim("k", k, 3, spec.attention.head_dim_qk, "attention.head_dim_qk (dk)")
    _check_dim("v", v, 3, spec.attention.head_dim_v, "attention.head_dim_v (dv)")


def _check_cmp(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor | None, spec: NSASpec, expected_tc: int, why: str
) -> None:
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741
    pairs = [("k_cmp", k_cmp, spec.attention.head_dim_qk, "dk")]
    if v_cmp is not None:
        pairs.append(("v_cmp", v_cmp, spec.attention.head_dim_v, "dv"))
    for name, t, hd, hdn in pairs:
        _check_tensor(name, t, 4, f"[B, Tc, Hkv, {hdn}]")
        _check_same_device("q", q, **{name: t})
        _check_float(name, t)
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (like q), got {t.dtype}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name}: expected batch B = {q.shape[0]} (like q), got shape {tuple(t.shape)}")
        if t.shape[1] != expected_tc:
            raise ValueError(
                f"{name}: expected {expected_tc} compressed blocks for {why} (l={l}, d={d}), got {t.shape[1]}"
            )
        _check_dim(name, t, 2, spec.attention.kv_heads, "attention.kv_heads (Hkv)")
        _check_dim(name, t, 3, hd, f"attention.head_dim_{'qk' if hdn == 'dk' else 'v'} ({hdn})")


def check_cu_seqlens_static(cu_seqlens: object, x: Tensor, name: str) -> None:
    """The checks of ``_check_cu_seqlens`` that need no device read (type, shape, dtype, B = 1);
    the offsets' values are trusted (used with ``max_seqlen``: no host sync)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens: expected an int32 torch.Tensor [N+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected shape [N+1] with N >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens: expected dtype torch.int32 (flash-attn convention), got {cu_seqlens.dtype}"
        )
    if x.shape[0] != 1:
        raise ValueError(
            f"{name}: expected batch B = 1 with cu_seqlens (packed sequences), got B = {x.shape[0]}"
        )


def check_max_seqlen(max_seqlen: object, T: int) -> int:  # noqa: N803
    """Validate ``max_seqlen`` (an int in 0..T) without reading anything from the device; returns it. Used
    by ``NSAOps.forward``, ``nsa_dsl.compression.compress`` and ``NSAttention``.

    A value smaller than the longest sequence is not detected (that would need the offsets on the host): the
    offsets are then trusted and the result is undefined."""
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or not 0 <= max_seqlen <= T:
        raise ValueError(f"max_seqlen: must be an int in 0..T = {T}, got {max_seqlen!r}")
    return max_seqlen


def _check_cu_seqlens(cu_seqlens: Any, q: Tensor, name: str = "q") -> list[int]:
    """Validate flash-attn style offsets; returns them as a Python list."""
    check_cu_seqlens_static(cu_seqlens, q, name)
    offs = [int(x) for x in cu_seqlens.tolist()]
    if offs[0] != 0:
        raise ValueError(f"cu_seqlens: must start at 0, got {offs[0]}")
    if any(b < a for a, b in zip(offs, offs[1:], strict=False)):
        raise ValueError("cu_seqlens: must be non-decreasing")
    if offs[-1] != q.shape[1]:
        raise ValueError(
            f"cu_seqlens: last offset must equal the packed length T = {q.shape[1]}, got {offs[-1]}"
        )
    return offs


def _num_cmp(spec: NSASpec, T: int) -> int:  # noqa: N803
    return spec.num_compressed(T)


def compressed_cu_seqlens(cu_seqlens: Tensor, spec: NSASpec) -> Tensor:
    """Offsets of each sequence's compressed blocks in packed ``k_cmp``/``v_cmp``.

    ``cu_seqlens`` int32 [N+1] (flash-attn convention) -> int32 [N+1] on the same device, where sequence s has
    Tc_s = floor((L_s - l)/d) + 1 compressed blocks (0 if L_s < l), L_s = cu_seqlens[s+1] - cu_seqlens[s].
    """
    _check_spec(spec)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens: expected a 1-D int32 torch.Tensor [N+1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected dtype torch.int32, got {cu_seqlens.dtype}")
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if bool((lens < 0).any()):
        raise ValueError("cu_seqlens: must be non-decreasing")
    tc = torch.where(lens >= l, torch.div(lens - l, d, rounding_mode="floor") + 1, torch.zeros_like(lens))
    out = torch.zeros(cu_seqlens.numel(), dtype=torch.int64, device=cu_seqlens.device)
    out[1:] = torch.cumsum(tc, 0)
    return out.to(torch.int32)


# --------------------------------------------------------------------------------------------------
# numerics helpers
# --------------------------------------------------------------------------------------------------


def _masked_softmax(logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim restricted to ``mask`` (broadcastable to ``logits``; not expanded).

    Returns (p, lse) with p = 0 off the mask and, for rows with no key, p = 0 and lse = +inf. NaN-free in
    forward and backward (also when lse is differentiated). The row max is detached: p and lse do not
    depend on it mathematically, so the gradients are exact.
    """
    lf = logits.masked_fill(~mask, -_INF)
    m = lf.detach().amax(-1, keepdim=True)
    has = m > -_INF
    m = torch.where(has, m, torch.zeros_like(m))
    e = torch.exp(lf - m)
    ssum = torch.where(has, e.sum(-1, keepdim=True), torch.ones_like(m))
    p = e / ssum
    lse = (m + torch.log(ssum)).squeeze(-1).masked_fill(~has.squeeze(-1), _INF)
    return p, lse


def _attend_heads(qh: Tensor, kh: Tensor, vh: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Masked attention in the [B, Hkv, C, G, .] layout (no large permuted copies).

    qh [B, Hkv, C, G, dk], kh [B, Hkv, S, dk], vh [B, Hkv, S, dv], mask broadcastable to [B, Hkv, C, 1, S]
    -> (o [B, C, Hq, dv], lse [B, C, Hq]) with Hq = Hkv*G in head order h = hkv*G + g.
    """
    B, H, C, G, dk = qh.shape  # noqa: N806
    logits = torch.matmul(qh.reshape(B, H, C * G, dk), kh.transpose(-1, -2)).view(B, H, C, G, -1) * scale
    p, lse = _masked_softmax(logits, mask)
    o = torch.matmul(p.view(B, H, C * G, -1), vh).view(B, H, C, G, -1)
    return o.permute(0, 2, 1, 3, 4).reshape(B, C, H * G, -1), lse.permute(0, 2, 1, 3).reshape(B, C, H * G)


def _chunk_size(T: int, per_query_bytes: int, minimum: int = 1) -> int:  # noqa: N803
    """Queries per chunk: as many as fit in _CHUNK_BYTES, at least ``minimum`` (bounds the Python loop)."""
    return max(1, min(T, max(minimum, _CHUNK_BYTES // max(1, per_query_bytes))))


def _group(q: Tensor, spec: NSASpec) -> Tensor:
    """[B, T, Hq, D] -> [B, T, Hkv, G, D] (query head h uses KV head h // G)."""
    B, T, _, D = q.shape  # noqa: N806
    return q.reshape(B, T, spec.attention.kv_heads, spec.G, D)


def _ungroup(o: Tensor) -> Tensor:
    B, T, H, G, D = o.shape  # noqa: N806
    return o.reshape(B, T, H * G, D)


# --------------------------------------------------------------------------------------------------
# compressed branch
# --------------------------------------------------------------------------------------------------


def _cmp_visible(t_pos: Tensor, tc: int, spec: NSASpec) -> Tensor:
    """[C, Tc] bool: query t sees compressed block i iff i*d + l - 1 <= t."""
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741
    ends = torch.arange(tc, device=t_pos.device) * d + (l - 1)
    return ends[None, :] <= t_pos[:, None]


def _cmp_chunk(qg: Tensor, kc: Tensor, t_pos: Tensor, spec: NSASpec, scale: float) -> tuple[Tensor, Tensor]:
    """qg [B, C, Hkv, G, dk], kc [B, Tc, Hkv, dk] -> p [B, C, Hkv, G, Tc], lse [B, C, Hkv, G]."""
    logits = torch.einsum("bchgd,bihd->bchgi", qg, kc) * scale
    mask = _cmp_visible(t_pos, kc.shape[1], spec)[None, :, None, None, :]
    return _masked_softmax(logits, mask)


def _validate_cmp_inputs(q, k_cmp, v_cmp, spec):
    _check_spec(spec)
    _check_q(q, spec)
    tc = _num_cmp(spec, q.shape[1])
    _check_cmp(q, k_cmp, v_cmp, spec, tc, f"T={q.shape[1]}")


def compressed_attention(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, spec: NSASpec, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """The compressed branch (one sequence per batch row; use ``nsa_attention`` for varlen).

    q [B, T, Hq, dk], k_cmp [B, Tc, Hkv, dk], v_cmp [B, Tc, Hkv, dv] ->
    (o_cmp [B, T, Hq, dv] in q's dtype, lse_cmp [B, T, Hq] in the compute dtype; +inf and o = 0 for queries
    t < l - 1 that see no compressed block).
    """
    _validate_cmp_inputs(q, k_cmp, v_cmp, spec)
    sc = _resolve_scale(spec, scale)
    o, lse = _compressed_attention(q, k_cmp, v_cmp, spec, sc)
    return o.to(q.dtype), lse


def _compressed_attention(q, k_cmp, v_cmp, spec, scale):
    B, T, Hq, _ = q.shape  # noqa: N806
    cdt = _compute_dtype(q.dtype)
    dv = v_cmp.shape[-1]
    tc = k_cmp.shape[1]
    o = q.new_zeros((B, T, Hq, dv), dtype=cdt)
    lse = q.new_full((B, T, Hq), _INF, dtype=cdt)
    if tc == 0 or T == 0:
        return o, lse
    qg = _group(q.to(cdt), spec)
    kc, vc = k_cmp.to(cdt), v_cmp.to(cdt)
    C = _chunk_size(T, B * Hq * tc * 3 * torch.finfo(cdt).bits // 8, _MIN_CHUNK)  # noqa: N806
    outs, lses = [], []
    for t0 in range(0, T, C):
        t_pos = torch.arange(t0, min(T, t0 + C), device=q.device)
        p, ls = _cmp_chunk(qg[:, t0 : t0 + C], kc, t_pos, spec, scale)
        outs.append(_ungroup(torch.einsum("bchgi,bihv->bchgv", p, vc)))
        lses.append(ls.flatten(2))
    return torch.cat(outs, 1), torch.cat(lses, 1)


def compression_probs(q: Tensor, k_cmp: Tensor, spec: NSASpec, scale: float | None = None) -> Tensor:
    """p_cmp [B, T, Hq, Tc] (compute dtype): softmax over the compressed blocks visible to each query, 0 for
    invisible blocks (rows of queries that see no block are all 0). Dense: meant for tests at small T."""
    _validate_cmp_inputs(q, k_cmp, None, spec)
    sc = _resolve_scale(spec, scale)
    cdt = _compute_dtype(q.dtype)
    B, T, Hq, _ = q.shape  # noqa: N806
    tc = k_cmp.shape[1]
    if tc == 0:
        return q.new_zeros((B, T, Hq, 0), dtype=cdt)
    t_pos = torch.arange(T, device=q.device)
    p, _ = _cmp_chunk(_group(q.to(cdt), spec), k_cmp.to(cdt), t_pos, spec, sc)
    return p.reshape(B, T, Hq, tc)


# --------------------------------------------------------------------------------------------------
# scores and top-n
# --------------------------------------------------------------------------------------------------


def overlap_matrix(spec: NSASpec, tc: int, nslc: int, *, dtype=torch.float64, device=None) -> Tensor:
    """M [Tc, Nslc] with M[i, j] = overlap[k] for i = j*ratio + overlap_offset + k (``derive(spec)``),
    so that p_slc = p_cmp @ M. Compressed blocks outside 0..Tc-1 are skipped."""
    der = derive(spec)
    m = torch.zeros(tc, nslc, dtype=dtype, device=device)
    if tc == 0 or nslc == 0:
        return m
    j = torch.arange(nslc, device=device)
    for kk, w in enumerate(der.overlap):
        i = j * der.ratio + der.overlap_offset + kk
        ok = (i >= 0) & (i < tc)
        m[i[ok], j[ok]] += float(w)
    return m


def _valid_blocks(t_pos: Tensor, nslc: int, spec: NSASpec) -> Tensor:
    """[C, Nslc] bool: block j valid for query t iff j <= floor(t / l')."""
    lp = spec.selection.block
    return (
        torch.arange(nslc, device=t_pos.device)[None, :]
        <= torch.div(t_pos, lp, rounding_mode="floor")[:, None]
    )


def _scores_chunk(p: Tensor, t_pos: Tensor, spec: NSASpec, nslc: int) -> Tensor:
    """p [B, C, Hkv, G, Tc] -> group scores [B, C, Hkv, Nslc], -inf for invalid blocks."""
    m = overlap_matrix(spec, p.shape[-1], nslc, dtype=p.dtype, device=p.device)
    s = torch.einsum("bchgi,ij->bchj", p, m)
    valid = _valid_blocks(t_pos, nslc, spec)[None, :, None, :]
    return s.masked_fill(~valid, -_INF)


def selection_scores(p_cmp: Tensor, spec: NSASpec, T: int) -> Tensor:  # noqa: N803
    """Group importance scores [B, T, Hkv, Nslc] (Nslc = ceil(T / l')) from p_cmp [B, T, Hq, Tc].

    Convention: score[b, t, h, j] = sum over the G query heads of KV head h of
    p_slc[j] = sum_k overlap[k] * p_cmp[j*ratio + overlap_offset + k] (out-of-range compressed blocks skipped)
    for valid blocks j <= floor(t / l'), and -inf for invalid blocks. Forced blocks are NOT marked here
    (``select_blocks`` adds them).
    """
    _check_spec(spec)
    _check_tensor("p_cmp", p_cmp, 4, "[B, T, Hq, Tc]")
    _check_float("p_cmp", p_cmp)
    if p_cmp.shape[1] != T:
        raise ValueError(f"p_cmp: expected T = {T} at dim 1, got shape {tuple(p_cmp.shape)}")
    _check_dim("p_cmp", p_cmp, 2, spec.attention.heads, "attention.heads (Hq)")
    tc = _num_cmp(spec, T)
    if p_cmp.shape[3] != tc:
        raise ValueError(
            f"p_cmp: expected {tc} compressed blocks for T={T} (l={spec.compression.block}, "
            f"d={spec.compression.stride}), got {p_cmp.shape[3]}"
        )
    B = p_cmp.shape[0]  # noqa: N806
    pg = p_cmp.reshape(B, T, spec.attention.kv_heads, spec.G, tc)
    t_pos = torch.arange(T, device=p_cmp.device)
    return _scores_chunk(pg, t_pos, spec, spec.num_selection_blocks(T))


def _select_chunk(scores: Tensor, t_pos: Tensor, spec: NSASpec) -> Tensor:
    """scores [B, C, Hkv, Nslc] (-inf invalid) -> indices [B, C, Hkv, n] int32, ascending, -1 padded."""
    s = spec.selection
    n, lp = s.top_n, s.block
    nslc = scores.shape[-1]
    j = torch.arange(nslc, device=scores.device)[None, :]
    cur = torch.div(t_pos, lp, rounding_mode="floor")[:, None]  # current block per query
    valid = j <= cur
    forced = valid & ((j < s.force_initial) | (j > cur - s.force_local))
    adj = scores.masked_fill(~valid[None, :, None, :], -_INF)
    adj = adj.masked_fill(forced[None, :, None, :], _INF)
    # Stable descending sort: among equal scores the lower block index comes first.
    _, order = torch.sort(adj, dim=-1, descending=True, stable=True)
    kk = min(n, nslc)
    top = order[..., :kk]
    ok = torch.gather(valid[None, :, None, :].expand_as(adj), -1, top)
    big = nslc + 1
    top = torch.where(ok, top, torch.full_like(top, big))
    top, _ = torch.sort(top, dim=-1)
    top = torch.where(top == big, torch.full_like(top, -1), top)
    if kk < n:
        top = torch.cat([top, top.new_full((*top.shape[:-1], n - kk), -1)], -1)
    return top.to(torch.int32)


def select_blocks(scores: Tensor, spec: NSASpec, T: int) -> Tensor:  # noqa: N803
    """Top-n selection: scores [B, T, Hkv, Nslc] -> indices [B, T, Hkv, n] int32.

    Among the valid blocks (j <= floor(t/l')) keep the n highest scores, forced blocks (0..force_initial-1 and
    the force_local most recent valid ones) always in; ties go to the lower block index. Each row lists the
    selected blocks in ascending order followed by -1 for unused slots (fewer than n valid blocks).
    Scores of invalid blocks are ignored (whatever their value).
    """
    _check_spec(spec)
    _check_tensor("scores", scores, 4, "[B, T, Hkv, Nslc]")
    if scores.shape[1] != T:
        raise ValueError(f"scores: expected T = {T} at dim 1, got shape {tuple(scores.shape)}")
    _check_dim("scores", scores, 2, spec.attention.kv_heads, "attention.kv_heads (Hkv)")
    _check_dim("scores", scores, 3, spec.num_selection_blocks(T), "Nslc = ceil(T / l')")
    t_pos = torch.arange(T, device=scores.device)
    return _select_chunk(scores, t_pos, spec)


def selection_indices(
    q: Tensor,
    k_cmp: Tensor,
    spec: NSASpec,
    *,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """q and k_cmp -> selected block indices [B, T, Hkv, n] int32 (p_cmp -> ``selection_scores`` ->
    ``select_blocks``, computed in chunks without materialising p_cmp; varlen like ``nsa_attention``).
    No gradient flows through the result."""
    _check_spec(spec)
    _check_q(q, spec)
    sc = _resolve_scale(spec, scale)
    if cu_seqlens is None:
        _check_cmp(q, k_cmp, None, spec, _num_cmp(spec, q.shape[1]), f"T={q.shape[1]}")
        return _indices_from_q(q, k_cmp, spec, sc)
    offs = _check_cu_seqlens(cu_seqlens, q)
    coffs = [int(x) for x in compressed_cu_seqlens(cu_seqlens, spec).tolist()]
    _check_cmp(q, k_cmp, None, spec, coffs[-1], f"cu_seqlens={offs} (packed per sequence)")
    parts = [
        _indices_from_q(q[:, offs[s] : offs[s + 1]], k_cmp[:, coffs[s] : coffs[s + 1]], spec, sc)
        for s in range(len(offs) - 1)
    ]
    return torch.cat(parts, 1)


@torch.no_grad()
def _indices_from_q(q: Tensor, k_cmp: Tensor, spec: NSASpec, scale: float) -> Tensor:
    """Chunked p_cmp -> scores -> top-n, without materialising [T, Hq, Tc]. No gradient (as in the paper)."""
    B, T, Hq, _ = q.shape  # noqa: N806
    cdt = _compute_dtype(q.dtype)
    hkv, n = spec.attention.kv_heads, spec.selection.top_n
    if T == 0:
        return torch.empty((B, 0, hkv, n), dtype=torch.int32, device=q.device)
    nslc = spec.num_selection_blocks(T)
    tc = k_cmp.shape[1]
    qg = _group(q.detach().to(cdt), spec)
    kc = k_cmp.detach().to(cdt)
    C = _chunk_size(T, B * (Hq * max(tc, 1) * 3 + hkv * nslc * 4) * 8, _MIN_CHUNK)  # noqa: N806
    out = []
    for t0 in range(0, T, C):
        t_pos = torch.arange(t0, min(T, t0 + C), device=q.device)
        if tc > 0:
            p, _ = _cmp_chunk(qg[:, t0 : t0 + C], kc, t_pos, spec, scale)
        else:
            p = qg.new_zeros((B, len(t_pos), hkv, spec.G, 0))
        sc = _scores_chunk(p, t_pos, spec, nslc)
        out.append(_select_chunk(sc, t_pos, spec))
    return torch.cat(out, 1)


# --------------------------------------------------------------------------------------------------
# selection and window branches
# --------------------------------------------------------------------------------------------------


def _check_indices(indices: Any, q: Tensor, spec: NSASpec) -> None:
    _check_tensor("indices", indices, 4, "[B, T, Hkv, n]")
    _check_same_device("q", q, indices=indices)
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices: expected dtype torch.int32, got {indices.dtype}")
    if indices.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"indices: expected [B, T] = {tuple(q.shape[:2])} (like q), got {tuple(indices.shape)}"
        )
    _check_dim("indices", indices, 2, spec.attention.kv_heads, "attention.kv_heads (Hkv)")
    _check_dim("indices", indices, 3, spec.selection.top_n, "selection.top_n (n)")
    nslc = spec.num_selection_blocks(q.shape[1])
    if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= nslc):
        raise ValueError(
            f"indices: values must lie in -1..{nslc - 1} (ceil(T/l') blocks for T={q.shape[1]}), "
            f"got {int(indices.min())}..{int(indices.max())}"
        )


def selected_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, spec: NSASpec, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """The selection branch: each query attends (one softmax) to the tokens of its KV head's selected blocks
    (``indices`` [B, T, Hkv, n], -1 = unused slot) with token index <= t.

    Returns (o_slc [B, T, Hq, dv] in q's dtype, lse_slc [B, T, Hq] compute dtype, +inf where no key is seen).
    A block listed twice in a row counts once. Indices must lie in -1..ceil(T/l')-1.
    """
    _check_spec(spec)
    _check_q(q, spec)
    _check_kv(q, k, v, spec)
    _check_indices(indices, q, spec)
    o, lse = _selected_attention(q, k, v, indices, spec, _resolve_scale(spec, scale))
    return o.to(q.dtype), lse


def _selected_attention(q, k, v, indices, spec, scale):
    """Per chunk of queries: gather the union of the blocks any query of the chunk selected (per KV head)
    and do one batched matmul against them with a mask keeping each query's own blocks ("union"); or
    gather each query's own n blocks ("gather"). Both mask tokens > t. Same result either way."""
    B, T, Hq, _ = q.shape  # noqa: N806
    hkv, dk, dv = k.shape[2], k.shape[3], v.shape[3]
    cdt = _compute_dtype(q.dtype)
    lp, n = spec.selection.block, spec.selection.top_n
    if T == 0:
        return q.new_zeros((B, 0, Hq, dv), dtype=cdt), q.new_zeros((B, 0, Hq), dtype=cdt)
    nslc = spec.num_selection_blocks(T)
    dev = q.device
    qg = _group(q.to(cdt), spec)

    def blocks(x: Tensor) -> Tensor:  # [B, T, Hkv, D] -> [B*Hkv*Nslc, l'*D], zero-padded to Nslc*l' tokens
        x = x.to(cdt).permute(0, 2, 1, 3)
        x = torch.nn.functional.pad(x, (0, 0, 0, nslc * lp - T))
        return x.reshape(B * hkv * nslc, lp * x.shape[-1])

    kb, vb = blocks(k), blocks(v)
    base = ((torch.arange(B, device=dev)[:, None] * hkv + torch.arange(hkv, device=dev)[None, :]) * nslc)[
        :, :, None
    ]  # [B, Hkv, 1]: first block row of (b, h)
    offs = torch.arange(lp, device=dev)
    # Worst case the union is every block: size the chunk for [C, Hq, T] logits (x4 for softmax/backward).
    per_query = max(Hq * T * 4, hkv * n * lp * (dk + dv + 2 * spec.G + 4)) * 8
    C = _chunk_size(T, B * per_query, _MIN_CHUNK // 2)  # noqa: N806
    outs, lses = [], []
    for t0 in range(0, T, C):
        t1 = min(T, t0 + C)
        c = t1 - t0
        t_pos = torch.arange(t0, t1, device=dev)
        idx = indices[:, t0:t1].long()  # [B, C, Hkv, n]
        sel = torch.zeros((*idx.shape[:3], nslc + 1), dtype=torch.bool, device=dev)
        sel.scatter_(-1, torch.where(idx >= 0, idx, nslc), True)
        sel = sel[..., :nslc]  # [B, C, Hkv, Nslc]: query c selected block j
        union = sel.any(1)  # [B, Hkv, Nslc]
        nu = max(1, int(union.sum(-1).max()))
        q_c = qg[:, t0:t1]
        path = _SELECTION_PATH or "union"
        if path == "union":
            # One matmul per KV head against the union of the chunk's blocks (at worst dense causal, but
            # BLAS-efficient and without per-query copies: faster on CPUs than the per-query gather).
            # Union blocks first, in ascending order (stable sort of the "not in union" flags).
            ub = torch.sort((~union).to(torch.uint8), dim=-1, stable=True)[1][..., :nu]  # [B, Hkv, U]
            uok = torch.gather(union, -1, ub)
            rows = (base + ub).reshape(-1)
            kg = kb.index_select(0, rows).view(B, hkv, nu * lp, dk)
            vg = vb.index_select(0, rows).view(B, hkv, nu * lp, dv)
            pos = (ub[..., None] * lp + offs).reshape(B, hkv, nu * lp)  # token positions [B, Hkv, S]
            mine = torch.gather(sel.transpose(1, 2), -1, ub[:, :, None].expand(-1, -1, c, -1))
            mine = mine & uok[:, :, None]  # [B, Hkv, C, U]: query c selected union block u
            mask = mine[..., None].expand(-1, -1, -1, -1, lp).reshape(B, hkv, c, nu * lp)
            mask = mask & (pos[:, :, None, :] <= t_pos[None, None, :, None])
            o_c, ls = _attend_heads(q_c.transpose(1, 2), kg, vg, mask[:, :, :, None, :], scale)
            outs.append(o_c)
            lses.append(ls)
            continue
        else:
            # Per query: gather its own n blocks (the G heads of a KV head share them); repeats count once.
            srt = torch.sort(idx, dim=-1)[0]
            idx = torch.cat([srt[..., :1], srt[..., 1:].masked_fill(srt[..., 1:] == srt[..., :-1], -1)], -1)
            rows = (base[:, None] + idx.clamp_min(0)).reshape(-1)
            kq = kb.index_select(0, rows).view(B, c, hkv, n * lp, dk)
            vq = vb.index_select(0, rows).view(B, c, hkv, n * lp, dv)
            ipos = (idx[..., None] * lp + offs).reshape(B, c, hkv, n * lp)
            ok = (idx >= 0)[..., None].expand(-1, -1, -1, -1, lp).reshape(B, c, hkv, n * lp)
            ok = ok & (ipos <= t_pos[None, :, None, None])
            logits = torch.einsum("bchgd,bchsd->bchgs", q_c, kq) * scale
            p, ls = _masked_softmax(logits, ok[:, :, :, None, :])
            outs.append(_ungroup(torch.einsum("bchgs,bchsv->bchgv", p, vq)))
        lses.append(ls.flatten(2))
    return torch.cat(outs, 1), torch.cat(lses, 1)


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, spec: NSASpec, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """The sliding-window branch: query t attends to tokens max(0, t - w + 1)..t (w = spec.window_size).

    Returns (o_win [B, T, Hq, dv] in q's dtype, lse_win [B, T, Hq] compute dtype). With the window off (w = 0)
    o_win = 0 and lse_win = +inf.
    """
    _check_spec(spec)
    _check_q(q, spec)
    _check_kv(q, k, v, spec)
    o, lse = _window_attention(q, k, v, spec, _resolve_scale(spec, scale))
    return o.to(q.dtype), lse


def _window_attention(q, k, v, spec, scale):
    B, T, Hq, _ = q.shape  # noqa: N806
    dv = v.shape[3]
    cdt = _compute_dtype(q.dtype)
    w = spec.window_size
    if w == 0 or T == 0:
        return q.new_zeros((B, T, Hq, dv), dtype=cdt), q.new_full((B, T, Hq), _INF, dtype=cdt)
    qg = _group(q.to(cdt), spec)
    kh, vh = k.to(cdt).transpose(1, 2), v.to(cdt).transpose(1, 2)  # [B, Hkv, T, .]
    # Chunks of about w queries read about 2w keys; the budget caps the [C, Hq, C + w] logits.
    budget = _CHUNK_BYTES // max(1, B * Hq * (2 * min(T, w) + 1) * 4 * 8)
    C = min(T, max(_MIN_CHUNK // 4, min(w, budget)))  # noqa: N806
    outs, lses = [], []
    for t0 in range(0, T, C):
        t1 = min(T, t0 + C)
        k0 = max(0, t0 - w + 1)
        t_pos = torch.arange(t0, t1, device=q.device)
        s_pos = torch.arange(k0, t1, device=q.device)
        mask = (s_pos[None, :] <= t_pos[:, None]) & (s_pos[None, :] > t_pos[:, None] - w)
        o_c, ls = _attend_heads(
            qg[:, t0:t1].transpose(1, 2),
            kh[:, :, k0:t1],
            vh[:, :, k0:t1],
            mask[None, None, :, None, :],
            scale,
        )
        outs.append(o_c)
        lses.append(ls)
    return torch.cat(outs, 1), torch.cat(lses, 1)


# --------------------------------------------------------------------------------------------------
# the full op
# --------------------------------------------------------------------------------------------------


def _check_g(g: Any, q: Tensor) -> None:
    _check_tensor("g", g, 4, "[B, T, Hq, 3]")
    _check_same_device("q", q, g=g)
    _check_float("g", g)
    if g.shape != (*q.shape[:3], 3):
        raise ValueError(
            f"g: expected shape {(*q.shape[:3], 3)} = [B, T, Hq, 3] (cmp, slc, win), got {tuple(g.shape)}"
        )


def _branches_dense(q, k, v, k_cmp, v_cmp, spec, scale, k_win=None, v_win=None) -> dict[str, Tensor]:
    o_cmp, lse_cmp = _compressed_attention(q, k_cmp, v_cmp, spec, scale)
    indices = _indices_from_q(q, k_cmp, spec, scale)
    o_slc, lse_slc = _selected_attention(q, k, v, indices, spec, scale)
    o_win, lse_win = _window_attention(
        q, k if k_win is None else k_win, v if v_win is None else v_win, spec, scale
    )
    return {
        "o_cmp": o_cmp,
        "lse_cmp": lse_cmp,
        "o_slc": o_slc,
        "lse_slc": lse_slc,
        "o_win": o_win,
        "lse_win": lse_win,
        "indices": indices,
    }


def nsa_branches(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    spec: NSASpec,
    *,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    k_win: Tensor | None = None,
    v_win: Tensor | None = None,
) -> dict[str, Tensor]:
    """Every intermediate of the forward: ``o_cmp, o_slc, o_win`` [B, T, Hq, dv] (q's dtype),
    ``lse_cmp, lse_slc, lse_win`` [B, T, Hq] (compute dtype, +inf where a branch sees no key) and ``indices``
    [B, T, Hkv, n] int32. Same arguments and validation as ``nsa_attention`` (without gates), plus optional
    separate window keys/values ``k_win``/``v_win`` (shaped like k/v; default: k/v), used by
    ``NSAttention(separate_kv=True)``."""
    br = _nsa_branches(
        q, k, v, k_cmp, v_cmp, spec, scale=scale, cu_seqlens=cu_seqlens, k_win=k_win, v_win=v_win
    )
    for key in ("o_cmp", "o_slc", "o_win"):
        br[key] = br[key].to(q.dtype)
    return br


def _nsa_branches(
    q, k, v, k_cmp, v_cmp, spec, *, scale, cu_seqlens, k_win=None, v_win=None
) -> dict[str, Tensor]:
    _check_spec(spec)
    _check_q(q, spec)
    _check_kv(q, k, v, spec)
    if (k_win is None) != (v_win is None):
        raise ValueError("k_win/v_win: pass both or neither")
    if k_win is not None:
        try:
            _check_kv(q, k_win, v_win, spec)
        except ValueError as e:
            raise ValueError(f"(window) {e}") from None
    sc = _resolve_scale(spec, scale)
    if cu_seqlens is None:
        _check_cmp(q, k_cmp, v_cmp, spec, _num_cmp(spec, q.shape[1]), f"T={q.shape[1]}")
        return _branches_dense(q, k, v, k_cmp, v_cmp, spec, sc, k_win, v_win)
    offs = _check_cu_seqlens(cu_seqlens, q)
    coffs = [int(x) for x in compressed_cu_seqlens(cu_seqlens, spec).tolist()]
    _check_cmp(q, k_cmp, v_cmp, spec, coffs[-1], f"cu_seqlens={offs} (packed per sequence)")
    parts: list[dict[str, Tensor]] = []
    for s in range(len(offs) - 1):
        a, b = offs[s], offs[s + 1]
        ca, cb = coffs[s], coffs[s + 1]
        kw = None if k_win is None else k_win[:, a:b]
        vw = None if v_win is None else v_win[:, a:b]
        parts.append(
            _branches_dense(
                q[:, a:b], k[:, a:b], v[:, a:b], k_cmp[:, ca:cb], v_cmp[:, ca:cb], spec, sc, kw, vw
            )
        )
    return {key: torch.cat([p[key] for p in parts], 1) for key in parts[0]}


def combine_branches(br: dict[str, Tensor], g: Tensor, spec: NSASpec) -> Tensor:
    """o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win (the window term only when the window is on), computed in
    the compute dtype of ``br``'s outputs and returned in that dtype."""
    o_cmp = br["o_cmp"]
    gc = g.to(o_cmp.dtype)
    o = gc[..., 0:1] * o_cmp + gc[..., 1:2] * br["o_slc"]
    if spec.window_size > 0:
        o = o + gc[..., 2:3] * br["o_win"]
    return o


def nsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    g: Tensor,
    spec: NSASpec,
    *,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    return_indices: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Native Sparse Attention, the reference.

    Args:
        q: [B, T, Hq, dk]; k: [B, T, Hkv, dk]; v: [B, T, Hkv, dv] (query head h uses KV head h // G).
        k_cmp, v_cmp: compressed keys/values [B, Tc, Hkv, dk|dv], Tc = spec.num_compressed(T); with
            ``cu_seqlens`` packed per sequence at offsets ``compressed_cu_seqlens(cu_seqlens, spec)``.
        g: gates [B, T, Hq, 3] in [0, 1] (post-sigmoid), order (cmp, slc, win); g_win is ignored when the
            window is off.
        spec: the NSASpec (block sizes, top-n, window, head counts; shapes are checked against it).
        scale: softmax scale (default spec.scale = 1/sqrt(dk) unless the spec sets one).
        cu_seqlens: int32 [N+1] offsets of packed sequences (B = 1); each behaves exactly as if run alone.
        return_indices: also return the selected block indices [B, T, Hkv, n] int32 (ascending, -1 unused).

    Returns:
        o [B, T, Hq, dv] in q's dtype, or (o, indices).
    """
    _check_spec(spec)
    _check_q(q, spec)
    _check_g(g, q)
    br = _nsa_branches(q, k, v, k_cmp, v_cmp, spec, scale=scale, cu_seqlens=cu_seqlens)
    o = combine_branches(br, g, spec).to(q.dtype)
    if return_indices:
        return o, br["indices"]
    return o
