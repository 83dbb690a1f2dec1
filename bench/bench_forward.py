"""Forward benchmark: the generated NSA forward and its kernels against dense attention, FlexAttention's
sliding window and fla-core's ``parallel_nsa``.

    python bench/bench_forward.py                   # paper + fla_compat, T = 8k..128k -> bench/results/
    python bench/bench_forward.py --T 8192 65536 --specs nsa_paper --no-fla

Rows (all bf16, B = 1, medians of ``triton.testing.do_bench``):
* ``nsa_dsl``: ``nsa_dsl.compile(spec).forward`` (the full op: compressed attention + top-n + selection +
  window + gated sum; k_cmp / v_cmp are inputs), and for fla_compat also with the mean-pool compression
  included (``nsa_dsl+compress``), which is what fla's ``parallel_nsa`` does inside;
* per kernel: ``cmp_select`` (compressed attention + scores + top-n), ``slc_fwd`` (both schedules),
  ``win_fwd``, with each kernel's TFLOP/s (exact FLOPs of the keys attended) against the card's bf16 matmul
  rate measured in the same run;
* dense causal GQA attention through every torch SDPA backend that runs;
* FlexAttention (``torch.compile(flex_attention)``) causal sliding window w vs our window kernel alone;
* fla-core ``parallel_nsa`` on fla_compat (skipped cleanly when ``fla`` does not import);
* group-centric vs KV-outer selection schedule at G = 16 (nsa_paper) and G = 2 (small_group).
Writes ``bench/results/forward.json``, ``forward.md`` and ``forward.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any

if "--smoke-cpu" in sys.argv:  # the emitted kernels must be loaded as interpreted functions: set it first
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import nsa_dsl  # noqa: E402

log = logging.getLogger("bench_forward")
ROWS: list[dict[str, Any]] = []
DEVICE = "cuda"


def add(section: str, spec: str, T: int, impl: str, ms: float | None, flop: float | None = None,  # noqa: N803
        **extra: Any) -> None:
    row = {"section": section, "spec": spec, "T": T, "impl": impl, "ms": ms}
    if flop:
        row["tflops"] = common.tflops(flop, ms) if ms else None
    row.update(extra)
    ROWS.append(row)
    print(f"  {section:9s} {spec:12s} T={T:6d} {impl:28s} "
          f"{'-' if ms is None else f'{ms:9.3f} ms'}"
          + (f"  {row['tflops']:6.1f} TFLOP/s" if row.get("tflops") else "")
          + (f"  {extra}" if extra else ""), flush=True)


def attempt(section: str, spec: str, T: int, impl: str, fn, flop: float | None = None,  # noqa: N803
            **extra: Any) -> float | None:
    """Time ``fn`` (after one un-timed call); record an error note instead of failing the run."""
    try:
        fn()
        ms = common.bench_ms(fn, warmup=15, rep=60)
    except Exception as e:  # one baseline failing must not stop the run
        msg = f"{e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        add(section, spec, T, impl, None, error=msg)
        if "out of memory" in msg.lower():
            common.free_memory()
        return None
    add(section, spec, T, impl, ms, flop, **extra)
    return ms


def mean_pool(x: torch.Tensor, spec) -> torch.Tensor:
    """Mean-pool compression with l = d (fla_compat): [B,T,H,D] -> [B,Tc,H,D]."""
    lc = spec.compression.block
    B, T, H, D = x.shape  # noqa: N806
    tc = spec.num_compressed(T)
    return x[:, : tc * lc].view(B, tc, lc, H, D).mean(2)


def _config(spec_name: str, args) -> dict | None:
    """Kernel configs for ``spec_name`` from --config-file ({spec: {kernel: params}}), if given."""
    if not args.config_file or not args.config_file.is_file():
        return None
    return json.loads(args.config_file.read_text()).get(spec_name)


def bench_spec(spec_name: str, Ts: list[int], args) -> None:  # noqa: N803
    spec = nsa_dsl.load_spec(spec_name)
    ops = nsa_dsl.compile(spec, _config(spec_name, args))
    used = [f"{kn}={ops.config_for(kn, T=Ts[0])}" for kn in ("slc_fwd", "win_fwd") if ops.has_kernel(kn)]
    print(f"[{spec_name}] configs: " + "; ".join(used), flush=True)
    base = ops.config_for("slc_fwd", T=Ts[0])
    sched_ops = {s: ops.with_config("slc_fwd", {**base, "schedule": s}) for s in ("group", "kvouter")}
    for T in Ts:
        common.free_memory()
        try:
            bench_one(spec, spec_name, T, ops, sched_ops, args)
        except Exception:
            traceback.print_exc()
        common.free_memory()


def bench_one(spec, spec_name: str, T: int, ops, sched_ops, args) -> None:  # noqa: N803
    x = common.make_inputs(spec, T, device=DEVICE)
    q, k, v, kc, vc, g = x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["g"]
    print(f"[{spec_name}] T={T}", flush=True)
    with torch.no_grad():
        # --- the full op
        attempt("full", spec_name, T, "nsa_dsl", lambda: ops.forward(q, k, v, kc, vc, g))
        if spec.compression.function == "mean" and spec.compression.block == spec.compression.stride:
            attempt("full", spec_name, T, "nsa_dsl+compress",
                    lambda: ops.forward(q, k, v, mean_pool(k, spec), mean_pool(v, spec), g))
        # --- per kernel
        try:
            if hasattr(ops, "cmp_select"):
                o_cmp, lse_cmp, idx = ops.cmp_select(q, kc, vc)
                attempt("kernel", spec_name, T, "cmp_select", lambda: ops.cmp_select(q, kc, vc),
                        common.cmp_flop(spec, T))
            else:
                o_cmp, lse_cmp = ops.cmp_fwd(q, kc, vc)
                idx = ops.select(q, kc, lse_cmp)
                attempt("kernel", spec_name, T, "cmp_fwd", lambda: ops.cmp_fwd(q, kc, vc),
                        common.cmp_flop(spec, T))
                attempt("kernel", spec_name, T, "select", lambda: ops.select(q, kc, lse_cmp))
        except Exception as e:
            print(f"  cmp/select failed: {e}; random indices for the selection kernels", flush=True)
            idx = random_indices(spec, T)
            o_cmp = torch.randn(1, T, spec.attention.heads, spec.attention.head_dim_v, device=DEVICE,
                                dtype=q.dtype)
        sflop = common.selection_flop(spec, idx)
        for name, o in sched_ops.items():
            default = " (default)" if name == base_schedule(ops, T) else ""
            attempt("kernel", spec_name, T, f"slc_fwd[{name}]{default}",
                    lambda o=o: o.slc_fwd(q, k, v, idx), sflop)
        if spec.window_size:
            o_win, _ = ops.win_fwd(q, k, v)
            wflop = common.window_flop(spec, T)
            attempt("kernel", spec_name, T, "win_fwd", lambda: ops.win_fwd(q, k, v), wflop)
            wmod = ops.module("win_fwd", T=T)
            o_slc = torch.zeros_like(o_win)
            attempt("kernel", spec_name, T, "win_fwd+gated_epilogue",
                    lambda: wmod.run(q, k, v, gate=g, o_cmp=o_cmp, o_slc=o_slc), wflop)
            attempt("kernel", spec_name, T, "combine_fwd",
                    lambda: ops.module("combine_fwd", T=T).run(o_cmp, o_slc, o_win, g))
            if not args.no_flex and DEVICE == "cuda" and T in args.flex_T:
                bench_flex(spec, spec_name, T, q, k, v, ops, args)
        # --- dense baselines
        dflop = common.dense_causal_flop(spec, T)
        for name, backend in common.sdpa_backends().items():
            if (name == "math" and T > args.math_max_t) or DEVICE != "cuda":
                continue
            attempt("dense", spec_name, T, f"sdpa[{name}]", common.sdpa_dense(q, k, v, backend), dflop)
        # --- fla-core
        if spec_name == "fla_compat" and not args.no_fla and DEVICE == "cuda":
            bench_fla(spec, spec_name, T, q, k, v, g)


def base_schedule(ops, T: int) -> str:  # noqa: N803
    return ops.config_for("slc_fwd", T=T).get("schedule", "group")


def random_indices(spec, T: int) -> torch.Tensor:  # noqa: N803
    from nsa_dsl.reference import select_blocks

    scores = torch.rand(1, T, spec.attention.kv_heads, spec.num_selection_blocks(T), device=DEVICE)
    return select_blocks(scores, spec, T)


_FLEX: dict[str, Any] = {}


def bench_flex(spec, spec_name: str, T: int, q, k, v, ops, args) -> None:  # noqa: N803
    """FlexAttention causal sliding window (compiled) vs our window kernel, same inputs."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as e:
        add("window", spec_name, T, "flex_attention", None, error=f"unavailable: {e}")
        return
    w = spec.window_size
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=True)  # one compile per head dims

    def sliding(b, h, qi, ki):
        return (ki <= qi) & (qi - ki < w)

    try:
        try:  # compiled mask construction: no T x T mask in memory
            bm = create_block_mask(sliding, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cuda", _compile=True)
        except TypeError:
            bm = create_block_mask(sliding, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cuda")
    except Exception as e:
        add("window", spec_name, T, "flex_attention", None, error=f"block mask: {e}")
        return
    flop = common.window_flop(spec, T)
    dims = [(q.shape[-1], v.shape[-1], ops)]
    if q.shape[-1] != 128 or v.shape[-1] != 128:  # fallback (and the anchors' dims): dk = dv = 128
        s128 = spec.replace(attention={"head_dim_qk": 128, "head_dim_v": 128})
        dims.append((128, 128, nsa_dsl.compile(s128, {"win_fwd": ops.config_for("win_fwd", T=T)})))
    for i, (dk, dv, op) in enumerate(dims):
        if i > 0 and not _FLEX.get("failed") and not args.flex_128:
            break
        qd, kd, vd = (x[..., :d].contiguous() for x, d in ((q, dk), (k, dk), (v, dv)))
        qt, kt, vt = (x.transpose(1, 2) for x in (qd, kd, vd))
        fl = flop * (dk + dv) / (q.shape[-1] + v.shape[-1])
        ms = attempt("window", spec_name, T, "flex_attention",
                     lambda qt=qt, kt=kt, vt=vt: _FLEX["fn"](qt, kt, vt, block_mask=bm, enable_gqa=True), fl,
                     dk=dk, dv=dv)
        if i == 0 and ms is None:
            _FLEX["failed"] = True
        attempt("window", spec_name, T, "nsa_dsl win_fwd",
                lambda qd=qd, kd=kd, vd=vd, op=op: op.win_fwd(qd, kd, vd), fl, dk=dk, dv=dv)


def bench_fla(spec, spec_name: str, T: int, q, k, v, g) -> None:  # noqa: N803
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as e:
        add("fla", spec_name, T, "fla parallel_nsa", None, error=f"import failed: {e.__class__.__name__}")
        return
    g_cmp, g_slc = g[..., 0].contiguous(), g[..., 1].contiguous()
    attempt("full", spec_name, T, "fla parallel_nsa",
            lambda: parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=spec.selection.top_n,
                                 block_size=spec.selection.block))


def schedules(Ts: list[int], specs: list[str], args) -> None:  # noqa: N803
    """Group-centric vs KV-outer selection (same indices) at G = 16 (nsa_paper) and G = 2 (small_group)."""
    for spec_name in specs:
        spec = nsa_dsl.load_spec(spec_name)
        ops = nsa_dsl.compile(spec, _config(spec_name, args))
        base = ops.config_for("slc_fwd", T=Ts[0])
        kv = ops.with_config("slc_fwd", {**base, "schedule": "kvouter"})
        gr = ops.with_config("slc_fwd", {**base, "schedule": "group"})
        for T in Ts:
            common.free_memory()
            _schedule_one(spec, spec_name, T, gr, kv)
        common.free_memory()


def _schedule_one(spec, spec_name: str, T: int, gr, kv) -> None:  # noqa: N803
    x = common.make_inputs(spec, T, device=DEVICE)
    idx = random_indices(spec, T)
    flop = common.selection_flop(spec, idx)
    with torch.no_grad():
        for name, o in (("group", gr), ("kvouter", kv)):
            attempt("schedule", spec_name, T, f"slc_fwd[{name}] G={spec.G}",
                    lambda o=o: o.slc_fwd(x["q"], x["k"], x["v"], idx), flop)


def summarize(meta: dict[str, Any]) -> dict[str, tuple[list[dict[str, Any]], list[str] | None]]:
    """Per (spec, T): our full time, best SDPA, fla; ratios. Plus the kernel and window tables."""
    def ms(sec, spec, T, impl):  # noqa: N803
        for r in ROWS:
            if r["section"] == sec and r["spec"] == spec and r["T"] == T and r["impl"] == impl:
                return r["ms"]
        return None

    summary = []
    for spec in sorted({r["spec"] for r in ROWS if r["section"] == "full"}):
        for T in sorted({r["T"] for r in ROWS if r["spec"] == spec and r["section"] == "full"}):
            dense = [(r["ms"], r["impl"]) for r in ROWS
                     if r["section"] == "dense" and r["spec"] == spec and r["T"] == T and r["ms"]]
            best = min(dense) if dense else (None, None)
            ours = ms("full", spec, T, "nsa_dsl")
            ours_c = ms("full", spec, T, "nsa_dsl+compress")
            fla = ms("full", spec, T, "fla parallel_nsa")
            summary.append({
                "spec": spec, "T": T, "nsa_dsl ms": ours, "nsa_dsl+compress ms": ours_c,
                "best SDPA ms": best[0], "best SDPA": best[1],
                "speedup vs SDPA": (best[0] / ours) if ours and best[0] else None,
                "fla ms": fla,
                "speedup vs fla": (fla / (ours_c or ours)) if fla and (ours_c or ours) else None,
            })
    kernels = [{k: r.get(k) for k in ("spec", "T", "impl", "ms", "tflops", "error")}
               for r in ROWS if r["section"] in ("kernel", "schedule")]
    mm = meta.get("matmul_bf16_tflops") or float("nan")
    for r in kernels:
        r["% of matmul"] = 100 * r["tflops"] / mm if r.get("tflops") and math.isfinite(mm) else None
    window = [{k: r.get(k) for k in ("spec", "T", "impl", "ms", "tflops", "dk", "dv", "error")}
              for r in ROWS if r["section"] == "window"]
    dense = [{k: r.get(k) for k in ("spec", "T", "impl", "ms", "tflops", "error")}
             for r in ROWS if r["section"] in ("dense", "fla")]
    return {
        "summary (full forward)": (summary, None),
        "kernels": (kernels, ["spec", "T", "impl", "ms", "tflops", "% of matmul", "error"]),
        "window: ours vs FlexAttention": (window, None),
        "dense baselines": (dense, None),
    }


def save(meta: dict[str, Any], args, quiet: bool = False) -> None:
    """Write JSON + Markdown (+ PNG) of the rows so far (called after each T: a killed run keeps its rows)."""
    tables = summarize(meta)
    paths = common.write_results(args.name, ROWS, meta, tables, args.out)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in ROWS:
        dense_line = r["section"] == "dense" and "cudnn" in r["impl"]
        if r["ms"] and (r["section"] in ("full", "window") or dense_line):
            series.setdefault(f"{r['impl']} ({r['spec']})", []).append((r["T"], r["ms"]))
    why = common.plot_lines(args.out / f"{args.name}.png", series, title=f"NSA forward, {meta.get('card')}")
    if not quiet:
        print(why or f"plot: {args.out / (args.name + '.png')}")
        print(common.markdown_table(*tables["summary (full forward)"]))
        print(f"results: {paths['json']} {paths['md']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--specs", nargs="+", default=["nsa_paper", "fla_compat"])
    ap.add_argument("--schedule-T", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--schedule-specs", nargs="+", default=["nsa_paper", "small_group"])
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--flex-T", type=int, nargs="+", default=[16384, 65536], help="Ts for FlexAttention")
    ap.add_argument("--flex-128", action="store_true", help="also compare the window at dk = dv = 128")
    ap.add_argument("--no-schedules", action="store_true")
    ap.add_argument("--math-max-t", type=int, default=8192, help="largest T for the SDPA math backend")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    ap.add_argument("--name", default="forward")
    ap.add_argument("--config-file", type=Path, help="JSON {spec: {kernel: params}}")
    ap.add_argument("--smoke-cpu", action="store_true", help="exercise the code on CPU")
    args = ap.parse_args(argv)
    global DEVICE
    if args.smoke_cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("bench_forward: needs a CUDA device (or --smoke-cpu)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    meta = common.env_info()
    meta["matmul_bf16_tflops"] = round(common.matmul_tflops(), 1)
    print(f"card: {meta.get('card')}  torch {meta['torch']}  triton {meta['triton']}  "
          f"bf16 matmul {meta['matmul_bf16_tflops']} TFLOP/s", flush=True)
    if not args.no_schedules:  # first: cheap, and required even if a time limit cuts the long Ts
        try:
            schedules(args.schedule_T, args.schedule_specs, args)
        except Exception:
            traceback.print_exc()
        save(meta, args, quiet=True)
    # Ts in the outer loop so that a time limit still leaves every spec measured at the smaller Ts
    for T in args.T:
        for s in args.specs:
            try:
                bench_spec(s, [T], args)
            except Exception:
                traceback.print_exc()
        save(meta, args, quiet=True)
    save(meta, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
