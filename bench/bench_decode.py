"""Decode benchmark (issue 5): one NSA decode step vs dense SDPA decode over a KV cache of T tokens.

For each spec (nsa_paper, small_group), B in {1, 16, 64} and T in 8k..128k (as memory allows):
* NSA: ``decode`` (attention only) replayed from a CUDA graph over an ``NSACache`` of random K/V;
* dense: ``F.scaled_dot_product_attention`` of one query token against the whole cache (GQA), every SDPA
  backend that runs, also replayed from a CUDA graph;
* bytes: what NSA must read per step (compressed K/V of the visible blocks + n selected blocks + the window,
  paper Table 4's token count x Hkv x (dk + dv) x 2 B), what our kernels move in total (plus the fp32 logit
  scratch written and read back, the query and the output), and the dense cache size; achieved bandwidth =
  bytes / time next to the card's device-to-device copy bandwidth measured in the same run.
Timing: each call is preceded by a 256 MiB L2 flush inside the graph; the flush alone is timed the same way
and subtracted (cold-L2 numbers, the honest ones for a serving step).

Usage: ``python bench/bench_decode.py [--quick] [--out DIR]``; writes ``decode.json`` and ``decode.md``.
``--compare``: the decode plan's old (``kernels_decode.LEGACY``) and new schedule options, a few variants and
splits, timed in one process against dense SDPA (``decode_compare.json`` / ``.md``); at every shape also the
default plan with programmatic dependent launch off / with the plain wait (``pdl0`` / ``pdl2``; ``new`` is PDL
= 1 on sm90+), checked bitwise against ``new``; ``--warm I`` compiles those of shape I first
(bench/gpu_decode.sh).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, sdpa_backends, warm_on_side_stream  # noqa: E402
from nsa_dsl.codegen.decode import _splits, decode, decode_plan  # noqa: E402

import nsa_dsl  # noqa: E402
from nsa_dsl.cache import NSACache  # noqa: E402

_FLUSH = None
DEVICE = "cuda"
# (B, T) -> alternative (split_cmp, split_sw, split_topk) timed next to the automatic choice
SWEEPS = {
    (1, 65536): [(8, 4, 4), (32, 8, 16), (64, 16, 16)],
    (16, 65536): [(1, 1, 1), (2, 2, 2), (8, 4, 4)],
    (64, 65536): [(1, 1, 1), (2, 1, 2)],
}


# (spec, B, T) -> tile/schedule alternatives of the decode kernel (plan configs) timed next to the default
TILE_SWEEPS = {
    ("nsa_paper", 1, 65536): [{"COMBINE": "last"}],
    ("nsa_paper", 16, 65536): [{"BLOCK_N": 128}, {"num_warps": 4}, {"BLOCK_K": 64, "BLOCK_W": 64},
                               {"COMBINE": "last"}],
}


def _flush() -> None:
    _FLUSH.zero_()


def graph_us(fn, *, calls: int = 10, reps: int = 3) -> float:
    """Microseconds per ``fn()`` replayed from a CUDA graph, cold L2 (flush timed alone and subtracted).
    Falls back to eager timing (``triton.testing.do_bench``, L2 flushed) where capture fails (negative
    return value marks it)."""
    try:
        return _graph_us(fn, calls=calls, reps=reps)
    except Exception as e:  # a backend that cannot be captured
        print(f"  (graph capture failed: {str(e).splitlines()[0][:100]}; eager timing)", flush=True)
        torch.cuda.synchronize()
        from triton.testing import do_bench

        return -1e3 * float(do_bench(fn, warmup=5, rep=25, return_mode="median"))


def _graph_us(fn, *, calls: int, reps: int) -> float:
    warm_on_side_stream(fn)

    def capture(body):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                body()
        return g

    g_both = capture(lambda: (_flush(), fn()))
    g_flush = capture(_flush)

    def t(g):
        g.replay()
        torch.cuda.synchronize()
        best = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            best.append(a.elapsed_time(b) * 1e3 / calls)
        best.sort()
        return best[len(best) // 2]

    out = max(t(g_both) - t(g_flush), 1e-3)
    del g_both, g_flush
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB: (read + write) bytes / s, in TB/s."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 / min(times) / 1e12


def nsa_bytes(spec, T: int, B: int) -> tuple[float, float]:  # noqa: N803
    """(must-read bytes, bytes our kernels move) per step."""
    a, s = spec.attention, spec.selection
    e = 2
    kv = a.kv_heads * (a.head_dim_qk + a.head_dim_v) * e
    tc = spec.num_compressed(T)
    tokens = tc + min(T, s.top_n * s.block) + min(T, spec.window_size)
    must = B * tokens * kv
    moved = must + B * a.heads * tc * 4 * 2 + B * a.heads * (a.head_dim_qk + a.head_dim_v) * e
    return float(must), float(moved)


def _nsa_cache(spec, B: int, T: int):  # noqa: N803
    """A decode cache of B sequences at length T, filled with random K/V (raw and compressed)."""
    ident = lambda x: x  # noqa: E731 - the cache is filled directly; no compressor runs in this benchmark
    cache = NSACache(spec, B, capacity=T + 16, device=DEVICE, dtype=torch.bfloat16,
                     compress_k=ident, compress_v=ident)
    for t in (cache.k, cache.v, cache.k_cmp_buf, cache.v_cmp_buf):
        t.normal_()
    cache.lengths.fill_(T)
    cache._host_lengths = [T] * B
    return cache


def _step_tensors(spec, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: N803
    """One decode step's inputs for B sequences (bf16, fresh random q and gates) and an output buffer."""
    a = spec.attention
    q = torch.randn(B, 1, a.heads, a.head_dim_qk, device=DEVICE, dtype=torch.bfloat16)
    g = torch.rand(B, 1, a.heads, 3, device=DEVICE, dtype=torch.bfloat16)
    return q, g, torch.empty(B, 1, a.heads, a.head_dim_v, device=DEVICE, dtype=torch.bfloat16)


