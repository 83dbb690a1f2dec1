"""Kernel family: selected attention (group-centric and KV-outer schedules), sliding window, gated combine.

Each ``register(KernelDef(...))`` block below is self-contained: template, search space, validity check
(power-of-two tiles, shared-memory and register estimates against the device limits) and the deterministic
per-architecture default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..spec import NSASpec
from .loads import loads_check, prefer_tma
from .plan import DeviceLimits, KernelDef, element_bytes, next_pow2, register, split_dim


def _pow2(x: Any) -> bool:
    return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


def _padded(dim: int) -> int:
    """Columns a head dim really costs after splitting into power-of-two chunks (192 -> 192, 72 -> 80)."""
    return sum(w for (_, w, _) in split_dim(dim))


def _common_check(config: Mapping[str, Any], tiles: tuple[str, ...], limits: DeviceLimits) -> str | None:
    for t in tiles:
        v = config.get(t)
        if not _pow2(v) or v < 16:
            return f"{t}: must be a power of two >= 16, got {v!r}"
    nw = config.get("num_warps")
    if not _pow2(nw) or nw > min(16, limits.max_num_warps):
        return f"num_warps: must be a power of two <= 16, got {nw!r}"
    ns = config.get("num_stages")
    if not isinstance(ns, int) or not 1 <= ns <= 6:
        return f"num_stages: must be an integer in 1..6, got {ns!r}"
    return None


def _regs_per_thread(elems_fp32: int, elems_16: int, num_warps: int) -> float:
    """Rough 32-bit registers per thread for the live tiles (accumulators fp32, operands 16-bit)."""
    return (elems_fp32 + elems_16 / 2) / (num_warps * 32)


# ------------------------------------------------------------------------------------------------
# slc_fwd: group-centric selected attention
# ------------------------------------------------------------------------------------------------


def _gpad(spec: NSASpec) -> int:
    """MMA rows of one (token, KV head) program: G padded to a power of two >= 16."""
    return max(16, next_pow2(spec.G))


def _slc_space(spec: NSASpec, limits: DeviceLimits) -> dict[str, list]:
    top = max(16, min(128, next_pow2(spec.selection.block)))
    return {
        "BLOCK_N": [b for b in (16, 32, 64, 128) if b <= top],
        "num_warps": [1, 2, 4, 8],
        "num_stages": [1, 2, 3, 4],
        "schedule": ["group", "kvouter"],
        # group-centric only: consecutive tokens per program (shared blocks re-read from L1)
        "TPP": [1, 2, 4, 8],
        # group-centric only: "rows" (the G heads are the MMA rows, padded to 16) or "keys" (transposed: the
        # block's keys are the M side, so the tiles are wgmma-sized for any G)
        "LAYOUT": ["rows", "keys"],
        # K/V sub-tiles through pointer loads or tensor-memory-accelerator (TMA) descriptor loads (bulk copies
        # into shared memory, no per-thread addresses; out-of-range rows read 0); "tma" applies to the
        # group-centric schedule with LAYOUT "rows" and is ignored by the others
        "LOADS": ["pointers", "tma"],
        # KV-outer schedule only: MMA rows (tokens x heads of the group), entries per program, merge rows,
        # whether the block's K/V stay loaded across the program's entries
        "BLOCK_M": [16, 32, 64, 128],
        "CHUNK": [16, 32, 64, 128, 256],
        "BLOCK_R": [16, 32, 64],
        "KV_RESIDENT": [True, False],
        "KV_WARPS": [2, 4, 8],
    }


def _slc_check(spec: NSASpec, config: Mapping[str, Any], limits: DeviceLimits) -> str | None:
    why = _common_check(config, ("BLOCK_N",), limits)
    if why:
        return why
    if config.get("schedule") not in _slc_space(spec, limits)["schedule"]:
        known = _slc_space(spec, limits)["schedule"]
        return f"schedule: must be one of {known}, got {config.get('schedule')!r}"
    if config.get("TPP") not in (1, 2, 4, 8, 16):
        return f"TPP: must be 1, 2, 4, 8 or 16 tokens per program, got {config.get('TPP')!r}"
    if config.get("LAYOUT", "rows") not in ("rows", "keys"):
        return f"LAYOUT: must be 'rows' or 'keys', got {config.get('LAYOUT')!r}"
    why = loads_check(spec, config, limits)
    if why:
        return why
    if config["schedule"] == "kvouter":
        why = _kvouter_check(spec, config)
        if why:
            return why
    bn = config["BLOCK_N"]
    if bn > max(16, next_pow2(spec.selection.block)):
        return f"BLOCK_N: {bn} > the selection block l'={spec.selection.block} rounded up to a power of two"
    if limits.interpreter:
        return None
    a = spec.attention
    dk, dv, esz = _padded(a.head_dim_qk), _padded(a.head_dim_v), element_bytes(spec)
    smem = (config["num_stages"] * bn * (dk + dv) + _gpad(spec) * dk) * esz
    if smem > limits.smem_per_block:
        return f"num_stages/BLOCK_N: ~{smem} bytes of shared memory > the device's {limits.smem_per_block}"
    regs = _regs_per_thread(_gpad(spec) * (dv + bn), _gpad(spec) * dk, config["num_warps"])
    if regs > 192:
        return f"num_warps: {config['num_warps']} warps leave ~{regs:.0f} regs/thread for live tiles (> 192)"
    return None


def _kvouter_check(spec: NSASpec, config: Mapping[str, Any]) -> str | None:
    gp2 = next_pow2(spec.G)
    for t in ("BLOCK_M", "BLOCK_R"):
        v = config.get(t)
        if not _pow2(v) or v < max(16, gp2):
            return f"{t}: must be a power of two >= max(16, G={spec.G} rounded up), got {v!r}"
    bt = config["BLOCK_M"] // gp2
    ch = config.get("CHUNK")
    if not isinstance(ch, int) or ch < bt or ch % bt:
        return f"CHUNK: must be a positive multiple of BLOCK_M / G (= {bt} tokens), got {ch!r}"
    kw = config.get("KV_WARPS")
    if not _pow2(kw) or kw > 16:
        return f"KV_WARPS: must be a power of two <= 16, got {kw!r}"
    if not isinstance(config.get("KV_RESIDENT"), bool):
        return f"KV_RESIDENT: must be true or false, got {config.get('KV_RESIDENT')!r}"
    return None


def _slc_default(spec: NSASpec, limits: DeviceLimits) -> dict[str, Any]:
    """Group-centric for G >= 8 (the MMA rows are real heads), KV-outer below (group-centric pads G to 16 rows
    and re-reads every selected block per token). Measured on H200 at T = 32k: G = 16 group 9.6 ms vs KV-outer
    10.7 ms; G = 2 group 31.6 ms vs KV-outer 7.0 ms."""
    bn = max(16, min(64, next_pow2(spec.selection.block)))
    schedule = "group" if spec.G >= 8 else "kvouter"
    if limits.interpreter:
        return {"BLOCK_N": bn, "num_warps": 4, "num_stages": 1, "schedule": schedule, **_SCHEDULE_DEFAULT}
    cfg = {"BLOCK_N": bn, "num_warps": 2, "num_stages": 2, "schedule": schedule, **_SCHEDULE_DEFAULT}
    # K/V through TMA descriptors where they apply (H200, sweep_slcwin.py --group, 2026-11-29 15:05 UTC, ms,
    # pointers -> tma, outputs bitwise equal): paper 8k 2.38 -> 2.29, 64k 19.6 -> 18.2; fla_compat 8k
    # 2.02 -> 1.79, 64k 16.5 -> 14.7 (bench/results/slc_tma_T*_h200_s8.json)
    return prefer_tma(_slc_check, spec, cfg, limits)


#: Schedule-specific parameters (group-centric: TPP, LAYOUT; KV-outer: the rest), set for either schedule
_SCHEDULE_DEFAULT = {"BLOCK_M": 64, "CHUNK": 256, "BLOCK_R": 16, "KV_RESIDENT": True, "TPP": 1, "KV_WARPS": 4,
                     "LAYOUT": "rows", "LOADS": "pointers"}


def _slc_constants(spec: NSASpec, config: Mapping[str, Any]) -> dict[str, Any]:
    bn = int(config["BLOCK_N"])
    gp2 = next_pow2(spec.G)
    # the KV-outer merge works on [rows, slots, <= 64 columns] tiles
    merge_chunks = [
        (o + i, min(64, w - i), min(64, max(0, v - i)))
        for (o, w, v) in split_dim(spec.attention.head_dim_v)
        for i in range(0, w, 64)
    ]
    return {
        "MERGE_CHUNKS": merge_chunks,
        "GPAD": _gpad(spec),
        "GP2": gp2,
        "NSUB": -(-spec.selection.block // bn),
        "BLOCK_T": max(1, int(config.get("BLOCK_M", 64)) // gp2),
    }


register(
    KernelDef(
        name="slc_fwd",
        template="slc_fwd.py.j2",
        pass_="fwd",
        space=_slc_space,
        check=_slc_check,
        default=_slc_default,
        constants=_slc_constants,
        doc="selected attention, group-centric: one program per (token, KV head), G heads as MMA rows",
    )
)


# ------------------------------------------------------------------------------------------------
# win_fwd: sliding-window attention
# ------------------------------------------------------------------------------------------------


def _win_space(spec: NSASpec, limits: DeviceLimits) -> dict[str, list]:
    return {
        "BLOCK_M": [16, 32, 64, 128],
        "BLOCK_N": [16, 32, 64, 128],
        "num_warps": [2, 4, 8],
        "num_stages": [1, 2, 3, 4],
        # query heads of one KV head packed into a tile's rows (they share every K/V tile)
        "HEADS": [h for h in (1, 2, 4, 8, 16) if spec.G % h == 0],
        # K/V tiles through pointer loads or TMA descriptors (as the selection kernel's LOADS)
        "LOADS": ["pointers", "tma"],
    }


def _win_check(spec: NSASpec, config: Mapping[str, Any], limits: DeviceLimits) -> str | None:
    why = _common_check(config, ("BLOCK_M", "BLOCK_N"), limits)
    if why:
        return why
    gh = config.get("HEADS", 1)
    if not _pow2(gh) or spec.G % gh or gh > config["BLOCK_M"]:
        return f"HEADS: must be a power of two dividing G={spec.G} and <= BLOCK_M, got {gh!r}"
    why = loads_check(spec, config, limits)
    if why:
        return why
    if limits.interpreter:
        return None
    a = spec.attention
    dk, dv, esz = _padded(a.head_dim_qk), _padded(a.head_dim_v), element_bytes(spec)
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    smem = (config["num_stages"] * bn * (dk + dv) + bm * dk) * esz
    if smem > limits.smem_per_block:
        return f"num_stages/BLOCK_N/BLOCK_M: ~{smem} bytes of shared memory > {limits.smem_per_block}"
    regs = _regs_per_thread(bm * (dv + bn), bm * dk, config["num_warps"])
    if regs > 224:
        return f"num_warps: {config['num_warps']} warps leave ~{regs:.0f} regs/thread for live tiles (> 224)"
    return None


def _win_default(spec: NSASpec, limits: DeviceLimits) -> dict[str, Any]:
    if limits.interpreter:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "HEADS": 1}
        return {**cfg, "LOADS": "pointers"}
    # H200, paper spec, T = 32k: BLOCK_M 128 (32 tokens x 4 heads) / BLOCK_N 64 / 8 warps / 2 stages 2.34 ms;
    # 64/64/4/2 with one head per tile 2.43 ms; 128/64/8/3 2.66 ms. TMA K/V loads (sweep_slcwin.py --window,
    # 2026-11-29 16:47 UTC, ms at 8k / 64k): one head per tile (small_group) 0.240 / 1.99 -> 0.217 / 1.79;
    # four heads per tile (paper) 0.581 / 4.64 -> 0.588 / 4.70, so pointer loads stay there.
    if spec.G % 4 == 0:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "HEADS": 4}
        return {**cfg, "LOADS": "pointers"}
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "HEADS": 1}
    return prefer_tma(_win_check, spec, cfg, limits)


register(
    KernelDef(
        name="win_fwd",
        template="win_fwd.py.j2",
        pass_="fwd",
        space=_win_space,
        check=_win_check,
        default=_win_default,
        enabled=lambda spec: spec.window_size > 0,
        doc="sliding-window attention over tiles of BLOCK_M queries, only the KV range the tile needs",
    )
)


# ------------------------------------------------------------------------------------------------
# combine_fwd: the gated sum as a stand-alone elementwise kernel
# ------------------------------------------------------------------------------------------------


def _combine_check(spec: NSASpec, config: Mapping[str, Any], limits: DeviceLimits) -> str | None:
    v = config.get("BLOCK_R")
    if not _pow2(v) or not 1 <= v <= 256:
        return f"BLOCK_R: must be a power of two in 1..256, got {v!r}"
    nw = config.get("num_warps")
    if not _pow2(nw) or nw > 16:
        return f"num_warps: must be a power of two <= 16, got {nw!r}"
    return None


register(
    KernelDef(
        name="combine_fwd",
        template="combine_fwd.py.j2",
        pass_="fwd",
        space=lambda spec, limits: {"BLOCK_R": [8, 16, 32, 64], "num_warps": [2, 4, 8]},
        check=_combine_check,
        default=lambda spec, limits: {"BLOCK_R": 16 if limits.interpreter else 32, "num_warps": 4},
        doc="gated sum o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win (when no branch kernel fuses it)",
    )
)
