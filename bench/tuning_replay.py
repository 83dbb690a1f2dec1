"""Replay a measured grid (``bench_tuning.py``'s grid.json) through the tuner's search, many seeds, no GPU.

Each sampler (TPE, random) gets ``--frac`` of the grid's points as its trial budget; a trial's time is the
grid's measurement of that config (failed points fail again). Reports, per sampler, how often the search ends
within 3% of the grid's best, the median number of trials it needed to get there, and the mean final ratio.
This is how the sampler choice in ``nsa_dsl.tuning.search`` is justified with real landscapes.

    python bench/tuning_replay.py bench/results/tuning_grid_h100.json --seeds 20
    python bench/tuning_replay.py synthetic --samplers tpe --tpe multivariate=false
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any


class TableKernelDef:
    """A kernel whose valid points are exactly the grid's (space = the values seen per parameter)."""

    name = "replay"
    pass_ = "fwd"
    template = "replay"

    def __init__(self, points: list[dict[str, Any]], default: dict[str, Any]):
        from nsa_dsl.tuning.keys import canonical

        self.table = {canonical(p["config"]): p["ms"] for p in points}
        keys = sorted({k for p in points for k in p["config"]})
        self._space = {
            k: sorted({p["config"][k] for p in points}, key=lambda v: (str(type(v)), v)) for k in keys
        }
        self._default = default

    def space(self, spec: Any, limits: Any) -> dict[str, list[Any]]:
        return self._space

    def check(self, spec: Any, config: dict[str, Any], limits: Any) -> str | None:
        from nsa_dsl.tuning.keys import canonical

        return None if canonical(config) in self.table else "not a valid point of the grid"

    def default(self, spec: Any, limits: Any) -> dict[str, Any]:
        return dict(self._default)


class ReplayTarget:
    def __init__(self, kd: TableKernelDef):
        self.kd = kd

    def build(self, config: dict[str, Any]) -> Any:
        from nsa_dsl.tuning.keys import canonical

        if self.kd.table.get(canonical(config)) is None:
            raise RuntimeError("failed in the measured grid")
        return config

    def gate(self, built: Any, config: dict[str, Any]) -> str | None:
        return None

    def candidate(self, built: Any, config: dict[str, Any]) -> Any:
        from nsa_dsl.tuning.timing import Candidate

        return Candidate(config=config, run=lambda i: None)


class _Lim:
    name, capability, sm_count, smem_per_block, interpreter = "replay", (0, 0), 1, 0, True


def _complete_default(grid: dict[str, Any]) -> dict[str, Any]:
    """The grid's default as a point of the grid: parameters it does not name (a grid recorded before a kernel
    default listed them) take the current registered default's value for the grid's spec."""
    pts = grid["points"]
    default = dict(grid.get("default") or pts[0]["config"])
    keys = set(pts[0]["config"])
    missing = keys - set(default)
    if missing:
        try:
            from nsa_dsl.codegen.plan import DeviceLimits, get_kernel

            import nsa_dsl

            spec = nsa_dsl.load_spec(grid["meta"]["spec"])
            lim = DeviceLimits("replay", (9, 0), 132, 227 * 1024)
            cur = get_kernel(grid["kernel"]).default(spec, lim)
            default.update({k: cur[k] for k in missing if k in cur})
        except Exception:  # noqa: BLE001 - an unknown kernel or spec: leave the default as recorded
            pass
    return {k: v for k, v in default.items() if k in keys}


