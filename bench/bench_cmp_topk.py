"""Forward timing of compression + top-n: cmp_fwd + slc_topk (separate) vs the fused cmp_topk kernel.

B = 1, bf16, the paper spec (dk=192) and the paper spec with dk = dv = 128 (the shape of the public kernels'
anchors), T = 16k and 64k, a small sweep of configs per kernel (no autotune: configs are data), against
cuDNN SDPA dense causal attention and a bf16 matmul measured in the same run. Prints a Markdown table and
writes JSON to $OUT (or bench/results/).

    python bench/bench_cmp_topk.py [--T 16384 65536] [--quick] [--specs nsa_paper fla_compat]
        [--kernels cmp_fwd slc_topk]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

import nsa_dsl
from nsa_dsl import load_spec


def _flops(spec, T, with_pv=True, qk_passes=1):  # noqa: N803
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741
    t = torch.arange(T, dtype=torch.float64)
    nvis = torch.clamp(torch.div(t - l + 1 + d, d, rounding_mode="floor"), min=0).sum().item()
    a = spec.attention
    f = qk_passes * 2 * nvis * a.heads * a.head_dim_qk
    if with_pv:
        f += 2 * nvis * a.heads * a.head_dim_v
    return f


def _bench_kernel(ops, kname, cfg, T, q, kc, vc):  # noqa: N803
    """(ms, config, compile_s) of one kernel at one config."""
    o2 = ops if cfg is None else ops.with_config(kname, cfg)
    mod = o2.module(kname, T=T)
    if kname == "slc_topk":
        _, lse = ops.module("cmp_fwd", T=T).run(q, kc, vc)
        args = (q, kc, lse)
    else:
        args = (q, kc, vc)
    t0 = time.time()
    mod.run(*args)
    torch.cuda.synchronize()
    compile_s = time.time() - t0
    ms = do_bench(lambda: mod.run(*args), warmup=5, rep=50)
    return ms, dict(mod.CONFIG), compile_s


def _dense_ms(a, T, q):  # noqa: N803
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qd = q.transpose(1, 2)
    kd = torch.randn(1, a.heads, T, a.head_dim_qk, device=q.device, dtype=torch.bfloat16)
    vd = torch.randn(1, a.heads, T, a.head_dim_v, device=q.device, dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
        return do_bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True),
            warmup=3,
            rep=20,
        )


SWEEPS = {
    "cmp_fwd": [
        None,
        {"LOADS": "pointers"},  # the default before session 9 (TMA descriptors since)
        {"num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    ],
    "slc_topk": [
        None,
        # (session 9) a chunk's best from tl.topk, the running list merged by tl.bitonic_merge
        {"SELECT": "topk"},
        {"BLOCK_S": 16},
        {"BLOCK_S": 16, "SELECT": "topk"},
        {"BLOCK_S": 32, "SELECT": "topk"},
        {"BLOCK_M": 256, "SELECT": "topk"},
        {"BLOCK_M": 64, "SELECT": "topk", "num_warps": 4},
    ],
    "cmp_topk": [
        None,
        {"SELECT": "topk"},
    ],
}

#: --specs names beyond the shipped specs
EXTRA_SPECS = {"nsa_paper_dk128": ("nsa_paper", {"head_dim_qk": 128})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--specs", nargs="+", default=["nsa_paper", "nsa_paper_dk128"],
                    help="spec names (shipped, or nsa_paper_dk128: the paper spec with dk = dv = 128)")
    ap.add_argument("--kernels", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    args = ap.parse_args()
    dev = torch.device("cuda")
    out_dir = Path(os.environ.get("OUT") or "bench/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: x @ x, warmup=10, rep=100)
    meta = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "bf16_matmul_tflops": 2 * 8192**3 / mm_ms / 1e9,
    }
    print(json.dumps(meta), flush=True)
    sweeps = {k: (v[:1] if args.quick else v) for k, v in SWEEPS.items() if k in args.kernels}
    specs = []
    for name in args.specs:
        if name in EXTRA_SPECS:
            base, attn = EXTRA_SPECS[name]
            specs.append(load_spec(base).replace(name=name, attention=attn))
        else:
            specs.append(load_spec(name))
    rows, summary = [], []
    for spec in specs:
        a = spec.attention
        ops = nsa_dsl.compile(spec)
        for T in args.T:  # noqa: N806
            tc = spec.num_compressed(T)
            q = torch.randn(1, T, a.heads, a.head_dim_qk, device=dev, dtype=torch.bfloat16)
            kc = torch.randn(1, tc, a.kv_heads, a.head_dim_qk, device=dev, dtype=torch.bfloat16)
            vc = torch.randn(1, tc, a.kv_heads, a.head_dim_v, device=dev, dtype=torch.bfloat16)
            best: dict[str, dict] = {}
            for kname, cfgs in sweeps.items():
                for cfg in cfgs:
                    try:
                        ms, used, compile_s = _bench_kernel(ops, kname, cfg, T, q, kc, vc)
                    except Exception as e:  # record and go on
                        rows.append(
                            {"spec": spec.name, "T": T, "kernel": kname, "config": cfg, "error": str(e)[:300]}
                        )
                        print("ERR", spec.name, T, kname, cfg, str(e)[:300], flush=True)
                        continue
                    fl = _flops(
                        spec, T, with_pv=kname != "slc_topk", qk_passes=2 if kname == "cmp_topk" else 1
                    )
                    r = {"spec": spec.name, "T": T, "kernel": kname, "config": used, "ms": round(ms, 4)}
                    r.update(tflops=round(fl / ms / 1e9, 1), compile_s=round(compile_s, 1))
                    rows.append(r)
                    print(r, flush=True)
                    if kname not in best or ms < best[kname]["ms"]:
                        best[kname] = r
            try:
                dense = _dense_ms(a, T, q)
            except Exception as e:
                dense = float("nan")
                print("dense failed:", str(e)[:200])
            nan = {"ms": float("nan")}
            summary.append(
                {
                    "spec": spec.name,
                    "T": T,
                    "cmp_fwd": best.get("cmp_fwd", nan)["ms"],
                    "slc_topk": best.get("slc_topk", nan)["ms"],
                    "fused": best.get("cmp_topk", nan)["ms"],
                    "dense_cudnn": dense,
                    "best_configs": {k: v["config"] for k, v in best.items()},
                }
            )
            torch.cuda.empty_cache()
    (out_dir / "cmp_topk.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1)
    )
    print("| spec | T | cmp_fwd ms | slc_topk ms | separate ms | fused cmp_topk ms | dense cuDNN ms |")
    print("|---|---|---|---|---|---|---|")
    for r in summary:
        sep = r["cmp_fwd"] + r["slc_topk"]
        print(
            f"| {r['spec']} | {r['T']} | {r['cmp_fwd']:.2f} | {r['slc_topk']:.2f} | {sep:.2f} | "
            f"{r['fused']:.2f} | {r['dense_cudnn']:.2f} |"
        )


if __name__ == "__main__":
    main()
