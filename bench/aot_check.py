"""Compile a generated forward / backward kernel ahead of time for sm90 on any machine (no GPU needed) and
report ptxas' registers, spills and asynchronous copies: catches GPU-only compile errors (the interpreter
accepts more) and unpipelined loops before a device call. ``bench/decode_aot.py`` does the same for decode.

    python bench/aot_check.py slc_fwd nsa_paper --config '{"TPP": 4, "num_warps": 4}' --maxnreg 128
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_aot  # noqa: E402  (also drops TRITON_INTERPRET)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_TYPES = {
    **dict.fromkeys(("Q", "K", "V", "KC", "VC", "O", "DO", "GATE", "OCMP", "OWIN", "OSLC", "OUT"), "*bf16"),
    **dict.fromkeys(("LSE", "DELTA", "DK_", "DV_", "DQ"), "*fp32"),
    **dict.fromkeys(("IDX", "BOS", "CU", "CUC", "TILES"), "*i32"),
}
_BWD = {"VARLEN": False, "ACCUM": False, "DOT_PREC": "ieee"}

#: kernel name -> [(label, function name, constexprs)]
VARIANTS = {
    "slc_fwd": [
        ("slc_fwd", "_slc_fwd_kernel",
         {"VARLEN": False, "GATED": False, "WITH_WIN": False, "DOT_PREC": "ieee"}),
        ("slc_fwd gated + window, varlen", "_slc_fwd_kernel",
         {"VARLEN": True, "GATED": True, "WITH_WIN": True, "DOT_PREC": "ieee"}),
    ],
    "cmp_fwd": [("cmp_fwd", "_cmp_fwd_kernel", {"VARLEN": False, "DOT_PREC": "ieee"})],
    "win_fwd": [("win_fwd", "_win_fwd_kernel", {"VARLEN": False, "GATED": False, "DOT_PREC": "ieee"})],
    "bwd_cmp": [("bwd_cmp dK/dV", "_bwd_cmp_dkdv", _BWD), ("bwd_cmp dQ", "_bwd_cmp_dq", _BWD)],
    "bwd_win": [("bwd_win dK/dV", "_bwd_win_dkdv", _BWD), ("bwd_win dQ", "_bwd_win_dq", _BWD)],
    "bwd_slc": [("bwd_slc dQ", "_bwd_slc_dq", _BWD)],
}


def _descriptor_types(plan, names) -> dict[str, str]:
    """Signature types of the TMA descriptor parameters of a plan whose kernel takes them (one per head-dim
    chunk: KD{j} / VD{j} for K / V, QD{j} / OD{j} for the dense backward's Q / dO): bf16 boxes of
    [rows, 1, chunk width], rows as the emitted host helpers build them."""
    c, cfg = plan.constants, plan.config
    kv_box = {"bwd_slc": c.get("LPP"), "bwd_cmp": cfg.get("DQ_BLOCK_N"), "bwd_win": cfg.get("DQ_BLOCK_N")}
    boxes = {"KD": kv_box.get(plan.kernel, cfg.get("BLOCK_N")), "QD": cfg.get("BLOCK_M")}
    out = {}
    for (kp, vp), box in (("KD", "VD"), boxes["KD"]), (("QD", "OD"), boxes["QD"]):
        for prefix, chunks in ((kp, c.get("DK_CHUNKS", ())), (vp, c.get("DV_CHUNKS", ()))):
            for j, (_, w, _) in enumerate(chunks):
                if f"{prefix}{j}" in names:
                    out[f"{prefix}{j}"] = f"tensordesc<bf16[{box}, 1, {w}]>"
    return out


def check(kernel: str, spec_name: str, config: dict, maxnreg: int | None = None) -> list[tuple[str, str]]:
    plan, mod, tmp = decode_aot.load_for_sm90(spec_name, kernel, config)
    out = []
    for label, fname, consts in VARIANTS[kernel]:
        fn = getattr(mod, fname)
        # the dense backward's dQ kernels take their own warps / stages (dq_warps, dq_stages)
        warps, stages = ("dq_warps", "dq_stages") if fname.endswith("_dq") else ("num_warps", "num_stages")
        sig = {n: "constexpr" if n in consts else _TYPES.get(n, "i32") for n in fn.arg_names}
        sig.update(_descriptor_types(plan, fn.arg_names))
        try:
            c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts,
                                         attrs=decode_aot.aligned_pointers(fn, sig)),
                               target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": plan.config[warps], "num_stages": plan.config[stages],
                                        **({"maxnreg": maxnreg} if maxnreg else {})})
        except Exception as e:
            out.append((label, f"COMPILE ERROR {type(e).__name__}: {str(e).splitlines()[0][:300]}"))
            continue
        regs, spill, ptx_txt = decode_aot.ptxas_report(c, tmp)
        tma = ptx_txt.count("cp.async.bulk.tensor")
        out.append((label, f"{regs} registers, {spill} bytes spilled, smem {c.metadata.shared} B, "
                           f"cp.async {ptx_txt.count('cp.async')} (TMA {tma})"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=sorted(VARIANTS))
    ap.add_argument("specs", nargs="*", default=["nsa_paper"])
    ap.add_argument("--config", default="{}", help="config overrides (JSON)")
    ap.add_argument("--maxnreg", type=int, help="register cap per thread passed to the compiler")
    args = ap.parse_args()
    cfg = json.loads(args.config)
    for s in args.specs:
        for name, info in check(args.kernel, s, cfg, args.maxnreg):
            print(f"{s:12s} {json.dumps(cfg)} {name:34s} {info}")


if __name__ == "__main__":
    main()
