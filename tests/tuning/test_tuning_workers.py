"""The persistent ``WorkerPool`` behind ``--workers``: started once for many jobs, the same choice as one
worker where the fake timer makes it deterministic, clean shutdown, a killed worker is a one-line error.

Each test runs a script in its own session (subprocess, ``start_new_session``): a regression fails on the
timeout instead of hanging pytest, and every process the script left behind (workers, their compile pools)
is found by its session id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")

_COMMON = """
import json, multiprocessing, os, signal, sys
from nsa_dsl import load_spec
from nsa_dsl.tuning import canonical, tune_kernel
from nsa_dsl.tuning.search import WorkerError, WorkerPool, evaluated_trials, open_study, study_storage
from nsa_dsl.tuning.testing import FakeKernelDef, FakeTarget, fake_time
from nsa_dsl.tuning.timing import FakeTimer

SPEC = load_spec("tiny")


class Limits:
    name, capability, sm_count, smem_per_block, interpreter = "fake-gpu", (9, 0), 132, 1 << 30, False


class SmallDef(FakeKernelDef):
    # 32 points, all valid and none failing: a budget of 32 is an exhaustive search
    def space(self, spec, limits):
        return {"BLOCK_M": [32, 64], "BLOCK_N": [16, 32], "num_warps": [2, 4], "num_stages": [2, 3],
                "schedule": ["group", "kv_outer"]}


def registry():
    return {"fake_fwd": SmallDef()}


