"""Analytic cost model of NSA vs dense causal attention: sympy expressions in T (and the batch B).

``cost_model(spec)`` returns a :class:`CostModel`. All expressions use the symbols ``model.T`` (sequence /
context length) and ``model.B`` (batch); evaluate them with ``model.at(expr, T=..., batch=...)``.

What is counted (the definitions, so that numbers can be checked by hand):

* **Keys per query** (``model.keys``), for the query that sees the whole context of T tokens (the last query
  of a prefill, or a decode step with T cached tokens), per query head:
  ``cmp`` = Tc = floor((T - l)/d) + 1 visible compressed blocks (0 if T < l); ``slc`` = min(n·l', T)
  selected tokens; ``win`` = min(w, T) window tokens (0 when the window is off); ``nsa`` = their sum;
  ``dense`` = T. Branches are counted separately even where they overlap, as kernels read them separately.
* **Keys summed over a causal sequence** (``model.keys_total``): the same counts for every query position
  t = 0..T-1 (context s = t + 1), summed, in closed form (exact for every T; ``slc`` uses min(n·l', s), the
  paper's n·l' bound, which is exact once the selected blocks are full).
* **FLOPs**: matrix-multiply FLOPs only (2 per multiply-add). Forward: 2·(d_k + d_v) per (query head, key);
  backward (recompute S, dP = dO·Vᵀ, dV, dQ, dK): 2·(3·d_k + 2·d_v). Softmax, top-n, the cmp->slc score
  mapping and the compression MLP are O(T·Tc) or O(T) and left out. Both NSA and dense use the same
  per-key factors, so forward and backward FLOP ratios coincide when d_k and d_v are the same for both.
* **Bytes**: the compulsory HBM traffic of a fused kernel, i.e. every input read once and every output
  written once, in the spec's dtype (LSE float32, indices int32). For a decode step this is the KV actually
  read: NSA reads only Tc compressed + n·l' selected + w window tokens per KV head, dense reads all T.
  For forward/backward this is a lower bound (re-reads across query tiles are tiling decisions).
* **Decode tokens** (``nsa.decode_tokens``, ``dense.decode_tokens``): KV tokens read per decode step per
  (sequence, KV head) = ``keys['nsa']`` and T. The paper's Table 4 counts compressed tokens as T/d
  (``paper_decode_tokens`` = T/d + n·l' + w: 2048 / 2560 / 3584 / 5632 at 8k..64k for the paper's spec);
  the exact count Tc = floor((T - l)/d) + 1 is about l/d - 1 tokens smaller (1 for the paper's spec:
  2047 / 2559 / 3583 / 5631), which leaves the expected speedups 4 / 6.4 / 9.1 / 11.6× unchanged after
  rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import sympy as sp

from .derived import T as _T
from .spec import NSASpec

__all__ = ["PassCost", "AttentionCost", "CostModel", "cost_model", "DTYPE_BYTES"]

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

B = sp.Symbol("B", integer=True, positive=True)


@dataclass(frozen=True)
class PassCost:
    """FLOPs and compulsory bytes of one pass (sympy expressions in T and B)."""

    flops: sp.Expr
    bytes: sp.Expr


@dataclass(frozen=True)
class AttentionCost:
    """Costs of one attention variant: a full causal forward and backward over T tokens, and one decode
    step with T cached tokens. ``decode_tokens``: KV tokens read per decode step per (sequence, KV head)."""

    forward: PassCost
    backward: PassCost
    decode: PassCost
    decode_tokens: sp.Expr


@dataclass(frozen=True)
class CostModel:
    """Cost expressions of one spec (see the module docstring for the exact definitions).

    ``keys`` / ``keys_total`` are keyed by ``"cmp"``, ``"slc"``, ``"win"``, ``"nsa"`` (sum of the three)
    and ``"dense"``. ``nsa`` / ``dense`` hold forward, backward and decode costs.
    """

    spec: NSASpec
    T: sp.Symbol
    B: sp.Symbol
    keys: dict[str, sp.Expr]
    keys_total: dict[str, sp.Expr]
    nsa: AttentionCost
    dense: AttentionCost
    paper_decode_tokens: sp.Expr
    notes: tuple[str, ...] = field(default=())

    def at(self, expr: sp.Expr, T: int, batch: int = 1) -> int | float:  # noqa: N803
        """Evaluate an expression of this model at sequence length ``T`` and batch ``batch``."""
        if int(T) < 1 or int(batch) < 1:
            raise ValueError(f"T and batch: must be positive integers, got T={T!r}, batch={batch!r}")
        v = sp.sympify(expr).subs({self.T: int(T), self.B: int(batch)})
        if not v.is_number:
            raise ValueError(f"expr: must be an expression in T and B only, got {expr}")
        return int(v) if v.is_integer else float(v)

    def decode_speedup(self, T: int) -> float:  # noqa: N803
        """Expected decode speedup (memory bound): dense tokens / NSA tokens read per step."""
        return self.at(self.dense.decode_tokens, T) / self.at(self.nsa.decode_tokens, T)

    def paper_decode_speedup(self, T: int) -> float:  # noqa: N803
        """The paper's Table 4 expected speedup: T / (T/d + n·l' + w)."""
        return int(T) / self.at(self.paper_decode_tokens, T)

    def flop_ratio(self, T: int, which: str = "forward") -> float:  # noqa: N803
        """Dense / NSA FLOPs of ``which`` in forward | backward | decode."""
        if which not in ("forward", "backward", "decode"):
            raise ValueError(f"which: must be forward, backward or decode, got {which!r}")
        dense, nsa = getattr(self.dense, which).flops, getattr(self.nsa, which).flops
        return self.at(dense, T) / self.at(nsa, T)

    def row(self, T: int) -> dict[str, Any]:  # noqa: N803
        """The numbers ``nsa-compile --report`` prints for one T."""
        return {
            "T": int(T),
            "dense_tokens": self.at(self.dense.decode_tokens, T),
            "cmp_tokens": self.at(self.keys["cmp"], T),
            "slc_tokens": self.at(self.keys["slc"], T),
            "win_tokens": self.at(self.keys["win"], T),
            "nsa_tokens": self.at(self.nsa.decode_tokens, T),
            "paper_tokens": self.at(self.paper_decode_tokens, T),
            "decode_speedup": self.decode_speedup(T),
            "paper_decode_speedup": self.paper_decode_speedup(T),
            "forward_flop_ratio": self.flop_ratio(T, "forward"),
            "backward_flop_ratio": self.flop_ratio(T, "backward"),
        }


def _sum_min(c: int, T: sp.Expr) -> sp.Expr:  # noqa: N803
    """sum_{s=1}^{T} min(s, c) in closed form (c >= 0)."""
    return sp.Piecewise((T * (T + 1) / 2, T <= c), (sp.Rational(c * (c + 1), 2) + c * (T - c), True))


def _num_visible_cmp(s: sp.Expr, l: int, d: int) -> sp.Expr:  # noqa: E741
    """Tc(s): compressed blocks visible to a query that sees s tokens (block i iff i·d + l <= s)."""
    return sp.Piecewise((0, s < l), (sp.floor((s - l) / d) + 1, True))


def _sum_visible_cmp(T: sp.Expr, l: int, d: int) -> sp.Expr:  # noqa: E741, N803
    """sum_{s=1}^{T} Tc(s) in closed form: with K = T - l + 1, sum_{m=0}^{K-1} (floor(m/d) + 1)
    = K + d·q(q-1)/2 + r·q where q = floor(K/d), r = K - d·q."""
    K = T - l + 1  # noqa: N806
    q = sp.floor(K / d)
    r = K - d * q
    return sp.Piecewise((0, T < l), (K + d * q * (q - 1) / 2 + r * q, True))


@lru_cache(maxsize=128)
def cost_model(spec: NSASpec) -> CostModel:
    """The cost model of ``spec`` (see the module docstring). Expressions in ``T`` and ``B``."""
    if not isinstance(spec, NSASpec):
        raise ValueError(f"spec: must be an NSASpec, got {type(spec).__name__}")
    T = _T  # noqa: N806
    a, c, s = spec.attention, spec.compression, spec.selection
    Hq, Hkv, dk, dv = a.heads, a.kv_heads, a.head_dim_qk, a.head_dim_v  # noqa: N806
    l, d, lp, n, w = c.block, c.stride, s.block, s.top_n, spec.window_size  # noqa: E741
    es = DTYPE_BYTES[a.dtype]
    Tc = _num_visible_cmp(T, l, d)  # noqa: N806

    keys = {
        "cmp": Tc,
        "slc": sp.Min(T, n * lp),
        "win": sp.Min(T, w) if w else sp.Integer(0),
    }
    keys["nsa"] = keys["cmp"] + keys["slc"] + keys["win"]
    keys["dense"] = T
    total = {
        "cmp": _sum_visible_cmp(T, l, d),
        "slc": _sum_min(n * lp, T),
        "win": _sum_min(w, T) if w else sp.Integer(0),
    }
    total["nsa"] = total["cmp"] + total["slc"] + total["win"]
    total["dense"] = T * (T + 1) / 2

    fwd_per_key = 2 * (dk + dv)
    bwd_per_key = 2 * (3 * dk + 2 * dv)

    # Compulsory traffic (elements), per batch element.
    q_el, o_el = T * Hq * dk, T * Hq * dv
    kv_el = T * Hkv * (dk + dv)
    kv_cmp_el = Tc * Hkv * (dk + dv)
    g_el = T * Hq * 3
    lse_bytes_dense = T * Hq * 4
    lse_bytes_nsa = 3 * T * Hq * 4  # one LSE per branch
    idx_bytes = T * Hkv * n * 4

    dense_fwd = PassCost(
        flops=B * Hq * fwd_per_key * total["dense"],
        bytes=B * ((q_el + kv_el + o_el) * es + lse_bytes_dense),
    )
    dense_bwd = PassCost(
        flops=B * Hq * bwd_per_key * total["dense"],
        # read q, k, v, o, dO, LSE; write dQ, dK, dV
        bytes=B * ((2 * q_el + 2 * kv_el + 2 * o_el) * es + lse_bytes_dense),
    )
    nsa_fwd = PassCost(
        flops=B * Hq * fwd_per_key * total["nsa"],
        bytes=B * ((q_el + kv_el + kv_cmp_el + g_el + o_el) * es + lse_bytes_nsa + idx_bytes),
    )
    nsa_bwd = PassCost(
        flops=B * Hq * bwd_per_key * total["nsa"],
        # read q, k, v, k_cmp, v_cmp, g, o, dO, LSEs, indices; write dQ, dK, dV, dK_cmp, dV_cmp, dg
        bytes=B * ((2 * (q_el + kv_el + kv_cmp_el + g_el) + 2 * o_el) * es + lse_bytes_nsa + idx_bytes),
    )
    step_io = Hq * (dk + dv) * es  # q read, o written, per sequence
    dense_dec = PassCost(
        flops=B * Hq * fwd_per_key * keys["dense"],
        bytes=B * (Hkv * keys["dense"] * (dk + dv) * es + step_io),
    )
    nsa_dec = PassCost(
        flops=B * Hq * fwd_per_key * keys["nsa"],
        bytes=B * (Hkv * keys["nsa"] * (dk + dv) * es + step_io + Hq * 3 * es),
    )
    return CostModel(
        spec=spec,
        T=T,
        B=B,
        keys=keys,
        keys_total=total,
        nsa=AttentionCost(nsa_fwd, nsa_bwd, nsa_dec, keys["nsa"]),
        dense=AttentionCost(dense_fwd, dense_bwd, dense_dec, keys["dense"]),
        paper_decode_tokens=T / d + n * lp + w,
    )