def run_nsa(spec, ops, B: int, T: int, splits=None, sweep=None, profile=False) -> dict:  # noqa: N803
    cache = _nsa_cache(spec, B, T)
    if splits is None:
        splits = _splits(ops, decode_plan(ops, B=B, S=1, T=T), B, 1, T)
    q, g, out = _step_tensors(spec, B)
    step = lambda: decode(ops, q, cache, g, out=out, splits=splits, plan_length=T)  # noqa: E731
    res = {"us": abs(graph_us(step)), "splits": list(splits), "finite": bool(torch.isfinite(out).all())}
    for alt in sweep or []:
        res.setdefault("sweep", {})[str(tuple(alt))] = abs(graph_us(
            lambda alt=alt: decode(ops, q, cache, g, out=out, splits=alt, plan_length=T)))
    if profile:
        res["kernels_us"] = kernel_breakdown(step)
    return res


def kernel_breakdown(step, n: int = 20) -> dict[str, float]:
    """Average device microseconds per launch of each kernel of an eager step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        tot = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if tot and evt.count:
            out[evt.key[:60]] = tot / n
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])


def kernel_timeline(step, n: int = 10) -> list[dict]:
    """Where each kernel of an eager step runs, on the device clock (torch.profiler): ``n`` steps, each queued
    behind a ~1 ms GPU sleep (so the host has issued every launch before the first starts, as in a graph
    replay) and synchronised after; per kernel launch of the step, in start order, the median start and end
    offsets from the step's first kernel start (µs) and the stream. Shows whether launches on several streams
    (``batch_chunks``) overlap and where a step waits between kernels."""
    from torch.profiler import ProfilerActivity, profile

    def _kernels(prof) -> list:
        evs = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")
               and not any(x in e.name.lower() for x in ("sleep", "spin_kernel"))]  # torch.cuda._sleep
        return sorted(evs, key=lambda e: e.time_range.start)

    step()
    torch.cuda.synchronize()
    steps: list[list] = []
    for _ in range(n):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.cuda._sleep(2_000_000)
            step()
            torch.cuda.synchronize()
        steps.append(_kernels(prof))
    width = min(len(k) for k in steps)
    out = []
    for i in range(width):
        starts = [k[i].time_range.start - k[0].time_range.start for k in steps]
        ends = [k[i].time_range.end - k[0].time_range.start for k in steps]
        ev = steps[-1][i]
        out.append({"kernel": ev.name[:40], "stream": getattr(ev, "device_resource_id", None),
                    "start_us": statistics.median(starts), "end_us": statistics.median(ends)})
    return out


def timeline(shapes: list[tuple[str, int, int]], names: list[str], outdir: Path) -> None:
    """--timeline: kernel_timeline of the named variants (default: "new") at each spec:B:T shape."""
    rows = []
    meta = env_info()
    for spec_name, B, T in shapes:  # noqa: N806
        spec = nsa_dsl.load_spec(spec_name)
        base = nsa_dsl.compile(spec, device=DEVICE)
        cache = _nsa_cache(spec, B, T)
        q, g, out = _step_tensors(spec, B)
        for name in names:
            ops = base.with_config("decode", variants()[name]) if variants()[name] else base
            splits = _splits(ops, decode_plan(ops, B=B, S=1, T=T), B, 1, T)
            step = functools.partial(decode, ops, q, cache, g, out=out, splits=splits, plan_length=T)
            tl_ = kernel_timeline(step)
            rows.append({"spec": spec_name, "B": B, "T": T, "variant": name, "splits": list(splits),
                         "kernels": tl_})
            print(f"{spec_name} B={B} T={T} {name} splits {tuple(splits)}:", flush=True)
            for k in tl_:
                print(f"    {k['kernel']:40s} stream {k['stream']}: {k['start_us']:7.1f} -> "
                      f"{k['end_us']:7.1f} us ({k['end_us'] - k['start_us']:.1f})", flush=True)
        del cache
        torch.cuda.empty_cache()
    data = {"meta": meta, "rows": rows}
    (outdir / "decode_timeline.json").write_text(json.dumps(data, indent=1, default=str))


def run_dense(spec, B: int, T: int) -> dict:  # noqa: N803
    """Dense decode through every SDPA backend, two formulations: ``enable_gqa`` (q [B, Hq, 1, dk]) and
    ``grp`` (the G query heads of a KV head as G query rows: q [B, Hkv, G, dk] against k/v [B, Hkv, T, ·],
    no mask; the usual way to run GQA decode on kernels without native GQA)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    a = spec.attention
    q = torch.randn(B, a.heads, 1, a.head_dim_qk, device=DEVICE, dtype=torch.bfloat16)
    qg = q.view(B, a.kv_heads, spec.G, a.head_dim_qk)
    k = torch.empty(B, a.kv_heads, T, a.head_dim_qk, device=DEVICE, dtype=torch.bfloat16).normal_()
    v = torch.empty(B, a.kv_heads, T, a.head_dim_v, device=DEVICE, dtype=torch.bfloat16).normal_()
    out = {}
    for name, be in sdpa_backends().items():
        if name == "math" and B * T > 16 * 16384:
            continue  # materialises the scores in fp32 through several kernels: slow, not a contender
        for form in ("gqa", "grp"):
            key = f"{name}/{form}"
            try:
                def fn(be=be, form=form, q=q, qg=qg, k=k, v=v):
                    with sdpa_kernel([be]):
                        if form == "gqa":
                            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                        return F.scaled_dot_product_attention(qg, k, v)

                fn()
                torch.cuda.synchronize()
                us = graph_us(fn)
                out[key] = abs(us)
                if us < 0:
                    out[key + "_eager"] = True
            except Exception as e:  # a backend that cannot run this shape
                out[key] = None
                out[key + "_err"] = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                torch.cuda.synchronize()
    del q, qg, k, v
    torch.cuda.empty_cache()
    return out


