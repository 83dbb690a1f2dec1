"""``nsa-tune``: tune a spec's generated kernels on this machine's GPU(s) and cache the result.

    nsa-tune SPEC [--seq-lens 8k,32k,64k] [--kernels fwd,bwd,decode|NAMES] (--trials N | --budget-seconds S)
                  [--batch B] [--workers N] [--seed S] [--force] [-v]
    nsa-tune export FILE      # write every record of the user cache to FILE
    nsa-tune import FILE      # merge FILE's records into the user cache

A second run of the same command is a cache hit (seconds). An interrupted run resumes where it stopped (the
Optuna study is stored beside the cache). Errors: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["main", "parse_seq_lens"]

_GROUPS = ("fwd", "bwd", "decode")


class CliError(Exception):
    pass


def parse_seq_lens(text: str) -> list[int]:
    """``"8k,32k,65536"`` -> [8192, 32768, 65536] (k = 1024, m = 1024**2)."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        mult = 1
        if p[-1] in "km":
            mult = 1024 if p[-1] == "k" else 1024 * 1024
            p = p[:-1]
        try:
            v = int(float(p) * mult)
        except ValueError:
            raise CliError(f"--seq-lens: '{part}' is not a length (e.g. 8k, 32768)") from None
        if v < 1:
            raise CliError(f"--seq-lens: lengths must be positive, got '{part}'")
        out.append(v)
    if not out:
        raise CliError("--seq-lens: give at least one length")
    return out


def _positive(name: str, cast: Any) -> Any:
    # argparse prefixes the message with "argument NAME: ", so the message does not repeat the name
    what = "integer" if cast is int else "number"

    def f(s: str) -> Any:
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive {what}, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {s!r}")
        return v

    return f


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {s!r}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise CliError(message)


def _tune_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nsa-tune", description="Tune the generated NSA kernels of a spec on this GPU.")
    p.add_argument("spec", help="spec name (nsa_paper, ...) or YAML path")
    p.add_argument("--seq-lens", default="8k", help="comma-separated T values, e.g. 8k,32k,64k (default 8k)")
    p.add_argument("--kernels", default="fwd", help="groups fwd,bwd,decode and/or kernel names (default fwd)")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--trials", type=_positive("--trials", int), help="evaluated candidates per kernel and shape"
    )
    g.add_argument(
        "--budget-seconds",
        type=_positive("--budget-seconds", float),
        help="total search time, split evenly over kernels and shapes",
    )
    p.add_argument("--batch", type=_positive("--batch", int), default=1, help="batch size B (default 1)")
    p.add_argument(
        "--workers",
        type=_positive("--workers", int),
        default=1,
        help="worker processes, one GPU each, started once per run, sharing each job's Optuna study",
    )
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument(
        "--compile-jobs",
        type=int,
        default=None,
        help="processes compiling candidates in parallel, per worker (default on a GPU: min(8, cores / "
        "(2 x workers)))",
    )
    p.add_argument(
        "--local-fraction",
        type=_fraction,
        default=None,
        help="share of each job's trials spent last on the best point's one- and two-parameter neighbours "
        "(default 0.6; 0 = the sampler only)",
    )
    p.add_argument("--force", action="store_true", help="search again even if the cache has a record")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log every failed or rejected candidate (stderr)"
    )
    p.add_argument("--sampler", choices=("tpe", "random"), default="tpe", help=argparse.SUPPRESS)
    p.add_argument("--fake", action="store_true", help=argparse.SUPPRESS)  # fake kernel/timer (tests, demos)
    return p


