"""Kernel family: the backward pass (issue 4) — ``bwd_pre``, ``bwd_cmp``, ``bwd_slc``, ``bwd_win``.

* ``bwd_pre`` (bwd_pre.py.j2): per query row and branch, r_b = rowsum(dO * O_b) -> dg and D_b = g_b * r_b.
* ``bwd_cmp`` / ``bwd_win`` (one template, bwd_dense.py.j2, two plans): FA2-style backward of a dense-masked
  branch; the compressed branch puts key n at token n*d + l - 1, the window masks t - w < n <= t.
* ``bwd_slc`` (bwd_slc.py.j2): group-centric dQ and block-outer dK/dV over a GPU-built reverse index
  (``nsa_dsl.codegen.reverse_index``).

Config parameters (constexprs baked into the emitted source):
  BLOCK_M, BLOCK_N  query / key tile of the dK/dV kernel (bwd_cmp, bwd_win);
  LOADS             bwd_cmp / bwd_win: the dK/dV loop's query tiles and the dQ loop's key tiles through
                    "pointers" or "tma" descriptors (as the forward kernels' LOADS);
  DQ_BLOCK_M, DQ_BLOCK_N, dq_warps, dq_stages  the same for their dQ kernel;
  KV_PASSES         1: dK and dV accumulated together; 2: two passes over the queries (dV, then dK), one
                    accumulator live at a time (+30% FLOPs, far fewer registers -> larger MMA tiles);
  KV_LOOP           bwd_cmp / bwd_win dK/dV: "nested" (a loop over the G heads around the loop over the
                    query tiles) or "flat" (one loop over the (head, query tile) pairs: the software pipeline
                    does not drain after each head's tiles);
  DQ_CMP            bwd_win only: 1 = its dQ kernel also computes the compressed branch's dQ (same query
                    tile, one accumulator; bwd_cmp then runs no dQ kernel, the selection dQ stores first):
                    one read of Q / dO and one fp32 round trip of dQ less; 0 = separate dQ kernels. A choice
                    across two kernels, so not in the tuner's per-kernel space;
  Q_CHUNK           query tokens per dK/dV program before the query range is split over more programs
                    (fp32 partials summed in order; 0 = never split);
  ORDER             launch order of bwd_cmp / bwd_win: "tiles" (key / query tile the fastest grid axis, so
                    concurrent programs share query / key tiles in L2) or "lpt" (the longest programs first:
                    key tiles ascending, query tiles descending; shorter tail under causal imbalance);
  BLOCK_T           tokens per dK/dV tile of bwd_slc (rows = BLOCK_T x G);
  CHUNK             most tokens per bwd_slc work item (longer reverse-index lists are split);
  KEY_SPLIT         programs sharing one bwd_slc work item, each with l'/KEY_SPLIT keys (fewer registers);
  DQ_TOKENS         consecutive tokens per bwd_slc dQ program (distinct selected blocks loaded once; 1: the
                    token's G heads alone, slot loop pipelined over dq_stages stages, no union masking);
  DQ_LOADS          bwd_slc one-token dQ: the selected blocks' K/V through "pointers" or "tma" descriptors
                    (as the forward selection's LOADS; ignored by DQ_TOKENS > 1 and DQ_LAYOUT "blocks");
  DQ_LAYOUT         bwd_slc one-token dQ: "rows" (heads are the MMA rows) or "keys" (transposed: the block's
                    keys are the M side, dQ^T += K^T dS^T; the sm90 default for G >= 16, 1.35x faster at 64k);
                    "blocks": block-outer, computed by the dK/dV kernel as fp32 per-(token, slot) partials
                    (T x Hq x n x dk x 4 bytes) that a second kernel sums per token (small G: each block's K/V
                    read once per work item, not once per token);
  BLOCK_R           rows per program of bwd_pre;
  num_warps, num_stages (and dq_warps for the bwd_slc dQ kernel).
No kernel uses atomics, so every config is bitwise reproducible run to run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..spec import NSASpec
from .loads import loads_check, prefer_tma
from .plan import DeviceLimits, KernelDef, element_bytes, next_pow2, register, split_dim

_POW2 = (16, 32, 64, 128, 256)


def _padded(dim: int) -> int:
    return sum(w for _, w, _ in split_dim(dim))


def _common_check(cfg: Mapping[str, Any]) -> str | None:
    if cfg.get("num_warps") not in (1, 2, 4, 8, 16):
        return f"num_warps: must be one of 1, 2, 4, 8, 16, got {cfg.get('num_warps')}"
    ns = cfg.get("num_stages", 1)
    if not isinstance(ns, int) or not 1 <= ns <= 6:
        return f"num_stages: must be an integer in 1..6, got {ns}"
    return None


# ------------------------------------------------------------------------------------------------
# bwd_pre
# ------------------------------------------------------------------------------------------------


def _pre_constants(spec: NSASpec, cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {"BWD_BRANCHES": ["cmp", "slc"] + (["win"] if spec.window_size > 0 else [])}


def _pre_default(spec: NSASpec, limits: DeviceLimits) -> dict[str, Any]:
    return {"BLOCK_R": 16 if limits.interpreter else 64, "num_warps": 4}


def _pre_space(spec: NSASpec, limits: DeviceLimits) -> dict[str, list]:
    return {"BLOCK_R": [16, 32, 64, 128], "num_warps": [2, 4, 8]}


def _pre_check(spec: NSASpec, cfg: Mapping[str, Any], limits: DeviceLimits) -> str | None:
    if cfg["BLOCK_R"] not in (16, 32, 64, 128, 256):
        return f"BLOCK_R: must be a power of two in 16..256, got {cfg['BLOCK_R']}"
    return _common_check(cfg)


register(
    KernelDef(
        name="bwd_pre",
        template="bwd_pre.py.j2",
        pass_="bwd",
        space=_pre_space,
        check=_pre_check,
        default=_pre_default,
        constants=_pre_constants,
        doc="backward preprocessing: dg and D_b = g_b * rowsum(dO * O_b)",
    )
)


# ------------------------------------------------------------------------------------------------
# bwd_cmp / bwd_win (one template)
# ------------------------------------------------------------------------------------------------


def _dense_constants(branch: str):
    def constants(spec: NSASpec, cfg: Mapping[str, Any]) -> dict[str, Any]:
        if branch == "cmp":
            return {
                "BWD_BRANCH": "cmp",
                "KEY_STRIDE": spec.compression.stride,
                "KEY_OFF": spec.compression.block - 1,
                "GATE_IDX": 0,
            }
        return {"BWD_BRANCH": "win", "KEY_STRIDE": 1, "KEY_OFF": 0, "GATE_IDX": 2}

    return constants


def _dense_default(branch: str):
    def default(spec: NSASpec, limits: DeviceLimits) -> dict[str, Any]:
        if limits.interpreter:
            return {"BLOCK_M": 16, "BLOCK_N": 16, "Q_CHUNK": 0, "num_warps": 4, "num_stages": 1,
                    "KV_PASSES": 1, "DQ_BLOCK_M": 16, "DQ_BLOCK_N": 16, "dq_warps": 4, "dq_stages": 1,
                    "ORDER": "tiles", "LOADS": "pointers", "KV_LOOP": "nested", "DQ_CMP": 0}
        wide = _padded(spec.attention.head_dim_qk) + _padded(spec.attention.head_dim_v) > 256
        # All measured on an H200 with bench_backward (sweeps 2026-11-28, --variants 2026-11-29; paper
        # spec unless named). wgmma tiles (64+ rows) beat spill-free 32-row mma.sync tiles despite spills.
        # dQ, dk = dv = 128: 64 x 64, 4 warps. dQ, dk = 192: 64 x 32 tiles, 4 warps, 3 stages: compressed
        # 18.42 -> 17.03 ms at 64k, 0.59 -> 0.49 at 8k (fourth sweep, 07:09 UTC, against 128 x 64, 8 warps);
        # window 9.06 -> 7.48 ms at 64k, 1.12 -> 0.92 at 8k (fifth sweep, 07:20 UTC, against the 128 x 32
        # tiles nsa-tune had found).
        dq = {"DQ_BLOCK_M": 64, "DQ_BLOCK_N": 64, "dq_warps": 4, "dq_stages": 2}
        if wide:
            dq = {"DQ_BLOCK_M": 64, "DQ_BLOCK_N": 32, "dq_warps": 4, "dq_stages": 3}
        # dK/dV in one pass over narrow query tiles. Window at dk = 192: 64 keys x 32 queries, 4 warps: 16.9
        # -> 11.1 ms at 64k (two-pass before; 05:35 UTC). Compressed, both widths (fifth sweep): 64 keys x
        # 32 queries, 4 warps, with the query range split into 1,024-token chunks (64 programs per key tile:
        # a shorter tail for the causally unbalanced key tiles): paper 43.2 -> 36.6 ms at 64k (128 x 32, 8
        # warps, 4,096-token chunks before), fla_compat (dk = dv = 128) 17.6 -> 8.5 ms (32 x 32 before).
        # Launching the longest key tiles first (ORDER "lpt") lost 7-13 ms at 64k (less L2 reuse of the
        # query tiles).
        q_chunk = 0
        if branch == "cmp":
            kv = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "KV_PASSES": 1}
            q_chunk = 1024
        elif wide:
            kv = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "KV_PASSES": 1}
        else:
            kv = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "KV_PASSES": 1}
        # Query tiles (dK/dV) and key tiles (dQ) through TMA descriptors where they apply (H200, paper spec,
        # bench_backward --variants, 2026-11-29 16:35 UTC, ms at 64k): compressed dK/dV 36.7 -> 32.8, window
        # dK/dV 11.3 -> 10.5.
        # Window dK/dV as one loop over (head, query tile) pairs (KV_LOOP "flat"; H200, paper spec,
        # bench_backward --variants, tenth sweep, 2026-11-30): 10.66 -> 10.42 ms at 64k, 2.66 -> 2.55 at 16k;
        # the compressed one lost (33.22 -> 33.67 ms at 64k, 3.03 / 3.04 at 16k) and stays nested.
        loop = "flat" if branch == "win" else "nested"
        # The compressed dQ inside the window's dQ kernel (DQ_CMP; H200, paper spec, bench_backward
        # --variants, two calls, 2026-11-30 01:49 UTC, backward ms): 112.78 -> 111.95 and 113.01 -> 111.93 at
        # 64k, 19.85 -> 19.35 at 16k (the fused kernel 22.66 ms against 17.4 + 6.3 for the two dQ kernels).
        fuse = 1 if branch == "win" else 0
        cfg = {**kv, "Q_CHUNK": q_chunk, **dq, "ORDER": "tiles", "KV_LOOP": loop, "DQ_CMP": fuse}
        return prefer_tma(_dense_check, spec, cfg, limits)

    return default


def _dense_space(spec: NSASpec, limits: DeviceLimits) -> dict[str, list]:
    return {
        "BLOCK_M": [16, 32, 64, 128],
        "BLOCK_N": [16, 32, 64, 128],
        "Q_CHUNK": [0, 1024, 2048, 4096, 8192],
        "num_warps": [4, 8],
        "num_stages": [1, 2, 3],
        "KV_PASSES": [1, 2],
        "DQ_BLOCK_M": [16, 32, 64, 128],
        "DQ_BLOCK_N": [16, 32, 64, 128],
        "dq_warps": [4, 8],
        "dq_stages": [1, 2, 3],
        "ORDER": ["tiles", "lpt"],
        # the dK/dV loop's query tiles and the dQ loop's key tiles through pointer loads or TMA descriptors
        "LOADS": ["pointers", "tma"],
        "KV_LOOP": ["nested", "flat"],
    }


def _dense_smem(spec: NSASpec, cfg: Mapping[str, Any]) -> int:
    e = element_bytes(spec)
    dk, dv = _padded(spec.attention.head_dim_qk), _padded(spec.attention.head_dim_v)
    kv = cfg["BLOCK_N"] * (dk + dv) * e
    qdo = cfg["BLOCK_M"] * (dk + dv) * e * max(1, cfg["num_stages"])
    tiles = 2 * cfg["BLOCK_M"] * cfg["BLOCK_N"] * e
    return kv + qdo + tiles


def _dense_check(spec: NSASpec, cfg: Mapping[str, Any], limits: DeviceLimits) -> str | None:
    for key in ("BLOCK_M", "BLOCK_N", "DQ_BLOCK_M", "DQ_BLOCK_N"):
        if cfg[key] not in _POW2:
            return f"{key}: must be a power of two in 16..256, got {cfg[key]}"
    if cfg.get("KV_PASSES") not in (1, 2):
        return f"KV_PASSES: must be 1 or 2, got {cfg.get('KV_PASSES')}"
    if cfg.get("ORDER", "tiles") not in ("tiles", "lpt"):
        return f"ORDER: must be 'tiles' or 'lpt', got {cfg.get('ORDER')!r}"
    if cfg.get("DQ_CMP", 0) not in (0, 1) or isinstance(cfg.get("DQ_CMP", 0), bool):
        return f"DQ_CMP: must be 0 or 1, got {cfg.get('DQ_CMP')!r}"
    if cfg.get("KV_LOOP", "nested") not in ("nested", "flat"):
        return f"KV_LOOP: must be 'nested' or 'flat', got {cfg.get('KV_LOOP')!r}"
    if not isinstance(cfg["Q_CHUNK"], int) or cfg["Q_CHUNK"] < 0:
        return f"Q_CHUNK: must be an integer >= 0, got {cfg['Q_CHUNK']}"
    why = loads_check(spec, cfg, limits)
    if why:
        return why
    why = _common_check(cfg) or _common_check({"num_warps": cfg["dq_warps"], "num_stages": cfg["dq_stages"]})
    if why:
        return why
    if not limits.interpreter:
        need = _dense_smem(spec, cfg)
        if need > limits.smem_per_block:
            return f"shared memory: needs ~{need} bytes > {limits.smem_per_block} on {limits.name}"
        dk_, dv_ = _padded(spec.attention.head_dim_qk), _padded(spec.attention.head_dim_v)
        acc = cfg["BLOCK_N"] * ((dk_ + dv_) if cfg["KV_PASSES"] == 1 else max(dk_, dv_))
        if acc > 192 * 32 * cfg["num_warps"]:
            return "registers: BLOCK_N x (dk + dv) fp32 dK/dV accumulators exceed 192 per thread"
        if cfg["DQ_BLOCK_M"] * _padded(spec.attention.head_dim_qk) > 128 * 32 * cfg["dq_warps"]:
            return "registers: DQ_BLOCK_M x dk fp32 dQ accumulators exceed 128 per thread"
    return None


def _cmp_check(spec: NSASpec, cfg: Mapping[str, Any], limits: DeviceLimits) -> str | None:
    if cfg.get("DQ_CMP", 0):
        return "DQ_CMP: only the window plan (bwd_win) can take the compressed branch's dQ; use 0 for bwd_cmp"
    return _dense_check(spec, cfg, limits)


for _branch, _enabled in (("cmp", None), ("win", lambda s: s.window_size > 0)):
    register(
        KernelDef(
            name=f"bwd_{_branch}",
            template="bwd_dense.py.j2",
            pass_="bwd",
            space=_dense_space,
            check=_cmp_check if _branch == "cmp" else _dense_check,
            default=_dense_default(_branch),
            constants=_dense_constants(_branch),
            enabled=_enabled,
            doc=f"FA2-style backward of the {'compressed' if _branch == 'cmp' else 'window'} branch",
        )
    )


# ------------------------------------------------------------------------------------------------
# bwd_slc
# ------------------------------------------------------------------------------------------------


def _slc_constants(spec: NSASpec, cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "DQ_ROWS": max(16, next_pow2(cfg["DQ_TOKENS"] * spec.G)),
        "LPP": max(16, next_pow2(spec.selection.block)),
    }


def _slc_default(spec: NSASpec, limits: DeviceLimits) -> dict[str, Any]:
    G = spec.G  # noqa: N806
    if limits.interpreter:
        return {"BLOCK_T": max(1, 16 // G), "CHUNK": 8, "KEY_SPLIT": 1, "num_warps": 4, "dq_warps": 4,
                "num_stages": 1, "DQ_TOKENS": 1, "dq_stages": 1, "DQ_LAYOUT": "rows", "DQ_LOADS": "pointers"}
    # measured on an H200 (bench_backward sweeps, paper spec, T = 8k / 32k, 2026-11-28): dK/dV 32 rows x 64
    # keys (KEY_SPLIT 1: the 64-key tile is the wgmma M side), 4 warps, 2 stages: 24.3 -> 10.7 ms at 32k,
    # 5.8 -> 2.9 at 8k (128 rows x 32 keys, 8 warps, 1 stage before). dQ: one token per program (its G heads
    # as rows, the slot loop pipelined like the forward's group-centric kernel), 2 warps, 2 stages when
    # G >= 8: 20.5 -> 17.2 ms at 32k (4.2 vs 4.4 ms at 8k); below, several tokens fill the 16-row MMA tile.
    # G >= 16: the transposed one-token dQ (DQ_LAYOUT "keys": the block's 64 keys are the wgmma M side),
    # 4 warps, 2 stages: 17.2 -> 12.7 ms at 32k, 34.9 -> 25.8 ms at 64k (H200, 2026-11-29 02:42 UTC run)
    # G <= 4: the block-outer dQ (DQ_LAYOUT "blocks", partials written by the dK/dV kernel): small_group
    # (G = 2) selection backward 9.9 -> 2.8 ms at 8k, 49.1 -> 10.7 at 32k, 104.4 -> 22.0 at 64k (H200,
    # bench_backward --slc-layouts, 2026-11-29 05:35 UTC); costs T x Hq x n x dk x 4 bytes of fp32 partials
    if G >= 16:
        dq = {"DQ_TOKENS": 1, "dq_warps": 4, "dq_stages": 2, "DQ_LAYOUT": "keys"}
    elif G >= 8:
        dq = {"DQ_TOKENS": 1, "dq_warps": 2, "dq_stages": 2, "DQ_LAYOUT": "rows"}
    else:
        dq = {"DQ_TOKENS": 1, "dq_warps": 4, "dq_stages": 1, "DQ_LAYOUT": "blocks"}
    cfg = {"BLOCK_T": max(1, 32 // G), "CHUNK": 1024, "KEY_SPLIT": 1, "num_warps": 4, "num_stages": 2, **dq,
           "DQ_LOADS": "pointers"}
    # The one-token dQ's K/V through TMA descriptors where they apply (H200, paper spec, bench_backward
    # --variants, 2026-11-29 16:35 UTC): 26.9 -> 24.6 ms at 64k, 6.32 -> 5.99 at 16k. The "blocks" layout
    # has no such loads.
    if cfg["DQ_LAYOUT"] == "blocks":
        return cfg
    cfg = prefer_tma(_slc_check, spec, cfg, limits, "DQ_LOADS")
    if cfg["DQ_LOADS"] == "tma" and cfg["DQ_LAYOUT"] == "keys":
        # with TMA the transposed dQ runs best on 2 warps (ninth sweep, H200, 2026-11-29 16:57 UTC, paper spec
        # at 64k: 24.4 -> 22.7 ms; 8 warps 54.1, 8 warps + 3 stages 59.2)
        cfg["dq_warps"] = 2
    return cfg


def _slc_space(spec: NSASpec, limits: DeviceLimits) -> dict[str, list]:
    G = spec.G  # noqa: N806
    return {
        "BLOCK_T": sorted({max(1, r // G) for r in (16, 32, 64, 128)}),
        "CHUNK": [256, 512, 1024, 2048, 4096],
        "KEY_SPLIT": [k for k in (1, 2, 4) if max(16, next_pow2(spec.selection.block)) // k >= 16],
        "DQ_TOKENS": [1, 2, 4],
        # "blocks" keeps a [tokens, HKV, n, G, dk] fp32 partial buffer: offered for small groups only
        "DQ_LAYOUT": ["rows", "keys"] + (["blocks"] if G <= 4 else []),
        # the one-token dQ ("rows" / "keys"): K/V blocks through pointer loads or TMA descriptors (ignored by
        # the others)
        "DQ_LOADS": ["pointers", "tma"],
        "num_warps": [4, 8],
        "dq_warps": [2, 4, 8],
        "dq_stages": [1, 2, 3],
        "num_stages": [1, 2, 3],
    }


def _slc_check(spec: NSASpec, cfg: Mapping[str, Any], limits: DeviceLimits) -> str | None:
    rows = cfg["BLOCK_T"] * spec.G
    if not isinstance(cfg["BLOCK_T"], int) or cfg["BLOCK_T"] < 1 or rows != next_pow2(rows) or rows < 16:
        return f"BLOCK_T: BLOCK_T x G must be a power of two >= 16, got {cfg['BLOCK_T']} x {spec.G}"
    if rows > 256:
        return f"BLOCK_T: BLOCK_T x G must be <= 256 rows, got {rows}"
    lpp = max(16, next_pow2(spec.selection.block))
    if cfg["KEY_SPLIT"] not in (1, 2, 4) or lpp // cfg["KEY_SPLIT"] < 16:
        return f"KEY_SPLIT: must be 1, 2 or 4 with at least 16 keys per program, got {cfg['KEY_SPLIT']}"
    if not isinstance(cfg["CHUNK"], int) or cfg["CHUNK"] < 1:
        return f"CHUNK: must be an integer >= 1, got {cfg['CHUNK']}"
    if cfg.get("DQ_TOKENS") not in (1, 2, 4):
        return f"DQ_TOKENS: must be 1, 2 or 4, got {cfg.get('DQ_TOKENS')}"
    if cfg.get("dq_warps") not in (1, 2, 4, 8, 16):
        return f"dq_warps: must be one of 1, 2, 4, 8, 16, got {cfg.get('dq_warps')}"
    if cfg.get("DQ_LAYOUT", "rows") not in ("rows", "keys", "blocks"):
        return f"DQ_LAYOUT: must be 'rows', 'keys' or 'blocks', got {cfg.get('DQ_LAYOUT')!r}"
    if cfg.get("DQ_LAYOUT") == "blocks" and (cfg["KEY_SPLIT"] != 1 or cfg["DQ_TOKENS"] != 1):
        return (f"DQ_LAYOUT: 'blocks' needs KEY_SPLIT = 1 and DQ_TOKENS = 1, got {cfg['KEY_SPLIT']} and "
                f"{cfg['DQ_TOKENS']}")
    if cfg.get("DQ_LAYOUT", "rows") == "keys" and cfg["DQ_TOKENS"] != 1:
        return f"DQ_LAYOUT: 'keys' needs DQ_TOKENS = 1, got {cfg['DQ_TOKENS']}"
    why = loads_check(spec, cfg, limits, "DQ_LOADS")
    if why:
        return why
    if cfg.get("dq_stages") not in (1, 2, 3, 4):
        return f"dq_stages: must be one of 1, 2, 3, 4, got {cfg.get('dq_stages')}"
    if cfg.get("DQ_LAYOUT", "rows") == "keys" and cfg["dq_stages"] == 1 and not limits.interpreter:
        # Compiled for sm90 by Triton 3.6 this variant faults (illegal memory access at 2, 4 and 8 warps,
        # paper spec, H200, 2026-11-29, bench/check_bwd_slc_configs.py) while 2+ stages and the interpreter
        # are exact: pruned on GPUs until that is understood
        return "dq_stages: DQ_LAYOUT 'keys' needs dq_stages >= 2 on a GPU (1 stage faults on sm90)"
    return _common_check(cfg)


register(
    KernelDef(
        name="bwd_slc",
        template="bwd_slc.py.j2",
        pass_="bwd",
        space=_slc_space,
        check=_slc_check,
        default=_slc_default,
        constants=_slc_constants,
        doc="selection backward: group-centric dQ, reverse-index block-outer dK/dV",
    )
)
