"""Kernel family: compressed attention forward (``cmp_fwd``) and selection scoring + top-n (``slc_topk``).

Config parameters (constexprs baked into the emitted source):
  BLOCK_M   rows per program = BLOCK_T query tokens x GP (G padded to a power of two) query heads;
  BLOCK_N   compressed keys per inner tile (cmp_fwd);
  BLOCK_S   selection blocks scored per inner step (slc_topk; >= next_pow2(n));
  MAP, SKIP, MERGE, SELECT   how a chunk's scores are formed and merged into the running top-n (slc_topk,
            cmp_topk; see templates/_select.j2): SELECT "sort" takes a chunk's best from a full sort, "topk"
            from tl.topk with the running list kept ascending and merged by tl.bitonic_merge;
  num_warps, num_stages.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from ..spec import NSASpec
from .loads import loads_check, prefer_tma
from .plan import DeviceLimits, KernelDef, element_bytes, next_pow2, register, split_dim

_POW2 = (16, 32, 64, 128, 256)


def _padded(dim: int) -> int:
    return sum(w for _, w, _ in split_dim(dim))


def _rows_ok(spec: NSASpec, cfg: Mapping[str, Any]) -> str | None:
    bm, gp = cfg["BLOCK_M"], next_pow2(spec.G)
    if bm not in _POW2 and bm not in (512,):
        return f"BLOCK_M: must be a power of two in 16..512, got {bm}"
    if bm < gp:
        return f"BLOCK_M: must be >= next_pow2(G) = {gp} (all heads of a group in one program), got {bm}"
    if cfg.get("num_warps") not in (1, 2, 4, 8, 16):
        return f"num_warps: must be one of 1, 2, 4, 8, 16, got {cfg.get('num_warps')}"
    if not isinstance(cfg.get("num_stages"), int) or not 1 <= cfg["num_stages"] <= 6:
        return f"num_stages: must be an integer in 1..6, got {cfg.get('num_stages')}"
    return None


# ------------------------------------------------------------------------------------------------
# cmp_fwd
# ------------------------------------------------------------------------------------------------


def _cmp_space(spec: NSASpec, limits: DeviceLimits) -> dict[str, list]:
    gp = next_pow2(spec.G)
    return {
        "BLOCK_M": [b for b in (16, 32, 64, 128, 256) if b >= gp],
        "BLOCK_N": [16, 32, 64, 128],
        "num_warps": [4, 8],
        "num_stages": [1, 2, 3, 4],
        # compressed K/V tiles through pointer loads or TMA descriptors (as the selection kernel's LOADS)
        "LOADS": ["pointers", "tma"],
    }


def _cmp_smem(spec: NSASpec, cfg: Mapping[str, Any]) -> int:
    e = element_bytes(spec)
    dk, dv = _padded(spec.attention.head_dim_qk), _padded(spec.attention.head_dim_v)
    q = cfg["BLOCK_M"] * dk * e
    kv = cfg["BLOCK_N"] * (dk + dv) * e * max(1, cfg["num_stages"])
    p = cfg["BLOCK_M"] * cfg["BLOCK_N"] * e
    return q + kv + p


def _cmp_check(spec: NSASpec, cfg: Mapping[str, Any], limits: DeviceLimits) -> str | None:
    why = _rows_ok(spec, cfg)
    if why:
        return why
    if cfg["BLOCK_N"] not in _POW2:
        return f"BLOCK_N: must be a power of two in 16..256, got {cfg['BLOCK_N']}"
    why = loads_check(spec, cfg, limits)
    if why:
        return why
    if not limits.interpreter:
        need = _cmp_smem(spec, cfg)
        if need > limits.smem_per_block:
            return f"shared memory: needs ~{need} bytes > {limits.smem_per_block} on {limits.name}"
        if (
            cfg["BLOCK_M"] * (_padded(spec.attention.head_dim_v) + cfg["BLOCK_N"])
            > 256 * 32 * cfg["num_warps"]
        ):
            return "registers: BLOCK_M x (dv + BLOCK_N) fp32 accumulators exceed 256 per thread"
    return None


def _cmp_default(spec: NSASpec, limits: DeviceLimits) -> dict[str, Any]:
    gp = next_pow2(spec.G)
    if limits.interpreter:
        return {"BLOCK_M": max(16, gp), "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "LOADS": "pointers"}
    # Measured on H200 (bench/RESULTS.md): 128 rows x 64 compressed keys, 8 warps, 3 stages is the best of
    # the swept points at dk = 192 (13.1 ms at 64k vs 13.9 with 2 stages). Compressed K/V through TMA
    # descriptors where they apply (H200, bench_cmp_topk.py, 2026-11-29 16:35 UTC, 64k): dk = 192 13.11 ->
    # 12.06 ms, dk = 128 11.62 -> 10.04 ms.
    cfg = {"BLOCK_M": max(128, gp), "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "LOADS": "pointers"}
    while _cmp_check(spec, cfg, limits) and cfg["num_stages"] > 1:
        cfg["num_stages"] -= 1
    while _cmp_check(spec, cfg, limits) and cfg["BLOCK_M"] > max(16, gp):
        cfg["BLOCK_M"] //= 2
    return prefer_tma(_cmp_check, spec, cfg, limits)


register(
    KernelDef(
        name="cmp_fwd",
        template="cmp_fwd.py.j2",
        pass_="fwd",
        space=_cmp_space,
        check=_cmp_check,
        default=_cmp_default,
        doc="compressed attention forward: (o_cmp, lse_cmp)",
    )
)


# ------------------------------------------------------------------------------------------------
# slc_topk (scoring + top-n) and cmp_topk (fused compressed attention + scoring + top-n)
# ------------------------------------------------------------------------------------------------


def overlap_levels(spec: NSASpec) -> list[list[float]]:
    """The cmp -> slc overlap weights (``derive(spec).overlap``, Eq. 9) cut into rows of ``ratio = l'/d``.

    ``levels[q][i]`` is the weight of compressed block ``j*ratio + overlap_offset + q*ratio + i`` in the
    score of selection block j (0.0 past the last tap), so row q holds the taps that lie q groups of
    ``ratio`` compressed blocks ahead. For the paper's spec (weights 1,2,2,2,1, ratio 4):
    ``[[1, 2, 2, 2], [1, 0, 0, 0]]``. ``len(levels) - 1`` extra groups must be in reach of a top-n chunk
    (shared by the ``slc_topk``/``cmp_topk`` and ``decode`` kernel families).
    """
    from ..derived import derive

    der = derive(spec)
    r, w = der.ratio, der.overlap
    nq = -(-len(w) // r)
    return [[float(w[q * r + i]) if q * r + i < len(w) else 0.0 for i in range(r)] for q in range(nq)]


@functools.lru_cache(maxsize=1)
def topk_available() -> bool:
    """Whether this Triton has ``tl.topk`` and ``tl.bitonic_merge`` (SELECT = "topk")."""
    import triton.language as tl

    return hasattr(tl, "topk") and hasattr(tl, "bitonic_merge")


def default_select() -> str:
    """The SELECT default of every top-n kernel (slc_topk, cmp_topk, decode): "topk" where Triton has it."""
    return "topk" if topk_available() else "sort"


def select_check(cfg: Mapping[str, Any]) -> str | None:
    """Why config parameter SELECT is invalid here, or None (shared by the forward scorers and decode)."""
    if cfg.get("SELECT", "sort") not in ("sort", "topk"):
        return f"SELECT: must be 'sort' or 'topk', got {cfg.get('SELECT')!r}"
    if cfg.get("SELECT") == "topk" and not topk_available():
        return "SELECT: 'topk' needs tl.topk and tl.bitonic_merge, which this Triton lacks; use 'sort'"
    return None


def _topk_constants(fused: bool):
    def constants(spec: NSASpec, cfg: Mapping[str, Any]) -> dict[str, Any]:
        from ..derived import derive

        rp = next_pow2(derive(spec).ratio)
        levels = overlap_levels(spec)
        return {
            "FUSED": fused,
            "RP": rp,
            "BLOCK_C": cfg["BLOCK_S"] * rp,
            "LEVELS": levels,
            "STEP": cfg["BLOCK_S"] - (len(levels) - 1),
        }

    return constants


def _topk_space(fused: bool):
    def space(spec: NSASpec, limits: DeviceLimits) -> dict[str, list]:
        gp, np_ = next_pow2(spec.G), next_pow2(spec.selection.top_n)
        sp = {
            "BLOCK_M": [b for b in (16, 32, 64, 128, 256) if b >= gp],
            "BLOCK_S": [b for b in (8, 16, 32, 64) if b >= max(np_, 2)],
            "num_warps": [4, 8],
            "num_stages": [1, 2, 3],
        }
        sp["MAP"] = ["reshape", "dot"]
        sp["SKIP"] = [0, 1]
        sp["MERGE"] = ["sort", "bitonic"]
        sp["SELECT"] = ["sort", "topk"]
        if fused:
            sp["BLOCK_N"] = [16, 32, 64, 128]
        return sp

    return space


def _topk_check(fused: bool):
    def check(spec: NSASpec, cfg: Mapping[str, Any], limits: DeviceLimits) -> str | None:
        why = _rows_ok(spec, cfg)
        if why:
            return why
        from ..derived import derive

        np_ = next_pow2(spec.selection.top_n)
        bs = cfg["BLOCK_S"]
        if bs & (bs - 1) or bs < np_:
            return f"BLOCK_S: must be a power of two >= next_pow2(top_n) = {np_}, got {bs}"
        extra = len(overlap_levels(spec)) - 1
        if bs - extra < 1:
            return f"BLOCK_S: must be > {extra} (overlap spans that many extra groups)"
        cols = bs * next_pow2(derive(spec).ratio)
        if cols < 16:
            return f"BLOCK_S: BLOCK_S x next_pow2(l'/d) = {cols} compressed columns, need >= 16 for tl.dot"
        if cols > 256:
            return f"BLOCK_S: BLOCK_S x next_pow2(l'/d) = {cols} compressed columns, at most 256"
        if cfg.get("MAP", "reshape") not in ("reshape", "dot"):
            return f"MAP: must be 'reshape' or 'dot', got {cfg.get('MAP')!r}"
        if cfg.get("MAP") == "dot" and bs < 16:
            return f"BLOCK_S: MAP='dot' needs BLOCK_S >= 16 (tl.dot N), got {bs}"
        if cfg.get("MERGE", "sort") not in ("sort", "bitonic"):
            return f"MERGE: must be 'sort' or 'bitonic', got {cfg.get('MERGE')!r}"
        why = select_check(cfg)
        if why:
            return why
        if cfg.get("SELECT") == "topk" and cfg.get("MERGE", "sort") != "sort":
            return f"MERGE: {cfg.get('MERGE')!r} applies to SELECT = 'sort' only ('topk' has its own merge)"
        if cfg.get("SKIP", 0) not in (0, 1):
            return f"SKIP: must be 0 or 1, got {cfg.get('SKIP')!r}"
        if fused and cfg.get("BLOCK_N") not in _POW2:
            return f"BLOCK_N: must be a power of two in 16..256, got {cfg.get('BLOCK_N')}"
        if not limits.interpreter:
            e = element_bytes(spec)
            dk, dv = _padded(spec.attention.head_dim_qk), _padded(spec.attention.head_dim_v)
            need = cfg["BLOCK_M"] * dk * e + cols * (dk + (dv if fused else 0)) * e * cfg["num_stages"]
            if need > limits.smem_per_block:
                return f"shared memory: needs ~{need} bytes > {limits.smem_per_block} on {limits.name}"
        return None

    return check


def _topk_default(fused: bool):
    def default(spec: NSASpec, limits: DeviceLimits) -> dict[str, Any]:
        from ..derived import derive

        gp, np_ = next_pow2(spec.G), next_pow2(spec.selection.top_n)
        rp = next_pow2(derive(spec).ratio)
        bs = max(np_, 2)
        while bs * rp < 16:
            bs *= 2
        select = default_select()
        if limits.interpreter:
            cfg = {
                "BLOCK_M": max(16, gp),
                "BLOCK_S": bs,
                "num_warps": 4,
                "num_stages": 1,
                "MAP": "reshape",
                "SKIP": 0,
                "MERGE": "sort",
                "SELECT": select,
            }
            if fused:
                cfg["BLOCK_N"] = 16
            return cfg
        # Chunks of at least 64 compressed columns with full sorts, 32 with tl.topk: H200, bench_cmp_topk.py,
        # 2026-11-29 16:47 UTC, ms at 16k / 64k, fla_compat (ratio 1): sort, 64 blocks 0.82 / 10.5; topk, 64
        # blocks 0.59 / 7.41, 32 blocks 0.55 / 7.23, 16 blocks 0.53 / 7.39; paper (16 blocks x ratio 4): sort
        # 0.92 / 12.6, topk 0.87 / 11.8.
        cols = 32 if select == "topk" else 64
        while bs * rp < cols and bs * 2 * rp <= 128:
            bs *= 2
        # Measured on H200: 128 rows is 2x faster than 64; MERGE="sort" (tl.sort) 12.5 ms vs 13.9 ms for the
        # bitonic merge at 64k (bench/RESULTS.md). Every parameter of the space is set explicitly, so tuning
        # records and plan keys name the full config.
        cfg = {
            "BLOCK_M": max(128, gp),
            "BLOCK_S": bs,
            "num_warps": 8,
            "num_stages": 2,
            "MAP": "reshape",
            "SKIP": 0,
            "MERGE": "sort",
            "SELECT": select,
        }
        if fused:
            cfg["BLOCK_N"] = 64
        chk = _topk_check(fused)
        while chk(spec, cfg, limits) and cfg["num_stages"] > 1:
            cfg["num_stages"] -= 1
        return cfg

    return default


register(
    KernelDef(
        name="slc_topk",
        template="slc_topk.py.j2",
        pass_="fwd",
        space=_topk_space(False),
        check=_topk_check(False),
        default=_topk_default(False),
        constants=_topk_constants(False),
        doc="selection scoring + top-n from (q, k_cmp, lse_cmp): indices",
    )
)

register(
    KernelDef(
        name="cmp_topk",
        template="slc_topk.py.j2",
        pass_="fwd",
        space=_topk_space(True),
        check=_topk_check(True),
        default=_topk_default(True),
        constants=_topk_constants(True),
        doc="fused compressed attention + scoring + top-n: (o_cmp, lse_cmp, indices)",
    )
)
