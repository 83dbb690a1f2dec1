"""How a kernel reads its K/V tiles: per-thread pointer loads or TMA tensor descriptors (config parameter
``LOADS``, ``DQ_LOADS`` for the selection backward's dQ). One validity rule and one default rule, shared by
every kernel family with the option (slc_fwd, win_fwd, cmp_fwd, bwd_cmp / bwd_win, bwd_slc); the emitted
side (descriptor parameters, host descriptors, ``tma_rows`` loads) is in ``templates/_macros.j2``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from ..spec import NSASpec
from .plan import DeviceLimits, element_bytes

__all__ = ["tma_available", "loads_check", "prefer_tma"]


@lru_cache(maxsize=1)
def tma_available() -> bool:
    """Whether this Triton has host-side TMA tensor descriptors (``triton.tools.tensor_descriptor``, 3.4+)."""
    try:
        return importlib.util.find_spec("triton.tools.tensor_descriptor") is not None
    except ImportError:  # pragma: no cover - no triton.tools at all
        return False


def loads_check(
    spec: NSASpec, config: Mapping[str, Any], limits: DeviceLimits, key: str = "LOADS"
) -> str | None:
    """Why config parameter ``key`` ("pointers" or "tma": how a kernel reads its K/V tiles) is invalid here,
    or None. Shared by every kernel with a TMA option (slc_fwd, win_fwd, cmp_fwd, bwd_cmp / bwd_win, and
    bwd_slc's dQ as DQ_LOADS): "tma" needs compute capability >= 9, host descriptors in this Triton and K/V
    rows that are multiples of 16 bytes."""
    loads = config.get(key, "pointers")
    if loads not in ("pointers", "tma"):
        return f"{key}: must be 'pointers' or 'tma', got {loads!r}"
    if loads == "pointers":
        return None
    if not limits.interpreter and limits.capability[0] < 9:
        return f"{key}: 'tma' needs compute capability >= 9.0, not {limits.name}: use 'pointers'"
    if not tma_available():
        return f"{key}: 'tma' needs Triton >= 3.4 (triton.tools.tensor_descriptor): use 'pointers'"
    esz = element_bytes(spec)
    if spec.attention.head_dim_qk * esz % 16 or spec.attention.head_dim_v * esz % 16:
        return f"{key}: 'tma' needs K/V rows (head_dim x element size) that are multiples of 16 bytes"
    return None


def prefer_tma(
    check: Callable[[NSASpec, Mapping[str, Any], DeviceLimits], str | None],
    spec: NSASpec,
    config: dict[str, Any],
    limits: DeviceLimits,
    key: str = "LOADS",
) -> dict[str, Any]:
    """``config`` with ``key`` = "tma" where the kernel's ``check`` accepts that (sm90+, host descriptors,
    16-byte rows, and whatever else the kernel needs), else "pointers". The default rule of every kernel whose
    TMA option was measured faster on the card (bench/RESULTS.md)."""
    ok = not limits.interpreter and check(spec, {**config, key: "tma"}, limits) is None
    return {**config, key: "tma" if ok else "pointers"}
