"""The search: an Optuna study over a kernel's pruned space, one record per (device, versions, spec, kernel,
shape bucket).

Every evaluated trial compiles the candidate (``target.build``), checks its output against the reference on a
small input (``target.gate``; a wrong candidate is a failed trial and can never win) and times it with the
injected timer. Invalid points (``KernelDef.check`` + the tuner's device checks) are pruned before compiling;
points already evaluated reuse their result. Compile errors and out-of-resource errors are failed trials.

The study lives in an Optuna journal file under ``<cache_root>/tuning/studies/`` named after the record
key, so an interrupted run resumes where it stopped and several worker processes (one per GPU) can share it.

Several GPUs (``--workers N``): a ``WorkerPool`` starts N processes once (worker i sees only GPU i) and keeps
them, with their compile pools, for every kernel x shape job of a run; each job goes to all of them and they
share its study and its trial budget (a trial another live worker has taken counts against the budget and is
not proposed twice). Worker 0 then re-times the best candidates (its target and kernels are loaded already)
and this process chooses, by the same rule as with one worker.

Sampler: TPE (seeded, multivariate). The spaces are small, categorical and structured (tiles x warps x
stages x schedule), where a model of good vs bad points can beat uniform sampling; Optuna's CMA-ES leaves
categorical parameters to its independent fallback sampler, and a grid is too slow beyond a few hundred
points. TPE vs random was measured with ``bench/tuning_replay.py`` (a measured grid replayed over many
seeds): see bench/RESULTS.md "## Autotuning". The last ``LOCAL_FRACTION`` of a trial budget is a local search
instead: the one- and two-parameter neighbours of the best point so far, nearest first (the per-architecture
defaults are hand-tuned, and on the measured grid the best point differed from the default in two coupled
parameters, which TPE alone found in 16 of 40 replayed seeds and the local phase in 39). When the trial
budget covers every valid point the search is exhaustive.

The choice is deterministic: the best few candidates and the default are re-timed, then every candidate
within ``tie_tol`` (relative) of the best counts as tied and the tie goes to the default config if it is
tied, else to the candidate whose canonical config JSON sorts first. Every process reading the same study
picks the same one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._compat import detect_limits, get_kernel_def, tuning_dir
from .keys import canonical, key_fields, record_key
from .space import default_neighbours, full_config, grid_size, valid_points, why_invalid
from .space import neighbours as _neighbours
from .timing import Candidate, default_timer

__all__ = [
    "TuneResult",
    "CandidateRejected",
    "DeviceBroken",
    "tune_kernel",
    "choose",
    "study_storage",
    "open_study",
    "run_search",
    "evaluated_trials",
    "journal_path",
    "WorkerPool",
    "WorkerError",
]

log = logging.getLogger("nsa_dsl.tuning.search")

DEFAULT_TIE_TOL = 0.02
#: Share of a trial budget spent on the default's one-parameter neighbours before the sampler (see
#: ``tune_kernel``); the value is the one chosen with ``bench/tuning_replay.py`` (bench/RESULTS.md).
NEIGHBOUR_FRACTION = 0.0
#: Share of a trial budget spent last on the best point's one- and two-parameter neighbours (a local search
#: around the incumbent, nearest first, see ``tune_kernel``); chosen with ``bench/tuning_replay.py``
#: (bench/RESULTS.md).
LOCAL_FRACTION = 0.6
#: Parameters the local phase moves at once (1 or 2): two escapes the local optima where the better point
#: differs in two coupled parameters (num_warps and num_stages on the measured slc_topk grid).
LOCAL_MAX_PARAMS = 2
#: Grids up to this many points are listed and pruned up front (exhaustive search possible); larger ones
#: are pruned point by point as the sampler proposes them.
MAX_ENUMERATE = 20000


class CandidateRejected(RuntimeError):
    """A candidate's output disagreed with the reference (the correctness gate)."""


class _TrialFailed(RuntimeError):
    """Internal: an evaluated trial failed (compile error, out of resources, rejected by the gate)."""


class DeviceBroken(RuntimeError):
    """A candidate left this process's CUDA context unusable (a sticky error such as an illegal memory
    access): every later candidate in this process would fail too, so the search stops. The candidate is
    recorded as failed in the study, so a rerun (a fresh process) resumes without trying it again."""


@dataclass
class TuneResult:
    """Outcome of tuning one kernel at one shape bucket."""

    kernel: str
    T: int
    B: int
    key: str
    config: dict[str, Any]
    time_ms: float | None
    default_config: dict[str, Any]
    default_ms: float | None
    trials: int = 0  # evaluated (compiled) candidates in the study
    failed: int = 0  # compile / resource failures
    rejected: int = 0  # wrong output (correctness gate)
    invalid: int = 0  # pruned before compiling
    grid: int = 0  # valid points in the pruned grid
    seconds: float = 0.0
    from_cache: bool = False
    fields: dict[str, Any] = field(default_factory=dict)
    #: wall seconds per phase of this search (``PHASES``; trial phases summed over workers)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        if self.time_ms and self.default_ms:
            return self.default_ms / self.time_ms
        return None

    def to_record(self) -> dict[str, Any]:
        from nsa_dsl import __version__

        return {
            "fields": self.fields,
            "config": self.config,
            "time_ms": self.time_ms,
            "default_config": self.default_config,
            "default_ms": self.default_ms,
            "trials": self.trials,
            "failed": self.failed,
            "rejected": self.rejected,
            "grid": self.grid,
            "tuning_seconds": round(self.seconds, 3),
            "phase_seconds": self.phase_seconds,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "nsa_dsl": __version__,
        }


# ----------------------------------------------------------------------------------------------------------
# storage
# ----------------------------------------------------------------------------------------------------------


def journal_path(path: str | os.PathLike[str] | None, key: str) -> Path:
    """The study's journal file: ``path``, or (None) ``<cache_root>/tuning/studies/<key>.journal``."""
    return Path(path) if path is not None else tuning_dir() / "studies" / f"{key}.journal"


