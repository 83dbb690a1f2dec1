"""Autotuning benchmark: tuned vs default configs, exhaustive grid vs Optuna, cache-hit time.

Phases (time-boxed by ``--deadline-s``; a phase that would not fit is skipped and says so):
  C. tune each forward kernel at each T with ``--trials`` candidates (defaults measured in the same process,
     the winner and the default re-timed together): default ms, tuned ms, speedup, trials, seconds;
  D. the same calls again: cache hits (the "second nsa-tune is seconds" check);
  A. exhaustive grid of ``--grid-kernel`` at ``--grid-T`` (every valid point compiled, gated, timed);
  B. Optuna (TPE, seed 0) and random search on the same kernel with 25% of the grid's points (kernels are
     already compiled, so these cost timing only).
Writes JSON under ``--out`` (results, the grid landscape, the records file for ``tuning/configs``).

    python bench/bench_tuning.py --spec nsa_paper --seq-lens 8k,32k --trials 12 --out $OUT
    python bench/bench_tuning.py --smoke --out /tmp/x      # CPU / interpreter check of every path
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="nsa_paper")
    ap.add_argument("--seq-lens", default="8k,32k")
    ap.add_argument(
        "--kernels", default="cmp_fwd,slc_topk,slc_fwd,win_fwd,schedule.cmp_select,schedule.combine"
    )
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--grid-kernel", default="slc_topk")
    ap.add_argument("--grid-T", type=int, default=8192)
    ap.add_argument(
        "--grid-fix",
        default="MAP=reshape,SKIP=0",
        help="parameters fixed to one value for the grid (a sub-grid small enough to measure)",
    )
    ap.add_argument("--compile-jobs", type=int, default=6)
    ap.add_argument("--grid-jobs", type=int, default=14)
    ap.add_argument("--deadline-s", type=float, default=170.0)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--smoke", action="store_true", help="tiny spec, tiny shapes, interpreter")
    a = ap.parse_args()
    t_start = time.monotonic()
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        a.spec, a.seq_lens, a.kernels, a.trials = "tiny", "64,128", "cmp_fwd,win_fwd,schedule.combine", 3
        a.grid_kernel, a.grid_T, a.compile_jobs, a.grid_jobs, a.grid_fix = (
            "combine_fwd",
            64,
            2,
            2,
            "num_warps=4",
        )
    os.environ.setdefault("NSA_DSL_CACHE_DIR", "/tmp/nsa_tune_bench_cache")
    cache_root = Path(os.environ["NSA_DSL_CACHE_DIR"])
    shutil.rmtree(cache_root, ignore_errors=True)

    import torch
    from nsa_dsl.tuning import search, tune_kernel
    from nsa_dsl.tuning._compat import detect_limits, tuning_dir
    from nsa_dsl.tuning.cli import parse_seq_lens
    from nsa_dsl.tuning.keys import canonical

    from nsa_dsl import load_spec

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_spec(a.spec)
    limits = detect_limits()
    left = lambda: a.deadline_s - (time.monotonic() - t_start)  # noqa: E731
    import triton

    meta = {
        "card": limits.name,
        "capability": list(limits.capability),
        "sm_count": limits.sm_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "spec": spec.name,
        "spec_hash": spec.hash,
        "dtype": spec.attention.dtype,
    }
    print("meta", json.dumps(meta), flush=True)
    res: dict = {"meta": meta, "tuned": [], "cache_hit": None, "grid": None, "search": [], "skipped": []}

    def dump() -> None:
        (out / "tuning_results.json").write_text(json.dumps(res, indent=1))

    # ---- C: tuned vs default -----------------------------------------------------------------------------
    kernels = [k for k in a.kernels.split(",") if k]
    seq = parse_seq_lens(a.seq_lens)
    tC = time.monotonic()
    for T in seq:  # noqa: N806
        for k in kernels:
            if left() < 15:
                res["skipped"].append(f"tune {k} T={T}: out of time")
                continue
            t0 = time.monotonic()
            try:
                r = tune_kernel(
                    spec, k, T=T, B=1, limits=limits, trials=a.trials, compile_jobs=a.compile_jobs, force=True
                )
            except Exception as e:  # noqa: BLE001
                res["skipped"].append(f"tune {k} T={T}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                print("FAILED", k, T, e, flush=True)
                continue
            row = {
                "kernel": k,
                "T": T,
                "default_ms": r.default_ms,
                "tuned_ms": r.time_ms,
                "speedup": r.speedup,
                "trials": r.trials,
                "failed": r.failed,
                "rejected": r.rejected,
                "grid": r.grid,
                "seconds": round(time.monotonic() - t0, 2),
                "config": r.config,
                "default": r.default_config,
            }
            res["tuned"].append(row)
            print("TUNED", json.dumps(row), flush=True)
            dump()
    res["tune_seconds"] = round(time.monotonic() - tC, 1)
    sp = [r["speedup"] for r in res["tuned"] if r["speedup"]]
    res["geomean_speedup"] = math.exp(sum(map(math.log, sp)) / len(sp)) if sp else None

    # ---- D: cache hits -------------------------------------------------------------------------------------
    t0 = time.monotonic()
    hits = 0
    for row in res["tuned"]:
        r = tune_kernel(spec, row["kernel"], T=row["T"], B=1, limits=limits, trials=a.trials)
        hits += int(r.from_cache)
    res["cache_hit"] = {"calls": len(res["tuned"]), "hits": hits, "seconds": round(time.monotonic() - t0, 3)}
    if res["tuned"] and left() > 40:
        import subprocess

        done_k = sorted({r["kernel"] for r in res["tuned"]})
        done_t = sorted({r["T"] for r in res["tuned"]})
        cmd = [
            sys.executable,
            "-m",
            "nsa_dsl.tuning.cli",
            spec.name,
            "--seq-lens",
            ",".join(map(str, done_t)),
            "--kernels",
            ",".join(done_k),
            "--trials",
            str(a.trials),
        ]
        t0 = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        res["cache_hit"]["cli_seconds"] = round(time.monotonic() - t0, 2)
        res["cache_hit"]["cli_rc"] = p.returncode
        res["cache_hit"]["cli_cached_rows"] = p.stdout.count("cache")
        print(p.stdout[-3000:], p.stderr[-2000:], flush=True)
    rec = tuning_dir() / "records.json"
    if rec.exists():
        shutil.copy(rec, out / "records.json")
    dump()

    # ---- A: exhaustive grid --------------------------------------------------------------------------------
    gk, gT = a.grid_kernel, a.grid_T  # noqa: N806
    fix = {}
    for item in [x for x in a.grid_fix.split(",") if x]:
        name, val = item.split("=", 1)
        fix[name] = int(val) if val.lstrip("-").isdigit() else val
    from dataclasses import replace

    from nsa_dsl.tuning._compat import get_kernel_def

    gdef = get_kernel_def(gk)
    full_space = gdef.space

    def sub_space(spec_, lim_):
        sp_ = dict(full_space(spec_, lim_))
        for name_, val_ in fix.items():
            if name_ in sp_:
                sp_[name_] = [val_]
        return sp_

    greg = {gk: replace(gdef, space=sub_space)}
    if left() < 30:
        res["skipped"].append("grid: out of time")
    else:
        t0 = time.monotonic()
        journal = cache_root / "grid.journal"
        try:
            r = tune_kernel(
                spec,
                gk,
                T=gT,
                B=1,
                limits=limits,
                trials=10**6,
                compile_jobs=a.grid_jobs,
                force=True,
                save=False,
                confirm=0,
                storage_path=journal,
                registry=greg,
                budget_seconds=max(10.0, left() - 12),
            )
            st, name = search.study_storage(journal, r.key)
            import optuna

            study = optuna.load_study(study_name=name, storage=st)
            pts = []
            for t in study.get_trials(deepcopy=False):
                if not t.user_attrs.get("evaluated"):
                    continue
                pts.append(
                    {
                        "config": json.loads(t.user_attrs["config"]),
                        "ms": t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
                        "error": t.user_attrs.get("error") or t.user_attrs.get("rejected"),
                    }
                )
            ok = [p["ms"] for p in pts if p["ms"] is not None]
            res["grid"] = {
                "kernel": gk,
                "T": gT,
                "fixed": fix,
                "default": r.default_config,
                "valid_points": r.grid,
                "evaluated": len(pts),
                "complete": len(pts) >= r.grid,
                "best_ms": min(ok) if ok else None,
                "default_ms": r.default_ms,
                "seconds": round(time.monotonic() - t0, 1),
            }
            (out / "grid.json").write_text(json.dumps({"meta": meta, **res["grid"], "points": pts}))
            print("GRID", json.dumps(res["grid"]), flush=True)
        except Exception as e:  # noqa: BLE001
            res["skipped"].append(f"grid: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        dump()

    # ---- B: Optuna vs random with 25% of the grid ----------------------------------------------------------
    g = res["grid"]
    if g and g["complete"] and g["best_ms"]:
        budget = max(1, math.ceil(0.25 * g["valid_points"]))
        # the tuner's search (TPE then the local phase) for three seeds, TPE alone and random search for one
        runs = [("tpe", search.LOCAL_FRACTION, sd) for sd in (0, 1, 2)]
        runs += [("tpe", 0.0, 0), ("random", 0.0, 0)]
        for sampler, local, seed in runs:
            label = f"{sampler}+ls{local:g} seed {seed}" if local else f"{sampler} seed {seed}"
            if left() < 8:
                res["skipped"].append(f"search {label}: out of time")
                continue
            t0 = time.monotonic()
            journal = cache_root / f"search_{sampler}_{local:g}_{seed}.journal"
            r = tune_kernel(
                spec,
                gk,
                T=gT,
                B=1,
                limits=limits,
                trials=budget,
                compile_jobs=0,
                force=True,
                save=False,
                registry=greg,
                confirm=0,
                storage_path=journal,
                sampler=sampler,
                seed=seed,
                local=local,
            )
            st, name = search.study_storage(journal, r.key)
            import optuna

            study = optuna.load_study(study_name=name, storage=st)
            grid_ms = {
                canonical(p["config"]): p["ms"] for p in json.loads((out / "grid.json").read_text())["points"]
            }
            # best-so-far in trial order, scored with the grid's own timings (one measurement per point)
            best, first3 = math.inf, None
            n = 0
            for t in study.get_trials(deepcopy=False):
                if not t.user_attrs.get("evaluated"):
                    continue
                n += 1
                ms = grid_ms.get(t.user_attrs["config"])
                if ms is not None and ms < best:
                    best = ms
                if first3 is None and best <= g["best_ms"] * 1.03:
                    first3 = n
            row = {
                "sampler": label,
                "budget": budget,
                "found_ms": r.time_ms,
                "found_grid_ms": best,
                "ratio_to_grid_best": best / g["best_ms"],
                "trials_to_within_3pct": first3,
                "seconds": round(time.monotonic() - t0, 1),
            }
            res["search"].append(row)
            print("SEARCH", json.dumps(row), flush=True)
            dump()
    res["total_seconds"] = round(time.monotonic() - t_start, 1)
    dump()
    print(f"\n{'kernel':10} {'T':>6} {'default':>9} {'tuned':>9} {'speedup':>7} {'trials':>6} {'s':>6}")
    for r in res["tuned"]:
        print(
            f"{r['kernel']:10} {r['T']:>6} {r['default_ms'] or 0:9.4f} {r['tuned_ms']:9.4f} "
            f"{r['speedup'] or 0:7.3f} {r['trials']:>6} {r['seconds']:>6}"
        )
    print("geomean", res["geomean_speedup"], "cache", res["cache_hit"], "grid", res["grid"])
    for s in res["search"]:
        print("search", s)
    print("skipped", res["skipped"], "total_s", res["total_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
