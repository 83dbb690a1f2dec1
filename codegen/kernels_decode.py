"""Kernel family: the decode step (``decode``), issue 5.

One template (``decode.py.j2``) emits the step's kernels: compressed attention (+ logits scratch), top-n,
selected + window attention and the gated sum; ``split_cmp``/``split_sw`` choose how many programs share one
(sequence, KV head)'s context (flash-decoding); with both = 1 the step is a single launch.

Config parameters:
  tokens      query tokens per step the plan is generated for (S <= tokens; 1 = plain decoding);
  BLOCK_N     compressed keys per tile of the compressed-attention loop;
  BLOCK_S     selection blocks scored per top-n chunk (>= next_pow2(n), BLOCK_S x next_pow2(l'/d) in 16..256);
  BLOCK_K     selected-block tile (tokens; l' is covered by ceil(l'/BLOCK_K) tiles);
  BLOCK_W     window tile (tokens);
  split_cmp   programs per (sequence, KV head) over the compressed blocks (0 = auto from the SM count);
  split_sw    programs per (sequence, token, KV head) over selected + window tiles (0 = auto);
  split_topk  programs per (sequence, KV head) scoring shares of the selection blocks when split_cmp > 1
              (partial top-n lists merged by the selected-attention programs; 0 = auto);
  COMBINE     "kernel": a last launch, one program per (token, KV head), loops over the split selected/window
              states; "last": the split program that finishes last (atomic ticket) merges them (one launch
              less); "rows": a last launch, one program per query row, merges every split state (selected,
              window and the compressed partials, so the top-n kernel no longer merges o_cmp) as one
              [splits, dv] tile each; "last_rows": the last split program (ticket) merges them all as
              [G rows, splits, 32] tiles (one launch less than "rows"); "auto": "rows" for steps of at
              most 16 (sequence, token, KV head) groups, "last_rows" above (chosen per call: with few groups
              the serial merge in the last program costs more than a launch, with many the launch costs more);
  LSE_MERGE   "loop": the top-n programs merge the split compressed (m, l) pairs in two loops over the splits;
              "tile": as one [rows, splits] tile and two reductions;
  PREFETCH    1: the top-n loop loads the next chunk's logits before scoring the current one (software
              pipelined by hand); 0: load and score in turn;
  SW_PREFETCH 1: the selected / window loops load the next tile's K/V before attending to the current one
              (software pipelined by hand, one tile of registers more); 0: load and attend in turn; 2: only
              when split_sw == 1 or split_sw >= 8 (H200: it gained at 16 splits and in the fused step, lost
              at 4 splits);
  CMP_PREFETCH  1: the same for the compressed-attention loop; 2: only when split_cmp >= 8 (few programs per
              SM: latency-bound; the prefetch doubles the loop's registers);
  SKIP        1: merge a top-n chunk only when one of its keys beats the running n-th best (shared
              ``_select.j2`` schedule; most chunks of a long context are skipped);
  PDL         programmatic dependent launch (compute capability >= 9, not the interpreter): 0 off; 1 every
              kernel of the step lets the next one be scheduled on entry (``gdc_launch_dependents``); the
              first (compressed attention) is launched normally (it must see the cache appends), the later
              ones with ``launch_pdl`` and call ``gdc_wait`` before reading anything an earlier kernel of the
              step wrote (each waits for its predecessor, which waited for its own: the chain is
              transitive); the selected + window kernel attends to its window tiles (independent of the
              top-n) before that wait; 2 the same launches with the wait before any tile (a control for
              timing the early window); 3 as 1 for steps of at most 4 (sequence, KV head) groups, else
              off (chosen per call). Selected and window keep separate softmax states: every value gives
              bitwise the same results;
  PDL_AT      where each kernel lets the next one be scheduled: "entry" (its first statement) or "tail" (after
              its main loop, before its stores: the next grid's programs, which wait for this one, are
              scheduled into its tail instead of holding SM slots its loads need); with PDL only;
  LOGITS      element type of the compressed kernel's logit scratch (read back by the top-n): "fp32" or
              "fp16" (half the scratch bytes; the scaled logits are rounded to 11 significant bits, 8 times
              finer than the rounding of bf16 q and k the logits come from);
  WINDOW_AT   where the window tiles are attended to: "sw" in the selected + window kernel; "topk" as
              S x split_sw extra programs of the top-n launch, concurrently with the scoring (the scoring is
              latency-bound and leaves bandwidth idle; the selected + window kernel then reads only the
              selected blocks); "cmp" as the last S x split_sw programs of the compressed launch (meant for
              the tail of its programs; on the H200 that kernel is bandwidth-bound to its end, and the
              window's reads add to it what they take off the top-n launch). "topk" and "cmp" apply when the
              step has both a top-n launch (split_cmp > 1) and split selected/window programs (split_sw > 1);
              otherwise the window stays in the "sw" kernel;
  LOADS       how the selected + window tiles are read: "pointers" (per-thread loads) or "tma" (tensor
              descriptors over the caches, one bulk copy per tile; sm90+, ``loads.loads_check``);
  CMP_LOADS   the same for the compressed K/V tiles of the compressed-attention loop;
  SELECT      how a top-n chunk's best are found (``_select.j2``): "sort" (full sort) or "topk" (``tl.topk``
              + ``tl.bitonic_merge``; needs a Triton that has both); "topk" also merges the split top-n lists
              in the selected + window programs with one ``tl.topk`` instead of a sort;
  topk_warps  warps of the split top-n kernel (0 = num_warps);
  combine_warps  warps of the row combine kernel (COMBINE = "rows");
  cmp_stages  pipeline stages of the compressed-attention kernel (0 = num_stages; with 32-key tiles and
              4-5 stages two programs fit an SM's shared memory with more tiles in flight each);
  batch_chunks  the host splits the step's batch into this many chunks of sequences (at most B), each a
              whole chain of launches with its own scratch; on a GPU chunk i + 1 runs on another stream and
              starts right after chunk i's compressed-attention launch, so its bandwidth-bound compressed pass
              overlaps chunk i's latency-bound top-n and selected launches (chunk i's stream has the higher
              priority). The split counts are chosen for one chunk. 1 = one chain (no streams); 0 = auto
              (``auto_batch_chunks``: 2 where one chain would be the fused single launch and half the batch
              takes the split path, i.e. one to two (sequence, token, KV head) groups per SM);
  num_warps, num_stages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..spec import NSASpec
from .kernels_cmp import default_select, overlap_levels, select_check, topk_available
from .loads import loads_check
from .plan import DeviceLimits, KernelDef, element_bytes, next_pow2, register, split_dim

_SPLITS = (0, 1, 2, 4, 8, 16, 32, 64)


def _pow2(x: Any) -> bool:
    return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


def _padded(dim: int) -> int:
    return sum(w for (_, w, _) in split_dim(dim))


def _rp(spec: NSASpec) -> int:
    from ..derived import derive

    return next_pow2(derive(spec).ratio)


def decode_rows(spec: NSASpec, tokens: int) -> int:
    """MMA rows of a (sequence, KV head) program: tokens x G (padded to powers of two), at least 16."""
    return max(16, next_pow2(tokens) * next_pow2(spec.G))


def _decode_constants(spec: NSASpec, cfg: Mapping[str, Any]) -> dict[str, Any]:
    rp = _rp(spec)
    levels = overlap_levels(spec)
    return {
        "ROWS": decode_rows(spec, cfg["tokens"]),
        "TROWS": next_pow2(cfg["tokens"]) * next_pow2(spec.G),
        "RW": max(16, next_pow2(spec.G)),
        "RP": rp,
        "BLOCK_C": cfg["BLOCK_S"] * rp,
        "LEVELS": levels,
        "STEP": cfg["BLOCK_S"] - (len(levels) - 1),
        "NSUB": -(-spec.selection.block // cfg["BLOCK_K"]),
    }


def pdl_supported(limits: DeviceLimits) -> bool:
    """Programmatic dependent launch: compute capability >= 9.0 and a real device (not the interpreter)."""
    return not limits.interpreter and limits.capability[0] >= 9


def _decode_space(spec: NSASpec, limits: DeviceLimits) -> dict[str, list]:
    np_, rp = next_pow2(spec.selection.top_n), _rp(spec)
    top_k = max(16, min(128, next_pow2(spec.selection.block)))
    return {
        "tokens": [1, 2, 4, 8],
        "BLOCK_N": [16, 32, 64, 128],
        "BLOCK_S": [b for b in (8, 16, 32, 64, 128, 256) if b >= max(np_, 2) and 16 <= b * rp <= 256],
        "BLOCK_K": [b for b in (16, 32, 64, 128) if b <= top_k],
        "BLOCK_W": [16, 32, 64, 128],
        "split_cmp": list(_SPLITS),
        "split_sw": list(_SPLITS[:6]),
        "split_topk": list(_SPLITS[:6]),
        "SKIP": [0, 1],
        "COMBINE": ["kernel", "last", "rows", "last_rows", "auto"],
        "LSE_MERGE": ["loop", "tile"],
        "PREFETCH": [0, 1],
        "SW_PREFETCH": [0, 1, 2],
        "CMP_PREFETCH": [0, 1, 2],
        "PDL": [0, 1, 2, 3] if pdl_supported(limits) else [0],
        "PDL_AT": ["entry", "tail"],
        "LOGITS": ["fp32", "fp16"],
        "WINDOW_AT": ["sw", "topk", "cmp"],
        "LOADS": ["pointers", "tma"],
        "CMP_LOADS": ["pointers", "tma"],
        "SELECT": ["sort", "topk"] if topk_available() else ["sort"],
        "topk_warps": [0, 2, 4, 8],
        "combine_warps": [1, 2, 4, 8],
        "num_warps": [2, 4, 8],
        "num_stages": [1, 2, 3],
        "cmp_stages": [0, 2, 3, 4, 5],
        "batch_chunks": [0, 1, 2, 3, 4],
    }


def _decode_check(spec: NSASpec, cfg: Mapping[str, Any], limits: DeviceLimits) -> str | None:
    for t in ("BLOCK_N", "BLOCK_K", "BLOCK_W"):
        v = cfg.get(t)
        if not _pow2(v) or not 16 <= v <= 256:
            return f"{t}: must be a power of two in 16..256, got {v!r}"
    tok = cfg.get("tokens")
    if not _pow2(tok) or tok > 16:
        return f"tokens: must be a power of two <= 16, got {tok!r}"
    np_, rp = next_pow2(spec.selection.top_n), _rp(spec)
    bs = cfg.get("BLOCK_S")
    if not _pow2(bs) or bs < np_:
        return f"BLOCK_S: must be a power of two >= next_pow2(top_n) = {np_}, got {bs!r}"
    extra = len(overlap_levels(spec)) - 1
    if bs - extra < 1:
        return f"BLOCK_S: must be > {extra} (the overlap spans that many extra groups)"
    if not 16 <= bs * rp <= 256:
        return f"BLOCK_S: BLOCK_S x next_pow2(l'/d) = {bs * rp} compressed columns, must be in 16..256"
    for t in ("split_cmp", "split_sw", "split_topk"):
        v = cfg.get(t)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 256:
            return f"{t}: must be an integer in 0..256 (0 = auto), got {v!r}"
    if cfg.get("COMBINE", "kernel") not in ("kernel", "last", "rows", "last_rows", "auto"):
        return f"COMBINE: must be 'kernel', 'last', 'rows', 'last_rows' or 'auto', got {cfg.get('COMBINE')!r}"
    if cfg.get("LSE_MERGE", "loop") not in ("loop", "tile"):
        return f"LSE_MERGE: must be 'loop' or 'tile', got {cfg.get('LSE_MERGE')!r}"
    if cfg.get("PREFETCH", 0) not in (0, 1):
        return f"PREFETCH: must be 0 or 1, got {cfg.get('PREFETCH')!r}"
    if cfg.get("SW_PREFETCH", 0) not in (0, 1, 2):
        return f"SW_PREFETCH: must be 0, 1 or 2, got {cfg.get('SW_PREFETCH')!r}"
    if cfg.get("CMP_PREFETCH", 0) not in (0, 1, 2):
        return f"CMP_PREFETCH: must be 0, 1 or 2, got {cfg.get('CMP_PREFETCH')!r}"
    pdl = cfg.get("PDL", 0)
    if pdl not in (0, 1, 2, 3) or isinstance(pdl, bool):
        return f"PDL: must be 0, 1, 2 or 3, got {pdl!r}"
    if pdl and not pdl_supported(limits):
        return f"PDL: programmatic dependent launch needs compute capability >= 9.0, not {limits.name}: use 0"
    if cfg.get("PDL_AT", "entry") not in ("entry", "tail"):
        return f"PDL_AT: must be 'entry' or 'tail', got {cfg.get('PDL_AT')!r}"
    if cfg.get("LOGITS", "fp32") not in ("fp32", "fp16"):
        return f"LOGITS: must be 'fp32' or 'fp16', got {cfg.get('LOGITS')!r}"
    if cfg.get("WINDOW_AT", "sw") not in ("sw", "topk", "cmp"):
        return f"WINDOW_AT: must be 'sw', 'topk' or 'cmp', got {cfg.get('WINDOW_AT')!r}"
    why = select_check(cfg) or loads_check(spec, cfg, limits)
    why = why or loads_check(spec, cfg, limits, key="CMP_LOADS")
    if why:
        return why
    if cfg.get("topk_warps", 0) not in (0, 1, 2, 4, 8, 16):
        return f"topk_warps: must be 0 (= num_warps) or one of 1, 2, 4, 8, 16, got {cfg.get('topk_warps')!r}"
    if cfg.get("combine_warps", 4) not in (1, 2, 4, 8, 16):
        return f"combine_warps: must be one of 1, 2, 4, 8, 16, got {cfg.get('combine_warps')!r}"
    if cfg.get("SKIP") not in (0, 1):
        return f"SKIP: must be 0 or 1, got {cfg.get('SKIP')!r}"
    nw = cfg.get("num_warps")
    if nw not in (1, 2, 4, 8, 16):
        return f"num_warps: must be one of 1, 2, 4, 8, 16, got {nw!r}"
    ns = cfg.get("num_stages")
    if not isinstance(ns, int) or not 1 <= ns <= 6:
        return f"num_stages: must be an integer in 1..6, got {ns!r}"
    cs = cfg.get("cmp_stages", 0)
    if not isinstance(cs, int) or isinstance(cs, bool) or not 0 <= cs <= 6:
        return f"cmp_stages: must be an integer in 0..6 (0 = num_stages), got {cs!r}"
    bc = cfg.get("batch_chunks", 1)
    if not isinstance(bc, int) or isinstance(bc, bool) or not 0 <= bc <= 16:
        return f"batch_chunks: must be an integer in 0..16 (0 = auto), got {bc!r}"
    if not limits.interpreter:
        a = spec.attention
        e = element_bytes(spec)
        dk, dv = _padded(a.head_dim_qk), _padded(a.head_dim_v)
        rows = decode_rows(spec, tok)
        # the compressed kernel (which also runs the selected/window tiles when the step is fused) and the
        # selected + window kernel
        sw_tile = max(cfg["BLOCK_K"], cfg["BLOCK_W"])
        for tile, stages in ((max(cfg["BLOCK_N"], sw_tile), cs or ns), (sw_tile, ns)):
            need = rows * dk * e + tile * (dk + dv) * e * stages
            if need > limits.smem_per_block:
                return f"shared memory: needs ~{need} bytes > {limits.smem_per_block} on {limits.name}"
        if rows * (dv + max(cfg["BLOCK_N"], bs * rp)) > 256 * 32 * nw:
            return "registers: rows x (dv + tile) fp32 values exceed 256 per thread"
    return None


#: the schedule before issue 5's second pass (serial split merges, combine per (token, KV head), top-n loads
#: not prefetched): ``ops.with_config("decode", LEGACY)`` selects it for a same-run comparison
LEGACY: dict[str, Any] = {
    "COMBINE": "kernel", "LSE_MERGE": "loop", "PREFETCH": 0, "SW_PREFETCH": 0, "CMP_PREFETCH": 0, "PDL": 0,
    "WINDOW_AT": "sw", "SELECT": "sort", "batch_chunks": 1,
}


def _decode_default(spec: NSASpec, limits: DeviceLimits) -> dict[str, Any]:
    np_, rp = next_pow2(spec.selection.top_n), _rp(spec)
    bs = max(np_, 2)
    while bs * rp < 16:
        bs *= 2
    lp = next_pow2(spec.selection.block)
    if limits.interpreter:
        return {
            "tokens": 1, "BLOCK_N": 16, "BLOCK_S": bs, "BLOCK_K": 16, "BLOCK_W": 16,
            "split_cmp": 0, "split_sw": 0, "split_topk": 0, "SKIP": 1, "COMBINE": "rows", "LSE_MERGE": "tile",
            "PREFETCH": 1, "SW_PREFETCH": 1, "CMP_PREFETCH": 1, "PDL": 0, "PDL_AT": "entry", "LOGITS": "fp32",
            "WINDOW_AT": "topk",
            "SELECT": default_select(), "LOADS": "pointers", "CMP_LOADS": "pointers",
            "topk_warps": 0, "combine_warps": 4, "num_warps": 4, "num_stages": 1, "cmp_stages": 0,
            "batch_chunks": 1,
        }
    while bs * 2 * rp <= 256:  # one program scores the blocks of one step: wide chunks, few sorts
        bs *= 2
    # 8 warps and 32-token selected/window tiles: no register spills on sm90 for the paper and small-group
    # specs (ptxas: 128 / 121 / 182 registers for the cmp / top-n / selected+window kernels; 4 warps or
    # 64-token tiles spill in the selected+window kernel; 128 / 202 with the top-n / slc+win prefetch).
    # Schedule options: one H200 run, old (LEGACY) vs new in one process, CUDA graph, cold L2
    # (bench/results/decode_h200_run2.md), paper spec, 64k:
    #   B = 1: LEGACY 47.9 us; COMBINE rows + LSE tile + PREFETCH 37.6; + SW_PREFETCH 37.1 (splits 16,16,16);
    #          with 32 compressed splits (auto_splits now) 32.8. Per kernel: combine 12.3 -> 4.2 us (rows),
    #          top-n 10.4 -> 5.2 us (no o_cmp merge, tiled LSE, prefetched logits).
    #   B = 16 (4,4,4): LEGACY 121.0; new without SW_PREFETCH 120.7; with it 130.2 (slc/win 31.2 -> 41.8 us)
    #          -> SW_PREFETCH = 2 (on only for split_sw == 1 or >= 8: small_group B = 16 fused 275.1 vs 282.6
    #          without). CMP_PREFETCH 1 gained at B = 1 on the paper spec (36.0 vs 37.1) but lost on
    #          small_group B = 1 (46.9 vs 41.6) and B = 16 (357 vs 275): off. COMBINE "last" / "last_rows"
    #          lost at B = 1 (46.2 / 44.1 us).
    cfg = {
        "tokens": 1,
        "BLOCK_N": 64,
        "BLOCK_S": bs,
        "BLOCK_K": max(16, min(32, lp)),
        "BLOCK_W": 32,
        "split_cmp": 0,
        "split_sw": 0,
        "split_topk": 0,
        "SKIP": 1,
        # rows / last_rows per call (H200, 2026-11-29 12:58 UTC, paper 64k, us): B = 1 26.0 / 32.6,
        # B = 16 107.8 / 101.9 (bench/results/decode_h200_s7_combine.md)
        "COMBINE": "auto",
        "LSE_MERGE": "tile",
        "PREFETCH": 1,
        "SW_PREFETCH": 2,
        "CMP_PREFETCH": 0,
        # PDL (H200, bench_decode.py --compare, 2026-11-29 05:37 UTC, PDL 0 / 1 in us): paper B = 1 64k
        # 31.8 / 29.9, 8k 30.4 / 27.4 (faster: 4 groups); small_group B = 1 64k 39.4 / 39.8 (16 groups),
        # paper B = 16 64k 118.8 / 126.3, 8k 64.0 / 67.3 (slower): so 3 = on for at most 4 groups
        "PDL": 3 if pdl_supported(limits) else 0,
        # PDL_AT "tail" and LOGITS "fp16" (H200, bench_decode.py --compare, 2026-11-29 20:41 UTC, CUDA graph,
        # cold L2, us, default -> tail / fp16 / both with PDL 1): paper 64k B = 16 92.4 -> 93.3 / 91.1 /
        # 90.3, B = 1 25.1 -> 27.9 / 25.2 / 25.4, B = 64 306.4 -> 306.5 / 296.0 / 294.0; 128k B = 16 144.3 ->
        # 144.8 / 140.7; small_group 64k B = 16 231.6 -> 232.2 / 228.8 (bench/results/
        # decode_h200_s11_call2.md). The fp16 scratch for 16-bit specs (its rounding is 8x finer than the
        # bf16 inputs'); the tail release stays an option.
        "PDL_AT": "entry",
        "LOGITS": "fp32" if element_bytes(spec) == 4 else "fp16",
        # the window as programs of the top-n launch and tl.topk chunks (H200, bench_decode.py --compare,
        # 2026-11-29 18:43 UTC, CUDA graph, cold L2, us, default -> both): paper 64k B = 16 101.5 -> 100.1,
        # B = 1 28.4 -> 27.0, 8k B = 16 56.4 -> 53.5; small_group 64k B = 16 243.6 -> 238.7, B = 1 39.5 ->
        # 38.6; paper B = 64 (one launch: SELECT only) 314.4 -> 310.7 (bench/results/decode_h200_s10_call1.md)
        "WINDOW_AT": "topk",
        "SELECT": default_select(),
        # TMA for the selected / window tiles was slower (paper 64k B = 16 104.5, B = 1 33.0, B = 64 391.4 us)
        "LOADS": "pointers",
        "CMP_LOADS": "pointers",
        "topk_warps": 0,
        "combine_warps": 4,
        # 4 warps (H200, bench_decode.py --compare, 2026-11-29 12:37 UTC, CUDA graph, cold L2), 8 -> 4 warps
        # in us: paper B = 1 8k 26.7 -> 25.6, 64k 28.2 -> 26.1; B = 16 8k 65.6 -> 60.5, 64k 116.6 -> 109.2
        # (with BLOCK_N 128); small_group B = 1 64k 40.5 -> 36.9, B = 16 64k 274.5 -> 242.5; paper B = 64 64k
        # (one fused launch) 473.4 -> 310.3. Two programs per SM instead of one keep more K/V loads in
        # flight; ptxas: no spills in the split kernels at 4 warps.
        "num_warps": 4,
        # 3 stages (H200, 2026-11-29 18:51 UTC, CUDA graph, cold L2, us, 2 -> 3 stages): paper 64k B = 16
        # 97.1 -> 92.9 (compressed 50.4 -> 47.7, selected 23.8 -> 21.1), B = 1 25.1 -> 24.3, 8k B = 16 51.5 ->
        # 46.2, B = 64 308.8 -> 305.9; small_group 64k B = 16 237.1 -> 231.6, B = 1 36.0 -> 35.9
        # (bench/results/decode_h200_s10_call2.md)
        "num_stages": 3,
        "cmp_stages": 0,
        # two chains of launches on their own streams where one chain would be the fused single launch
        # (auto_batch_chunks)
        "batch_chunks": 0,
    }
    while _decode_check(spec, cfg, limits) and cfg["num_stages"] > 1:
        cfg["num_stages"] -= 1
    return cfg


def auto_batch_chunks(spec: NSASpec, limits: DeviceLimits, *, B: int, S: int) -> int:  # noqa: N803
    """``batch_chunks`` = 0: 2 when the step has between one and two (sequence, token, KV head) groups per
    SM (one chain would be the single fused launch, each half of the batch takes the split path, and the
    second half's compressed pass overlaps the first half's later launches), else 1; 1 on the interpreter.
    H200, CUDA graph, cold L2 (bench/RESULTS.md, decode tenth pass): paper 64k B = 64 295.1 -> 284.5 /
    283.3 us (two calls), small_group 64k B = 16 228.5 -> 218.1 us; paper B = 16 (64 groups, split path
    either way) 90.8 -> 105.8 us with two chains, so it stays 1 below one group per SM."""
    groups = B * S * spec.attention.kv_heads
    sms = max(1, limits.sm_count)
    if limits.interpreter or B < 2 or not sms <= groups < 2 * sms:
        return 1
    return 2


def auto_splits(
    spec: NSASpec, cfg: Mapping[str, Any], limits: DeviceLimits, *, B: int, S: int, max_len: int  # noqa: N803
) -> tuple[int, int, int]:
    """(split_cmp, split_sw, split_topk) for a step shape: the configured values, or (0 = auto) enough
    programs to fill about two waves of the device's SMs, never less than a couple of tiles per program."""
    sc, ss, st = int(cfg["split_cmp"]), int(cfg["split_sw"]), int(cfg.get("split_topk", 0))
    target = 2 * max(1, limits.sm_count)
    if B * S * spec.attention.kv_heads >= max(1, limits.sm_count) and not limits.interpreter:
        # one program per (sequence, KV head) already fills the GPU: the fused single launch wins
        # (H200, 64k: paper B=64 341 vs 409 us split 2; small_group B=16 282 vs 324 us; bench/RESULTS.md)
        sc = sc or 1
        ss = ss or 1
        st = st or 1
    if sc == 0:
        tc = spec.num_compressed(max(1, max_len))
        # about two BLOCK_N tiles per program, at most 32 programs per (sequence, KV head). For long
        # contexts (>= 8 programs) whose grid stays within one wave (latency-bound), the power of two just
        # above the estimate is taken (a power-of-two length has T/d - 1 blocks: 64k -> 32 programs, not 16).
        # H200, paper spec, B = 1, 64k: 32 splits 32.8 us vs 16 splits 37.1 us (same run,
        # bench/results/decode_h200_run2.md); 64 splits were slower in the first run (bench/RESULTS.md)
        kv = B * spec.attention.kv_heads
        by_work = max(1, tc // (2 * cfg["BLOCK_N"]))
        sc = max(1, min(by_work, math.ceil(target / kv), 32))
        sc = 1 << (sc.bit_length() - 1)
        one_wave = kv * 2 * sc <= max(1, limits.sm_count)
        if by_work >= 8 and sc < by_work + 1 <= 2 * sc and one_wave and 2 * sc <= 32:
            sc *= 2
    if ss == 0:
        units = spec.selection.top_n * -(-spec.selection.block // cfg["BLOCK_K"])
        w = spec.window_size
        units += -(-w // cfg["BLOCK_W"]) if w else 0
        ss = max(1, min(units // 2, math.ceil(target / (B * S * spec.attention.kv_heads)), 16))
        ss = 1 << (ss.bit_length() - 1)
    if st == 0:
        step = cfg["BLOCK_S"] - (len(overlap_levels(spec)) - 1)
        n_slc = spec.num_selection_blocks(max(1, max_len))
        st = max(1, min(-(-n_slc // step), math.ceil(target / (B * spec.attention.kv_heads)), 16))
        st = 1 << (st.bit_length() - 1)
    return sc, ss, st


register(
    KernelDef(
        name="decode",
        template="decode.py.j2",
        pass_="decode",
        space=_decode_space,
        check=_decode_check,
        default=_decode_default,
        constants=_decode_constants,
        doc="decode step: compressed attention + top-n + selected + window + gated sum over an NSACache",
    )
)