def replay(grid: dict[str, Any], *, samplers: list[str], seeds: int, frac: float) -> dict[str, Any]:
    import optuna
    from nsa_dsl.tuning import search, tune_kernel
    from nsa_dsl.tuning.keys import canonical
    from nsa_dsl.tuning.timing import FakeTimer

    from nsa_dsl import load_spec

    pts = grid["points"]
    default = _complete_default(grid)
    kd = TableKernelDef(pts, default)
    ok = [p["ms"] for p in pts if p["ms"] is not None]
    best = min(ok)
    budget = max(1, math.ceil(frac * len(pts)))
    spec = load_spec("tiny")
    table = kd.table
    out: dict[str, Any] = {
        "points": len(pts),
        "budget": budget,
        "best_ms": best,
        "default_ms": table.get(canonical(default)),
    }
    for label in samplers:
        # "tpe+nb0.33": TPE after a third of the budget spent on the default's one-parameter neighbours;
        # "tpe+ls0.25": the last quarter of the budget on the best point's one- and two-parameter neighbours
        sampler, *mods = label.split("+")
        opts = {m[:2]: float(m[2:]) for m in mods}
        if set(opts) - {"nb", "ls"}:
            raise SystemExit(f"--samplers: unknown modifier in {label!r} (NAME+nbF, NAME+lsF)")
        nb_frac, ls_frac = opts.get("nb", 0.0), opts.get("ls", 0.0)
        to3, final, hit = [], [], 0
        for seed in range(seeds):
            with tempfile.TemporaryDirectory() as d:
                os.environ["NSA_DSL_CACHE_DIR"] = d
                j = Path(d) / "s.journal"
                r = tune_kernel(
                    spec,
                    "replay",
                    T=1024,
                    limits=_Lim(),
                    trials=budget,
                    sampler=sampler,
                    seed=seed,
                    timer=FakeTimer(lambda c: table[canonical(c)]),
                    target=ReplayTarget(kd),
                    registry={"replay": kd},
                    storage_path=j,
                    neighbours=nb_frac,
                    local=ls_frac,
                    save=False,
                    confirm=0,
                    compile_jobs=0,
                )
                st, name = search.study_storage(j, r.key)
                study = optuna.load_study(study_name=name, storage=st)
                cur, first = math.inf, None
                n = 0
                for t in study.get_trials(deepcopy=False):
                    if not t.user_attrs.get("evaluated"):
                        continue
                    n += 1
                    ms = table.get(t.user_attrs["config"])
                    if ms is not None:
                        cur = min(cur, ms)
                    if first is None and cur <= best * 1.03:
                        first = n
                final.append(cur / best)
                if first is not None:
                    hit += 1
                    to3.append(first)
        out[label] = {
            "seeds": seeds,
            "within_3pct": hit,
            "median_trials_to_3pct": statistics.median(to3) if to3 else None,
            "mean_final_ratio": statistics.fmean(final),
            "worst_final_ratio": max(final),
        }
    return out


def synthetic_grid() -> dict[str, Any]:
    """The structured fake landscape of the tuner's tests (``FakeKernelDef`` x ``fake_time``) as a grid."""
    from nsa_dsl.tuning.space import iter_points
    from nsa_dsl.tuning.testing import FakeKernelDef, fake_time

    kd = FakeKernelDef()
    pts = [{"config": c, "ms": fake_time(c)} for c in iter_points(kd.space(None, None))
           if kd.check(None, c, None) is None]
    return {"points": pts, "default": kd.default(None, None), "kernel": "fake", "meta": {"spec": "tiny"}}


def _tpe_overrides(text: str) -> dict[str, Any]:
    """``multivariate=false,n_startup_trials=4`` -> TPESampler keyword arguments."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        out[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.lstrip("-").isdigit() else v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("grid", help="a grid JSON from bench_tuning.py, or 'synthetic' (the tests' landscape)")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--frac", type=float, default=0.25)
    ap.add_argument("--samplers", default="tpe,random",
                    help="comma-separated; NAME+nbF spends the fraction F of the budget on the default's "
                         "one-parameter neighbours first (e.g. tpe+nb0.33), NAME+lsF the last fraction F "
                         "on the best point's (e.g. tpe+ls0.25)")
    ap.add_argument("--tpe", default="", metavar="K=V,...",
                    help="TPESampler arguments over the tuner's (e.g. multivariate=false,n_startup_trials=4)")
    a = ap.parse_args()
    grid = synthetic_grid() if a.grid == "synthetic" else json.loads(Path(a.grid).read_text())
    if a.tpe:
        import optuna
        from nsa_dsl.tuning import search

        kw = _tpe_overrides(a.tpe)
        tuner_sampler = search._sampler

        def sampler(name: str, seed: int, n_startup: int) -> Any:
            if name != "tpe":
                return tuner_sampler(name, seed, n_startup)
            args = {"seed": seed, "multivariate": True, "n_startup_trials": n_startup, **kw}
            return optuna.samplers.TPESampler(**args)

        search._sampler = sampler
    res = replay(grid, samplers=a.samplers.split(","), seeds=a.seeds, frac=a.frac)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
