"""Forward+backward benchmark of the generated NSA op (issue 4).

Compares, B = 1, bf16, T = 8k..64k:
  * nsa-dsl on the paper spec (64 q / 4 kv heads, dk 192, dv 128) and on fla_compat (dk = dv = 128, mean-pool
    compression inside the timed region, like fla-core) — forward, forward+backward, and a per-stage breakdown
    of the backward (bwd_pre, bwd_cmp, reverse_index, bwd_slc, bwd_win, cast) and of the forward stages;
  * torch SDPA, causal dense attention with the same head counts, every backend that runs
    (at T >= --sdpa-all-max only the fastest backend measured below it);
  * fla-core ``parallel_nsa`` on fla_compat when installed.
Optionally (--sweep) a few backward-kernel configs are timed at one T first and the best is used.

Writes JSON and a Markdown table (card, versions, date) to --out (default bench/results) and prints the table.
Usage: python bench/bench_backward.py [--T 8192 16384 32768 65536] [--out DIR] [--sweep]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from nsa_dsl.codegen.autograd import activation_bytes_per_token, nsa_attention, nsa_backward

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py, shared with the forward and decode benchmarks)

import nsa_dsl
from nsa_dsl import load_spec

DT = torch.bfloat16
DEVICE = "cuda"  # a CPU smoke run of the bench logic sets "cpu" (with DT = float32 and the interpreter)


def timeit(fn, budget_ms: float = 1500.0, min_runs: int = 3, max_runs: int = 30) -> float:
    """Median milliseconds of fn() (CUDA events), after one warm-up call; runs sized to a time budget."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e), 1e-3)
    n = int(max(min_runs, min(max_runs, budget_ms // est)))
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def nsa_inputs(spec, T, *, grad: bool):  # noqa: N803
    a = spec.attention
    g = torch.Generator(device=DEVICE).manual_seed(T)

    def r(*shape):
        return torch.randn(*shape, device=DEVICE, generator=g, dtype=DT).requires_grad_(grad)

    tc = spec.num_compressed(T)
    q = r(1, T, a.heads, a.head_dim_qk)
    k, v = r(1, T, a.kv_heads, a.head_dim_qk), r(1, T, a.kv_heads, a.head_dim_v)
    kc, vc = r(1, tc, a.kv_heads, a.head_dim_qk), r(1, tc, a.kv_heads, a.head_dim_v)
    gate = torch.rand(1, T, a.heads, 3, device=DEVICE, generator=g, dtype=DT).requires_grad_(grad)
    do = torch.randn(1, T, a.heads, a.head_dim_v, device=DEVICE, generator=g, dtype=DT)
    return [q, k, v, kc, vc, gate], do


def mean_pool(x, spec):
    """fla_compat compression (l = d): mean over non-overlapping blocks (differentiable, timed)."""
    l = spec.compression.block  # noqa: E741
    B, T, H, D = x.shape  # noqa: N806
    tc = spec.num_compressed(T)
    return x[:, : tc * l].reshape(B, tc, l, H, D).mean(2)


def bench_nsa(spec, ops, T, *, pool: bool) -> dict:  # noqa: N803
    xs, do = nsa_inputs(spec, T, grad=True)
    q, k, v, kc, vc, g = xs

    def fwd():
        with torch.no_grad():
            kk, vv = (mean_pool(k, spec), mean_pool(v, spec)) if pool else (kc, vc)
            ops.forward(q, k, v, kk, vv, g)

    def fwdbwd():
        kk, vv = (mean_pool(k, spec), mean_pool(v, spec)) if pool else (kc, vc)
        o = nsa_attention(q, k, v, kk, vv, g, ops)
        o.backward(do)
        for x in xs:
            x.grad = None

    row = {"fwd_ms": timeit(fwd), "fwdbwd_ms": timeit(fwdbwd)}
    # stage breakdown: forward stages and backward stages (CUDA events, 3 runs averaged)
    with torch.no_grad():
        qd, kd, vd, kcd, vcd, gd = (x.detach() for x in xs)
        if pool:
            kcd, vcd = mean_pool(kd, spec), mean_pool(vd, spec)
        fw = {}
        fw["cmp_fwd"] = timeit(lambda: ops.cmp_fwd(qd, kcd, vcd), budget_ms=300)
        o_cmp, lse_cmp = ops.cmp_fwd(qd, kcd, vcd)
        fw["select"] = timeit(lambda: ops.select(qd, kcd, lse_cmp), budget_ms=300)
        idx = ops.select(qd, kcd, lse_cmp)
        fw["slc_fwd"] = timeit(lambda: ops.slc_fwd(qd, kd, vd, idx), budget_ms=300)
        if spec.window_size > 0:
            fw["win_fwd"] = timeit(lambda: ops.win_fwd(qd, kd, vd), budget_ms=300)
        _, saved = ops.forward_train(qd, kd, vd, kcd, vcd, gd)
        prof: dict[str, float] = {}
        nsa_backward(ops, qd, kd, vd, kcd, vcd, gd, do, saved)  # warm
        for _ in range(3):
            nsa_backward(ops, qd, kd, vd, kcd, vcd, gd, do, saved, profile=prof)
    row["fwd_stages_ms"] = fw
    row["bwd_stages_ms"] = {kk: vv / 3 for kk, vv in prof.items()}
    fl = bwd_flops(spec, T)
    row["bwd_tflops"] = {
        kk: fl[kk] / row["bwd_stages_ms"][kk] / 1e9 for kk in fl if row["bwd_stages_ms"].get(kk)
    }
    torch.cuda.empty_cache()
    return row


def branch_pairs(spec, T) -> dict[str, float]:  # noqa: N803
    """(query head, key) pairs each branch attends to at length T (selection: an estimate assuming the
    current block is among the n selected and the others are full blocks)."""
    t = torch.arange(T, dtype=torch.float64)
    hq = spec.attention.heads
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741
    tc = spec.num_compressed(T)
    nvis = torch.clamp(torch.div(t - l + 1, d, rounding_mode="floor") + 1, 0, tc)
    lp, n = spec.selection.block, spec.selection.top_n
    nb = torch.div(t, lp, rounding_mode="floor") + 1
    slc = torch.where(nb <= n, t + 1, (n - 1) * lp + torch.remainder(t, lp) + 1)
    w = spec.window_size
    win = torch.clamp(t + 1, max=w) if w > 0 else torch.zeros_like(t)
    return {"cmp": hq * float(nvis.sum()), "slc": hq * float(slc.sum()), "win": hq * float(win.sum())}


def bwd_flops(spec, T) -> dict[str, float]:  # noqa: N803
    """Backward matmul FLOPs per branch and kernel (one pass over the pairs): dK/dV kernel 2*(2dk + 2dv),
    dQ kernel 2*(2dk + dv) per (query head, key) pair."""
    dk, dv = spec.attention.head_dim_qk, spec.attention.head_dim_v
    out = {}
    for b, p in branch_pairs(spec, T).items():
        out[f"bwd_{b}.dkdv"] = 2 * (2 * dk + 2 * dv) * p
        out[f"bwd_{b}.dq"] = 2 * (2 * dk + dv) * p
        out[f"bwd_{b}"] = out[f"bwd_{b}.dkdv"] + out[f"bwd_{b}.dq"]
    return out


SDPA_BACKENDS = ("flash", "cudnn", "efficient")


def bench_sdpa(T, dk, dv, backend) -> dict | None:  # noqa: N803
    """Dense causal GQA attention (64 q / 4 kv heads) through one SDPA backend (``common.sdpa_dense``):
    forward and forward+backward, or None when the backend does not run this shape."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, T, 64, dk, device="cuda", dtype=DT, generator=g, requires_grad=True)
    k = torch.randn(1, T, 4, dk, device="cuda", dtype=DT, generator=g, requires_grad=True)
    v = torch.randn(1, T, 4, dv, device="cuda", dtype=DT, generator=g, requires_grad=True)
    do = torch.randn(1, 64, T, dv, device="cuda", dtype=DT, generator=g)
    be = common.sdpa_backends()[backend]
    kx = vx = None
    try:
        run = common.sdpa_dense(q, k, v, be)
        run().backward(do)
        torch.cuda.synchronize()
        mode = "enable_gqa"
    except Exception:  # noqa: BLE001 - no GQA in this backend: K/V expanded to 64 heads (leaves)
        from torch.nn.attention import sdpa_kernel

        kx = k.detach().repeat_interleave(16, 2).transpose(1, 2).requires_grad_(True)
        vx = v.detach().repeat_interleave(16, 2).transpose(1, 2).requires_grad_(True)
        qt = q.transpose(1, 2)

        def run():
            with sdpa_kernel([be]):
                return torch.nn.functional.scaled_dot_product_attention(qt, kx, vx, is_causal=True)

        try:
            run().backward(do)
            torch.cuda.synchronize()
            mode = "kv expanded"
        except Exception:  # noqa: BLE001 - this backend does not run the shape at all
            return None

    def fwd():
        with torch.no_grad():
            run()

    def fwdbwd():
        run().backward(do)
        q.grad = k.grad = v.grad = None
        if kx is not None:
            kx.grad = vx.grad = None

    return {"backend": backend, "mode": mode, "fwd_ms": timeit(fwd), "fwdbwd_ms": timeit(fwdbwd)}


def bench_fla(T) -> dict | None:  # noqa: N803
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception:
        return None
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, T, 64, 128, device="cuda", dtype=DT, generator=g, requires_grad=True)
    k = torch.randn(1, T, 4, 128, device="cuda", dtype=DT, generator=g, requires_grad=True)
    v = torch.randn(1, T, 4, 128, device="cuda", dtype=DT, generator=g, requires_grad=True)
    gc = torch.rand(1, T, 64, device="cuda", dtype=DT, generator=g).requires_grad_(True)
    gs = torch.rand(1, T, 64, device="cuda", dtype=DT, generator=g).requires_grad_(True)
    do = torch.randn(1, T, 64, 128, device="cuda", dtype=DT, generator=g)

    def fwd():
        with torch.no_grad():
            parallel_nsa(q, k, v, gc, gs, None, block_counts=16, block_size=64)

    def fwdbwd():
        parallel_nsa(q, k, v, gc, gs, None, block_counts=16, block_size=64).backward(do)
        q.grad = k.grad = v.grad = gc.grad = gs.grad = None

    try:
        return {"impl": "fla-core parallel_nsa", "fwd_ms": timeit(fwd), "fwdbwd_ms": timeit(fwdbwd)}
    except Exception as e:  # noqa: BLE001
        return {"impl": "fla-core parallel_nsa", "error": str(e)[:200]}


def candidates(spec) -> list[dict[str, dict]]:
    """A few whole-backward configs (kernel -> params) to time; index 0 = the defaults, 1 = the sm90 defaults
    before the second pass (12:09 run), 2 = spill-free 32-row tiles with the multi-token selection dQ."""
    G = spec.G  # noqa: N806
    wide = spec.attention.head_dim_qk + spec.attention.head_dim_v > 256
    old = {"bwd_slc": {**OLD_SLC, "BLOCK_T": max(1, 128 // G)}, "bwd_cmp": OLD_CMP, "bwd_win": OLD_WIN}
    if not wide:
        old = {**old, "bwd_cmp": OLD_COMPAT["bwd_cmp"]}
    return [
        {},
        old,
        {
            "bwd_cmp": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "KV_PASSES": 2},
            "bwd_win": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "KV_PASSES": 2},
            "bwd_slc": {"BLOCK_T": max(1, 32 // G), "KEY_SPLIT": 2, "num_warps": 4, "num_stages": 1,
                        "DQ_TOKENS": 4, "dq_warps": 4, "dq_stages": 1, "DQ_LAYOUT": "rows"},
        },
    ]


def with_candidate(ops, cand):
    for kname, params in cand.items():
        if ops.has_kernel(kname):
            cfg = dict(ops.config_for(kname, T=16384))
            cfg.update(params)
            ops = ops.with_config(kname, cfg)
    return ops


def warm(spec_name: str, idx: int) -> None:
    """Compile (Triton cache) the forward + backward kernels of one candidate at T = 8192."""
    spec = load_spec(spec_name)
    ops = with_candidate(nsa_dsl.compile(spec), candidates(spec)[idx])
    xs, do = nsa_inputs(spec, 8192, grad=False)
    q, k, v, kc, vc, g = xs
    with torch.no_grad():
        _, saved = ops.forward_train(q, k, v, kc, vc, g)
        nsa_backward(ops, q, k, v, kc, vc, g, do, saved)
    torch.cuda.synchronize()


def sweep(spec, ops, T):  # noqa: N803
    """Time the candidate configs per backward kernel at one T; returns (ops with the best, log rows)."""
    xs, do = nsa_inputs(spec, T, grad=False)
    q, k, v, kc, vc, g = xs
    with torch.no_grad():
        _, saved = ops.forward_train(q, k, v, kc, vc, g)
    log = []
    times: dict[str, list[tuple[float, int]]] = {}
    for i, cand in enumerate(candidates(spec)):
        try:
            trial = with_candidate(ops, cand)
            prof: dict[str, float] = {}
            nsa_backward(trial, q, k, v, kc, vc, g, do, saved)
            for _ in range(3):
                nsa_backward(trial, q, k, v, kc, vc, g, do, saved, profile=prof)
        except Exception as e:  # noqa: BLE001
            log.append({"candidate": i, "error": str(e)[:200]})
            continue
        row = {kk: vv / 3 for kk, vv in prof.items()}
        log.append({"candidate": i, "T": T, "ms": row})
        for key, ms in row.items():
            times.setdefault(key, []).append((ms, i))
    # dQ and dK/dV kernels of a branch have separate parameters: pick each from its own timing
    best = ops
    for kname in ("bwd_cmp", "bwd_slc", "bwd_win"):
        for part, keys in PARAM_GROUPS[kname].items():
            lst = times.get(f"{kname}.{part}")
            if not lst:
                continue
            _, i = min(lst)
            params = {kk: vv for kk, vv in candidates(spec)[i].get(kname, {}).items() if kk in keys}
            if params:
                best = with_candidate(best, {kname: params})
            log.append({"kernel": f"{kname}.{part}", "best_candidate": i})
    return best, log


#: Which config parameters belong to which kernel of a backward stage (for the sweep's per-kernel pick).
_DENSE_GROUPS = {
    "dkdv": {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "KV_PASSES", "Q_CHUNK"},
    "dq": {"DQ_BLOCK_M", "DQ_BLOCK_N", "dq_warps", "dq_stages"},
}
PARAM_GROUPS = {
    "bwd_cmp": _DENSE_GROUPS,
    "bwd_win": _DENSE_GROUPS,
    "bwd_slc": {
        "dkdv": {"BLOCK_T", "KEY_SPLIT", "num_warps", "num_stages", "CHUNK"},
        "dq": {"DQ_TOKENS", "dq_warps", "dq_stages", "DQ_LAYOUT"},
    },
}


def legacy_reverse_index(indices, cu_seqlens, block, chunk):
    """The first reverse-index builder (host syncs: four .item(), one nonzero), kept for same-run timing."""
    if indices.dim() != 3:
        raise ValueError(f"indices: expected [T, Hkv, n], got shape {tuple(indices.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk: must be >= 1, got {chunk}")
    dev = indices.device
    T, hkv, n = indices.shape  # noqa: N806
    cu = cu_seqlens.to(device=dev, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    nblk = (lens + block - 1) // block
    blk_off = torch.zeros_like(cu)
    blk_off[1:] = torch.cumsum(nblk, 0)
    nb_total = int(blk_off[-1].item()) if cu.numel() > 1 else 0
    i32 = torch.int32

    def _empty(dtype=i32):
        return torch.zeros(0, dtype=dtype, device=dev)

    if T == 0 or nb_total == 0:
        return 0
    nseq = lens.numel()
    tok_seq = torch.repeat_interleave(torch.arange(nseq, device=dev), lens, output_size=T)  # [T]
    idx = indices.to(torch.int64)
    valid = idx >= 0
    gblk = blk_off[tok_seq][:, None, None] + idx  # [T, Hkv, n]
    head = torch.arange(hkv, device=dev)[None, :, None]
    bkey = head * nb_total + gblk
    tok = torch.arange(T, device=dev)[:, None, None]
    sentinel = torch.iinfo(torch.int64).max
    keys = torch.where(valid, bkey * T + tok, torch.full_like(bkey, sentinel)).reshape(-1)
    skeys = torch.sort(keys).values
    nkeys = hkv * nb_total
    n_entries = int(valid.sum().item())
    skeys = skeys[:n_entries]
    tokens = (skeys % T).to(i32)
    # per-block offsets by binary search over the sorted block keys (no bincount: deterministic-mode safe)
    bounds = torch.searchsorted(skeys // T, torch.arange(nkeys + 1, device=dev))
    offs = bounds[:-1]
    counts = bounds[1:] - bounds[:-1]
    nch = (counts + chunk - 1) // chunk
    n_items = int(nch.sum().item())
    if n_items == 0:
        return 0
    item_blk = torch.repeat_interleave(torch.arange(nkeys, device=dev), nch, output_size=n_items)
    first_item = torch.cumsum(nch, 0) - nch
    item_k = torch.arange(n_items, device=dev) - first_item[item_blk]
    item_lo = offs[item_blk] + item_k * chunk
    item_hi = torch.minimum(item_lo + chunk, (offs + counts)[item_blk])
    split = nch[item_blk] > 1
    slot = torch.cumsum(split.to(torch.int64), 0) - 1
    item_dst = torch.where(split, slot, torch.full_like(slot, -1))
    n_partials = int(split.sum().item())

    def _block_geom(keys_):
        h = keys_ // nb_total
        gb = keys_ % nb_total
        s = torch.searchsorted(blk_off, gb, right=True) - 1
        tok0 = cu[s] + (gb - blk_off[s]) * block
        return tok0, cu[s + 1], h

    it_tok0, it_kend, it_h = _block_geom(item_blk)
    red_keys = torch.nonzero(nch > 1).reshape(-1)
    red_tok0, red_kend, red_h = _block_geom(red_keys)
    # partial slots of a split block are contiguous (items are ordered by block key)
    red_lo = slot[first_item[red_keys]] if red_keys.numel() else _empty(torch.int64)
    red_hi = red_lo + nch[red_keys]
    return (tokens, it_tok0, it_kend, it_h, item_lo, item_hi, item_dst, red_tok0, red_kend, red_h, red_lo,
            red_hi, n_items, n_partials)


# ------------------------------------------------------------------------------------------------
# second pass: old-vs-new kernel variants (one process per candidate compiles in parallel first)
# ------------------------------------------------------------------------------------------------

#: The sm90 defaults before the second pass (2026-11-28 12:09 run), paper spec G = 16.
OLD_SLC = {"DQ_TOKENS": 4, "dq_warps": 4, "dq_stages": 1, "DQ_LAYOUT": "rows", "BLOCK_T": 8, "KEY_SPLIT": 2,
           "num_warps": 8, "num_stages": 1, "CHUNK": 1024}
OLD_CMP = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1, "KV_PASSES": 1,
           "DQ_BLOCK_M": 64, "DQ_BLOCK_N": 64, "dq_warps": 4, "dq_stages": 2}
OLD_WIN = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "KV_PASSES": 2,
           "DQ_BLOCK_M": 64, "DQ_BLOCK_N": 64, "dq_warps": 4, "dq_stages": 2}


def _kv(bm, bn, w, s, p):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, "KV_PASSES": p}


def _dq(bm, bn, w, s):
    return {"DQ_BLOCK_M": bm, "DQ_BLOCK_N": bn, "dq_warps": w, "dq_stages": s}


def _sdq(t, w, s, layout="rows"):
    return {"DQ_TOKENS": t, "dq_warps": w, "dq_stages": s, "DQ_LAYOUT": layout}


def _skv(bt, ks, w, s, chunk=1024):
    return {"BLOCK_T": bt, "KEY_SPLIT": ks, "num_warps": w, "num_stages": s, "CHUNK": chunk}


def _q(cfg, q_chunk, order="tiles"):
    return {**cfg, "Q_CHUNK": q_chunk, "ORDER": order}


#: Per spec and kernel part, the variants tried; candidate i takes variant i of every part that has one
#: (parts are timed separately, so one sweep covers them all; "bwd_cmp.dq" and "bwd_cmp.dkdv" share the
#: launch ORDER, so variant i of both names the same one). Variant 0 of each part = the default of the time.
#: "slc_fwd.fwd" (the forward selection kernel, timed alone) is also understood. Earlier sweeps' lists are
#: in git history (session 5: the fourth to sixth sweeps).
_CMP_KV = _kv(32, 64, 4, 2, 1)
VARIANTS = {
    # eleventh sweep (session 13): the compressed dQ inside the window's dQ kernel (bwd_win DQ_CMP; compare
    # bwd_total: the compressed dQ launch disappears). The tenth, KV_LOOP "flat" for the dense dK/dV, and the
    # ninth, tiles / stages / warps around the TMA defaults: git history and bench/RESULTS.md
    "nsa_paper": {
        "bwd_win.dq": [{}, {"DQ_CMP": 1}],
    },
    # sixth sweep (session 5)
    "fla_compat": {
        "bwd_cmp.dkdv": [_q(_CMP_KV, 1024), _q(_kv(32, 64, 4, 3, 1), 1024), _q(_CMP_KV, 512),
                         _q(_kv(16, 64, 4, 2, 1), 1024), _q(_kv(32, 128, 8, 2, 1), 512)],
    },
}
OLD_COMPAT = {"bwd_slc": OLD_SLC, "bwd_cmp": {**OLD_CMP, **_kv(32, 32, 4, 2, 1)}}
#: What every variant candidate starts from: the current defaults (each candidate overrides its parts).
_BASE: dict[str, dict] = {"bwd_slc": {}, "bwd_cmp": {}, "bwd_win": {}, "slc_fwd": {}}


def variant_candidates(spec_name: str = "nsa_paper") -> list[dict[str, dict]]:
    parts = VARIANTS[spec_name]
    n = max(len(v) for v in parts.values())
    out = []
    for i in range(n):
        cand = {k: dict(v) for k, v in _BASE.items()}
        for part, lst in parts.items():
            if i < len(lst):
                cand[part.split(".")[0]].update(lst[i])
        out.append(cand)
    return out


def warm_variant(spec_name: str, idx: int, T: int = 2048) -> None:  # noqa: N803
    """Compile (Triton cache) the forward and backward kernels of one variant candidate (and, when the spec's
    variants time it, the stand-alone selection kernel)."""
    spec = load_spec(spec_name)
    cand = variant_candidates(spec_name)[idx]
    ops = with_candidate(nsa_dsl.compile(spec), cand)
    xs, do = nsa_inputs(spec, T, grad=False)
    with torch.no_grad():
        _, saved = ops.forward_train(*xs)
        nsa_backward(ops, *xs, do, saved)
        if "slc_fwd.fwd" in VARIANTS[spec_name]:
            ops.module("slc_fwd", T=T).run(xs[0], xs[1], xs[2], saved["indices"].to(torch.int32).contiguous())
    torch.cuda.synchronize()


def _event_ms(fn, reps: int = 10, busy: bool = False) -> tuple[float, float]:
    """(median CUDA-event ms, median host wall ms) of fn() after one warm-up. ``busy``: a 20 ms GPU sleep is
    queued first, so the host enqueues fn's launches while the GPU is busy and the events see GPU time only
    (as inside the backward, where the reverse index is launched behind the compressed-branch kernels)."""
    import time

    fn()
    torch.cuda.synchronize()
    ev, wall = [], []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if busy:
            torch.cuda._sleep(40_000_000)
        t0 = time.perf_counter()
        s.record()
        fn()
        e.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        ev.append(s.elapsed_time(e))
        wall.append((t1 - t0) * 1e3)
    return statistics.median(ev), statistics.median(wall)


def _slc_fwd_ms(ops, xs, saved, T: int) -> float:  # noqa: N803
    """CUDA-event ms (median of 5 after a warm-up) of the forward selection kernel alone (saved top-n)."""
    idx = saved["indices"].to(torch.int32).contiguous()
    return _event_ms(functools.partial(ops.module("slc_fwd", T=T).run, xs[0], xs[1], xs[2], idx), reps=5)[0]


def run_variants(spec_name: str, Ts: list[int], out: Path, only: list[int] | None = None) -> list[dict]:  # noqa: N803
    """Per-kernel times of every variant candidate (and of the old/new reverse index) at each T."""
    from nsa_dsl.codegen import reverse_index

    spec = load_spec(spec_name)
    base = nsa_dsl.compile(spec)
    cands = variant_candidates(spec_name)
    parts = VARIANTS[spec_name]
    rows = []
    for T in Ts:  # noqa: N806
        xs, do = nsa_inputs(spec, T, grad=False)
        with torch.no_grad():
            _, saved = base.forward_train(*xs)
        idx = saved["indices"].to(torch.int32).contiguous().view(T, spec.attention.kv_heads, -1)
        cu = torch.tensor([0, T], device=DEVICE, dtype=torch.int32)
        builders = (("legacy", legacy_reverse_index), ("sync-free", reverse_index.build))
        for name, builder in builders:
            fn = functools.partial(builder, idx, cu, spec.selection.block, 1024)
            ev, wall = _event_ms(fn)
            busy = _event_ms(fn, busy=True)[0] if name == "sync-free" else ev
            rows.append({"spec": spec_name, "T": T, "part": "reverse_index", "variant": name, "ms": ev,
                         "host_ms": wall, "gpu_ms_busy_queue": busy})
            print(json.dumps(rows[-1]), flush=True)
        for i, cand in enumerate(cands):
            if only is not None and i not in only:
                continue
            try:
                trial = with_candidate(base, cand)
                prof: dict[str, float] = {}
                nsa_backward(trial, *xs, do, saved)
                reps = 3
                for _ in range(reps):
                    nsa_backward(trial, *xs, do, saved, profile=prof)
            except Exception as e:  # noqa: BLE001
                rows.append({"spec": spec_name, "T": T, "candidate": i, "error": str(e)[:300]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            if i < len(parts.get("slc_fwd.fwd", [])):
                prof["slc_fwd.fwd"] = reps * _slc_fwd_ms(trial, xs, saved, T)
            for part, lst in parts.items():
                if i < len(lst) and part in prof:
                    rows.append({"spec": spec_name, "T": T, "part": part, "variant": i, "config": lst[i],
                                 "ms": prof[part] / reps})
            rows.append({"spec": spec_name, "T": T, "part": "bwd_total", "variant": i,
                         "ms": sum(v for k, v in prof.items() if "." not in k and k != "start") / reps})
            print(json.dumps({"T": T, "candidate": i, **{k: round(v / reps, 3) for k, v in prof.items()
                                                          if k != "_events"}}), flush=True)
        del xs, do, saved
        torch.cuda.empty_cache()
    (out / f"bwd_variants_{spec_name}.json").write_text(json.dumps(rows, indent=1))
    return rows


def pick_best(rows: list[dict], T: int) -> dict[str, dict]:  # noqa: N803
    """Kernel -> params: the fastest variant of every part at T (current defaults where nothing ran)."""
    best = {k: dict(v) for k, v in _BASE.items()}
    for part in VARIANTS[rows[0]["spec"]] if rows else ():
        rs = [r for r in rows if r.get("part") == part and r["T"] == T and isinstance(r.get("variant"), int)]
        if rs:
            best[part.split(".")[0]].update(min(rs, key=lambda r: r["ms"])["config"])
    return best


def run_e2e(spec_name: str, Ts: list[int], configs: dict[str, dict[str, dict]]) -> list[dict]:  # noqa: N803
    """Forward+backward (the custom op, then .backward) and backward-only stage sums per named config."""
    spec = load_spec(spec_name)
    base = nsa_dsl.compile(spec)
    rows = []
    for T in Ts:  # noqa: N806
        for name, cand in configs.items():
            ops = with_candidate(base, cand)
            xs, do = nsa_inputs(spec, T, grad=True)

            def fwdbwd(ops=ops, xs=xs, do=do):
                nsa_attention(*xs, ops).backward(do)
                for x in xs:
                    x.grad = None

            try:
                ms = timeit(fwdbwd, budget_ms=1200)
            except Exception as e:  # noqa: BLE001
                rows.append({"spec": spec_name, "T": T, "config": name, "error": str(e)[:300]})
                continue
            rows.append({"spec": spec_name, "T": T, "config": name, "fwdbwd_ms": ms})
            print(json.dumps(rows[-1]), flush=True)
            del xs, do
            torch.cuda.empty_cache()
    return rows


def run_reverse_index_ab(spec_names: list[str], Ts: list[int], rounds: int = 3) -> list[dict]:  # noqa: N803
    """Forward+backward with the selection reverse index built on a side stream (the op's way, "side") and
    built inline on the compute stream after the compressed branch (the way before, "serial"), alternating
    the two ``rounds`` times per shape (median of the rounds' medians), same inputs, same configs."""
    import contextlib

    import nsa_dsl.codegen.autograd as ag

    side = ag._side_stream

    @contextlib.contextmanager
    def serial(device, after):
        yield lambda *ts: None

    rows = []
    try:
        for sp in spec_names:
            spec = load_spec(sp)
            ops = nsa_dsl.compile(spec)
            for T in Ts:  # noqa: N806
                xs, do = nsa_inputs(spec, T, grad=True)

                def fwdbwd(ops=ops, xs=xs, do=do):
                    nsa_attention(*xs, ops).backward(do)
                    for x in xs:
                        x.grad = None

                got: dict[str, list[float]] = {"side": [], "serial": []}
                for _ in range(rounds):
                    for mode, impl in (("side", side), ("serial", serial)):
                        ag._side_stream = impl
                        got[mode].append(timeit(fwdbwd, budget_ms=600))
                ag._side_stream = side
                row = {"spec": sp, "T": T, **{f"{m}_ms": statistics.median(v) for m, v in got.items()},
                       "rounds": got}
                row["gain"] = row["serial_ms"] / row["side_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
                del xs, do
                torch.cuda.empty_cache()
    finally:
        ag._side_stream = side
    return rows


#: Selection dQ layouts compared by --slc-layouts (the spec's default first).
SLC_LAYOUTS = {
    "default": {},
    "blocks": {"bwd_slc": {"DQ_LAYOUT": "blocks", "DQ_TOKENS": 1, "KEY_SPLIT": 1}},
    "keys": {"bwd_slc": {"DQ_LAYOUT": "keys", "DQ_TOKENS": 1, "dq_stages": 2}},
}


def run_slc_layouts(spec_name: str, Ts: list[int]) -> list[dict]:  # noqa: N803
    """Per layout of the selection dQ: the backward's per-kernel times (CUDA events, mean of 3 after a
    warm-up), its gradients' largest relative difference from the default layout's (same inputs, same saved
    forward), and forward+backward through the custom op."""
    spec = load_spec(spec_name)
    base = nsa_dsl.compile(spec)
    rows = []
    for T in Ts:  # noqa: N806
        xs, do = nsa_inputs(spec, T, grad=False)
        with torch.no_grad():
            _, saved = base.forward_train(*xs)
        ref = None
        for name, cand in SLC_LAYOUTS.items():
            row = {"spec": spec_name, "T": T, "layout": name}
            try:
                ops = with_candidate(base, cand)
                row["bwd_slc"] = ops.config_for("bwd_slc", T=T)
                grads = nsa_backward(ops, *xs, do, saved)
                if ref is None:
                    ref = grads
                else:
                    row["max_rel_diff_vs_default"] = max(
                        float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-9))
                        for a, b in zip(grads, ref, strict=True))
                prof: dict = {}
                for _ in range(3):
                    nsa_backward(ops, *xs, do, saved, profile=prof)
                row.update({k: round(v / 3, 3) for k, v in prof.items() if k not in ("_events", "start")})
            except Exception as e:  # noqa: BLE001
                row["error"] = str(e)[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del xs, do, saved, ref
        torch.cuda.empty_cache()
    for r in run_e2e(spec_name, Ts, SLC_LAYOUTS):
        rows.append({**r, "layout": r.pop("config")})
    return rows


def variants_table(rows: list[dict]) -> str:
    """Markdown: per part and T, variant 0 (the default of the sweep's time) vs the best variant."""
    lines = ["| spec | T | part | variant 0 ms | best ms | best variant |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["spec"], r["T"], r["part"]) for r in rows if "part" in r})
    for sp, T, part in keys:  # noqa: N806
        rs = [r for r in rows if r.get("part") == part and r["T"] == T and r["spec"] == sp]
        old = [r for r in rs if r["variant"] in (0, "legacy")]
        best = min(rs, key=lambda r: r["ms"])
        old_ms = f"{old[0]['ms']:.2f}" if old else "-"
        lines.append(f"| {sp} | {T} | {part} | {old_ms} | {best['ms']:.2f} | "
                     f"{best['variant']} {json.dumps(best.get('config', ''))} |")
    return "\n".join(lines)


def _graph_ms(step, reps: int = 10) -> float:
    """Median milliseconds of one replay of ``step`` captured in a CUDA graph."""
    return timeit(common.capture_graph(step).replay, min_runs=reps)


def _host_ms(step, reps: int = 10) -> float:
    """Median host milliseconds to issue ``step`` (the call returns before the GPU is done; synced after)."""
    import time

    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        out.append(1e3 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
    return statistics.median(out)


def _uncached_plan_keys():
    """Context: every ``KernelPlan.key`` recomputed from the template files on disk, as before session 12
    (each launch looked its module up by a key that re-read every template): the A/B control."""
    import contextlib

    from nsa_dsl.codegen import plan as P  # noqa: N812

    def key(self):
        parts = [(P.TEMPLATE_DIR / self.kdef.template).read_text()]
        parts += [p.read_text() for p in sorted(P.TEMPLATE_DIR.glob("_*.j2"))]
        return P._plan_key(self.spec.canonical_json(), self.kernel, P._canon(self.config),
                           P.GENERATOR_VERSION, "\n".join(parts))

    @contextlib.contextmanager
    def ctx():
        saved = P.KernelPlan.__dict__["key"]
        P.KernelPlan.key = property(key)
        try:
            yield
        finally:
            P.KernelPlan.key = saved

    return ctx()


def run_overhead(spec_names, Ts) -> list[dict]:  # noqa: N803
    """Eager vs CUDA-graph forward + backward (``torch.autograd.grad`` of the op's output) and forward alone
    for the NSA op, and eager dense cuDNN SDPA, at each T in the order given, with the host time to issue one
    eager call: where the eager time exceeds the graph's, the GPU waited for the host."""
    rows = []
    for T in Ts:  # noqa: N806
        for name in spec_names:
            spec = load_spec(name)
            ops = nsa_dsl.compile(spec)
            xs, do = nsa_inputs(spec, T, grad=True)

            def nsa_step(xs=xs, do=do, ops=ops):
                o = nsa_attention(*xs, ops)
                return torch.autograd.grad(o, xs, do)

            def nsa_fwd(xs=xs, ops=ops):
                with torch.no_grad():
                    return ops.forward(*xs)

            rows.append({"impl": f"nsa-dsl {name}", "T": T, "eager_ms": timeit(nsa_step),
                         "host_ms": _host_ms(nsa_step), "graph_ms": _graph_ms(nsa_step),
                         "fwd_eager_ms": timeit(nsa_fwd), "fwd_host_ms": _host_ms(nsa_fwd),
                         "fwd_graph_ms": _graph_ms(nsa_fwd)})
            with _uncached_plan_keys():
                rows.append({"impl": f"{name}, key per call", "T": T, "eager_ms": timeit(nsa_step),
                             "host_ms": _host_ms(nsa_step), "graph_ms": None, "fwd_eager_ms": timeit(nsa_fwd),
                             "fwd_host_ms": _host_ms(nsa_fwd), "fwd_graph_ms": None})
            del xs, do
            torch.cuda.empty_cache()
        g = torch.Generator(device="cuda").manual_seed(0)
        dk, dv = 192, 128
        q = torch.randn(1, T, 64, dk, device="cuda", dtype=DT, generator=g, requires_grad=True)
        k = torch.randn(1, T, 4, dk, device="cuda", dtype=DT, generator=g, requires_grad=True)
        v = torch.randn(1, T, 4, dv, device="cuda", dtype=DT, generator=g, requires_grad=True)
        do = torch.randn(1, 64, T, dv, device="cuda", dtype=DT, generator=g)
        run = common.sdpa_dense(q, k, v, common.sdpa_backends()["cudnn"])

        def dense_step(run=run, q=q, k=k, v=v, do=do):
            return torch.autograd.grad(run(), (q, k, v), do)

        def dense_fwd(run=run):
            with torch.no_grad():
                return run()

        # (cuDNN's backward does not capture: it invalidates the capture on the H200, torch 2.11)
        rows.append({"impl": "sdpa cudnn (dk = 192)", "T": T, "eager_ms": timeit(dense_step),
                     "host_ms": _host_ms(dense_step), "graph_ms": None, "fwd_eager_ms": timeit(dense_fwd),
                     "fwd_host_ms": _host_ms(dense_fwd), "fwd_graph_ms": None})
        del q, k, v, do, run
        torch.cuda.empty_cache()
        for r in rows[-2 * len(spec_names) - 1:]:
            graph = "-" if r["graph_ms"] is None else f"{r['graph_ms']:.2f}"
            fgraph = "-" if r["fwd_graph_ms"] is None else f"{r['fwd_graph_ms']:.2f}"
            print(f"T={T:>6} {r['impl']:>22}: fwd+bwd eager {r['eager_ms']:.2f} ms, graph {graph} ms, "
                  f"host {r['host_ms']:.2f} ms per eager call | fwd eager {r['fwd_eager_ms']:.2f} ms, graph "
                  f"{fgraph} ms, host {r['fwd_host_ms']:.2f} ms", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sdpa-all-max", type=int, default=16384)
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--sdpa-backends", nargs="+", choices=SDPA_BACKENDS, default=list(SDPA_BACKENDS),
                    help="SDPA backends to time (default: every one; above --sdpa-all-max only the fastest)")
    ap.add_argument("--warm", nargs=2, metavar=("SPEC", "CANDIDATE"), help="only compile one candidate")
    ap.add_argument("--warm-variant", nargs=2, metavar=("SPEC", "CANDIDATE"),
                    help="only compile one variant candidate (second pass)")
    ap.add_argument("--variants", nargs="*", metavar="SPEC",
                    help="time the variant candidates per backward kernel (old = candidate 0) and exit")
    ap.add_argument("--only", type=int, nargs="*", help="with --variants: these candidates only")
    ap.add_argument("--e2e", action="store_true",
                    help="with --variants: then time fwd+bwd (old, best per part, default configs)")
    ap.add_argument("--e2e-compat", action="store_true", help="with --e2e: fla_compat old vs default too")
    ap.add_argument("--slc-layouts", nargs="+", metavar="SPEC",
                    help="compare the selection dQ layouts (SLC_LAYOUTS) on these specs and exit")
    ap.add_argument("--overhead", nargs="+", metavar="SPEC",
                    help="eager vs CUDA-graph fwd+bwd and host issue time per call, these specs and cuDNN, "
                    "at each --T in the order given (bwd_overhead.json / .md)")
    ap.add_argument("--reverse-index-ab", nargs="+", metavar="SPEC",
                    help="fwd+bwd, reverse index on a side stream vs inline, on these specs, and exit")
    args = ap.parse_args()
    if args.overhead:
        common.write_results("bwd_overhead", run_overhead(args.overhead, args.T), common.env_info(),
                             outdir=Path(args.out))
        return 0
    if args.reverse_index_ab:
        rows = run_reverse_index_ab(args.reverse_index_ab, args.T)
        common.write_results("bwd_reverse_index_ab", rows, common.env_info(), outdir=Path(args.out))
        for r in rows:
            print(f"{r['spec']:>10} T={r['T']:>6}: side {r['side_ms']:.2f} ms, "
                  f"serial {r['serial_ms']:.2f} ms, gain {r['gain']:.3f}x")
        return 0
    if args.slc_layouts:
        rows = [r for sp in args.slc_layouts for r in run_slc_layouts(sp, args.T)]
        common.write_results("bwd_slc_layouts", rows, common.env_info(), outdir=Path(args.out))
        return 0
    if args.warm:
        warm(args.warm[0], int(args.warm[1]))
        return 0
    if args.warm_variant:
        warm_variant(args.warm_variant[0], int(args.warm_variant[1]))
        return 0
    if args.variants is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = common.env_info()
        rows = []
        e2e = []
        for sp in args.variants or ["nsa_paper"]:
            rows += run_variants(sp, args.T, out, args.only)
            best = pick_best([r for r in rows if r["spec"] == sp], max(args.T))
            meta.setdefault("best", {})[sp] = best
            print("best", sp, json.dumps(best), flush=True)
            if args.e2e:
                named = {"variant 0": variant_candidates(sp)[0], "best": best, "default": {}}
                e2e += run_e2e(sp, args.T, named)
        if args.e2e and args.e2e_compat:
            e2e += run_e2e("fla_compat", args.T, {"old": OLD_COMPAT, "default": {}})
        meta["e2e"] = e2e
        (out / "bwd_variants_meta.json").write_text(json.dumps(meta, indent=1))
        print(json.dumps({k: v for k, v in meta.items() if k not in ("best", "e2e")}))
        print(variants_table(rows))
        for r in e2e:
            print(f"e2e {r['spec']} T={r['T']} {r['config']}: {r.get('fwdbwd_ms', r.get('error'))}")
        return 0
    if not torch.cuda.is_available():
        print("bench_backward: needs a CUDA device", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = common.env_info()
    meta["matmul_tflops_bf16"] = common.matmul_tflops()
    rows = []
    paper, compat = load_spec("nsa_paper"), load_spec("fla_compat")
    ops_p, ops_c = nsa_dsl.compile(paper), nsa_dsl.compile(compat)
    if args.sweep:
        ops_p, log_p = sweep(paper, ops_p, 32768)
        ops_c, log_c = sweep(compat, ops_c, 32768)
        meta["sweep"] = {"nsa_paper": log_p, "fla_compat": log_c}
        print(json.dumps(meta["sweep"], indent=1), flush=True)
    meta["configs"] = {
        "nsa_paper": {kn: ops_p.config_for(kn, T=16384) for kn in ("bwd_cmp", "bwd_slc", "bwd_win")},
        "fla_compat": {kn: ops_c.config_for(kn, T=16384) for kn in ("bwd_cmp", "bwd_slc")},
    }
    meta["activation_bytes_per_token"] = {
        "nsa_paper": activation_bytes_per_token(paper),
        "fla_compat": activation_bytes_per_token(compat),
    }
    tag = meta["card"].replace(" ", "_")

    def flush() -> str:  # after every T, so that a run cut short still leaves its rows
        (out / f"backward_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        md = to_markdown(meta, rows)
        (out / f"backward_{tag}.md").write_text(md)
        return md

    fastest: dict[tuple[int, int], str] = {}
    for T in args.T:  # noqa: N806
        cases = (("nsa_paper", paper, ops_p, False), ("fla_compat", compat, ops_c, True))
        for name, spec, ops, pool in cases:
            try:
                r = bench_nsa(spec, ops, T, pool=pool)
                rows.append({"impl": f"nsa-dsl {name}", "spec": name, "T": T, **r})
            except Exception as e:  # noqa: BLE001
                rows.append({"impl": f"nsa-dsl {name}", "spec": name, "T": T, "error": str(e)[:300]})
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
        for dk, dv in ((192, 128), (128, 128)):
            narrow = T > args.sdpa_all_max and (dk, dv) in fastest
            backends = (fastest[dk, dv],) if narrow else tuple(args.sdpa_backends)
            best = None
            for be in backends:
                r = bench_sdpa(T, dk, dv, be)
                torch.cuda.empty_cache()
                if r is None:
                    continue
                rows.append({"impl": f"sdpa {be}", "spec": f"dense dk={dk} dv={dv}", "T": T, **r})
                print(json.dumps(rows[-1]), flush=True)
                if best is None or r["fwdbwd_ms"] < best[1]:
                    best = (be, r["fwdbwd_ms"])
            if best is not None and T <= args.sdpa_all_max:
                fastest[dk, dv] = best[0]
        if not args.no_fla:
            r = bench_fla(T)
            if r is not None:
                rows.append({"spec": "fla_compat", "T": T, **r})
                print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
        md = flush()
    print(md)
    return 0


def to_markdown(meta, rows) -> str:
    lines = [
        f"Card: {meta['card']}; torch {meta['torch']}, triton {meta['triton']}, fla {meta.get('fla')}; "
        f"{meta['date_utc']} UTC; bf16 8192^3 matmul {meta['matmul_tflops_bf16']:.0f} TFLOP/s.",
        "",
        "| T | impl | spec | fwd ms | fwd+bwd ms |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['T']} | {r['impl']} | {r['spec']} | error: {r['error'][:80]} | |")
        else:
            lines.append(
                f"| {r['T']} | {r['impl']} | {r['spec']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} |"
            )
    lines += [
        "",
        "Ratios (fwd+bwd; same run):",
        "",
        "| T | paper vs fastest SDPA (192/128) | fla_compat vs fla-core |",
        "|---|---|---|",
    ]
    for T in sorted({r["T"] for r in rows}):  # noqa: N806
        def get(pred, rows=rows, T=T):  # noqa: N803
            c = [r["fwdbwd_ms"] for r in rows if r["T"] == T and "fwdbwd_ms" in r and pred(r)]
            return min(c) if c else None

        ours_p = get(lambda r: r.get("spec") == "nsa_paper")
        ours_c = get(lambda r: r.get("spec") == "fla_compat" and str(r.get("impl", "")).startswith("nsa-dsl"))
        sd = get(lambda r: r.get("spec") == "dense dk=192 dv=128")
        fl = get(lambda r: str(r.get("impl", "")).startswith("fla-core"))
        a = f"{sd / ours_p:.2f}x" if ours_p and sd else "-"
        b = f"{fl / ours_c:.2f}x" if ours_c and fl else "-"
        lines.append(f"| {T} | {a} | {b} |")
    lines += ["", "Backward stage breakdown (ms):", ""]
    for r in rows:
        if "bwd_stages_ms" in r:
            st = ", ".join(f"{k} {v:.2f}" for k, v in r["bwd_stages_ms"].items())
            fw = ", ".join(f"{k} {v:.2f}" for k, v in r["fwd_stages_ms"].items())
            tf = ", ".join(f"{k} {v:.0f}" for k, v in r.get("bwd_tflops", {}).items())
            lines.append(f"- {r['spec']} T={r['T']}: bwd [{st}]; executed TFLOP/s [{tf}]; fwd [{fw}]")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("NSA_DSL_LOG", "warning")
    raise SystemExit(main())