def study_storage(path: str | os.PathLike[str] | None, key: str) -> tuple[Any, str]:
    """(Optuna JournalStorage, study name) for a record key; ``path`` None = the default journal file."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    p = journal_path(path, key)
    p.parent.mkdir(parents=True, exist_ok=True)
    backend = JournalFileBackend(str(p), lock_obj=JournalFileOpenLock(str(p) + ".lock"))
    _ = optuna  # imported for its side effects on logging config below
    return JournalStorage(backend), f"nsa-tune:{key}"


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    import optuna

    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(old)


#: Samplers the search accepts (``tpe`` is the default; the others are for measured comparisons).
SAMPLERS = ("tpe", "gp", "random")


def _sampler(name: str, seed: int, n_startup: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=n_startup)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler: must be one of {', '.join(SAMPLERS)}, got {name!r}")


def open_study(storage: Any, name: str, *, sampler: str = "tpe", seed: int = 0, n_startup: int = 8) -> Any:
    import optuna

    with _quiet_optuna():
        return optuna.create_study(
            study_name=name,
            storage=storage,
            direction="minimize",
            sampler=_sampler(sampler, seed, n_startup),
            load_if_exists=True,
        )


def evaluated_trials(study: Any) -> list[Any]:
    """Trials that compiled a candidate (complete, not duplicates) or failed while doing so."""
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get("duplicate"):
            out.append(t)
        elif t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("evaluated"):
            out.append(t)
    return out


# ----------------------------------------------------------------------------------------------------------
# objective
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    kdef: Any
    spec: Any
    limits: Any
    space: dict[str, list[Any]]
    target: Any
    timer: Callable[[Candidate], float]


def _evaluate(ctx: _Ctx, cfg: dict[str, Any], phases: dict[str, float] | None = None) -> float:
    """Compile, gate, time one config; raises on failure (message says which step). ``phases`` (optional)
    receives the wall seconds of each step: ``build`` (compile or load), ``gate`` and ``timing``."""
    clock = _PhaseClock(phases)
    try:
        with clock("build"):
            built = ctx.target.build(cfg)
    except Exception as e:
        raise _TrialFailed(f"compile: {type(e).__name__}: {_first_line(e)}") from e
    try:
        with clock("gate"):
            why = ctx.target.gate(built, cfg)
    except Exception as e:
        raise _TrialFailed(f"run: {type(e).__name__}: {_first_line(e)}") from e
    if why:
        raise CandidateRejected(f"gate: {why}")
    cand = ctx.target.candidate(built, cfg)
    try:
        with clock("timing"):
            ms = float(ctx.timer(cand))
    except Exception as e:
        raise _TrialFailed(f"timing: {type(e).__name__}: {_first_line(e)}") from e
    if not ms == ms or ms <= 0:  # NaN or nonsense
        raise _TrialFailed(f"timing: invalid time {ms!r}")
    return ms


class _PhaseClock:
    """``with clock(name):`` adds the block's wall seconds to ``phases[name]`` (no-op for ``phases`` None)."""

    def __init__(self, phases: dict[str, float] | None) -> None:
        self.phases = phases

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            if self.phases is not None:
                self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - t0


#: The phases of a search whose wall seconds ``TuneResult.phase_seconds`` sums (trial phases over all
#: workers, then the confirmation): where tuning time goes, e.g. whether more GPUs (``--workers``) or more
#: compile processes would shorten it.
PHASES = ("precompile", "build", "gate", "timing", "confirm")


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else ""


def _start_time(pid: int) -> str:
    """Process ``pid``'s start time in clock ticks since boot (Linux ``/proc``), or "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


_TOKENS: dict[int, str] = {}


def _process_token() -> str:
    """``host:pid:start time`` of this process: names it uniquely, also after its pid is reused."""
    import socket

    pid = os.getpid()
    if pid not in _TOKENS:
        _TOKENS[pid] = f"{socket.gethostname()}:{pid}:{_start_time(pid)}"
    return _TOKENS[pid]


def _token_alive(token: Any) -> bool:
    """Whether the process a ``_process_token`` names is still running (only processes of this host are
    checked; others count as gone)."""
    import socket

    try:
        host, pid_s, start = str(token).rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    return _start_time(pid) == start  # a reused pid is another process


def _busy_elsewhere(study: Any) -> dict[str, int]:
    """Configs (canonical JSON -> count) of the trials another live process of this host has taken and not
    finished: their outcome is coming. A trial left RUNNING by a dead process (interrupted, killed) is not
    counted, so its point is tried again."""
    import optuna

    me = _process_token()
    live: dict[str, bool] = {}
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        tok = t.user_attrs.get("taken_by")
        c = t.user_attrs.get("config")
        if tok is None or tok == me or c is None:
            continue
        if tok not in live:
            live[tok] = _token_alive(tok)
        if live[tok]:
            out[c] = out.get(c, 0) + 1
    return out


def _propose(study: Any, ctx: _Ctx) -> tuple[Any, dict[str, Any] | None]:
    """Ask the sampler for a trial. Invalid points, points already evaluated and points another live worker
    is evaluating are told at once (pruned / the earlier value) and come back with config None; otherwise
    (trial, config to evaluate), marked with this process's id (``worker``) as taken."""
    import optuna

    trial = study.ask()
    point = {p: trial.suggest_categorical(p, list(ctx.space[p])) for p in sorted(ctx.space)}
    cfg = full_config(ctx.kdef, ctx.spec, point, ctx.limits)
    c = canonical(cfg)
    trial.set_user_attr("config", c)
    why = why_invalid(ctx.kdef, ctx.spec, cfg, ctx.limits)
    if why:
        trial.set_user_attr("invalid", why)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return trial, None
    for t in study.get_trials(deepcopy=False):
        if t.number == trial.number or t.user_attrs.get("config") != c:
            continue
        if t.state == optuna.trial.TrialState.COMPLETE:
            trial.set_user_attr("duplicate", True)
            study.tell(trial, float(t.value))
            return trial, None
        if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("evaluated"):
            trial.set_user_attr("duplicate", True)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return trial, None
    if c in _busy_elsewhere(study):  # another worker is on it: its result will be in the study
        trial.set_user_attr("duplicate", True)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return trial, None
    trial.set_user_attr("worker", os.getpid())
    trial.set_user_attr("taken_by", _process_token())
    return trial, cfg


def _enqueue_local(study: Any, ctx: _Ctx, n: int) -> None:
    """Queue up to ``n`` valid neighbours (``LOCAL_MAX_PARAMS`` parameters moved at most) of the study's best
    point, nearest first, that no trial holds yet, so that the next ``study.ask()`` calls return them
    (``run_search``'s local phase)."""
    import optuna

    trials = study.get_trials(deepcopy=False)  # one read of the (shared) storage
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return
    best = min(done, key=lambda t: (t.value, t.number))
    taken = {t.user_attrs.get("config") for t in trials}
    waiting = {
        canonical(full_config(ctx.kdef, ctx.spec, t.params, ctx.limits))
        for t in trials
        if t.state == optuna.trial.TrialState.WAITING
    }
    for nb in _neighbours(dict(best.params), ctx.space, max_params=LOCAL_MAX_PARAMS):
        if n <= 0:
            break
        cfg = full_config(ctx.kdef, ctx.spec, nb, ctx.limits)
        c = canonical(cfg)
        if c in taken or c in waiting or why_invalid(ctx.kdef, ctx.spec, cfg, ctx.limits):
            continue
        study.enqueue_trial(nb)
        waiting.add(c)
        n -= 1


