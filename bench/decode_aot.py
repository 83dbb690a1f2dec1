"""Compile the generated decode kernels ahead of time for sm90 on any machine (no GPU needed) and report
ptxas' registers and spills per kernel: catches GPU-only compile errors and picks register-safe defaults.

Usage: ``python bench/decode_aot.py [SPEC ...] [--config JSON]`` (needs a Triton build with the NVIDIA
backend, e.g. the PyPI wheel).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from nsa_dsl.codegen.plan import DeviceLimits, make_plan  # noqa: E402
from nsa_dsl.codegen.render import render  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import nsa_dsl  # noqa: E402

_TYPES = {
    **dict.fromkeys(("Q", "K", "V", "KC", "VC", "KW", "VW", "GATE", "O"), "*bf16"),
    **dict.fromkeys(
        ("LOGITS", "LSEB", "PM", "PL", "PACC", "OC", "PM2", "PL2", "PACC2", "PMC", "PLC", "PACCC"), "*fp32"
    ),
    **dict.fromkeys(("LENS", "IDX", "CNT"), "*i32"),
    "CAND": "*i64",
}


def _signature(fn, consts: dict) -> dict[str, str]:
    return {n: "constexpr" if n in consts else _TYPES.get(n, "i32") for n in fn.arg_names}


def aligned_pointers(fn, signature: dict) -> dict:
    """The attributes the JIT gives a launch whose tensors are 16-byte aligned (every torch allocation is):
    ``tt.divisibility = 16`` on each pointer argument. Without them loads of 2-byte elements cannot be
    vectorised, and Triton then emits no asynchronous copies at all — a false "unpipelined loop"."""
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
            if signature.get(n, "").startswith("*")}


def _ptxas() -> str:
    from triton.backends.nvidia import compiler

    return compiler.get_ptxas(90).path


def ptxas_report(compiled, tmp: Path) -> tuple[str, str, str]:
    """(registers, bytes spilled, PTX text) of a kernel compiled for sm90: ptxas -v on its PTX."""
    ptx, ptx_txt = tmp / "k.ptx", compiled.asm["ptx"]
    ptx.write_text(ptx_txt)
    res = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp / "k.cubin")],
                         capture_output=True, text=True)
    txt = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", txt)
    spill = re.search(r"(\d+) bytes spill stores", txt)
    return (regs.group(1) if regs else "?"), (spill.group(1) if spill else "?"), ptx_txt


def load_for_sm90(spec_name: str, kernel: str, config: dict) -> tuple[Any, Any, Path]:
    """(plan, imported emitted module, scratch folder) of ``kernel`` for an sm90 card (H100 limits)."""
    h100 = DeviceLimits("H100 (AOT)", (9, 0), 132, 227 * 1024)
    plan = make_plan(nsa_dsl.load_spec(spec_name), kernel, config, h100)
    tmp = Path(tempfile.mkdtemp())
    path = tmp / f"{kernel}_{plan.key}.py"
    path.write_text(render(plan))
    spec = importlib.util.spec_from_file_location(f"aot_{kernel}_{plan.key}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return plan, mod, tmp


def check(spec_name: str, config: dict) -> list[tuple[str, str]]:
    _plan, mod, tmp = load_for_sm90(spec_name, "decode", config)
    variants = [
        # constexprs of one representative split schedule (16 compressed splits, 4 selected/window splits)
        ("cmp (split)", mod._cmp_kernel,
         {"FUSED": False, "FUSE_ALL": False, "DOT_PREC": "tf32", "CMP_PF": True, "SW_PF": True}),
        ("cmp+top-n+slc/win (one launch)", mod._cmp_kernel,
         {"FUSED": True, "FUSE_ALL": True, "DOT_PREC": "tf32", "CMP_PF": False, "SW_PF": True}),
        ("top-n (split)", mod._topk_kernel, {"SC_P": 16, "OC_PROG": -1}),
        ("slc/win (split)", mod._sw_kernel,
         {"FINAL": False, "MERGE": True, "CAND_P": 64, "LAST": False, "DOT_PREC": "tf32", "LAST_TILE": False,
          "SC_P": 4, "SS_P": 4, "CMP_PARTS": True, "SW_PF": False}),
        ("combine", mod._combine_kernel, {}),
        ("combine rows", mod._combine_rows_kernel, {"SC_P": 16, "SS_P": 16, "CMP_PARTS": True}),
    ]
    out = []
    for name, fn, consts in variants:
        consts = {**consts, "PDL": bool(mod.PDL_MODE)}  # as run() passes it (config PDL)
        sig = _signature(fn, consts)
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=aligned_pointers(fn, sig))
        warps = {"top-n (split)": mod.TOPK_WARPS, "combine rows": mod.COMBINE_WARPS}.get(name, mod.NUM_WARPS)
        try:
            c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "num_stages": mod.NUM_STAGES})
        except Exception as e:
            out.append((name, f"COMPILE ERROR {type(e).__name__}: {str(e).splitlines()[0][:300]}"))
            continue
        regs, spill, ptx_txt = ptxas_report(c, tmp)
        out.append((name, f"cp.async {ptx_txt.count('cp.async')} ld.global {ptx_txt.count('ld.global')} "
                          f"griddepcontrol {ptx_txt.count('griddepcontrol.wait')}/"
                          f"{ptx_txt.count('griddepcontrol.launch_dependents')} "
                          f"{regs} registers, {spill} bytes spilled, smem {c.metadata.shared} B"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="*", default=["nsa_paper", "small_group"])
    ap.add_argument("--config", default="{}", help="decode config overrides (JSON)")
    args = ap.parse_args()
    cfg = json.loads(args.config)
    for s in args.specs:
        for name, info in check(s, cfg):
            print(f"{s:12s} {json.dumps(cfg)} {name:32s} {info}")


if __name__ == "__main__":
    main()