def small_first(cfg):  # a unique best at the smallest tiles, far from the default
    return 1.0 + 0.3 * (cfg["BLOCK_M"] // 32) + 0.2 * (cfg["BLOCK_N"] // 16) + 0.1 * cfg["num_stages"]


def plateau(cfg):  # everything within 1%: the default must win the tie
    return 1.0 + 0.001 * cfg["num_warps"] + 0.002 * cfg["num_stages"]


class Slow(FakeTarget):
    def __init__(self, T):
        super().__init__(delay=0.03)
        self.T = T

    def build(self, config):
        if (
            str(self.T) == os.environ.get("KILL_T")
            and os.environ.get("CUDA_VISIBLE_DEVICES") == "1"
            and multiprocessing.current_process().name == "nsa-tune-worker-1"  # not its compile pool
            and self.built >= 1
        ):
            os.kill(os.getpid(), signal.SIGKILL)  # worker 1 dies in the middle of this job
        me = multiprocessing.current_process().name
        flag = os.environ.get("BREAK_FLAG", "")
        once = not os.path.isfile(flag)
        if str(self.T) == os.environ.get("BREAK_T") and me == "nsa-tune-worker-0" and once:
            import nsa_dsl.tuning.search as search  # worker 0's device "breaks" (a sticky CUDA error), once

            open(flag, "w").close()

            search._device_broken = lambda: "RuntimeError: CUDA error: an illegal memory access"
        return super().build(config)


def factory(spec, kernel, *, T, B=1, limits=None, device=None):
    return Slow(T)


def tune(T, fn, journal, **kw):
    return tune_kernel(SPEC, "fake_fwd", T=T, trials=32, timer=FakeTimer(fn), target_factory=factory,
                       storage_path=journal, limits=Limits(), registry=registry(), save=False, **kw)


def worker_pids(journal, key):
    storage, name = study_storage(journal, key)
    return sorted({t.user_attrs["worker"] for t in evaluated_trials(open_study(storage, name))})
"""

_PERSIST = (
    _COMMON
    + """
if __name__ == "__main__":
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    tmp = sys.argv[1]
    jobs = [(1000, fake_time), (2000, small_first), (4000, plateau)]
    out = {"jobs": [], "one": []}
    with WorkerPool(2) as pool:
        for i, (T, fn) in enumerate(jobs):
            journal = f"{tmp}/two{i}.journal"
            res = tune(T, fn, journal, pool=pool, compile_jobs=2)
            out["jobs"].append({"pids": pool.pids, "config": canonical(res.config), "trials": res.trials,
                                "study_pids": worker_pids(journal, res.key)})
        out["starts"], out["visible"] = pool.starts, pool.visible
    out["one"] = [canonical(tune(T, fn, f"{tmp}/one{i}.journal", workers=1, compile_jobs=0).config)
                  for i, (T, fn) in enumerate(jobs)]
    out["default"] = canonical(SmallDef().default(SPEC, Limits()))
    out["self"] = os.getpid()
    print("RESULT " + json.dumps(out))
"""
)

_KILL = (
    _COMMON
    + """
if __name__ == "__main__":
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    os.environ["KILL_T"], os.environ["BREAK_T"] = "2000", "8000"  # inherited by the workers
    os.environ["BREAK_FLAG"] = f"{sys.argv[1]}/broke"
    tmp = sys.argv[1]
    out = {}
    with WorkerPool(2) as pool:
        tune(1000, fake_time, f"{tmp}/a.journal", pool=pool, compile_jobs=2)
        out["before"] = pool.pids
        try:
            tune(2000, fake_time, f"{tmp}/b.journal", pool=pool, compile_jobs=2)
            out["error"] = None
        except WorkerError as e:
            out["error"] = str(e)
        res = tune(4000, fake_time, f"{tmp}/c.journal", pool=pool, compile_jobs=2)
        out["after"], out["starts"], out["trials_after"] = pool.pids, pool.starts, res.trials
        # a worker whose device broke finishes its search, then exits; the confirmation (worker 0's) and the
        # next job run on a new worker 0
        tune(8000, fake_time, f"{tmp}/d.journal", pool=pool, compile_jobs=2)
        res = tune(16000, fake_time, f"{tmp}/e.journal", pool=pool, compile_jobs=2)
        out["after_break"], out["starts_break"], out["trials_break"] = pool.pids, pool.starts, res.trials
    print("RESULT " + json.dumps(out))
"""
)


def _session_procs(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(rest[3]) == sid and rest[0] != "Z":
            out.append(int(d))
    return out


def _run_script(tmp_path: Path, text: str, timeout: float = 150.0) -> dict:
    """Run ``text`` as a script in a new session; return its RESULT json after checking that it exited 0 and
    left no process behind."""
    script = tmp_path / "script.py"
    script.write_text(text)
    env = {**os.environ, "NSA_DSL_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"the script did not finish within {timeout} s (a hang)")
    left: list[int] = []
    for _ in range(100):  # the compile pools of a killed worker exit within ~1 s of noticing it
        left = _session_procs(p.pid)
        if not left:
            break
        time.sleep(0.1)
    if left:
        os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err[-3000:]
    assert not left, f"processes left behind after the script exited: {left}"
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert line, (out[-2000:], err[-2000:])
    return json.loads(line[-1][len("RESULT ") :])


def test_pool_is_started_once_and_chooses_like_one_worker(tmp_path):
    r = _run_script(tmp_path, _PERSIST)
    pids = r["jobs"][0]["pids"]
    assert len(set(pids)) == 2 and r["self"] not in pids and None not in pids
    assert all(j["pids"] == pids for j in r["jobs"])  # the same two processes served every job
    assert r["starts"] == 2  # and no other worker was ever started
    assert r["visible"] == ["0", "1"]  # each pinned to its own GPU before it started
    for j in r["jobs"]:
        assert j["trials"] >= 32
        assert j["study_pids"] == sorted(pids)  # both workers searched each job's shared study
    # Exhaustive budgets: the 2-worker choice is the 1-worker choice; the landscapes differ per job.
    assert [j["config"] for j in r["jobs"]] == r["one"]
    assert len(set(r["one"])) == 3 and r["one"][2] == r["default"]  # the plateau's tie goes to the default


def test_killed_or_broken_worker_is_replaced(tmp_path):
    r = _run_script(tmp_path, _KILL)
    err = r["error"]
    assert err is not None, "a worker killed mid-job must fail the job"
    assert "\n" not in err and "worker 1" in err and "died" in err and "T=2000" in err
    assert "signal 9" in err
    # the next job runs on worker 0 (same process) and a new worker 1
    assert r["after"][0] == r["before"][0] and r["after"][1] != r["before"][1]
    assert r["starts"] == 3 and r["trials_after"] >= 32
    assert r["after_break"][0] != r["after"][0] and r["after_break"][1] == r["after"][1]
    assert r["starts_break"] == 4 and r["trials_break"] >= 32


def test_cli_workers_share_one_pool(tmp_path):
    """``nsa-tune --workers 2`` over three jobs: each worker takes whole jobs (every study was searched by
    one process), both workers took some, every evaluated trial was run by one of the same two workers (a
    pool per job would show at least three process ids), and nothing is left running."""
    text = (
        "import sys\nfrom nsa_dsl.tuning.cli import main\n"
        "if __name__ == '__main__':\n"
        "    rc = main(['tiny', '--fake', '--workers', '2', '--seq-lens', '1k,2k,4k', '--trials', '8',"
        " '--compile-jobs', '0'])\n"
        "    print('RESULT', rc)\n"
    )
    assert _run_script(tmp_path, text) == 0
    import optuna
    from nsa_dsl.tuning.search import evaluated_trials, open_study, study_storage

    journals = sorted((tmp_path / "cache" / "tuning" / "studies").glob("*.journal"))
    assert len(journals) == 3
    pids = set()
    for j in journals:
        storage, _ = study_storage(j, "x")
        (summary,) = optuna.get_all_study_summaries(storage)
        st = open_study(storage, summary.study_name)
        ev = evaluated_trials(st)
        assert len(ev) >= 8
        by = {t.user_attrs["worker"] for t in ev}
        assert len(by) == 1, f"job {j.name} was searched by {len(by)} processes"
        pids |= by
    assert len(pids) == 2


def test_trials_in_flight_elsewhere_count_against_the_budget(tmp_path):
    """Trials another live process has taken count against the shared budget and are not evaluated twice;
    one left RUNNING by a dead process, or by a process whose pid now names another process, is tried again
    (in-process, with a fake second worker)."""
    import socket

    from nsa_dsl.tuning import canonical, search
    from nsa_dsl.tuning.space import full_config
    from nsa_dsl.tuning.testing import FakeKernelDef, FakeTarget, fake_time
    from nsa_dsl.tuning.timing import FakeTimer

    from nsa_dsl import load_spec

    class Lim:
        name, capability, sm_count, smem_per_block, interpreter = "fake-gpu", (9, 0), 132, 1 << 30, False

    spec, lim, kd = load_spec("tiny"), Lim(), FakeKernelDef()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, other = socket.gethostname(), os.getppid()  # the parent of pytest: alive for the whole test
    live_tok = f"{host}:{other}:{search._start_time(other)}"
    storage, name = search.study_storage(tmp_path / "s.journal", "k")
    study = search.open_study(storage, name, sampler="random", seed=0)
    base = {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 2, "schedule": "group"}
    busy = [{**base, "num_warps": w} for w in (2, 4)]
    stale = [{**base, "num_warps": 8}, {**base, "num_warps": 8, "num_stages": 3}]
    takers = [live_tok, live_tok, f"{host}:{dead.pid}:1", f"{host}:{other}:1"]  # dead; pid reused
    for tok, point in zip(takers, [*busy, *stale], strict=True):
        t = study.ask({p: _dist(kd.space(spec, lim)[p]) for p in point})
        t.set_user_attr("config", canonical(full_config(kd, spec, point, lim)))
        t.set_user_attr("taken_by", tok)
    assert search._busy_elsewhere(study) == {canonical(c): 1 for c in busy}  # the stale ones do not count
    for point in [*busy, *stale]:  # the sampler proposes these first
        study.enqueue_trial(point)
    timer = FakeTimer(fake_time)
    ctx = search._Ctx(kd, spec, lim, kd.space(spec, lim), FakeTarget(fail=lambda c: False), timer)
    t0 = time.monotonic()
    search.run_search(study, ctx, trials=6, budget_seconds=2.0, n_valid=198)
    assert time.monotonic() - t0 >= 2.0  # waited for the two foreign trials to finish, up to the budget
    ev = search.evaluated_trials(study)
    assert len(ev) == 4 and timer.calls == 4  # 6 minus the 2 in flight elsewhere
    configs = [t.user_attrs["config"] for t in ev]
    assert {canonical(c) for c in stale} <= set(configs)  # the stale points are evaluated again
    assert not {canonical(c) for c in busy} & set(configs)


def _dist(choices):
    import optuna

    return optuna.distributions.CategoricalDistribution(choices)


def test_pool_arguments_and_closed_pool():
    from nsa_dsl.tuning.search import WorkerError, WorkerPool

    with pytest.raises(ValueError, match="workers: must be >= 1"):
        WorkerPool(0)
    with pytest.raises(ValueError, match="devices"):
        WorkerPool(2, devices=[])
    pool = WorkerPool(2)
    pool.close()  # never started: nothing to stop
    assert pool.pids == [None, None]
    with pytest.raises(WorkerError, match="the pool is closed"):
        pool.run_job({"kernel": "k", "T": 1})


def test_start_launches_only_the_ranks_asked_for():
    """A job's ``run_job`` starts only its own ranks, so a thread tuning on worker 0 never replaces worker 1
    under another thread's job; starting the rest later leaves the running worker alone."""
    from nsa_dsl.tuning.search import WorkerPool

    with WorkerPool(2) as pool:
        pool.start([1])
        first = pool.pids
        assert first[0] is None and first[1] is not None and pool.starts == 1
        pool.start()
        assert pool.pids[1] == first[1] and pool.pids[0] is not None and pool.starts == 2
    assert all(p is not None for p in pool.pids)


_UNREADABLE = """
import json, sys
from nsa_dsl.tuning.search import WorkerError, WorkerPool


class Unreadable:
    def __reduce__(self):  # unpickles as int("not a number"): the worker cannot read the job
        return (int, ("not a number",))


if __name__ == "__main__":
    with WorkerPool(1) as pool:
        try:
            pool.run_job({"kernel": "fake_fwd", "T": 1000, "timer": Unreadable()})
            err = None
        except WorkerError as e:
            err = str(e)
        print("RESULT " + json.dumps({"error": err, "alive": pool._procs[0].is_alive()}))
"""


def test_job_a_worker_cannot_read_is_one_line_error(tmp_path):
    r = _run_script(tmp_path, _UNREADABLE, timeout=60)
    assert r["error"] and "\n" not in r["error"]
    assert "worker 0" in r["error"] and "cannot read the job: ValueError" in r["error"]
    assert r["alive"]  # the worker survives it