def _finish(study: Any, ctx: _Ctx, trial: Any, cfg: dict[str, Any], precompile_s: float = 0.0) -> None:
    """Evaluate one proposed config and tell the study. ``evaluated`` is set only once the outcome is known:
    an interrupted trial (Ctrl-C, killed worker) stays RUNNING, does not count, and is tried again later.
    The trial keeps its phases' wall seconds (user attribute ``phases``; ``precompile_s``: its share of the
    parallel precompilation of its batch)."""
    import optuna

    c = canonical(cfg)
    trial.set_user_attr("worker", os.getpid())
    phases: dict[str, float] = {"precompile": precompile_s} if precompile_s else {}
    try:
        ms = _evaluate(ctx, cfg, phases)
    except CandidateRejected as e:
        trial.set_user_attr("phases", _rounded(phases))
        trial.set_user_attr("rejected", str(e))
        trial.set_user_attr("evaluated", True)
        log.info("candidate %s rejected: %s", c, e)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    except _TrialFailed as e:
        trial.set_user_attr("phases", _rounded(phases))
        trial.set_user_attr("error", str(e))
        trial.set_user_attr("evaluated", True)
        log.info("candidate %s failed: %s", c, e)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        broken = _device_broken()
        if broken:
            raise DeviceBroken(
                f"kernel {ctx.kdef.name}: candidate {c} left the CUDA context unusable ({broken}); "
                "stopped (it is recorded as failed: a rerun resumes without it)"
            ) from e
        return
    trial.set_user_attr("phases", _rounded(phases))
    trial.set_user_attr("evaluated", True)
    study.tell(trial, ms)


def _rounded(phases: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in phases.items()}


