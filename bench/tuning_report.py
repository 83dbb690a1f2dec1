"""Render the "## Autotuning" section of bench/RESULTS.md from bench_tuning.py / tuning_replay.py JSON.

python bench/tuning_report.py bench/results/tuning_h200.json [--replay replay.json] [--synthetic syn.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.2f}")


def render(res: dict, replay: dict | None, synthetic: dict | None) -> str:
    m = res["meta"]
    out = ["## Autotuning", ""]
    out.append(
        f"`bench/bench_tuning.py` (raw: `bench/results/{Path(res.get('_file', 'tuning.json')).name}`). One "
        f"{m['card']} (sm{m['capability'][0]}{m['capability'][1]}, {m['sm_count']} SMs), torch {m['torch']}, "
        f"triton {m['triton']}, python {m['python']}, {m['date_utc']} UTC; spec `{m['spec']}` "
        f"({m.get('dtype', 'bf16')}, B = 1). "
        "Each kernel is tuned with Optuna TPE (seed 0) over its pruned space; every candidate is compiled, "
        "checked against the reference on a small input, then timed with CUDA events (warm-up, median of "
        "repeats, 2-3 rotating input sets). Default and winner are re-timed together at the end, in the same "
        "process: the speedups below are ratios from one run."
    )
    out.append("")
    out.append("| kernel | T | default ms | tuned ms | speedup | trials (failed) | tuning s | tuned config |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in res["tuned"]:
        diff = {k: v for k, v in r["config"].items() if r["default"].get(k) != v}
        cfg = ", ".join(f"{k}={v}" for k, v in sorted(diff.items())) or "= default"
        sp = f"{r['speedup']:.3f}x" if r["speedup"] else "-"
        out.append(
            f"| {r['kernel']} | {r['T']} | {_ms(r['default_ms'])} | {_ms(r['tuned_ms'])} | {sp} | "
            f"{r['trials']} ({r['failed'] + r['rejected']}) | {r['seconds']:.1f} | {cfg} |"
        )
    out.append("")
    if res.get("geomean_speedup"):
        out.append(
            f"Geometric mean speedup over the defaults: **{res['geomean_speedup']:.3f}x** "
            f"({len([r for r in res['tuned'] if r['speedup']])} kernel x shape pairs); total tuning time "
            f"{res.get('tune_seconds', 0):.0f} s."
        )
    ch = res.get("cache_hit") or {}
    if ch:
        line = (
            f"Second run (cache hits): {ch.get('hits')}/{ch.get('calls')} records found in "
            f"{ch.get('seconds')} s"
        )
        if "cli_seconds" in ch:
            line += (
                f"; the same `nsa-tune` command line as a fresh process: {ch['cli_seconds']} s "
                f"(exit {ch['cli_rc']})"
            )
        out.append(line + ".")
    g = res.get("grid")
    if g:
        out.append("")
        fixed = ", ".join(f"{k}={v}" for k, v in (g.get("fixed") or {}).items())
        out.append(
            f"Exhaustive grid, `{g['kernel']}` at T = {g['T']}"
            + (f" (sub-grid with {fixed} fixed)" if fixed else "")
            + f": {g['evaluated']}/{g['valid_points']} valid points measured in {g['seconds']} s; best "
            f"{_ms(g['best_ms'])} ms, default {_ms(g['default_ms'])} ms."
        )
        for s in res.get("search", []):
            out.append(
                f"- {s['sampler']} with {s['budget']} trials (25% of the grid): best found "
                f"{_ms(s['found_grid_ms'])} ms by the grid's own measurement "
                f"({(s['ratio_to_grid_best'] - 1) * 100:.1f}% from the grid's best), within 3% after "
                f"{s['trials_to_within_3pct']} trials."
            )
    for title, rp in (("measured grid", replay), ("synthetic landscape", synthetic)):
        if not rp:
            continue
        out.append("")
        out.append(
            f"Sampler choice, replay of the {title} ({rp['points']} points, budget {rp['budget']} trials, "
            f"{rp['tpe']['seeds']} seeds; `bench/tuning_replay.py`):"
        )
        out.append("")
        out.append(
            "| sampler | runs within 3% of the best | median trials to 3% | mean final / best | worst |"
        )
        out.append("|---|---|---|---|---|")
        for name in ("tpe", "random"):
            s = rp.get(name)
            if s:
                out.append(
                    f"| {name} | {s['within_3pct']}/{s['seeds']} | {s['median_trials_to_3pct']} | "
                    f"{s['mean_final_ratio']:.3f} | {s['worst_final_ratio']:.3f} |"
                )
    if res.get("skipped"):
        out.append("")
        out.append("Not run (time box): " + "; ".join(res["skipped"]) + ".")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--replay")
    ap.add_argument("--synthetic")
    a = ap.parse_args()
    res = json.loads(Path(a.results).read_text())
    res["_file"] = a.results
    rp = json.loads(Path(a.replay).read_text()) if a.replay else None
    syn = json.loads(Path(a.synthetic).read_text()) if a.synthetic else None
    sys.stdout.write(render(res, rp, syn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