# ---- old vs new schedule options of the decode plan, same process (issue 5, second pass) ------------------
# variants of the decode plan config (on top of the default); "legacy" = the path before the second pass
def variants() -> dict[str, dict]:
    from nsa_dsl.codegen.kernels_decode import LEGACY

    return {
        "legacy": dict(LEGACY),
        "new": {},
        "new_topk_w4": {"topk_warps": 4},
        "new_last": {"COMBINE": "last"},
        "new_last_rows": {"COMBINE": "last_rows"},
        "new_last_rows_cmp_pf": {"COMBINE": "last_rows", "CMP_PREFETCH": 1},
        "no_sw_prefetch": {"SW_PREFETCH": 0},
        "no_topk_prefetch": {"PREFETCH": 0},
        "lse_loop": {"LSE_MERGE": "loop"},
        "cmp_prefetch": {"CMP_PREFETCH": 1},
        "cmp_prefetch_auto": {"CMP_PREFETCH": 2},
        "cmp_prefetch_bn32": {"CMP_PREFETCH": 1, "BLOCK_N": 32},
        "legacy_rows": {"COMBINE": "rows", "LSE_MERGE": "tile", "PREFETCH": 0, "SW_PREFETCH": 0},
        "new_cmp_pf_topk_w4": {"CMP_PREFETCH": 1, "topk_warps": 4},
        "rows_cmp_auto": {"CMP_PREFETCH": 2},
        "last_rows_cmp_auto": {"COMBINE": "last_rows", "CMP_PREFETCH": 2},
        "last_rows_cmp_auto_topk_w4": {"COMBINE": "last_rows", "CMP_PREFETCH": 2, "topk_warps": 4},
        # 4 warps for the compressed and selected + window kernels (session 5: -8% at paper B = 16, 64k)
        "w4": {"num_warps": 4},
        "w8": {"num_warps": 8},  # the default before 2026-11-29 12:37 UTC
        "combine_kernel": {"COMBINE": "kernel"},
        "combine_rows": {"COMBINE": "rows"},  # the default before COMBINE "auto"
        "sw_prefetch": {"SW_PREFETCH": 1},
        "bn128": {"BLOCK_N": 128},
        "w4_topk_w4": {"num_warps": 4, "topk_warps": 4},
        "w4_bn128": {"num_warps": 4, "BLOCK_N": 128},
        "w4_topk_w8": {"num_warps": 4, "topk_warps": 8},
        # programmatic dependent launch (the default "new" has PDL = 1 on sm90+: window tiles before the wait)
        "pdl0": {"PDL": 0},
        "pdl2": {"PDL": 2},  # PDL with the plain wait in the selected + window kernel
        # session 10: window as programs of the top-n launch, tl.topk chunks, selected / window K/V via TMA
        "win_topk": {"WINDOW_AT": "topk"},
        "sel_topk": {"SELECT": "topk"},
        "tma": {"LOADS": "tma"},
        "win_sel": {"WINDOW_AT": "topk", "SELECT": "topk"},
        "win_sel_tma": {"WINDOW_AT": "topk", "SELECT": "topk", "LOADS": "tma"},
        "win_sel_tma_bk64": {"WINDOW_AT": "topk", "SELECT": "topk", "LOADS": "tma", "BLOCK_K": 64},
        "sw_sort": {"WINDOW_AT": "sw", "SELECT": "sort"},  # the default before 2026-11-29 19:00 UTC
        "cmp_tma": {"CMP_LOADS": "tma"},
        "cmp_tma_pf": {"CMP_LOADS": "tma", "CMP_PREFETCH": 1},
        "cmp_tma_bn128": {"CMP_LOADS": "tma", "BLOCK_N": 128},
        "ns3": {"num_stages": 3},
        "cmp_tma_ns3": {"CMP_LOADS": "tma", "num_stages": 3},
        "bk64": {"BLOCK_K": 64},
        "pdl1": {"PDL": 1},
        "ns2": {"num_stages": 2},  # the default before 2026-11-29 19:10 UTC
        "tw8": {"topk_warps": 8},
        "bw64": {"BLOCK_W": 64},
        "bk64_bw64": {"BLOCK_K": 64, "BLOCK_W": 64},
        "tw2": {"topk_warps": 2},
        "bs32": {"BLOCK_S": 32},
        "ns4": {"num_stages": 4},
        # session 11: the next grid scheduled into the tail of this one (PDL_AT), the logit scratch in fp16
        "pdl1_tail": {"PDL": 1, "PDL_AT": "tail"},
        "pdl3_tail": {"PDL": 3, "PDL_AT": "tail"},
        "lg16": {"LOGITS": "fp16"},
        "lg16_pdl1_tail": {"LOGITS": "fp16", "PDL": 1, "PDL_AT": "tail"},
        # 32-key compressed tiles with more stages (two programs per SM, more tiles in flight each), and more
        # stages for the selected / window tiles
        "bn32_cs4": {"BLOCK_N": 32, "cmp_stages": 4},
        "bn32_cs5": {"BLOCK_N": 32, "cmp_stages": 5},
        "bn32_cs3": {"BLOCK_N": 32, "cmp_stages": 3},
        "ns5_cs3": {"num_stages": 5, "cmp_stages": 3},
        "ns4_cs3": {"num_stages": 4, "cmp_stages": 3},
        "bn32_cs5_ns5": {"BLOCK_N": 32, "cmp_stages": 5, "num_stages": 5},
        # the window tiles as the last programs of the compressed launch (its tail), not of the top-n launch
        "win_cmp": {"WINDOW_AT": "cmp"},
        "win_cmp_bn32_cs3": {"WINDOW_AT": "cmp", "BLOCK_N": 32, "cmp_stages": 3},
        # session 12: the batch as 2 / 4 chains on their own streams, each chain's compressed pass overlapping
        # the previous chain's top-n and selected launches (splits chosen for one chunk)
        "bc1": {"batch_chunks": 1},  # one chain (the default before batch_chunks = 0, auto)
        "bc2": {"batch_chunks": 2},
        "bc4": {"batch_chunks": 4},
        "bc2_pdl1": {"batch_chunks": 2, "PDL": 1},
        "bc2_win_cmp": {"batch_chunks": 2, "WINDOW_AT": "cmp"},
    }