def _select_kernels(spec: Any, names: str, registry: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(kernels to tune, skip messages)."""
    chosen: list[str] = []
    notes: list[str] = []
    for item in [s.strip() for s in names.split(",") if s.strip()]:
        if item in _GROUPS:
            ks = sorted(k for k, d in registry.items() if getattr(d, "pass_", None) == item)
            if not ks:
                notes.append(f"{item}: no {item} kernels are registered in nsa_dsl.codegen yet; skipped")
            chosen += [k for k in ks if k not in chosen]
        elif item in registry:
            if item not in chosen:
                chosen.append(item)
        else:
            known = ", ".join(sorted(registry)) or "none"
            raise CliError(
                f"--kernels: unknown kernel or group '{item}' (groups: fwd, bwd, decode; kernels: {known})"
            )
    out = []
    for k in chosen:
        d = registry[k]
        enabled = getattr(d, "is_enabled", None)
        if callable(enabled) and not enabled(spec):
            notes.append(f"{k}: not used by this spec; skipped")
        else:
            out.append(k)
    return out, notes


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.4f}" if v < 1 else f"{v:.3f}")


def _run_tune(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from nsa_dsl import load_spec

    from . import tune_kernel
    from ._compat import detect_limits, get_registry
    from .search import DeviceBroken, TuneResult, WorkerPool
    from .targets import NoTarget

    if args.verbose:
        import logging

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger("nsa_dsl").addHandler(handler)
        logging.getLogger("nsa_dsl").setLevel(logging.INFO)

    console = Console(width=None if sys.stdout.isatty() else 130)
    spec = load_spec(args.spec)
    seq_lens = parse_seq_lens(args.seq_lens)
    trials = args.trials if args.trials or args.budget_seconds else 32
    extra: dict[str, Any] = {}
    if args.fake:
        from .testing import fake_registry, fake_target_factory, fake_time
        from .timing import FakeTimer

        registry = fake_registry()
        extra = {"registry": registry, "target_factory": fake_target_factory, "timer": FakeTimer(fake_time)}
    else:
        from .schedules import schedule_defs

        registry = {**get_registry(), **schedule_defs()}
    if args.local_fraction is not None:
        extra["local"] = args.local_fraction
    kernels, notes = _select_kernels(spec, args.kernels, registry)
    for n in notes:
        console.print(f"[yellow]note[/]: {n}")
    if not kernels:
        raise CliError(f"--kernels: nothing to tune for '{args.kernels}' (see the notes above)")
    limits = detect_limits()
    if not args.fake:
        import torch

        if getattr(limits, "interpreter", False):
            console.print(
                "[yellow]note[/]: no CUDA device: candidates run in the Triton interpreter (slow; "
                "CPU timings are not GPU timings)"
            )
        elif args.workers > torch.cuda.device_count():
            raise CliError(
                f"--workers: {args.workers} workers need {args.workers} GPUs, "
                f"{torch.cuda.device_count()} visible"
            )
    jobs = [(k, t) for t in seq_lens for k in kernels]
    budget = args.budget_seconds / len(jobs) if args.budget_seconds else None
    console.print(
        f"nsa-tune: spec {spec.name} ({spec.hash}) on {limits.name}; {len(jobs)} kernel x shape jobs, "
        + (f"{trials} trials each" if budget is None else f"{budget:.1f} s each")
        + (f", {args.workers} workers" if args.workers > 1 else "")
    )
    results = []
    failures: list[str] = []
    t0 = time.monotonic()
    # One set of worker processes for the whole run (started at the first job that searches; a dead worker is
    # started again at the next job): starting them costs more than a short search.
    pool_cm: Any = WorkerPool(args.workers) if args.workers > 1 else contextlib.nullcontext(None)
    with (
        pool_cm as pool,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as prog,
    ):
        tasks = [prog.add_task(f"{k} T={t}", total=trials) for k, t in jobs]
        stop = threading.Event()  # a device that broke in this process: no later job can run here

        def run_one(i: int, ranks: list[int] | None) -> TuneResult | None:
            k, t = jobs[i]
            task = tasks[i]
            if stop.is_set():
                prog.update(task, description=f"{k} T={t} (not run)")
                return None

            def cb(done: int, total: int | None, _task: Any = task) -> None:
                prog.update(_task, completed=done, total=total)

            try:
                res = tune_kernel(
                    spec,
                    k,
                    T=t,
                    B=args.batch,
                    limits=limits,
                    trials=None if budget else trials,
                    budget_seconds=budget,
                    seed=args.seed,
                    force=args.force,
                    workers=args.workers,
                    sampler=args.sampler,
                    compile_jobs=args.compile_jobs,
                    progress=cb,
                    pool=pool,
                    ranks=ranks,
                    **extra,
                )
            except NoTarget as e:
                prog.update(task, description=f"{k} T={t} (skipped)")
                console.print(f"[yellow]note[/]: {e}; skipped")
                return None
            except DeviceBroken as e:
                prog.update(task, description=f"{k} T={t} (failed)")
                failures.append(f"{k} T={t}: {e}")
                stop.set()
                return None
            except (RuntimeError, ValueError) as e:
                prog.update(task, description=f"{k} T={t} (failed)")
                failures.append(f"{k} T={t}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}")
                return None
            if res.from_cache:
                prog.update(
                    task, completed=res.trials, total=res.trials or 1, description=f"{k} T={t} (cached)"
                )
            return res

        if pool is None or len(jobs) == 1:
            # one process, or one job that every worker searches (Optuna's distributed optimisation)
            got = [run_one(i, None) for i in range(len(jobs))]
        else:
            # several jobs and workers: each worker takes whole jobs (its own study in the shared journal
            # storage) as it becomes free. H200 x 2, 16 forward jobs of 12 trials: 1.23x less wall time than
            # one worker; both workers on each job's study (as for a single job) gave 0.96x (bench/RESULTS.md)
            free: queue.SimpleQueue[int] = queue.SimpleQueue()
            for r in range(pool.n):
                free.put(r)

            def on_free_worker(i: int) -> TuneResult | None:
                r = free.get()
                try:
                    return run_one(i, [r])
                finally:
                    free.put(r)

            with ThreadPoolExecutor(max_workers=pool.n, thread_name_prefix="nsa-tune-job") as ex:
                got = list(ex.map(on_free_worker, range(len(jobs))))
        results.extend(r for r in got if r is not None)
    table = Table(title=f"nsa-tune {spec.name} on {limits.name} (B={args.batch})")
    for col in ("kernel", "T", "default ms", "tuned ms", "speedup", "trials", "failed", "source", "seconds"):
        table.add_column(col, justify="left" if col in ("kernel", "source") else "right")
    sp = []
    for r in results:
        s = r.speedup
        if s:
            sp.append(s)
        table.add_row(
            r.kernel,
            str(r.T),
            _fmt_ms(r.default_ms),
            _fmt_ms(r.time_ms),
            "-" if s is None else f"{s:.2f}x",
            str(r.trials),
            str(r.failed + r.rejected),
            "cache" if r.from_cache else "tuned",
            f"{r.seconds:.1f}",
        )
    console.print(table)
    if sp:
        gm = math.exp(sum(math.log(x) for x in sp) / len(sp))
        console.print(f"geometric-mean speedup over defaults: {gm:.3f}x; total {time.monotonic() - t0:.1f} s")
    ph = _phase_totals(results)
    if ph:
        # where the searches' time went: compilation is CPU work (--compile-jobs), gate and timing GPU work
        # (--workers); trial phases are summed over workers
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in ph.items())
        console.print(f"search time by phase: {parts} (summed over workers)")
    if failures:
        for f in failures[1:]:
            print(f"nsa-tune: failed: {f}", file=sys.stderr)
        raise CliError(f"{len(failures)} job(s) failed; first: {failures[0]}")
    return 0


def _phase_totals(results: list[Any]) -> dict[str, float]:
    """Seconds per search phase (``PHASES``) summed over the results that were tuned now (not cache hits)."""
    from .search import PHASES

    out: dict[str, float] = {}
    for r in results:
        if not r.from_cache:
            for k in PHASES:
                if k in r.phase_seconds:
                    out[k] = out.get(k, 0.0) + float(r.phase_seconds[k])
    return out


def _run_io(cmd: str, argv: list[str]) -> int:
    from . import export_records, import_records
    from ._compat import tuning_dir

    p = _Parser(prog=f"nsa-tune {cmd}", description=f"{cmd} tuning records")
    p.add_argument("file")
    a = p.parse_args(argv)
    if cmd == "export":
        try:
            n = export_records(a.file)
        except OSError as e:
            raise CliError(f"export: cannot write {a.file}: {e.strerror or e}") from None
        print(f"exported {n} records from {tuning_dir()} to {a.file}")
    else:
        try:
            n = import_records(a.file)
        except ValueError as e:
            raise CliError(str(e)) from None
        print(f"imported {n} records from {a.file} into {tuning_dir()}")
    return 0


def _ensure_interpreter_without_gpu() -> None:
    """Without a CUDA device the generated kernels can only run in Triton's interpreter."""
    import os

    if "TRITON_INTERPRET" in os.environ:
        return
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _ensure_interpreter_without_gpu()
    try:
        if argv and argv[0] in ("export", "import"):
            return _run_io(argv[0], argv[1:])
        args = _tune_parser().parse_args(argv)
        return _run_tune(args)
    except KeyboardInterrupt:
        print("nsa-tune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI reports every error in one line
        from nsa_dsl.spec import SpecError

        if isinstance(e, SpecError):
            for line in str(e).splitlines():
                print(f"nsa-tune: error: {line}", file=sys.stderr)
        else:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if isinstance(e, KeyError) and msg.startswith(("'", '"')):
                msg = msg.strip("'\"")
            print(f"nsa-tune: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
