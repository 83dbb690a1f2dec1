"""Reverse index for the selection backward: selection block -> the tokens that selected it.

The forward's ``indices`` [T, Hkv, n] (packed tokens, block ids local to each sequence, -1 unused) say which
blocks each token reads. dK/dV of a block is a sum over the tokens that read it, so the backward turns the
index around: one stable sort of int32 block keys (hkv * NB + global block) on the GPU, then a count per block
by binary search. The flat order of ``indices`` is token-major, so the tokens of a block come out in ascending
order: the accumulation order of the dK/dV kernel is fixed and the result is bitwise reproducible without
atomics. No host synchronisation: the list sizes are static upper bounds from the shapes (``bounds``), and the
kernels skip the empty slots past the real items.

Long lists (block 0 is read by every token when ``force_initial`` >= 1) are split into work items of at most
``chunk`` tokens; such blocks' items write fp32 partials that a second kernel sums in item order.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

__all__ = ["bounds", "build", "source"]


@lru_cache(maxsize=1)
def source() -> str:
    """The builder's source: the ``host_reverse_index`` macro of ``_macros.j2`` (also rendered into the
    emitted ``bwd_slc`` module, so the two never drift apart)."""
    from .render import environment

    tmpl = environment().from_string('{% import "_macros.j2" as m %}{{ m.host_reverse_index() }}')
    return "import torch\n" + tmpl.render()


@lru_cache(maxsize=1)
def _namespace() -> dict[str, Any]:
    import sys
    import types

    name = "nsa_dsl.codegen._reverse_index_impl"
    mod = types.ModuleType(name)
    sys.modules[name] = mod  # dataclasses look their module up
    exec(compile(source(), "<nsa_dsl host_reverse_index>", "exec"), mod.__dict__)
    return mod.__dict__


def build(indices: Any, cu_seqlens: Any, block: int, chunk: int) -> Any:
    """Build the reverse index (see ``ReverseIndex``).

    Args:
        indices: int32 [T, Hkv, n] selected blocks per packed token (local to its sequence, -1 unused).
        cu_seqlens: int32 [N+1] sequence offsets into the packed tokens (same device).
        block: selection block size l'.
        chunk: most tokens per work item (>= 1).
    """
    return _namespace()["build_reverse_index"](indices, cu_seqlens, block, chunk)


def bounds(T: int, hkv: int, n: int, n_seq: int, block: int, chunk: int) -> tuple[int, int, int, int, int]:  # noqa: N803
    """Static sizes (block keys, entries, work items, partial slots, reductions) of the reverse index of T
    packed tokens in n_seq sequences: upper bounds from the shapes, so that building needs no host sync."""
    return _namespace()["reverse_index_bounds"](T, hkv, n, n_seq, block, chunk)


def __getattr__(name: str) -> Any:
    if name == "ReverseIndex":
        return _namespace()["ReverseIndex"]
    raise AttributeError(name)