PDL_VARIANTS = ("pdl0", "pdl2")


def _pdl_ok() -> bool:
    """Programmatic dependent launch needs compute capability >= 9 (the PDL variants are skipped below)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


# timed at every shape (candidates for the default); the rest of variants() only at EXTRA_VARIANTS
EVERYWHERE = ("legacy", "new", "rows_cmp_auto", "last_rows_cmp_auto", *PDL_VARIANTS)


# (spec, B, T) in timing order; the extra variants / splits only where listed
COMPARE_SHAPES = [
    ("nsa_paper", 1, 65536), ("nsa_paper", 16, 65536), ("nsa_paper", 1, 8192), ("nsa_paper", 16, 8192),
    ("small_group", 1, 65536), ("small_group", 16, 65536), ("small_group", 1, 8192),
    ("small_group", 16, 8192), ("nsa_paper", 1, 131072), ("nsa_paper", 16, 131072),
    ("small_group", 1, 131072), ("small_group", 16, 131072),
]
EXTRA_VARIANTS = {("nsa_paper", 1, 65536), ("nsa_paper", 16, 65536), ("small_group", 16, 65536)}
EXTRA_SPLITS = {
    ("nsa_paper", 1, 65536): [(16, 32, 16), (8, 16, 8), (32, 16, 16), (16, 16, 8)],
    ("nsa_paper", 16, 65536): [(4, 4, 8), (4, 8, 4), (4, 4, 16), (8, 4, 4), (2, 4, 4)],
    ("small_group", 16, 65536): [(2, 2, 4), (1, 2, 2), (4, 4, 4)],
}


#: --variants: only these variant names (plus "new"), at every shape; --shapes: only these shapes
ONLY_VARIANTS: list[str] | None = None
ONLY_SHAPES: list[tuple[str, int, int]] | None = None
#: --splits: (compressed, selected/window, top-n) split counts timed for "new" and every --variants variant
ONLY_SPLITS: list[tuple[int, int, int]] = []


def _shape_variants(key) -> list[tuple[str, tuple | None]]:
    """(variant, splits) pairs timed at a shape: legacy and new with automatic splits, more where listed."""
    if ONLY_VARIANTS is not None:
        out = [(n, None) for n in dict.fromkeys(["new", *ONLY_VARIANTS])]
        return out + [(n, sp) for n, _ in out for sp in ONLY_SPLITS]
    names = list(variants()) if key in EXTRA_VARIANTS else list(EVERYWHERE)
    if not _pdl_ok():  # PDL = 1 / 2 are rejected below sm90 ("new" is PDL = 0 there)
        names = [n for n in names if n not in PDL_VARIANTS]
    out = [(n, None) for n in names]
    out += [("new", sp) for sp in EXTRA_SPLITS.get(key, [])]
    out += [("legacy", sp) for sp in EXTRA_SPLITS.get(key, [])[:1]]
    return out


def warm(index: int, part: int = 0, parts: int = 1) -> None:
    """Compile every ``parts``-th (variant, splits) of comparison shape ``index`` from ``part`` on (one decode
    call each, no timing); parallel processes run these before the timing (Triton's disk cache keeps them)."""
    key = (ONLY_SHAPES or COMPARE_SHAPES)[index]
    spec_name, B, T = key  # noqa: N806
    spec = nsa_dsl.load_spec(spec_name)
    base = nsa_dsl.compile(spec, device=DEVICE)
    cache = _nsa_cache(spec, B, min(T, 65536))  # same specialisations as the full length, less memory
    q, g, _ = _step_tensors(spec, B)
    for name, sp in _shape_variants(key)[part::parts]:
        t0 = time.time()
        ops = base.with_config("decode", variants()[name]) if variants()[name] else base
        try:
            decode(ops, q, cache, g, splits=sp, plan_length=T)
            torch.cuda.synchronize()
            print(f"warm {key} {name} {sp}: {time.time() - t0:.1f}s", flush=True)
        except Exception as e:  # recorded by the timing pass too
            msg = str(e).splitlines()[0][:200] if str(e) else repr(e)
            print(f"warm {key} {name} {sp}: FAILED {msg}", flush=True)


def compare(outdir: Path, tmax: int) -> None:
    """Old vs new decode options in one process against dense SDPA; writes decode_compare.{json,md} after
    every shape (a time limit keeps what was measured)."""
    global _FLUSH
    _FLUSH = torch.empty(128 << 20, dtype=torch.bfloat16, device=DEVICE)
    meta = env_info()
    meta["copy_tbps"] = copy_bandwidth()
    print(f"# {meta.get('card')} torch {meta['torch']} triton {meta['triton']}; "
          f"copy {meta['copy_tbps']:.2f} TB/s", flush=True)
    rows: list[dict] = []
    ops_by_spec = {}
    for key in ONLY_SHAPES or COMPARE_SHAPES:
        spec_name, B, T = key  # noqa: N806
        if T > tmax:
            continue
        spec = nsa_dsl.load_spec(spec_name)
        base = ops_by_spec.setdefault(spec_name, nsa_dsl.compile(spec, device=DEVICE))
        row: dict = {"spec": spec_name, "B": B, "T": T, "nsa": {}}
        try:
            cache = _nsa_cache(spec, B, T)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            continue
        q, g, out = _step_tensors(spec, B)
        ref = None
        auto_out = {}  # variant -> output with automatic splits (PDL variants checked bitwise against "new")
        for name, sp in _shape_variants(key):
            ops = base.with_config("decode", variants()[name]) if variants()[name] else base
            splits = sp or _splits(ops, decode_plan(ops, B=B, S=1, T=T), B, 1, T)
            label = name if sp is None else f"{name} {tuple(splits)}"
            step = functools.partial(decode, ops, q, cache, g, out=out, splits=splits, plan_length=T)
            try:
                step()
                torch.cuda.synchronize()
                diff = 0.0 if ref is None else float((out.float() - ref).abs().max())
                if ref is None:
                    ref = out.float().clone()
                if sp is None:
                    auto_out[name] = out.clone()
                us = abs(graph_us(step))
                row["nsa"][label] = {"us": us, "splits": list(splits), "max_diff_vs_first": diff}
                if T == 65536 and B in (1, 16) and spec_name == "nsa_paper" and sp is None \
                        and (name in ("legacy", "new", "pdl0") or ONLY_VARIANTS is not None):
                    row["nsa"][label]["kernels_us"] = kernel_breakdown(step)
            except Exception as e:  # a variant that does not compile or fit: recorded, not fatal
                row["nsa"][label] = {"error": str(e).splitlines()[0][:160] if str(e) else type(e).__name__}
                torch.cuda.synchronize()
        for name in PDL_VARIANTS:
            if name in auto_out and "new" in auto_out and "us" in row["nsa"].get(name, {}):
                row["nsa"][name]["bitwise_equal_new"] = bool(torch.equal(auto_out[name], auto_out["new"]))
        del cache, step, auto_out
        torch.cuda.empty_cache()
        row["dense"] = run_dense(spec, B, T)
        must, moved = nsa_bytes(spec, T, B)
        dense = [x for x in row["dense"].values() if isinstance(x, float)]
        row.update(nsa_must_bytes=must, nsa_moved_bytes=moved, dense_best_us=min(dense) if dense else None)
        rows.append(row)
        timed = {k: v["us"] for k, v in row["nsa"].items() if "us" in v}
        best_lbl = min(timed, key=timed.get) if timed else None
        print(f"{spec_name:11s} B={B:2d} T={T:6d} legacy {timed.get('legacy')} new {timed.get('new')} best "
              f"{best_lbl} {timed.get(best_lbl)} | PDL 0 {timed.get('pdl0')} 1 (new) {timed.get('new')} "
              f"2 {timed.get('pdl2')} | dense {row['dense_best_us']} us", flush=True)
        for k, v in row["nsa"].items():
            eq = f" bitwise = new: {v['bitwise_equal_new']}" if "bitwise_equal_new" in v else ""
            print(f"    {k}: {v.get('us', v.get('error'))} diff {v.get('max_diff_vs_first', '')}{eq}",
                  flush=True)
            for kk, x in v.get("kernels_us", {}).items():
                print(f"        kernel {kk}: {x:.1f} us", flush=True)
        _write_compare(outdir, meta, rows)


def _us(nsa: dict, name: str) -> str:
    v = nsa.get(name, {})
    if "us" not in v:
        return "-"
    return f"{v['us']:.1f}" + ("" if v.get("bitwise_equal_new", True) else " (differs!)")


def _write_compare(outdir: Path, meta: dict, rows: list[dict]) -> None:
    data = {"meta": meta, "rows": rows}
    (outdir / "decode_compare.json").write_text(json.dumps(data, indent=1, default=str))
    cb = meta["copy_tbps"]
    lines = [
        f"Card: {meta.get('card')}, torch {meta['torch']}, triton {meta['triton']}, {meta['date_utc']} UTC; "
        f"copy {cb:.2f} TB/s (read + write). CUDA-graph replay, cold L2. legacy = the decode options "
        "before the second pass (kernels_decode.LEGACY), new = the default now; both with automatic splits.",
        "",
        "| spec | B | T | legacy µs | new µs | new / legacy | best variant µs | dense µs "
        "| speedup new (best) | new TB/s (% copy) | PDL 0 / 1 (new) / 2 µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = r["nsa"]
        new = n.get("new", {}).get("us")
        old = n.get("legacy", {}).get("us", new)  # --variants runs may skip legacy
        ok = {k: v["us"] for k, v in n.items() if "us" in v}
        d = r["dense_best_us"]
        if old is None or new is None or d is None:
            continue
        bl = min(ok, key=ok.get)
        tb = r["nsa_must_bytes"] / (new * 1e-6) / 1e12
        lines.append(
            f"| {r['spec']} | {r['B']} | {r['T']} | {old:.1f} | {new:.1f} | {new / old:.2f} | "
            f"{ok[bl]:.1f} ({bl}) | {d:.1f} | {d / new:.2f}× ({d / ok[bl]:.2f}×) | "
            f"{tb:.2f} ({100 * tb / cb:.0f}%) | {_us(n, 'pdl0')} / {new:.1f} / {_us(n, 'pdl2')} |"
        )
    (outdir / "decode_compare.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    global _FLUSH
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--specs", default="nsa_paper,small_group")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--tmax", type=int, default=131072)
    ap.add_argument("--compare", action="store_true", help="old vs new decode options (decode_compare.*)")
    ap.add_argument("--warm", type=int, metavar="I", help="compile the --compare variants of shape I")
    ap.add_argument("--warm-jobs", action="store_true",
                    help="print the 'I:P/N' warm-up jobs of the --compare shapes up to 64k (gpu_decode.sh)")
    ap.add_argument("--part", default="0/1", help="with --warm: P/N, every N-th variant from the P-th")
    ap.add_argument("--variants", help="with --compare: comma-separated variant names (\"new\" always runs)")
    ap.add_argument("--shapes", help="with --compare: comma-separated spec:B:T shapes instead of the list")
    ap.add_argument("--timeline", help="comma-separated spec:B:T shapes: kernel start/end offsets of one "
                    "step of each --variants variant (default: new) on the device clock")
    ap.add_argument("--splits", help="with --variants: semicolon-separated split triples C,S,T timed for new "
                    "and each variant")
    args = ap.parse_args()
    global ONLY_VARIANTS, ONLY_SHAPES, ONLY_SPLITS
    if args.splits:
        ONLY_SPLITS = [tuple(int(v) for v in x.split(",")) for x in args.splits.split(";") if x]
    if args.variants:
        ONLY_VARIANTS = [v for v in args.variants.split(",") if v]
        unknown = [v for v in ONLY_VARIANTS if v not in variants()]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known: {sorted(variants())}")
    if args.shapes:
        ONLY_SHAPES = [(a, int(b), int(c)) for a, b, c in (x.split(":") for x in args.shapes.split(","))]
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    if args.warm_jobs:
        # shapes with many variants over 4 processes, those with 5-6 (e.g. the PDL variants) over 2
        for i, key in enumerate(ONLY_SHAPES or COMPARE_SHAPES):
            if key[2] <= 65536:
                nv = len(_shape_variants(key))
                n = 4 if nv > 6 else 2 if nv > 4 else 1
                print("\n".join(f"{i}:{p}/{n}" for p in range(n)))
        return
    if args.warm is not None:
        part, parts = (int(x) for x in args.part.split("/"))
        warm(args.warm, part, parts)
        return
    if args.compare:
        compare(outdir, args.tmax)
        return
    if args.timeline:
        shapes = [(a, int(b), int(c)) for a, b, c in (x.split(":") for x in args.timeline.split(","))]
        timeline(shapes, list(dict.fromkeys(["new", *(ONLY_VARIANTS or [])])), outdir)
        return
    _FLUSH = torch.empty(128 << 20, dtype=torch.bfloat16, device=DEVICE)
    meta = env_info()
    meta["copy_tbps"] = copy_bandwidth()
    print(f"# {meta.get('card')} torch {meta['torch']} triton {meta['triton']}", flush=True)
    print(f"# copy {meta['copy_tbps']:.2f} TB/s", flush=True)
    free = torch.cuda.mem_get_info()[1]
    rows = []
    t_start = time.time()
    for spec_name in args.specs.split(","):
        spec = nsa_dsl.load_spec(spec_name)
        ops = nsa_dsl.compile(spec, device=DEVICE)
        a = spec.attention
        per_tok = a.kv_heads * (a.head_dim_qk + a.head_dim_v) * 2
        for B in [int(x) for x in args.batches.split(",")]:  # noqa: N806
            T = 8192  # noqa: N806
            while T <= args.tmax:
                need = B * T * per_tok * 1.15  # one cache at a time (NSA, then dense), plus scratch
                if need > 0.8 * free:
                    break
                row = {"spec": spec_name, "B": B, "T": T}
                sweep = SWEEPS.get((B, T)) if T == 65536 else None
                try:
                    row["nsa"] = run_nsa(spec, ops, B, T, sweep=sweep, profile=T == 65536 and B in (1, 16))
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    break
                torch.cuda.empty_cache()
                row["dense"] = run_dense(spec, B, T)
                must, moved = nsa_bytes(spec, T, B)
                dense_bytes = float(B * T * per_tok)
                us = row["nsa"]["us"]
                times = [x for kk, x in row["dense"].items() if isinstance(x, float)]
                best = min(times) if times else float("nan")
                row.update(
                    nsa_must_bytes=must, nsa_moved_bytes=moved, dense_bytes=dense_bytes,
                    nsa_tbps=must / (us * 1e-6) / 1e12, nsa_moved_tbps=moved / (us * 1e-6) / 1e12,
                    dense_best_us=best,
                    dense_best_tbps=dense_bytes / (best * 1e-6) / 1e12 if times else float("nan"),
                    speedup=best / us if times else float("nan"),
                    expected_speedup=dense_bytes / must,
                )
                rows.append(row)
                d = row["dense"]
                print(
                    f"{spec_name:12s} B={B:3d} T={T:6d} nsa {us:8.1f}us split={row['nsa']['splits']} "
                    f"{row['nsa_tbps']:.2f}TB/s | dense "
                    + " ".join(f"{kk}={v:.1f}" for kk, v in d.items() if isinstance(v, float))
                    + f" | x{row['speedup']:.2f} (bytes x{row['expected_speedup']:.1f})",
                    flush=True,
                )
                for delta in TILE_SWEEPS.get((spec_name, B, T), []):
                    try:
                        alt = run_nsa(spec, ops.with_config("decode", delta), B, T)["us"]
                    except Exception as e:  # a config that does not compile or fit
                        alt = str(e).splitlines()[0][:100]
                    row["nsa"].setdefault("tiles", {})[json.dumps(delta)] = alt
                    torch.cuda.empty_cache()
                for kk, v in row["nsa"].get("tiles", {}).items():
                    print(f"    config {kk}: {v if isinstance(v, str) else f'{v:.1f} us'}", flush=True)
                for kk, v in row["nsa"].get("sweep", {}).items():
                    print(f"    splits {kk}: {v:.1f} us", flush=True)
                for kk, v in row["nsa"].get("kernels_us", {}).items():
                    print(f"    kernel {kk}: {v:.1f} us", flush=True)
                T *= 2  # noqa: N806
                if args.quick and T > 65536:
                    break
    meta["elapsed_s"] = time.time() - t_start
    (outdir / "decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    lines = [
        f"Card: {meta.get('card')}, torch {meta['torch']}, triton {meta['triton']}, {meta['date_utc']} UTC; "
        f"device copy bandwidth {meta['copy_tbps']:.2f} TB/s (read + write).",
        "",
        "| spec | B | T | NSA µs (splits) | NSA must-read MB | NSA TB/s (% copy) | best dense µs (backend) | "
        "dense TB/s | speedup | bytes ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = {k: v for k, v in r["dense"].items() if isinstance(v, float)}
        bk = min(d, key=d.get) if d else "-"
        lines.append(
            f"| {r['spec']} | {r['B']} | {r['T']} | {r['nsa']['us']:.1f} "
            f"({','.join(str(x) for x in r['nsa']['splits'])}) | {r['nsa_must_bytes'] / 1e6:.1f} | "
            f"{r['nsa_tbps']:.2f} "
            f"({100 * r['nsa_tbps'] / meta['copy_tbps']:.0f}%) | {r['dense_best_us']:.1f} ({bk}) | "
            f"{r['dense_best_tbps']:.2f} | {r['speedup']:.2f}× | {r['expected_speedup']:.1f}× |"
        )
    md = "\n".join(lines) + "\n"
    (outdir / "decode.md").write_text(md)
    print(md)
    if not math.isfinite(meta["copy_tbps"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
