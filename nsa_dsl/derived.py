"""Quantities derived from a validated spec with sympy (pipeline step 2).

The only hand-written facts here are the definitions in SEMANTICS.md; everything a kernel needs as a
compile-time constant (block counts, the compression->selection overlap weights) is computed from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

from .spec import NSASpec

__all__ = ["Derived", "derive", "overlap_weights", "T"]

T = sp.Symbol("T", integer=True, positive=True)


@dataclass(frozen=True)
class Derived:
    """Compile-time constants of one spec.

    ``overlap``: the cmp->slc weights. Selection block j receives
    ``sum_k overlap[k] * p_cmp[j*ratio + offset + k]`` with ``ratio = l'/d`` and ``offset = overlap_offset``
    (negative: blocks that start before j*l'); out-of-range compressed blocks are skipped.
    ``Tc``: compressed blocks as a sympy expression in ``nsa_dsl.derived.T`` (valid for T >= l; 0 below).
    For l=32, d=16, l'=64: overlap = (1, 2, 2, 2, 1), offset = -1, ratio = 4.
    """

    G: int
    Tc: sp.Expr  # number of compressed blocks as a function of T (for T >= l)
    ratio: int  # l' / d: compressed-block starts per selection block
    overlap: tuple[int, ...]
    overlap_offset: int


def overlap_weights(l: int, d: int, lp: int) -> tuple[tuple[int, ...], int]:  # noqa: E741
    """Weights w_k = |tokens(i) ∩ tokens(j)| / d for compressed blocks i = j*l'/d + offset + k.

    Compressed block i covers [i*d, i*d + l); selection block j covers [j*l', (j+1)*l'). The overlap length
    is a piecewise-linear function of i; sympy evaluates it symbolically in j and we check it does not
    depend on j (translation invariance), then read off the integer weights.
    """
    i, j = sp.symbols("i j", integer=True)
    lo = sp.Max(i * d, j * lp)
    hi = sp.Min(i * d + l, (j + 1) * lp)
    overlap = sp.Max(0, hi - lo) / d
    ratio = lp // d
    # Blocks that can touch selection block j: i*d + l > j*l' and i*d < (j+1)*l'.
    first = sp.floor(sp.Rational(-l, d)) + 1  # smallest k (relative to j*ratio) with k*d + l > 0
    last = ratio - 1
    weights = []
    for k in range(int(first), last + 1):
        wk = sp.simplify(overlap.subs(i, j * ratio + k))
        # Translation invariance: the same weight for every j (checked at a few j's symbolically).
        vals = {sp.nsimplify(wk.subs(j, jj)) for jj in range(0, 4)}
        if len(vals) != 1:
            raise AssertionError(f"overlap weight depends on j: {vals}")
        weights.append(vals.pop())
    # Trim zero weights at either end.
    offset = int(first)
    while weights and weights[0] == 0:
        weights.pop(0)
        offset += 1
    while weights and weights[-1] == 0:
        weights.pop()
    for wv in weights:
        if not wv.is_integer:
            raise AssertionError(f"non-integer overlap weight {wv} (d must divide l and l')")
    return tuple(int(wv) for wv in weights), offset


@lru_cache(maxsize=256)
def derive(spec: NSASpec) -> Derived:
    """The compile-time constants of ``spec`` (cached per spec)."""
    l, d, lp = spec.compression.block, spec.compression.stride, spec.selection.block  # noqa: E741
    weights, offset = overlap_weights(l, d, lp)
    return Derived(
        G=spec.G,
        Tc=sp.floor((T - l) / d) + 1,
        ratio=lp // d,
        overlap=weights,
        overlap_offset=offset,
    )
