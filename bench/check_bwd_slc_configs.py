"""GPU check of selection-backward configs one process each (a config that breaks the CUDA context cannot
take the others down): bf16 gradients of the paper spec at T = 4096 against the default config's gradients
(which the GPU tests check against the fp32 reference). Prints one line per config: ok / wrong / crashed.

    python bench/check_bwd_slc_configs.py            # the built-in list
"""

from __future__ import annotations

import json
import subprocess
import sys

CONFIGS = [
    {},  # the default
    {"DQ_LAYOUT": "keys", "dq_warps": 8, "dq_stages": 1},
    {"DQ_LAYOUT": "keys", "dq_warps": 8, "dq_stages": 2},
    {"DQ_LAYOUT": "keys", "dq_warps": 4, "dq_stages": 1},
    {"DQ_LAYOUT": "keys", "dq_warps": 2, "dq_stages": 2},
    {"KEY_SPLIT": 2, "BLOCK_T": 2},
    {"KEY_SPLIT": 2, "BLOCK_T": 4},
    {"KEY_SPLIT": 4, "BLOCK_T": 2},
    {"KEY_SPLIT": 2, "BLOCK_T": 2, "DQ_LAYOUT": "rows", "dq_warps": 2},
]


def child(params: dict) -> None:
    import torch
    from nsa_dsl.codegen.autograd import nsa_backward

    import nsa_dsl
    from nsa_dsl import load_spec

    spec = load_spec("nsa_paper")
    T = 4096  # noqa: N806
    a = spec.attention
    gen = torch.Generator(device="cuda").manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=gen, device="cuda").to(torch.bfloat16)

    tc = spec.num_compressed(T)
    xs = (r(1, T, a.heads, a.head_dim_qk), r(1, T, a.kv_heads, a.head_dim_qk),
          r(1, T, a.kv_heads, a.head_dim_v), r(1, tc, a.kv_heads, a.head_dim_qk),
          r(1, tc, a.kv_heads, a.head_dim_v),
          torch.rand(1, T, a.heads, 3, generator=gen, device="cuda").to(torch.bfloat16))
    do = r(1, T, a.heads, a.head_dim_v)
    base = nsa_dsl.compile(spec)
    with torch.no_grad():
        _, saved = base.forward_train(*xs)
        want = nsa_backward(base, *xs, do, saved)
        ops = base
        if params:
            cfg = dict(base.config_for("bwd_slc", T=T))
            cfg.update(params)
            ops = base.with_config("bwd_slc", cfg)
        got = nsa_backward(ops, *xs, do, saved)
        torch.cuda.synchronize()
    errs = {n: float((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30))
            for n, x, y in zip(("dq", "dk", "dv", "dk_cmp", "dv_cmp", "dg"), got, want, strict=True)}
    print(json.dumps({"params": params, "rel_err": errs, "ok": max(errs.values()) < 2e-2}))


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return 0
    procs = [subprocess.Popen([sys.executable, __file__, "--child", json.dumps(c)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in CONFIGS]
    for c, p in zip(CONFIGS, procs, strict=True):
        try:
            out, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            print(json.dumps({"params": c, "result": "timeout"}))
            continue
        line = [x for x in out.splitlines() if x.startswith("{")]
        if p.returncode == 0 and line:
            res = json.loads(line[-1])
            print(json.dumps({"params": c, "result": "ok" if res["ok"] else "wrong",
                              "rel_err": {k: float(f"{v:.2e}") for k, v in res["rel_err"].items()}}))
        else:
            last = [x for x in err.strip().splitlines() if x.strip()][-1:] or ["?"]
            print(json.dumps({"params": c, "result": "crashed", "error": last[0][:200]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
