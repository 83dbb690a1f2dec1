"""``nsa-compile``: validate a spec, report its costs, show its derived quantities, emit its kernels.

    nsa-compile SPEC                      validate (SPEC: a YAML path or a built-in name such as nsa_paper)
    nsa-compile SPEC --show               print the normalised YAML and the derived quantities
    nsa-compile SPEC --report             cost table for T = 8k..128k (decode tokens, speedups, FLOP ratios)
    nsa-compile SPEC -o DIR               emit the specialised Triton kernels into DIR

Exit status: 0 on success, 2 when the spec or the arguments are wrong (each problem on its own line on
stderr, no traceback), 1 on an unexpected internal error (one line; set ``NSA_DSL_DEBUG=1`` for the
traceback), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from . import __version__
from .spec import NSASpec, SpecError, list_builtin_specs, load_spec

__all__ = ["compile_main", "report_table", "show_text"]

log = logging.getLogger("nsa_dsl.cli")

DEFAULT_SEQ_LENS = (8192, 16384, 32768, 65536, 131072)
PROG = "nsa-compile"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump, status 2
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Validate an NSA spec, report its costs, and emit its specialised Triton kernels.",
        epilog=f"Built-in specs: {', '.join(list_builtin_specs())}.",
    )
    p.add_argument("spec", metavar="SPEC", help="YAML file or built-in spec name (e.g. nsa_paper)")
    p.add_argument(
        "--report",
        action="store_true",
        help="print decode tokens, expected decode speedup and FLOP ratios vs dense for several T",
    )
    p.add_argument(
        "--seq-lens",
        metavar="T,T,...",
        default=None,
        help="sequence lengths for --report (default: 8k,16k,32k,64k,128k; suffix k = 1024)",
    )
    p.add_argument("--show", action="store_true", help="print the normalised YAML and derived quantities")
    p.add_argument("-o", "--output", metavar="DIR", type=Path, help="emit the generated kernels into DIR")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _parse_seq_lens(text: str | None) -> list[int]:
    if text is None:
        return list(DEFAULT_SEQ_LENS)
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            v = int(part[:-1]) * 1024 if part.endswith("k") else int(part)
        except ValueError:
            raise _UsageError(f"--seq-lens: must be positive integers like 8k,65536, got {part!r}") from None
        if v < 1:
            raise _UsageError(f"--seq-lens: must be positive integers, got {part!r}")
        out.append(v)
    return out


def _fmt_T(t: int) -> str:  # noqa: N802
    return f"{t // 1024}k" if t % 1024 == 0 else str(t)


def report_table(spec: NSASpec, seq_lens: Sequence[int] = DEFAULT_SEQ_LENS):
    """A ``rich.table.Table`` of the cost model at ``seq_lens`` (what ``--report`` prints)."""
    from rich.table import Table

    from .cost import cost_model

    cm = cost_model(spec)
    c, s = spec.compression, spec.selection
    w = spec.window_size
    t = Table(
        title=f"{spec.name}: NSA vs dense causal attention (per KV head, per sequence)",
        caption=(
            f"tokens read per decode step: cmp = floor((T-{c.block})/{c.stride})+1, "
            f"slc = {s.top_n}*{s.block}, win = {w}; paper count = T/{c.stride} + {s.top_n * s.block} + {w} "
            "(Table 4). Speedups are dense/NSA; FLOP ratios count matmul FLOPs of a causal sequence."
        ),
    )
    for name in ("T", "dense tok", "cmp", "slc", "win", "NSA tok", "paper tok", "decode x", "fwd FLOP x"):
        t.add_column(name, justify="right")
    t.add_column("bwd FLOP x", justify="right")
    for T in seq_lens:  # noqa: N806
        r = cm.row(T)
        t.add_row(
            _fmt_T(r["T"]),
            str(r["dense_tokens"]),
            str(r["cmp_tokens"]),
            str(r["slc_tokens"]),
            str(r["win_tokens"]),
            str(r["nsa_tokens"]),
            f"{r['paper_tokens']:g}",
            f"{r['decode_speedup']:.1f}",
            f"{r['forward_flop_ratio']:.1f}",
            f"{r['backward_flop_ratio']:.1f}",
        )
    return t


def show_text(spec: NSASpec) -> str:
    """The normalised YAML followed by the derived quantities as YAML comments (what ``--show`` prints)."""
    from .derived import derive

    dv = derive(spec)
    c, s = spec.compression, spec.selection
    first = dv.overlap_offset
    last = first + len(dv.overlap) - 1
    lines = [
        spec.to_yaml().rstrip("\n"),
        "# --- derived (nsa_dsl.derived) ---",
        f"# hash: {spec.hash}",
        f"# G (query heads per KV head): {spec.G}",
        f"# scale: {spec.scale:.10g}",
        f"# Tc(T) compressed blocks: {dv.Tc}   (0 if T < {c.block})",
        f"# selection blocks: ceiling(T/{s.block})",
        f"# ratio l'/d: {dv.ratio}",
        f"# overlap weights (cmp -> slc, Eq. 9): {list(dv.overlap)} on compressed blocks "
        f"{dv.ratio}j{first:+d} .. {dv.ratio}j{last:+d}  (offset {first})",
        f"# window: {spec.window_size if spec.window_size else 'off'}",
    ]
    return "\n".join(lines) + "\n"


def _emit(spec: NSASpec, outdir: Path, out: TextIO) -> None:
    try:
        from .codegen import emit_to_dir
    except ImportError as e:
        raise _UsageError(
            f"-o: kernel emission is not available in this build (nsa_dsl.codegen: {e})"
        ) from None
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _UsageError(f"-o: cannot create directory '{outdir}': {e.strerror or e}") from None
    paths = emit_to_dir(spec, outdir, config=None)
    print(f"wrote {len(paths)} file(s) to {outdir}", file=out)
    for p in paths:
        print(f"  {p}", file=out)


def compile_main(argv: Sequence[str] | None = None) -> int:
    """The ``nsa-compile`` entry point. Returns the exit status (0 ok, 2 bad spec/arguments, 1 internal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out, err = sys.stdout, sys.stderr
    try:
        args = _parser().parse_args(argv)
        seq_lens = _parse_seq_lens(args.seq_lens)
        spec = load_spec(args.spec)
        if args.show:
            out.write(show_text(spec))
        if args.report:
            from rich.console import Console

            Console(file=out, width=max(120, Console(file=out).width)).print(report_table(spec, seq_lens))
        if args.output is not None:
            _emit(spec, args.output, out)
        if not (args.show or args.report or args.output is not None):
            print(f"{spec.name}: OK (hash {spec.hash})", file=out)
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=err)
        return 130
    except SystemExit as e:  # --help / --version
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except SpecError as e:
        for line in e.messages():
            print(f"{PROG}: error: {line}", file=err)
        return 2
    except _UsageError as e:
        print(f"{PROG}: error: {e}", file=err)
        return 2
    except (ValueError, OSError) as e:
        if os.environ.get("NSA_DSL_DEBUG"):
            raise
        for line in [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]:
            print(f"{PROG}: error: {line}", file=err)
        return 2
    except Exception as e:  # noqa: BLE001 - the CLI never shows a traceback unless asked
        if os.environ.get("NSA_DSL_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        print(
            f"{PROG}: internal error: {type(e).__name__}: {msg} (NSA_DSL_DEBUG=1 shows the traceback)",
            file=err,
        )
        return 1


def main() -> None:  # pragma: no cover - console-script shim
    sys.exit(compile_main())


if __name__ == "__main__":  # pragma: no cover
    main()
