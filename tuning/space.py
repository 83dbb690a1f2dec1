"""Search spaces: the kernel's declared choices, pruned by its own checks and the tuner's device checks.

A kernel declares ``space(spec, limits) -> {param: [choices]}`` (tiles, ``num_warps``, ``num_stages``,
schedule variants...) and ``check(spec, config, limits) -> str | None``. A point of the space is merged over
``default(spec, limits)`` to give a full config. The tuner adds device checks of its own before anything is
compiled: tile parameters must be powers of two, ``num_warps`` in 1..32 (power of two),
``num_stages`` in 1..8, and a shared-memory estimate must fit ``limits.smem_per_block``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import Any

from .keys import canonical

__all__ = [
    "full_config",
    "default_neighbours",
    "device_check",
    "why_invalid",
    "iter_points",
    "valid_points",
    "smem_estimate",
    "grid_size",
]

_TILE_RE = re.compile(r"(^|_)(BLOCK|TILE)(_|$)|^BLOCK|^TILE", re.IGNORECASE)
_Q_TILE = ("BLOCK_M", "BLOCK_Q", "BLOCK_T", "BLOCK_G", "BLOCK_H")
_KV_TILE = ("BLOCK_N", "BLOCK_KV", "BLOCK_S", "BLOCK_C")
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def full_config(kdef: Any, spec: Any, point: dict[str, Any], limits: Any) -> dict[str, Any]:
    """``default(spec, limits)`` overridden by ``point``."""
    cfg = dict(kdef.default(spec, limits))
    cfg.update(point)
    return cfg


def smem_estimate(kdef: Any, spec: Any, config: dict[str, Any]) -> int:
    """Shared memory (bytes) a config needs: the kernel's own ``smem_bytes(spec, config)`` if it has one,
    else a generic estimate ``elem * (q_tile * dk + num_stages * kv_tile * (dk + dv))`` from the tile names
    (BLOCK_M/Q/T/G/H for query rows, BLOCK_N/KV/S/C for keys); 0 when no tile names are recognised."""
    own = getattr(kdef, "smem_bytes", None)
    if callable(own):
        return int(own(spec, config))
    up = {str(k).upper(): v for k, v in config.items()}
    q = max([int(up[n]) for n in _Q_TILE if isinstance(up.get(n), int)] or [0])
    kv = max([int(up[n]) for n in _KV_TILE if isinstance(up.get(n), int)] or [0])
    if not q and not kv:
        return 0
    stages = int(up.get("NUM_STAGES", 1) or 1)
    a = spec.attention
    elem = _DTYPE_BYTES.get(a.dtype, 2)
    dk, dv = a.head_dim_qk, a.head_dim_v
    # Triton pads head dims to powers of two inside the kernel.
    dk_p, dv_p = 1 << (dk - 1).bit_length(), 1 << (dv - 1).bit_length()
    return elem * (max(q, 16) * dk_p + max(stages - 1, 1) * kv * (dk_p + dv_p))


def device_check(kdef: Any, spec: Any, config: dict[str, Any], limits: Any) -> str | None:
    """The tuner's own checks (see module doc); None = fine."""
    for name, v in sorted(config.items()):
        if isinstance(v, bool) or not isinstance(v, int):
            continue
        if _TILE_RE.search(str(name)) and not _is_pow2(v):
            return f"{name}: tile sizes must be powers of two, got {v}"
    nw = config.get("num_warps")
    if nw is not None and (not isinstance(nw, int) or not _is_pow2(nw) or nw > 32):
        return f"num_warps: must be a power of two in 1..32, got {nw!r}"
    ns = config.get("num_stages")
    if ns is not None and (not isinstance(ns, int) or not 1 <= ns <= 8):
        return f"num_stages: must be in 1..8, got {ns!r}"
    smem_limit = int(getattr(limits, "smem_per_block", 0) or 0)
    if smem_limit:
        need = smem_estimate(kdef, spec, config)
        if need > smem_limit:
            return f"shared memory: estimated {need} bytes > device limit {smem_limit}"
    return None


def why_invalid(kdef: Any, spec: Any, config: dict[str, Any], limits: Any) -> str | None:
    """The kernel's ``check`` first, then ``device_check``; None = valid."""
    try:
        why = kdef.check(spec, config, limits)
    except Exception as e:  # a check that crashes rejects the point rather than the run
        return f"check raised {type(e).__name__}: {e}"
    if why:
        return str(why)
    return device_check(kdef, spec, config, limits)


def iter_points(space: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    """Every point of the grid, in a fixed order (parameters sorted by name, choices in declared order)."""
    names = sorted(space)
    for combo in itertools.product(*(list(space[n]) for n in names)):
        yield dict(zip(names, combo, strict=True))


def default_neighbours(default: dict[str, Any], space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Points that differ from ``default`` in one parameter, nearest first: every parameter moved one step
    down and up its declared choice list, then two steps, and so on (parameters in declared order). A
    parameter whose default value is not among its choices contributes every choice at distance 1. Validity
    is not checked here."""
    return neighbours(default, space, max_params=1)


def neighbours(
    point: dict[str, Any], space: dict[str, list[Any]], max_params: int = 1
) -> list[dict[str, Any]]:
    """Points that differ from ``point`` in 1..``max_params`` (1 or 2) parameters, nearest first: ordered by
    the summed number of steps along the parameters' declared choice lists, then by the number of parameters
    moved, then by parameter order (below before above at equal distance). A parameter whose value is not
    among its choices contributes every choice at distance 1. Validity is not checked here."""
    if max_params not in (1, 2):
        raise ValueError(f"max_params: must be 1 or 2, got {max_params}")
    base = {p: point.get(p) for p in space}
    per: list[list[tuple[int, Any]]] = []  # per parameter: (steps, value) of every other choice
    for p, choices in space.items():
        at = choices.index(base[p]) if base[p] in choices else None
        per.append([(1 if at is None else abs(j - at), v) for j, v in enumerate(choices) if j != at])
    names = list(space)
    moves: list[tuple[int, int, int, int, dict[str, Any]]] = []
    for i, mi in enumerate(per):
        for d, v in mi:
            moves.append((d, 1, i, -1, {**base, names[i]: v}))
    if max_params == 2:
        for i in range(len(per)):
            for j in range(i + 1, len(per)):
                for di, vi in per[i]:
                    for dj, vj in per[j]:
                        moves.append((di + dj, 2, i, j, {**base, names[i]: vi, names[j]: vj}))
    moves.sort(key=lambda m: m[:4])  # stable: below before above at equal keys
    return [m[4] for m in moves]


def grid_size(space: dict[str, list[Any]]) -> int:
    n = 1
    for v in space.values():
        n *= len(v)
    return n


def valid_points(
    kdef: Any, spec: Any, limits: Any
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """(valid full configs, [(invalid full config, reason)]) over the whole declared grid; duplicates (points
    that give the same full config) appear once."""
    space = kdef.space(spec, limits)
    seen: set[str] = set()
    good: list[dict[str, Any]] = []
    bad: list[tuple[dict[str, Any], str]] = []
    for p in iter_points(space):
        cfg = full_config(kdef, spec, p, limits)
        c = canonical(cfg)
        if c in seen:
            continue
        seen.add(c)
        why = why_invalid(kdef, spec, cfg, limits)
        if why:
            bad.append((cfg, why))
        else:
            good.append(cfg)
    return good, bad
