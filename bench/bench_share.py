"""Selection forward: the SHARE variant (blocks every token of a TPP-token program selected are attended to
once with the stacked rows) against the group-centric default, on two index patterns:

* "random": top-n of uniform random scores (what every other benchmark here uses): neighbours share only the
  forced initial / local blocks;
* "clustered C": the scores drawn once per C consecutive tokens, so neighbours select the same blocks except
  where their current block differs (a stand-in for trained models, whose neighbouring tokens pick mostly
  the same blocks; a labelled assumption, not a measurement of a model).

Every variant's output is compared with the default's on the same inputs before it is timed.

    python bench/bench_share.py --specs nsa_paper fla_compat --T 8192 65536
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from nsa_dsl.codegen.loader import load  # noqa: E402
from nsa_dsl.codegen.plan import make_plan  # noqa: E402

import nsa_dsl  # noqa: E402
from nsa_dsl.reference import select_blocks  # noqa: E402

VARIANTS = [
    {"TPP": 4},
    {"TPP": 2, "SHARE": 1, "num_warps": 2},
    {"TPP": 2, "SHARE": 1, "num_warps": 4},
    {"TPP": 4, "SHARE": 1, "num_warps": 4},
    {"TPP": 4, "SHARE": 1, "num_warps": 4, "num_stages": 3},
    {"TPP": 4, "SHARE": 1, "num_warps": 8},
    {"TPP": 8, "SHARE": 1, "num_warps": 8},
]


def indices(spec, T: int, cluster: int) -> torch.Tensor:  # noqa: N803
    n = spec.num_selection_blocks(T)
    rows = -(-T // cluster)
    scores = torch.rand(1, rows, spec.attention.kv_heads, n, device="cuda")
    return select_blocks(scores.repeat_interleave(cluster, 1)[:, :T], spec, T)


def run(spec_name: str, T: int, clusters: list[int], variants: list[dict]) -> list[dict]:  # noqa: N803
    spec = nsa_dsl.load_spec(spec_name)
    x = common.make_inputs(spec, T)
    base = load(make_plan(spec, "slc_fwd", {"schedule": "group"}))
    rows = []
    for c in clusters:
        idx = indices(spec, T, c)
        pattern = "random" if c == 1 else f"clustered {c}"
        shared = float((idx[:, 1:] == idx[:, :-1]).all(-1).float().mean())
        flop = common.selection_flop(spec, idx)
        o0, lse0 = base.run(x["q"], x["k"], x["v"], idx)
        ms0 = common.bench_ms(lambda idx=idx: base.run(x["q"], x["k"], x["v"], idx))
        rows.append({"spec": spec_name, "T": T, "pattern": pattern, "same_as_prev": round(shared, 3),
                     "config": "default", "ms": ms0, "tflops": common.tflops(flop, ms0), "vs_default": 1.0})
        print(rows[-1], flush=True)
        for v in variants:
            cfg = {"schedule": "group", **v}
            name = ",".join(f"{k}={val}" for k, val in v.items())
            try:
                mod = load(make_plan(spec, "slc_fwd", cfg))
                o, lse = mod.run(x["q"], x["k"], x["v"], idx)
                err = float((o.float() - o0.float()).abs().max())
                fin = torch.isfinite(lse0)
                lerr = float((lse[fin] - lse0[fin]).abs().max())
                ms = common.bench_ms(lambda mod=mod, idx=idx: mod.run(x["q"], x["k"], x["v"], idx))
            except Exception as e:  # a config the card rejects is a row, not a crash
                rows.append({"spec": spec_name, "T": T, "pattern": pattern, "config": name,
                             "error": str(e)[:100]})
                print(rows[-1], flush=True)
                continue
            rows.append({"spec": spec_name, "T": T, "pattern": pattern, "same_as_prev": round(shared, 3),
                         "config": name, "ms": ms, "tflops": common.tflops(flop, ms), "vs_default": ms0 / ms,
                         "max_abs_err_o": err, "max_abs_err_lse": lerr})
            print(rows[-1], flush=True)
        common.free_memory()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", nargs="+", default=["nsa_paper", "fla_compat"])
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--clusters", type=int, nargs="+", default=[1, 16], help="1 = random scores")
    ap.add_argument("--only", type=int, nargs="*", help="indices into VARIANTS")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    ap.add_argument("--name", default="share")
    args = ap.parse_args()
    variants = [VARIANTS[i] for i in args.only] if args.only else VARIANTS
    meta = common.env_info()
    rows = []
    for s in args.specs:
        for T in args.T:
            rows += run(s, T, args.clusters, variants)
    common.write_results(args.name, rows, meta, outdir=args.out)
    print(common.markdown_table(rows, ["spec", "T", "pattern", "same_as_prev", "config", "ms", "tflops",
                                       "vs_default", "max_abs_err_o", "error"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
