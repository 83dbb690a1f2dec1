"""Quick hand sweep of the selection / window kernel configs at one T (picks the per-architecture defaults;
the full search belongs to ``nsa_dsl.tuning``).

    python bench/sweep_slcwin.py --T 32768
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from nsa_dsl.codegen.loader import load  # noqa: E402
from nsa_dsl.codegen.plan import make_plan  # noqa: E402

import nsa_dsl  # noqa: E402
from nsa_dsl.reference import select_blocks  # noqa: E402

GROUP = [
    {"BLOCK_N": bn, "num_warps": w, "num_stages": s, "TPP": tpp}
    for (bn, w, s, tpp) in [
        (64, 2, 2, 1), (64, 2, 2, 2), (64, 2, 2, 4), (32, 2, 3, 1), (32, 2, 4, 1), (32, 4, 3, 1),
        (32, 2, 3, 2),
    ]
]
KVOUTER = [
    {"BLOCK_M": bm, "CHUNK": ch, "KV_RESIDENT": res, "KV_WARPS": w, "num_stages": s}
    for (bm, ch, res, w, s) in [
        (64, 64, True, 4, 1), (64, 256, True, 4, 2), (128, 256, True, 8, 2), (64, 256, False, 4, 2),
        (128, 256, False, 8, 2),
    ]
]
WINDOW = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, "HEADS": gh}
    for (bm, bn, w, s, gh) in [
        (64, 64, 4, 2, 1), (64, 64, 4, 2, 2), (64, 64, 4, 2, 4), (128, 64, 8, 2, 2), (128, 64, 8, 2, 4),
        (64, 64, 4, 3, 2),
    ]
]


def kvouter_split(spec_name: str, spec, x, idx, T: int) -> list[dict]:  # noqa: N803
    """Where the KV-outer schedule's time goes: reverse index, main kernel, merge (default config)."""
    try:
        mod = load(make_plan(spec, "slc_fwd", {"schedule": "kvouter"}))
        q, k, v = x["q"], x["k"], x["v"]
        ri = mod._reverse_index(idx, None, 1, T)
        entries, items, tok0, kend, nbt, nbs = ri
        a = spec.attention
        rows = T * a.kv_heads * spec.selection.top_n * spec.G
        op = torch.empty(rows, a.head_dim_v, device=q.device, dtype=q.dtype)
        lp = torch.empty(rows, device=q.device, dtype=torch.float32)
        o = torch.empty(1, T, a.heads, a.head_dim_v, device=q.device, dtype=q.dtype)
        lse = torch.empty(1, T, a.heads, device=q.device, dtype=torch.float32)

        def main_k():
            mod._slc_kvouter_kernel[(items.shape[0],)](
                q, k, v, entries, items, tok0, kend, op, lp, T, nbt, nbs, VARLEN=False, DOT_PREC="tf32",
                num_warps=mod.NUM_WARPS, num_stages=mod.NUM_STAGES)

        def merge_k():
            gp2 = 1 << (spec.G - 1).bit_length()
            mod._slc_merge_kernel[(triton.cdiv(T, mod.BLOCK_R // gp2), a.kv_heads)](
                idx, op, lp, o, lse, lse, o, o, o, T, GATED=False, WITH_WIN=False, num_warps=4)

        out = []
        for part, fn in (("index", lambda: mod._reverse_index(idx, None, 1, T)), ("main", main_k),
                         ("merge", merge_k)):
            ms = common.bench_ms(fn)
            out.append({"spec": spec_name, "kernel": f"slc_fwd[kvouter] {part}", "config": mod.CONFIG,
                        "ms": ms})
            print(out[-1], flush=True)
        return out
    except Exception as e:
        return [{"spec": spec_name, "kernel": "slc_fwd[kvouter] split", "config": "", "error": str(e)[:120]}]


def one(spec_name: str, T: int, small: bool, args) -> list[dict]:  # noqa: N803
    spec = nsa_dsl.load_spec(spec_name)
    x = common.make_inputs(spec, T)
    scores = torch.rand(1, T, spec.attention.kv_heads, spec.num_selection_blocks(T), device="cuda")
    idx = select_blocks(scores, spec, T)
    flop = common.selection_flop(spec, idx)
    rows = []
    if args.group:  # only the given group-centric configs, every one
        cands = [("group", c) for c in json.loads(args.group)]
    else:
        cands = [("group", c) for c in (GROUP[:1] if small else GROUP)]
        cands += [("kvouter", c) for c in (KVOUTER[1:2] if args.fast else KVOUTER)]
    ref = None
    for sched, cfg in cands:
        full = {"schedule": sched, **cfg}
        try:
            mod = load(make_plan(spec, "slc_fwd", full))
            o = mod.run(x["q"], x["k"], x["v"], idx)[0].float()
            ref = o if ref is None else ref
            diff = float((o - ref).abs().max())  # against the first config, same inputs
            ms = common.bench_ms(lambda mod=mod: mod.run(x["q"], x["k"], x["v"], idx))
        except Exception as e:
            rows.append({"spec": spec_name, "kernel": "slc_fwd", "config": full, "error": str(e)[:120]})
            continue
        rows.append({"spec": spec_name, "kernel": "slc_fwd", "config": full, "ms": ms,
                     "tflops": common.tflops(flop, ms), "max_diff_vs_first": diff})
        print(rows[-1], flush=True)
    if args.group:
        return rows
    rows += kvouter_split(spec_name, spec, x, idx, T)
    if spec.window_size and not small:
        rows += window_only(spec_name, T, WINDOW, x)
    return rows


def window_only(spec_name: str, T: int, configs: list[dict], x: dict | None = None) -> list[dict]:  # noqa: N803
    """win_fwd at each config (partial configs complete from the defaults), outputs against the first's;
    ``x``: the inputs (made here if None)."""
    spec = nsa_dsl.load_spec(spec_name)
    x = common.make_inputs(spec, T) if x is None else x
    wflop = common.window_flop(spec, T)
    rows, ref = [], None
    for cfg in configs:
        try:
            mod = load(make_plan(spec, "win_fwd", cfg))
            o = mod.run(x["q"], x["k"], x["v"])[0].float()
            ref = o if ref is None else ref
            diff = float((o - ref).abs().max())
            ms = common.bench_ms(lambda mod=mod: mod.run(x["q"], x["k"], x["v"]))
        except Exception as e:
            rows.append({"spec": spec_name, "kernel": "win_fwd", "config": cfg, "error": str(e)[:120]})
            continue
        rows.append({"spec": spec_name, "kernel": "win_fwd", "config": dict(mod.CONFIG), "ms": ms,
                     "tflops": common.tflops(wflop, ms), "max_diff_vs_first": diff})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    ap.add_argument("--fast", action="store_true", help="one KV-outer config")
    ap.add_argument("--best", type=Path, help="write {spec: {kernel: best config}} JSON here")
    ap.add_argument("--group", help="JSON list of group-centric slc_fwd configs: only these are timed "
                    "(no KV-outer, no window), each output compared with the first's")
    ap.add_argument("--window", help="JSON list of win_fwd configs: only these are timed (no selection), "
                    "each output compared with the first's")
    ap.add_argument("--specs", default="nsa_paper,small_group", help="with --group / --window: the specs")
    ap.add_argument("--name", default=None, help="result file name (default sweep_slcwin_T<T>)")
    args = ap.parse_args()
    meta = common.env_info()
    if args.window:
        rows = [r for s in args.specs.split(",") for r in window_only(s, args.T, json.loads(args.window))]
    elif args.group:
        rows = [r for s in args.specs.split(",") for r in one(s, args.T, False, args)]
    else:
        rows = one("nsa_paper", args.T, False, args) + one("small_group", args.T, True, args)
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("ms") is not None and r["kernel"] in ("slc_fwd", "win_fwd"):
            cur = best.setdefault(r["spec"], {}).get(r["kernel"])
            if cur is None or r["ms"] < cur[0]:
                best[r["spec"]][r["kernel"]] = (r["ms"], r["config"])
    if args.best:
        picked = {s: {k: v[1] for k, v in d.items()} for s, d in best.items()}
        args.best.write_text(json.dumps(picked, indent=1))
    for r in rows:
        r["config"] = str(r["config"])
    common.write_results(args.name or f"sweep_slcwin_T{args.T}", rows, meta, outdir=args.out)
    cols = ["spec", "kernel", "config", "ms", "tflops", "max_diff_vs_first", "error"]
    print(common.markdown_table(rows, cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