def run_search(
    study: Any,
    ctx: _Ctx,
    *,
    trials: int | None,
    budget_seconds: float | None,
    n_valid: int,
    progress: Callable[[int, int | None], None] | None = None,
    max_attempts: int | None = None,
    precompile: Any = None,
    share: int = 1,
    local: float = 0.0,
) -> None:
    """Run trials until the study holds ``trials`` evaluated candidates (counted study-wide, so several
    workers share one budget), the time budget is spent, or every valid point has been evaluated.

    ``precompile`` (a ``Precompiler``): proposals are taken in batches of its size and compiled in parallel
    processes (Triton's on-disk cache) before they are evaluated one by one here. ``share``: the number of
    workers searching the study at once; a batch takes at most 1/share of the trials still to run, so that
    the first worker to ask does not take most of them while the others wait. ``local``: the last fraction of
    a ``trials`` budget goes to the one- and two-parameter neighbours of the best point so far (nearest first,
    each once), instead of the sampler's proposals; the sampler takes over when they are exhausted."""
    t0 = time.monotonic()
    target = min(trials, n_valid) if trials is not None else n_valid
    attempts = 0
    cap = max_attempts if max_attempts is not None else 30 * max(target, 1) + 100
    batch = max(1, getattr(precompile, "jobs", 1))
    with _quiet_optuna():
        while True:
            done = len(evaluated_trials(study))
            if progress:
                progress(done, target if trials is not None else None)
            if done >= target:
                break
            if budget_seconds is not None and time.monotonic() - t0 >= budget_seconds:
                break
            if attempts >= cap:
                log.warning("search stopped after %d attempts with %d evaluated candidates", attempts, done)
                break
            # Trials other workers are evaluating count against the shared budget: the study ends at the
            # budget instead of each worker taking a last batch of its own; if they cover the rest, wait.
            busy = sum(_busy_elsewhere(study).values())
            if done + busy >= target:
                time.sleep(0.05)
                continue
            want = min(batch, target - done - busy, -(-(target - done) // max(1, share)))
            if trials is not None and local > 0 and done >= target - round(local * target):
                _enqueue_local(study, ctx, want)
            todo: list[tuple[Any, dict[str, Any]]] = []
            seen: set[str] = set()
            while len(todo) < want and attempts < cap:
                attempts += 1
                trial, cfg = _propose(study, ctx)
                if cfg is None:
                    continue
                c = canonical(cfg)
                if c in seen:  # the same point twice in one batch: keep one
                    trial.set_user_attr("duplicate", True)
                    import optuna

                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    continue
                seen.add(c)
                todo.append((trial, cfg))
            each = 0.0
            if precompile is not None and len(todo) > 1:
                t1 = time.monotonic()
                precompile.warm([cfg for _, cfg in todo])
                each = (time.monotonic() - t1) / len(todo)
            for trial, cfg in todo:
                _finish(study, ctx, trial, cfg, precompile_s=each)
                if progress:
                    progress(len(evaluated_trials(study)), target if trials is not None else None)


# ----------------------------------------------------------------------------------------------------------
# parallel compilation
# ----------------------------------------------------------------------------------------------------------

_POOLS: dict[int, Any] = {}
_CHILD_TARGETS: dict[tuple, Any] = {}


def _shutdown_pools(wait: bool = False) -> None:
    for p in _POOLS.values():
        p.shutdown(wait=wait, cancel_futures=True)
    _POOLS.clear()


def _precompile_one(desc: tuple, config: dict[str, Any]) -> str | None:
    """In a pool process: build the candidate and run its gate once, which makes Triton compile it into its
    on-disk cache (shared with the parent). Returns an error line or None; errors are the parent's to find."""
    spec_d, kernel, T, B, limits, factory = desc  # noqa: N806
    from . import _TUNING

    _TUNING.set(True)  # lookups made here never start a tuning run of their own (NSA_DSL_AUTOTUNE)
    try:
        tgt = _CHILD_TARGETS.get(desc[:4])
        if tgt is None:
            import json

            from nsa_dsl.spec import NSASpec

            tgt = _make_target(factory, NSASpec.from_dict(json.loads(spec_d)), kernel, T, B, limits, None)
            _CHILD_TARGETS.clear()  # one job at a time: the previous job's target (its gate inputs) goes
            _CHILD_TARGETS[desc[:4]] = tgt
        built = tgt.build(config)
        tgt.gate(built, config)
        return None
    except BaseException as e:  # noqa: BLE001 - reported by the parent's own evaluation
        return f"{type(e).__name__}: {_first_line(e)}"


def _watch_parent(parent_pid: int) -> None:
    """Compile-pool initializer: exit once the pool's owner is gone (a terminated or killed tuning worker
    cannot shut its pool down; its idle pool processes would otherwise wait for work forever)."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="nsa-tune-parent-watch", daemon=True).start()


class Precompiler:
    """Compiles batches of candidates in ``jobs`` spawned processes (each a CUDA context on the same GPU),
    so that the sequential, timed evaluation in the parent finds every kernel in Triton's cache. Compilation,
    not running, dominates a tuning run: this is where the CPU cores of the GPU host are used."""

    def __init__(
        self,
        jobs: int,
        spec: Any,
        kernel: str,
        T: int,
        B: int,
        limits: Any,  # noqa: N803
        target_factory: Callable[..., Any] | None = None,
        timeout_s: float = 600.0,
    ):
        self.jobs = int(jobs)
        self.desc = (canonical_spec(spec), kernel, int(T), int(B), limits, target_factory)
        self.timeout_s = timeout_s

    def _pool(self) -> Any:
        import atexit
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = _POOLS.get(self.jobs)
        if pool is None:
            if not _POOLS:
                atexit.register(_shutdown_pools)
            pool = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=mp.get_context("spawn"),
                initializer=_watch_parent,
                initargs=(os.getpid(),),
            )
            _POOLS[self.jobs] = pool
        return pool

    def warm(self, configs: list[dict[str, Any]]) -> list[str | None]:
        from concurrent.futures import wait

        try:
            futs = [self._pool().submit(_precompile_one, self.desc, dict(c)) for c in configs]
        except Exception as e:  # a broken pool only costs speed
            log.warning("parallel compilation unavailable (%s); compiling in the search process", e)
            _shutdown_pools()
            return [None] * len(configs)
        wait(futs, timeout=self.timeout_s)
        out: list[str | None] = []
        for f in futs:
            try:
                out.append(f.result(timeout=0))
            except Exception as e:
                out.append(f"{type(e).__name__}: {_first_line(e)}")
        return out


def canonical_spec(spec: Any) -> str:
    return canonical(spec.to_dict())


def auto_compile_jobs(workers: int = 1) -> int:
    """Parallel compile processes of each of ``workers`` search processes: 0 on CPU / the interpreter
    (nothing to compile), else min(8, cores / (2 * workers)). Each worker gets its own share of half the
    cores, up to 8, so that with ``--workers`` the host's compile throughput grows with the GPUs where cores
    allow (a search is mostly compilation: ``TuneResult.phase_seconds``)."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return 0
    return max(0, min(8, (os.cpu_count() or 2) // (2 * max(1, workers))))


# ----------------------------------------------------------------------------------------------------------
# choice
# ----------------------------------------------------------------------------------------------------------


def choose(times: dict[str, float], *, default: str | None = None, tie_tol: float = DEFAULT_TIE_TOL) -> str:
    """The winning canonical config among ``times`` (canonical JSON -> ms). Every config within ``tie_tol`` of
    the fastest is tied; ties go to ``default`` if it is tied, else to the lexicographically first JSON."""
    if not times:
        raise ValueError("times: no candidate to choose from")
    best = min(times.values())
    tied = sorted(c for c, ms in times.items() if ms <= best * (1.0 + tie_tol))
    if default is not None and default in tied:
        return default
    return tied[0]


def _study_times(study: Any) -> dict[str, float]:
    import optuna

    out: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get("duplicate"):
            c = t.user_attrs["config"]
            out[c] = min(out.get(c, float("inf")), float(t.value))
    return out


def _study_phases(study: Any) -> dict[str, float]:
    """Wall seconds per trial phase (``PHASES`` but ``confirm``), summed over the study's evaluated trials
    (all workers': with N workers the sum can exceed the search's wall time)."""
    out = {k: 0.0 for k in PHASES if k != "confirm"}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("evaluated"):
            for k, v in (t.user_attrs.get("phases") or {}).items():
                if k in out:
                    out[k] += float(v)
    return {k: round(v, 3) for k, v in out.items()}


def _study_counts(study: Any) -> dict[str, int]:
    import optuna

    counts = {"trials": 0, "failed": 0, "rejected": 0, "invalid": 0}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("invalid"):
            counts["invalid"] += 1
        if t.user_attrs.get("evaluated"):
            counts["trials"] += 1
            if t.state == optuna.trial.TrialState.FAIL:
                counts["rejected" if t.user_attrs.get("rejected") else "failed"] += 1
    return counts


# ----------------------------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------------------------


def _confirm(
    study: Any, ctx: _Ctx, default_cfg: dict[str, Any], *, kernel: str, confirm: int, tie_tol: float
) -> tuple[dict[str, float], float | None]:
    """(candidate times to choose from, the default's time) after a search: the study's times plus the
    default (measured now if the study lacks it), then, with ``confirm`` > 0, fresh readings of the candidates
    near the best and of the default. Empty times: every candidate failed."""
    times = _study_times(study)
    dc = canonical(default_cfg)
    default_ms = times.get(dc)
    if default_ms is None:
        try:
            default_ms = _evaluate(ctx, default_cfg)
        except Exception as e:  # the default itself failed: record it, any valid candidate beats it
            log.warning("kernel %s: the default config failed (%s)", kernel, _first_line(e))
    if default_ms is not None and dc not in times:
        # The default is always a candidate, also when it is not a point of the space (a KernelDef whose
        # default omits a parameter the space lists): the result is never slower than the default.
        times[dc] = default_ms
    if not times:
        return times, default_ms

    # Confirmation: re-time the candidates near the best (within 2 * tie_tol, at most ``confirm`` of them, by
    # time then JSON) and the default, in a fixed order; the choice is made among these fresh readings so that
    # one lucky reading cannot decide.
    if confirm > 0 and len(times) > 1:
        best = min(times.values())
        near = sorted((c for c in times if times[c] <= best * (1 + 2 * tie_tol)), key=lambda c: (times[c], c))
        ranked = near[: max(confirm, 1)]
        if default_ms is not None and dc in times and dc not in ranked:
            ranked.append(dc)
        fresh: dict[str, float] = {}
        for c in sorted(ranked):
            try:
                fresh[c] = _evaluate(ctx, _cfg_from_canonical(c))
            except Exception as e:
                log.warning("re-timing %s failed (%s); dropped", c, _first_line(e))
        if fresh:
            times = fresh
            default_ms = fresh.get(dc, default_ms)
    return times, default_ms


def _in_grid(point: dict[str, Any], space: dict[str, list[Any]]) -> bool:
    return all(p in point and point[p] in space[p] for p in space)


def tune_kernel(
    spec: Any,
    kernel: str,
    *,
    T: int,  # noqa: N803
    B: int = 1,  # noqa: N803
    limits: Any = None,
    trials: int | None = 32,
    budget_seconds: float | None = None,
    timer: Callable[[Candidate], float] | None = None,
    target: Any = None,
    target_factory: Callable[..., Any] | None = None,
    registry: dict[str, Any] | None = None,
    seed: int = 0,
    sampler: str = "tpe",
    storage_path: str | os.PathLike[str] | None = None,
    tie_tol: float = DEFAULT_TIE_TOL,
    confirm: int = 4,
    save: bool = True,
    force: bool = False,
    workers: int = 1,
    compile_jobs: int | None = None,
    device: Any = None,
    progress: Callable[[int, int | None], None] | None = None,
    pool: WorkerPool | None = None,
    ranks: list[int] | None = None,
    neighbours: float = NEIGHBOUR_FRACTION,
    local: float = LOCAL_FRACTION,
) -> TuneResult:
    """Tune ``kernel`` of ``spec`` for shape (T, B) and store the record in the user cache.

    ``trials``: evaluated candidates (None = until ``budget_seconds`` or the grid is exhausted).
    ``timer`` (default ``EventTimer``) and ``target`` (default ``targets.default_target``) are injectable.
    ``force``: search even when the user cache already holds a record (otherwise that record is returned
    at once). ``workers`` > 1: that many processes, worker i pinned to GPU i through ``CUDA_VISIBLE_DEVICES``,
    sharing the study's journal storage (Optuna's distributed optimisation); they are started for this call
    only. ``pool``: an open ``WorkerPool`` that runs the search instead (its size decides; ``workers`` is
    ignored), so that several calls share one set of started workers (``nsa-tune`` does this); ``ranks``:
    the pool's workers that search this job (default all; several threads may tune different jobs on
    disjoint ranks at once). With workers, the first of them re-times the best candidates on its GPU and
    this process chooses; workers build their targets with ``target_factory`` (a ``target`` object stays in
    this process and is not used by them).
    ``compile_jobs``: processes that compile each batch of candidates in parallel before they are timed
    (None = ``auto_compile_jobs(workers)`` per worker; 0 or 1 = compile in the search process).
    ``neighbours``: the fraction of ``trials`` spent first on the default's valid one-parameter neighbours
    (``space.default_neighbours``, nearest first), before the sampler proposes; 0 = none. ``local``: the
    fraction of ``trials`` spent last on the one- and two-parameter neighbours of the best point found so far
    (a local search around the incumbent; ``space.neighbours``); 0 = none.
    """
    from . import _memory_put
    from .store import user_store

    t_start = time.monotonic()
    kdef = get_kernel_def(kernel, registry)
    if limits is None:
        limits = detect_limits(device)
    fields = key_fields(spec, kernel, T=T, B=B, limits=limits)
    key = record_key(fields)
    default_cfg = dict(kdef.default(spec, limits))
    if trials is not None and trials < 1:
        raise ValueError(f"trials: must be >= 1, got {trials}")
    if trials is None and budget_seconds is None:
        raise ValueError("trials: give a trial count or budget_seconds")

    if not force:
        from . import _usable

        rec = user_store().get(key, fields)
        if (
            rec is not None
            and _usable(rec["config"], kdef, spec, limits, "cached", rec.get("default_config")) is None
        ):
            rec = None  # stale for the current generator: tune again
        if rec is not None:
            _memory_put(key, rec["config"])
            return TuneResult(
                kernel=kernel,
                T=T,
                B=B,
                key=key,
                config=dict(rec["config"]),
                time_ms=rec.get("time_ms"),
                default_config=dict(rec.get("default_config") or default_cfg),
                default_ms=rec.get("default_ms"),
                trials=int(rec.get("trials", 0)),
                failed=int(rec.get("failed", 0)),
                rejected=int(rec.get("rejected", 0)),
                grid=int(rec.get("grid", 0)),
                seconds=time.monotonic() - t_start,
                from_cache=True,
                fields=fields,
            )

    space = kdef.space(spec, limits)
    gsize = grid_size(space)
    if gsize <= MAX_ENUMERATE:
        good, _bad = valid_points(kdef, spec, limits)
        n_valid = len(good)
    else:  # too many points to list: the search prunes as it goes, and is never exhaustive
        good, n_valid = [], gsize
    if gsize <= MAX_ENUMERATE and not good:
        raise RuntimeError(f"kernel {kernel}: no valid point in its search space for this spec and device")
    storage, name = study_storage(storage_path, key)
    n_startup = max(4, min(10, (trials or 32) // 4))
    exhaustive = bool(good) and trials is not None and trials >= len(good)
    if exhaustive:
        sampler = "random"  # every valid point is enqueued; the model-based sampler would only cost time
    study = open_study(storage, name, sampler=sampler, seed=seed, n_startup=n_startup)
    if not study.get_trials(deepcopy=False):
        # The default goes first (it is the baseline); an exhaustive budget enqueues the whole grid.
        dpoint = {p: default_cfg.get(p) for p in space}
        first = (
            [dpoint]
            if _in_grid(dpoint, space) and why_invalid(kdef, spec, default_cfg, limits) is None
            else []
        )
        if exhaustive:
            first += [{p: c[p] for p in space} for c in good]
        elif first and neighbours > 0:
            # an optional local search around the default first (a model-based sampler rarely proposes
            # one-parameter moves in a large space; on the measured slc_topk grid it did worse than TPE alone)
            n_nb = int(neighbours * (trials if trials is not None else 32))
            for nb in default_neighbours(dpoint, space):
                if n_nb <= 0:
                    break
                if why_invalid(kdef, spec, full_config(kdef, spec, nb, limits), limits) is None:
                    first.append(nb)
                    n_nb -= 1
        seen: set[str] = set()
        for p in first:
            cp = canonical(p)
            if cp not in seen:
                seen.add(cp)
                study.enqueue_trial(p, skip_if_exists=True)

    # The target first: a kernel without one (``NoTarget``) is refused here, before any worker is busy.
    if target is None:
        target = _make_target(target_factory, spec, kernel, T, B, limits, device)
    use_pool = pool is not None or workers > 1
    if use_pool:
        n = pool.n if pool is not None else workers
        on = list(range(n)) if ranks is None else [int(r) for r in ranks]
        if not on or any(not 0 <= r < n for r in on) or len(set(on)) != len(on):
            raise ValueError(f"ranks: distinct worker ranks in 0..{n - 1}, got {ranks!r}")
        job = dict(
            spec=spec.to_dict(),
            kernel=kernel,
            T=T,
            B=B,
            limits=limits,
            trials=trials,
            budget_seconds=budget_seconds,
            timer=timer,
            target_factory=target_factory,
            registry=registry,
            seed=seed,
            sampler=sampler,
            # resolved here: a worker started earlier may have another cache root in its environment
            journal=str(journal_path(storage_path, key)),
            key=key,
            n_startup=n_startup,
            n_valid=n_valid,
            # every worker of the pool is busy at once (with this job or another): the CPU split counts n
            compile_jobs=auto_compile_jobs(n) if compile_jobs is None else int(compile_jobs),
            share=len(on),
            local=local,
        )
        goal = min(trials, n_valid) if trials is not None else None

        def poll() -> None:
            if progress:
                progress(len(evaluated_trials(study)), goal)

        # The search on the job's workers, then the confirmation on the first of them, whose target and
        # kernels are loaded already (and once every worker has finished: it reads the complete study).
        check = {**job, "op": "confirm", "default": default_cfg, "confirm": confirm, "tie_tol": tie_tol}
        with contextlib.ExitStack() as stack:
            p = pool if pool is not None else stack.enter_context(WorkerPool(workers))
            p.run_job(job, progress=poll, ranks=on)
            t_confirm = time.monotonic()
            times, default_ms = p.run_job(check, ranks=on[:1])[on[0]]
            t_confirm = time.monotonic() - t_confirm
    else:
        timer = timer or default_timer()
        ctx = _Ctx(kdef=kdef, spec=spec, limits=limits, space=space, target=target, timer=timer)
        jobs = auto_compile_jobs() if compile_jobs is None else int(compile_jobs)
        pre = Precompiler(jobs, spec, kernel, T, B, limits, target_factory) if jobs > 1 else None
        run_search(
            study,
            ctx,
            trials=trials,
            budget_seconds=budget_seconds,
            n_valid=n_valid,
            progress=progress,
            precompile=pre,
            local=local,
        )
        t_confirm = time.monotonic()
        times, default_ms = _confirm(study, ctx, default_cfg, kernel=kernel, confirm=confirm, tie_tol=tie_tol)
        t_confirm = time.monotonic() - t_confirm
    if not times:
        errs = [
            t.user_attrs.get("error") or t.user_attrs.get("rejected")
            for t in study.get_trials(deepcopy=False)
        ]
        first = next((e for e in errs if e), "no candidate was evaluated")
        raise RuntimeError(f"kernel {kernel}: every candidate failed (first: {first})")
    dc = canonical(default_cfg)
    win = choose(times, default=dc if dc in times else None, tie_tol=tie_tol)
    counts = _study_counts(study)
    phases = _study_phases(study)
    phases["confirm"] = round(t_confirm, 3)
    res = TuneResult(
        kernel=kernel,
        T=T,
        B=B,
        key=key,
        config=_cfg_from_canonical(win),
        time_ms=times[win],
        default_config=default_cfg,
        default_ms=default_ms,
        grid=n_valid,
        seconds=time.monotonic() - t_start,
        fields=fields,
        phase_seconds=phases,
        **counts,
    )
    if save:
        user_store().put(res.to_record())
        _memory_put(key, res.config)
    return res


def _cfg_from_canonical(c: str) -> dict[str, Any]:
    import json

    return json.loads(c)


def _make_target(
    factory: Callable[..., Any] | None,
    spec: Any,
    kernel: str,
    T: int,
    B: int,  # noqa: N803
    limits: Any,
    device: Any,
) -> Any:
    if factory is None:
        from .targets import default_target

        factory = default_target
    return factory(spec, kernel, T=T, B=B, limits=limits, device=device)


# ----------------------------------------------------------------------------------------------------------
# distributed workers
# ----------------------------------------------------------------------------------------------------------


#: Seconds a started worker has to report that it is ready before the pool gives up on it.
WORKER_START_TIMEOUT_S = 300.0
#: Seconds ``WorkerPool.close`` waits for a worker to exit after the shutdown sentinel before terminating it.
WORKER_EXIT_TIMEOUT_S = 60.0


class WorkerError(RuntimeError):
    """A worker of a ``WorkerPool`` failed or died; the message is one line (which worker, which job, why)."""


def _release_target(cache: dict[str, Any]) -> None:
    """Drop a worker's cached target and give its device memory back."""
    if cache.pop("target", None) is None:
        return
    cache.pop("target_key", None)
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _cached_target(cache: dict[str, Any], job: dict[str, Any], spec: Any) -> Any:
    """The job's target, reused when the previous job had the same (spec, kernel, shape, factory, limits);
    only the latest target is kept (its timing inputs can be large)."""
    import pickle

    try:
        key: bytes | None = pickle.dumps(
            (job["spec"], job["kernel"], job["T"], job["B"], job["target_factory"], job["limits"])
        )
    except Exception:  # an unpicklable piece: no reuse
        key = None
    if key is not None and cache.get("target_key") == key:
        return cache["target"]
    _release_target(cache)
    tgt = _make_target(job["target_factory"], spec, job["kernel"], job["T"], job["B"], job["limits"], None)
    if key is not None:
        cache["target"], cache["target_key"] = tgt, key
    return tgt


def _job_ctx(job: dict[str, Any], rank: int, cache: dict[str, Any]) -> tuple[Any, Any, _Ctx]:
    """In a worker: (spec, the job's shared study, the search context with the cached target)."""
    from nsa_dsl.spec import NSASpec

    spec = NSASpec.from_dict(job["spec"])
    kdef = get_kernel_def(job["kernel"], job["registry"])
    limits = job["limits"]
    storage, name = study_storage(job["journal"], job["key"])
    study = open_study(
        storage, name, sampler=job["sampler"], seed=job["seed"] + rank, n_startup=job["n_startup"]
    )
    timer = job["timer"]
    if timer is None:
        timer = cache.get("timer") or cache.setdefault("timer", default_timer())
    ctx = _Ctx(
        kdef=kdef,
        spec=spec,
        limits=limits,
        space=kdef.space(spec, limits),
        target=_cached_target(cache, job, spec),
        timer=timer,
    )
    return spec, study, ctx


def _search_job(job: dict[str, Any], rank: int, cache: dict[str, Any]) -> None:
    """In a worker: search the job's shared study until the study-wide budget is reached."""
    spec, study, ctx = _job_ctx(job, rank, cache)
    limits = job["limits"]
    jobs = int(job.get("compile_jobs") or 0)
    # The compile pool (module-level ``_POOLS``, keyed by its size) stays up between jobs.
    pre = (
        Precompiler(jobs, spec, job["kernel"], job["T"], job["B"], limits, job["target_factory"])
        if jobs > 1
        else None
    )
    run_search(
        study,
        ctx,
        trials=job["trials"],
        budget_seconds=job["budget_seconds"],
        n_valid=job["n_valid"],
        precompile=pre,
        share=int(job.get("share") or 1),
        local=float(job.get("local") or 0.0),
    )


def _device_broken() -> str | None:
    """Why this process's CUDA context is unusable (a sticky error such as an illegal memory access left by a
    candidate), or None."""
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - the error is the answer
        return f"{type(e).__name__}: {_first_line(e)}"
    return None


def _pool_worker_main(rank: int, conn: Any) -> None:
    """One persistent worker process of a ``WorkerPool``: report ready, then run the jobs that arrive on
    ``conn`` one by one (answering ``("done" | "error", job id, rank, error line, device error)``; a device
    error (a sticky CUDA error) means that it exits after this answer) until the ``None``
    sentinel, EOF, or the parent's death. Its compile pool and cached target live across jobs."""
    import signal
    from multiprocessing.reduction import ForkingPickler

    from . import _TUNING

    _TUNING.set(True)  # lookups made here never start a tuning run of their own (NSA_DSL_AUTOTUNE)
    # Ctrl-C reaches the whole process group: the parent decides (it closes the pool), not the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ppid = os.getppid()
    cache: dict[str, Any] = {}
    try:
        conn.send(("ready", None, rank, os.environ.get("CUDA_VISIBLE_DEVICES")))
        while True:
            if not conn.poll(1.0):
                if os.getppid() != ppid:  # the parent is gone: nobody will send the sentinel
                    return
                continue
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return
            try:
                job = ForkingPickler.loads(data)
            except Exception as e:  # e.g. a timer or target factory this process cannot import
                conn.send(("error", None, rank, f"cannot read the job: {type(e).__name__}: {_first_line(e)}"))
                continue
            if job is None:
                return
            payload: Any = None
            try:
                if job.get("op") == "confirm":
                    _, study, ctx = _job_ctx(job, rank, cache)
                    payload = _confirm(
                        study,
                        ctx,
                        job["default"],
                        kernel=job["kernel"],
                        confirm=job["confirm"],
                        tie_tol=job["tie_tol"],
                    )
                else:
                    _search_job(job, rank, cache)
                msg = ("done", job["id"], rank, None)
            except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it in one line
                msg = ("error", job["id"], rank, f"{type(e).__name__}: {_first_line(e)}")
            # A sticky CUDA error would fail every later candidate here: say so, and exit after this job (the
            # pool starts a new worker for the next one).
            broken = _device_broken()
            try:
                conn.send((*msg, broken, payload))
            except (BrokenPipeError, OSError):
                return
            if broken:
                return
    finally:
        # A multiprocessing child skips atexit handlers and joins its non-daemon children on exit: the idle
        # compile pool must be shut down here, or the worker never exits (found on a 2-GPU H200 host).
        _release_target(cache)
        _shutdown_pools(wait=True)


class WorkerPool:
    """``n`` persistent tuning processes, worker ``i`` pinned to GPU ``i`` (``CUDA_VISIBLE_DEVICES`` is set
    before it starts; ``devices`` overrides the list, default: the parent's visible devices, else 0..n-1).

    Starting a worker costs its imports, a CUDA context and its compile pool (about 20 s on a GPU host), so
    the pool starts them once (at the first ``run_job`` or ``start``) and keeps them across jobs; each keeps
    its compile pool and its latest target. ``run_job`` sends one job to every worker; they search the
    job's shared Optuna study until its study-wide budget is reached. A worker that fails or dies is reported
    as one ``WorkerError`` line after the other workers have finished the job (so nothing writes to the study
    afterwards); a dead worker is started again at the next job. Waits poll with short timeouts and check
    that the workers are alive: a dead worker never hangs the parent. ``close`` (also on leaving the ``with``
    block) sends each worker a sentinel, so that it shuts its compile pool down, and joins it; after an
    exception it terminates them instead. Several threads may run jobs at once on disjoint ``ranks``
    (``nsa-tune`` gives each worker its own job); ``close`` only after they have returned.
    """

    def __init__(
        self,
        n: int,
        *,
        devices: list[str] | None = None,
        start_timeout_s: float = WORKER_START_TIMEOUT_S,
        exit_timeout_s: float = WORKER_EXIT_TIMEOUT_S,
        job_timeout_s: float | None = None,
    ):
        if int(n) < 1:
            raise ValueError(f"workers: must be >= 1, got {n}")
        if devices is not None and not devices:
            raise ValueError("devices: give at least one device, or None for the visible ones")
        self.n = int(n)
        self.devices = [str(d) for d in devices] if devices is not None else None
        self.start_timeout_s = float(start_timeout_s)
        self.exit_timeout_s = float(exit_timeout_s)
        self.job_timeout_s = job_timeout_s
        #: ``CUDA_VISIBLE_DEVICES`` as each worker reported it
        self.visible: list[str | None] = [None] * self.n
        #: worker processes started so far (restarts of dead workers included)
        self.starts = 0
        self._procs: list[Any] = [None] * self.n
        self._conns: list[Any] = [None] * self.n
        self._job_id = 0
        self._closed = False
        self._why = ""  # why the pool closed itself (a worker that could not start)
        self._atexit = False
        # run_job may be called from several threads at once for disjoint ranks (nsa-tune runs one job per
        # worker): starting workers and numbering jobs are serialised, each rank's pipe is used by one job
        self._lock = threading.Lock()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(terminate=exc_type is not None)

    @property
    def pids(self) -> list[int | None]:
        """The workers' process ids (None: not started)."""
        return [p.pid if p is not None else None for p in self._procs]

    def _describe(self, r: int) -> str:
        p = self._procs[r]
        return f"worker {r} (pid {p.pid if p is not None else '-'}, CUDA_VISIBLE_DEVICES={self.visible[r]})"

    def _death(self, r: int, what: str) -> str:
        p = self._procs[r]
        p.join(timeout=5)
        code = p.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"{self._describe(r)} died ({how}) {what}"

    def start(self, ranks: list[int] | None = None) -> None:
        """Start every worker of ``ranks`` (default all) that is not running and wait until each reports
        ready. Idempotent; ``run_job`` calls it for its ranks. Launching is serialised between threads (it
        sets ``CUDA_VISIBLE_DEVICES`` of this process for the child); each caller waits for its own ranks
        only, so a worker is never replaced under a job another thread runs on it."""
        with self._lock:
            started = self._launch(range(self.n) if ranks is None else ranks)
        self._await_ready(started)

    def _launch(self, ranks: Any) -> list[int]:
        import atexit
        import multiprocessing as mp

        if self._closed:
            raise WorkerError(f"workers: the pool is closed{f' ({self._why})' if self._why else ''}")
        ctx = mp.get_context("spawn")
        old = os.environ.get("CUDA_VISIBLE_DEVICES")
        visible = self.devices or (
            [d for d in old.split(",") if d] if old else [str(i) for i in range(self.n)]
        )
        started = []
        try:
            for r in ranks:
                p = self._procs[r]
                if p is not None and p.is_alive():
                    continue
                if p is not None:
                    log.warning("%s is not running; starting a new one", self._describe(r))
                    self._conns[r].close()
                # Each worker sees exactly one GPU (set before the child starts: CUDA reads it at init).
                os.environ["CUDA_VISIBLE_DEVICES"] = visible[r % len(visible)]
                here, there = ctx.Pipe(duplex=True)
                p = ctx.Process(target=_pool_worker_main, args=(r, there), name=f"nsa-tune-worker-{r}")
                p.start()
                there.close()  # the worker's end lives in the worker only: its death is EOF here
                self._procs[r], self._conns[r], self.visible[r] = p, here, None
                self.starts += 1
                started.append(r)
        finally:
            if old is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = old
        if started and not self._atexit:
            atexit.register(self.close, True)
            self._atexit = True
        return started

    def _await_ready(self, started: list[int]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        waiting = set(started)
        while waiting:
            for r, msg in self._recv(waiting):
                if msg is None:
                    err = self._death(r, "while starting")
                    self._why = err
                    self.close(terminate=True)
                    raise WorkerError(f"workers: {err}")
                if msg[0] == "ready":
                    self.visible[r] = msg[3]
                    waiting.discard(r)
            if waiting and time.monotonic() > deadline:
                late = ", ".join(self._describe(r) for r in sorted(waiting))
                self._why = f"{late} not ready within {self.start_timeout_s:g} s"
                self.close(terminate=True)
                raise WorkerError(f"workers: {self._why}")

    def _recv(self, ranks: set[int], timeout: float = 0.5) -> list[tuple[int, Any]]:
        """Messages that arrive from ``ranks`` within ``timeout`` as (rank, message); message None: that
        worker is dead (EOF, or not alive with nothing left to read)."""
        from multiprocessing.connection import wait

        conns = {self._conns[r]: r for r in ranks}
        out: list[tuple[int, Any]] = []
        for c in wait(list(conns), timeout=timeout):
            r = conns[c]  # type: ignore[index]
            try:
                out.append((r, c.recv()))  # type: ignore[union-attr]
            except (EOFError, OSError):
                out.append((r, None))
        seen = {r for r, _ in out}
        for r in ranks:
            if r not in seen and not self._procs[r].is_alive():
                c = self._conns[r]
                try:
                    msg = c.recv() if c.poll() else None
                except (EOFError, OSError):
                    msg = None
                out.append((r, msg))
        return out

    def run_job(
        self,
        job: dict[str, Any],
        *,
        progress: Callable[[], None] | None = None,
        ranks: list[int] | None = None,
    ) -> dict[int, Any]:
        """Run one job (see ``tune_kernel``: ``op`` "search", the default, or "confirm") on every worker (or
        on ``ranks``) and return when all have finished it, with each worker's answer (rank -> the
        confirmation's times, None for a search); ``progress()`` is called about twice a second. Raises
        ``WorkerError`` (one line) if a worker failed, died or (with ``job_timeout_s``) overran; the pool
        stays usable."""
        on = list(range(self.n)) if ranks is None else list(ranks)
        self.start(on)
        with self._lock:
            self._job_id += 1
            jid = self._job_id
        what = f"during {job.get('kernel')} T={job.get('T')}"
        errors: list[str] = []
        answers: dict[int, Any] = {}
        pending: set[int] = set()
        for r in on:
            try:
                self._conns[r].send({**job, "id": jid})
                pending.add(r)
            except (BrokenPipeError, EOFError, OSError):
                errors.append(self._death(r, what))
        t0 = time.monotonic()
        while pending:
            if progress:
                progress()
            for r, msg in self._recv(pending):
                if msg is None:
                    errors.append(self._death(r, what))
                    pending.discard(r)
                elif msg[0] == "error" and msg[1] is None:  # it could not read the job
                    pending.discard(r)
                    errors.append(f"{self._describe(r)} failed {what}: {msg[3]}")
                elif msg[0] in ("done", "error") and msg[1] == jid:
                    pending.discard(r)
                    answers[r] = msg[5]
                    if msg[0] == "error":
                        errors.append(f"{self._describe(r)} failed {what}: {msg[3]}")
                    if msg[4]:  # it exits now; wait for that, so that the next job starts a new one
                        log.warning(
                            "%s: device unusable (%s) %s; it is replaced at the next job",
                            self._describe(r),
                            msg[4],
                            what,
                        )
                        self._procs[r].join(timeout=self.exit_timeout_s)
                        if self._procs[r].is_alive():
                            self._procs[r].terminate()
                            self._procs[r].join(timeout=5)
            if pending and self.job_timeout_s is not None and time.monotonic() - t0 > self.job_timeout_s:
                for r in sorted(pending):
                    errors.append(
                        f"{self._describe(r)} did not finish within {self.job_timeout_s:g} s {what}"
                    )
                    self._procs[r].terminate()
                    self._procs[r].join(timeout=5)
                pending.clear()
        if progress:
            progress()
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise WorkerError(f"workers: {errors[0]}{more}")
        return answers

    def close(self, terminate: bool = False) -> None:
        """Shut the workers down: a sentinel each (they shut their compile pools down and exit), then join;
        a worker still alive after ``exit_timeout_s`` (at once with ``terminate``) is terminated."""
        import atexit

        if self._closed:
            return
        self._closed = True
        if self._atexit:
            atexit.unregister(self.close)
            self._atexit = False
        live = [r for r in range(self.n) if self._procs[r] is not None and self._procs[r].is_alive()]
        if not terminate:
            for r in live:
                try:
                    self._conns[r].send(None)
                except (BrokenPipeError, EOFError, OSError):
                    pass
        deadline = time.monotonic() + (0.0 if terminate else self.exit_timeout_s)
        for r in live:
            p = self._procs[r]
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                if not terminate:
                    log.warning(
                        "%s did not exit within %g s; terminating it", self._describe(r), self.exit_timeout_s
                    )
                p.terminate()
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        for c in self._conns:
            if c is not None:
                c.close()


def result_dict(res: TuneResult) -> dict[str, Any]:
    return asdict(res)
