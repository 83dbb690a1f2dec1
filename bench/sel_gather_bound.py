"""How close is the selection kernel to the cost of just reading its blocks? (issue 3's targets)

The forward's selected attention (``slc_fwd``) reads, for every (token, KV head), the n selected blocks of l'
keys: n * l' * (dk + dv) * 2 bytes (655 KB on the paper spec). This script times, in one process on the same
indices (the real top-n of random inputs, from ``ops.forward``):

* ``slc_fwd``: the generated selection kernel with its default plan;
* ``gather``: a kernel that only loads the same K/V blocks in the same grid order (tokens fastest, then KV
  heads) and reduces them to one number per program: no attention math, nothing else written. Its time is a
  floor for any schedule that reads each (token, KV head)'s blocks once from the memory system (no reuse of
  blocks across tokens in registers or shared memory), the best of a few warp / stage / tile counts;
* dense causal attention (cuDNN SDPA, ``common.sdpa_dense``: the forward benchmark's baseline) for the same T,
  and the bf16 matmul rate.

    python bench/sel_gather_bound.py [--T 8192 65536] [--out DIR]

Prints a Markdown table and writes ``sel_gather_bound.json`` / ``.md`` (``common.write_results``) to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from common import (
    bench_ms,
    env_info,
    free_memory,
    make_inputs,
    matmul_tflops,
    sdpa_backends,
    sdpa_dense,
    write_results,
)

import nsa_dsl


@triton.jit
def _gather_blocks(K, V, IDX, OUT, T, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   DKP: tl.constexpr, DVP: tl.constexpr, TOPN: tl.constexpr, BLK: tl.constexpr,
                   BK: tl.constexpr):
    """Program (t, h): load the TOPN selected blocks of token t, KV head h (BK rows at a time) and store one
    sum, so that no load can be elided. K [T, HKV, DK], V [T, HKV, DV], IDX int32 [T, HKV, TOPN]
    (-1: none)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    rows = tl.arange(0, BK)
    ck = tl.arange(0, DKP)
    cv = tl.arange(0, DVP)
    acc_k = tl.zeros([BK, DKP], tl.float32)  # elementwise sums: no cross-thread reduction inside the loop
    acc_v = tl.zeros([BK, DVP], tl.float32)
    base = (t.to(tl.int64) * HKV + h) * TOPN
    for j in range(TOPN):
        blk = tl.load(IDX + base + j)
        for r0 in range(0, BLK, BK):
            tok = blk.to(tl.int64) * BLK + r0 + rows
            ok = (tok < T) & (tok >= 0)  # blk = -1: no block
            kv_rows = tok * HKV + h
            k = tl.load(K + kv_rows[:, None] * DK + ck[None, :], mask=ok[:, None] & (ck[None, :] < DK),
                        other=0.0)
            v = tl.load(V + kv_rows[:, None] * DV + cv[None, :], mask=ok[:, None] & (cv[None, :] < DV),
                        other=0.0)
            acc_k += k.to(tl.float32)
            acc_v += v.to(tl.float32)
    tl.store(OUT + t * HKV + h, tl.sum(tl.sum(acc_k, 1), 0) + tl.sum(tl.sum(acc_v, 1), 0))


def gather(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, blk: int, bk: int, warps: int,
           stages: int) -> torch.Tensor:
    """k [1, T, HKV, DK], v [1, T, HKV, DV], idx int32 [1, T, HKV, n] -> one float per (token, KV head)."""
    _, T, hkv, dk = k.shape  # noqa: N806
    dv, n = v.shape[-1], idx.shape[-1]
    out = torch.empty(T * hkv, device=k.device, dtype=torch.float32)
    _gather_blocks[(T, hkv)](k, v, idx, out, T, HKV=hkv, DK=dk, DV=dv, DKP=triton.next_power_of_2(dk),
                             DVP=triton.next_power_of_2(dv), TOPN=n, BLK=blk, BK=bk, num_warps=warps,
                             num_stages=stages)
    return out


#: (BK rows per load, warps, stages) of the gather kernel; its time is the best of them
GATHER_CONFIGS = ((16, 4, 3), (32, 4, 3), (32, 8, 3), (64, 8, 2), (32, 4, 4), (16, 2, 4), (16, 1, 4),
                  (8, 1, 4), (16, 2, 6), (8, 1, 8), (32, 2, 4), (16, 1, 8))


def measure(ops, spec, T: int) -> dict:  # noqa: N803
    """slc_fwd, the gather floor and dense cuDNN at one T (same inputs, the real top-n indices)."""
    a, s = spec.attention, spec.selection
    x = make_inputs(spec, T, seed=1)
    _, idx = ops.forward(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["g"], return_indices=True)
    idx = idx.to(torch.int32).contiguous()
    slc = ops.module("slc_fwd", T=T)
    row = {"T": T, "bytes": T * a.kv_heads * s.top_n * s.block * (a.head_dim_qk + a.head_dim_v) * 2,
           "slc_fwd_ms": bench_ms(lambda: slc.run(x["q"], x["k"], x["v"], idx))}
    for bk, warps, stages in GATHER_CONFIGS:
        row[f"gather_bk{bk}_w{warps}_s{stages}_ms"] = bench_ms(
            lambda bk=bk, w=warps, st=stages: gather(x["k"], x["v"], idx, s.block, bk, w, st))
    row["gather_ms"] = min(v for k, v in row.items() if k.startswith("gather_bk"))
    # the forward benchmark's dense baseline: causal GQA through cuDNN SDPA
    row["dense_cudnn_ms"] = bench_ms(sdpa_dense(x["q"], x["k"], x["v"], sdpa_backends()["cudnn"]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--spec", default="nsa_paper")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    spec = nsa_dsl.load_spec(args.spec)
    ops = nsa_dsl.compile(spec, device="cuda")
    meta = env_info()
    meta["matmul_tflops_bf16"] = matmul_tflops()
    meta["l2_bytes"] = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", None)
    rows = []
    for T in args.T:  # noqa: N806
        rows.append(measure(ops, spec, T))
        print(json.dumps(rows[-1]), flush=True)
        free_memory()
    write_results("sel_gather_bound", rows, meta, outdir=Path(args.out))
    print(f"\n{meta.get('card')}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
          f"{meta.get('date_utc')}; bf16 matmul {meta['matmul_tflops_bf16']:.0f} TFLOP/s, "
          f"L2 {meta['l2_bytes']} B; spec {spec.name}\n")
    print("| T | selected GB | slc_fwd ms | TB/s | gather only ms | TB/s | slc / gather | dense cuDNN ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gb = r["bytes"] / 1e9
        print(f"| {r['T']} | {gb:.1f} | {r['slc_fwd_ms']:.2f} | {gb / r['slc_fwd_ms']:.1f} | "
              f"{r['gather_ms']:.2f} | {gb / r['gather_ms']:.1f} | {r['slc_fwd_ms'] / r['gather_ms']:.2f} | "
              f"{r['dense_cudnn_ms']:.2f} |")


if __name__ == "__main__":
    main()
