"""The search with a fake, deterministic timer: failures, the gate, ties, resume, workers, cache hits."""

from __future__ import annotations

import itertools
import json

import optuna
import pytest
from nsa_dsl.tuning import canonical, search, tune_kernel
from nsa_dsl.tuning.testing import FakeKernelDef, FakeTarget, fake_registry, fake_time, flat_time
from nsa_dsl.tuning.timing import FakeTimer

from nsa_dsl import load_spec

SPEC = load_spec("tiny")


class _Limits:
    name, capability, sm_count, smem_per_block, interpreter = "fake-gpu", (9, 0), 132, 1 << 30, False


LIM = _Limits()
KW = dict(limits=LIM, registry=fake_registry())


def _grid():
    kd = FakeKernelDef()
    sp = kd.space(SPEC, LIM)
    names = sorted(sp)
    out = []
    for combo in itertools.product(*(sp[n] for n in names)):
        c = dict(zip(names, combo, strict=True))
        if c["BLOCK_M"] * c["BLOCK_N"] <= 4096:
            out.append(c)
    return out


def test_choose_rule():
    a, b, c = canonical({"x": 1}), canonical({"x": 2}), canonical({"x": 3})
    assert search.choose({a: 1.0, b: 2.0}) == a
    assert search.choose({b: 1.0, a: 1.01}) == a  # tie within 2%: lexicographic order of the JSON
    assert search.choose({b: 1.0, a: 1.03}) == b  # outside the tolerance: the faster one
    assert search.choose({a: 1.0, c: 1.015}, default=c) == c  # tied default wins
    assert search.choose({a: 1.0, c: 1.5}, default=c) == a
    with pytest.raises(ValueError):
        search.choose({})


def test_finds_optimum_and_records_failures():
    res = tune_kernel(
        SPEC, "fake_fwd", T=1000, trials=40, timer=FakeTimer(fake_time), target=FakeTarget(), **KW
    )
    best = min(fake_time(c) for c in _grid())
    assert res.time_ms == pytest.approx(best) and fake_time(res.config) == pytest.approx(best)
    assert res.default_ms == pytest.approx(fake_time(FakeKernelDef().default(SPEC, LIM)))
    assert res.trials == 40 and not res.from_cache and res.grid == 198


def test_compile_failures_are_failed_trials_not_crashes():
    always = lambda c: c["schedule"] == "kv_outer"  # noqa: E731 - half of the space fails to "compile"
    res = tune_kernel(
        SPEC, "fake_fwd", T=1000, trials=20, timer=FakeTimer(fake_time), target=FakeTarget(fail=always), **KW
    )
    assert res.failed > 0 and res.config["schedule"] == "group"
    storage, name = search.study_storage(None, res.key)
    st = optuna.load_study(study_name=name, storage=storage)
    fails = [t for t in st.trials if t.state == optuna.trial.TrialState.FAIL]
    assert fails and all("out of resources" in t.user_attrs["error"] for t in fails)


def test_every_candidate_failing_is_one_clear_error():
    with pytest.raises(RuntimeError, match="every candidate failed.*out of resources"):
        tune_kernel(
            SPEC,
            "fake_fwd",
            T=1000,
            trials=5,
            timer=FakeTimer(fake_time),
            target=FakeTarget(fail=lambda c: True),
            **KW,
        )


def test_sticky_device_error_stops_the_search_and_resume_skips_the_culprit(monkeypatch):
    """A candidate that leaves the CUDA context unusable (e.g. an illegal memory access) must stop the search
    at once (every later candidate in the process would fail too), stay recorded as failed, and not be tried
    again when a fresh process resumes the study."""
    state = {"broken": False, "culprit": None, "built": []}

    def fail(c):
        if state["culprit"] is None and c["schedule"] == "kv_outer":
            state["culprit"] = canonical(c)
            state["broken"] = True
            return True
        return False

    class Target(FakeTarget):
        def build(self, cfg):
            state["built"].append(canonical(cfg))
            return super().build(cfg)

    why = "AcceleratorError: illegal memory access"
    monkeypatch.setattr(search, "_device_broken", lambda: why if state["broken"] else None)
    kw = dict(T=1000, trials=30, timer=FakeTimer(fake_time), **KW)
    with pytest.raises(search.DeviceBroken, match="illegal memory access.*rerun resumes"):
        tune_kernel(SPEC, "fake_fwd", target=Target(fail=fail), **kw)
    culprit = state["culprit"]
    assert culprit is not None
    assert state["built"][-1] == culprit  # nothing ran after the broken candidate
    state["broken"], state["built"] = False, []  # a fresh process: the context works again
    res = tune_kernel(SPEC, "fake_fwd", target=Target(fail=fail), **kw)
    assert culprit not in state["built"] and res.trials == 30 and res.failed == 1


def test_gate_rejects_wrong_candidate_even_if_fastest():
    fastest = min(_grid(), key=fake_time)
    wrong = lambda c: c == fastest  # noqa: E731
    res = tune_kernel(
        SPEC, "fake_fwd", T=1000, trials=500, timer=FakeTimer(fake_time), target=FakeTarget(wrong=wrong), **KW
    )  # exhaustive: the wrong one is surely tried
    assert res.config != fastest and res.rejected == 1
    assert res.time_ms == pytest.approx(sorted(fake_time(c) for c in _grid())[1])


def test_exhaustive_when_budget_covers_grid():
    timer = FakeTimer(fake_time)
    res = tune_kernel(
        SPEC, "fake_fwd", T=1000, trials=10_000, timer=timer, target=FakeTarget(), confirm=0, **KW
    )
    assert res.trials == 198  # every valid point exactly once (12 of them fail to compile)
    assert timer.calls == 198 - res.failed


def _tie_time(cfg):
    # A plateau of near-equal best configs (within 1%), everything else clearly slower.
    if cfg["num_warps"] == 4 and cfg["BLOCK_N"] == 32:
        return 1.0 + 0.001 * (cfg["num_stages"] + (cfg["BLOCK_M"] // 16))
    return 2.0


@pytest.mark.parametrize("seed", [0, 1])
def test_tie_break_is_deterministic(seed):
    res = tune_kernel(
        SPEC,
        "fake_fwd",
        T=1000,
        trials=10_000,
        timer=FakeTimer(_tie_time),
        target=FakeTarget(),
        seed=seed,
        **KW,
    )
    plateau = [c for c in _grid() if _tie_time(c) < 1.5]
    default = FakeKernelDef().default(SPEC, LIM)
    assert default in plateau  # the default is tied: it wins
    assert res.config == default


def test_tie_without_default_goes_to_first_json():
    default = FakeKernelDef().default(SPEC, LIM)
    fail = lambda c: c == default  # noqa: E731 - the default cannot win
    res = tune_kernel(
        SPEC,
        "fake_fwd",
        T=1000,
        trials=10_000,
        timer=FakeTimer(_tie_time),
        target=FakeTarget(fail=fail),
        confirm=0,
        **KW,
    )
    plateau = sorted(
        json.dumps(c, sort_keys=True, separators=(",", ":"))
        for c in _grid()
        if _tie_time(c) < 1.5 and c != default
    )
    assert res.config == json.loads(plateau[0])
    assert res.default_ms is None


def test_flat_landscape_keeps_default_across_seeds_and_budgets():
    cfgs = set()
    for seed, trials in [(0, 8), (3, 15), (7, 30)]:
        res = tune_kernel(
            SPEC,
            "fake_fwd",
            T=1000 * (seed + 1),
            trials=trials,
            timer=FakeTimer(flat_time),
            target=FakeTarget(),
            seed=seed,
            **KW,
        )
        cfgs.add(canonical(res.config))
    assert cfgs == {canonical(FakeKernelDef().default(SPEC, LIM))}


def test_second_run_is_cache_hit():
    timer = FakeTimer(fake_time)
    first = tune_kernel(SPEC, "fake_fwd", T=1000, trials=12, timer=timer, target=FakeTarget(), **KW)
    n = timer.calls
    again = tune_kernel(SPEC, "fake_fwd", T=1000, trials=12, timer=timer, target=FakeTarget(), **KW)
    assert again.from_cache and timer.calls == n and again.config == first.config
    forced = tune_kernel(
        SPEC, "fake_fwd", T=1000, trials=12, timer=timer, target=FakeTarget(), force=True, **KW
    )
    assert not forced.from_cache


class _Interrupt(FakeTimer):
    def __init__(self, fn, after):
        super().__init__(fn)
        self.after = after

    def __call__(self, cand):
        if self.calls >= self.after:
            raise KeyboardInterrupt
        return super().__call__(cand)


def test_study_resumes_after_interrupt(tmp_path):
    journal = tmp_path / "study.journal"
    k = 7
    with pytest.raises(KeyboardInterrupt):
        tune_kernel(
            SPEC,
            "fake_fwd",
            T=1000,
            trials=20,
            timer=_Interrupt(fake_time, k),
            target=FakeTarget(),
            storage_path=journal,
            **KW,
        )
    storage, name = search.study_storage(journal, _key())
    st = optuna.load_study(study_name=name, storage=storage)
    done = len(search.evaluated_trials(st))
    assert k <= done < 20  # k timed + the compile failures met on the way; the interrupted one is not counted
    timer = FakeTimer(fake_time)
    res = tune_kernel(
        SPEC,
        "fake_fwd",
        T=1000,
        trials=20,
        timer=timer,
        target=FakeTarget(),
        storage_path=journal,
        confirm=0,
        **KW,
    )
    assert res.trials == 20  # k + the rest, in the same storage
    st = optuna.load_study(study_name=name, storage=storage)
    assert len(search.evaluated_trials(st)) == 20
    assert timer.calls <= 20 - done  # only the missing trials were measured


def _key():
    from nsa_dsl.tuning.keys import key_fields, record_key

    return record_key(key_fields(SPEC, "fake_fwd", T=1000, B=1, limits=LIM))


def test_two_workers_share_one_study(tmp_path):
    from nsa_dsl.tuning.testing import slow_fake_target_factory

    journal = tmp_path / "shared.journal"
    res = tune_kernel(
        SPEC,
        "fake_fwd",
        T=1000,
        trials=40,
        timer=FakeTimer(fake_time),
        target_factory=slow_fake_target_factory,
        storage_path=journal,
        workers=2,
        **KW,
    )
    storage, name = search.study_storage(journal, res.key)
    st = optuna.load_study(study_name=name, storage=storage)
    ev = search.evaluated_trials(st)
    # One shared budget: at most one extra trial per worker beyond the target.
    assert 40 <= len(ev) <= 41 and res.trials == len(ev)
    assert len({t.user_attrs["worker"] for t in ev}) == 2  # both processes evaluated candidates
    best = min(fake_time(c) for c in _grid())
    assert fake_time(res.config) <= best * 1.25


_WORKERS_WITH_POOLS = """
import sys
from nsa_dsl import load_spec
from nsa_dsl.tuning import tune_kernel
from nsa_dsl.tuning.testing import fake_registry, fake_time, slow_fake_target_factory
from nsa_dsl.tuning.timing import FakeTimer


class Limits:
    name, capability, sm_count, smem_per_block, interpreter = "fake-gpu", (9, 0), 132, 1 << 30, False


if __name__ == "__main__":
    res = tune_kernel(load_spec("tiny"), "fake_fwd", T=1000, trials=8, timer=FakeTimer(fake_time),
                      target_factory=slow_fake_target_factory, storage_path=sys.argv[1], workers=2,
                      compile_jobs=2, limits=Limits(), registry=fake_registry())
    print("TRIALS", res.trials)
"""


def test_workers_with_compile_pools_exit(tmp_path):
    """Each worker owns a compile pool; a worker must shut it down or it never exits (the multiprocessing
    child joins its pool's idle processes at exit). Run in a subprocess so a regression fails, not hangs."""
    import subprocess
    import sys

    script = tmp_path / "w.py"
    script.write_text(_WORKERS_WITH_POOLS)
    p = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "w.journal")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "TRIALS" in p.stdout and int(p.stdout.split("TRIALS")[1].split()[0]) >= 8


def test_parallel_precompile_batches():
    """With a compile pool the search proposes batches, compiles them in 2 processes, then evaluates them."""
    from nsa_dsl.tuning.testing import fake_target_factory

    timer = FakeTimer(fake_time)
    res = tune_kernel(
        SPEC,
        "fake_fwd",
        T=1000,
        trials=12,
        timer=timer,
        target_factory=fake_target_factory,
        compile_jobs=2,
        confirm=0,
        **KW,
    )
    assert res.trials == 12 and timer.calls == 12 - res.failed
    pre = search.Precompiler(2, SPEC, "fake_fwd", 1000, 1, LIM, fake_target_factory)
    bad = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1, "schedule": "group"}
    good = {**bad, "num_warps": 4}
    out = pre.warm([good, bad])
    assert out[0] is None and "out of resources" in out[1]  # errors come back, never raised


def test_big_grid_is_pruned_lazily(monkeypatch):
    """Grids too big to list are searched without enumerating them (and never 'exhaustively')."""
    monkeypatch.setattr(search, "MAX_ENUMERATE", 50)
    timer = FakeTimer(fake_time)
    res = tune_kernel(SPEC, "fake_fwd", T=1000, trials=15, timer=timer, target=FakeTarget(), confirm=0, **KW)
    assert res.grid == 216 and res.trials == 15  # the declared grid size: validity is unknown up front
    storage, name = search.study_storage(None, res.key)
    st = optuna.load_study(study_name=name, storage=storage)
    assert all(
        t.user_attrs.get("invalid")
        for t in st.trials
        if t.state == optuna.trial.TrialState.PRUNED and not t.user_attrs.get("duplicate")
    )


def test_processes_sharing_a_study_choose_the_same_config(tmp_path):
    """Ranks that read the same study pick the same config, whatever their own sampler seed."""
    import multiprocessing as mp

    from nsa_dsl.tuning.testing import tune_in_process

    journal = str(tmp_path / "shared.journal")
    ctx = mp.get_context("spawn")
    outs = [str(tmp_path / f"choice{i}.json") for i in range(3)]
    procs = [
        ctx.Process(target=tune_in_process, args=(journal, str(tmp_path / f"c{i}"), outs[i], i))
        for i in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    choices = {open(o).read() for o in outs}
    assert len(choices) == 1
    default = canonical(FakeKernelDef().default(SPEC, LIM))
    assert choices == {default}  # every point ties within 2%: the default wins


def test_default_outside_the_space_is_still_a_candidate():
    """A default that omits a parameter of the space is measured on its own and wins when it is fastest
    (seen on the GPU: slc_topk's default had no MERGE, the space lists MERGE; every trial was slower)."""

    class NoStages(FakeKernelDef):
        def default(self, spec, limits):
            d = super().default(spec, limits)
            del d["num_stages"]  # the kernel's own default for it applies
            return d

    def slow_unless_default(cfg):
        return 1.0 if "num_stages" not in cfg else 1.5

    reg = {"fake_fwd": NoStages()}
    res = tune_kernel(
        SPEC,
        "fake_fwd",
        T=1000,
        trials=10,
        timer=FakeTimer(slow_unless_default),
        target=FakeTarget(),
        limits=LIM,
        registry=reg,
    )
    assert res.config == NoStages().default(SPEC, LIM) and res.time_ms == pytest.approx(1.0)
    assert res.default_ms == pytest.approx(1.0) and res.speedup == pytest.approx(1.0)


def test_sampler_names():
    """Each name of ``SAMPLERS`` builds the matching Optuna sampler; an unknown name lists the choices."""
    assert isinstance(search._sampler("tpe", 0, 4), optuna.samplers.TPESampler)
    assert isinstance(search._sampler("random", 0, 4), optuna.samplers.RandomSampler)
    with pytest.raises(ValueError, match="tpe, gp, random"):
        search._sampler("grid", 0, 4)


def test_gp_sampler_name():
    pytest.importorskip("scipy")  # Optuna's GP sampler needs it; not a dependency of ours
    assert isinstance(search._sampler("gp", 0, 4), optuna.samplers.GPSampler)


def test_default_neighbours_nearest_first():
    """One-parameter moves from the default, one step in every parameter before two steps in any."""
    from nsa_dsl.tuning.space import default_neighbours

    space = {"a": [1, 2, 3, 4], "b": ["x", "y"], "c": [7]}
    nbs = default_neighbours({"a": 2, "b": "x", "c": 7}, space)
    assert nbs == [
        {"a": 1, "b": "x", "c": 7}, {"a": 3, "b": "x", "c": 7}, {"a": 2, "b": "y", "c": 7},
        {"a": 4, "b": "x", "c": 7},
    ]
    # a default value outside the choices: every choice is one step away
    assert default_neighbours({"a": 9, "b": "y", "c": 7}, {"a": [1, 2], "b": ["y"]}) == [
        {"a": 1, "b": "y"}, {"a": 2, "b": "y"}]


def test_neighbour_seeding_evaluates_valid_neighbours_first(tmp_path):
    """``neighbours``: after the default, the first trials are its valid one-parameter neighbours in order
    (from BLOCK_M 128, BLOCK_N 64 breaks the fake kernel's tile rule and is skipped)."""
    from nsa_dsl.tuning.space import default_neighbours

    class Wide(FakeKernelDef):
        def default(self, spec, limits):
            return {**super().default(spec, limits), "BLOCK_M": 128}

    kd = Wide()
    j = tmp_path / "s.journal"
    res = tune_kernel(SPEC, "fake_fwd", T=1000, trials=8, neighbours=0.5, timer=FakeTimer(fake_time),
                      target=FakeTarget(), storage_path=j, save=False, confirm=0, compile_jobs=0, limits=LIM,
                      registry={"fake_fwd": kd})
    st, name = search.study_storage(j, res.key)
    study = optuna.load_study(study_name=name, storage=st)
    got = [json.loads(t.user_attrs["config"]) for t in search.evaluated_trials(study)]
    default = kd.default(SPEC, LIM)
    nbs = default_neighbours(default, kd.space(SPEC, LIM))
    valid = [n for n in nbs if kd.check(SPEC, n, LIM) is None]
    assert {**default, "BLOCK_N": 64} in nbs and {**default, "BLOCK_N": 64} not in valid
    assert got[0] == default and got[1:5] == valid[:4]


class _RecordingPrecompiler:
    """Stands in for ``search.Precompiler``: records the size of every batch it is asked to compile."""

    def __init__(self, jobs: int) -> None:
        self.jobs, self.batches = jobs, []

    def warm(self, configs):
        self.batches.append(len(configs))
        return [None] * len(configs)


@pytest.mark.parametrize("share, expected", [(1, [8, 4]), (2, [6, 3, 2]), (3, [4, 3, 2])])
def test_batches_leave_the_other_workers_their_share(share, expected):
    """A worker takes at most 1/share of the trials still to run per batch, so that with N workers the
    first one to ask cannot take most of the budget (8 of 12) while the others idle (a batch of one is
    evaluated without the precompiler, hence not recorded)."""
    storage = optuna.storages.InMemoryStorage()
    study = search.open_study(storage, "share", seed=0)
    kd = FakeKernelDef()
    space = kd.space(SPEC, LIM)
    ctx = search._Ctx(kd, SPEC, LIM, space, FakeTarget(), FakeTimer(fake_time))
    pre = _RecordingPrecompiler(8)
    search.run_search(study, ctx, trials=12, budget_seconds=None, n_valid=198, precompile=pre, share=share)
    assert len(search.evaluated_trials(study)) == 12
    assert pre.batches == expected


def test_phase_seconds_say_where_the_search_time_went():
    """Each evaluated trial keeps its build / gate / timing seconds; the result sums them (plus the
    confirmation) and the cache record carries them."""
    import time

    class SlowTimer(FakeTimer):
        def __call__(self, cand):
            time.sleep(0.02)
            return super().__call__(cand)

    timer = SlowTimer(fake_time)
    res = tune_kernel(SPEC, "fake_fwd", T=1000, trials=6, timer=timer, target=FakeTarget(), **KW)
    ph = res.phase_seconds
    assert set(ph) == set(search.PHASES)
    assert all(v >= 0 for v in ph.values())
    evaluated_ok = res.trials - res.failed - res.rejected
    assert ph["timing"] >= 0.02 * evaluated_ok > 0  # every timed trial slept in the timer
    assert ph["confirm"] >= 0.02  # the confirmation re-times at least the best candidate
    assert res.to_record()["phase_seconds"] == ph


def test_two_parameter_neighbours_by_distance():
    """``neighbours(max_params=2)``: one- and two-parameter moves ordered by summed steps, then by the number
    of parameters moved, then by parameter order."""
    from nsa_dsl.tuning.space import neighbours

    space = {"a": [1, 2, 3, 4], "b": ["x", "y"], "c": [7]}
    p = {"a": 2, "b": "x", "c": 7}
    assert neighbours(p, space, max_params=2) == [
        {"a": 1, "b": "x", "c": 7}, {"a": 3, "b": "x", "c": 7}, {"a": 2, "b": "y", "c": 7},  # 1 step
        {"a": 4, "b": "x", "c": 7},  # 2 steps, one parameter
        {"a": 1, "b": "y", "c": 7}, {"a": 3, "b": "y", "c": 7},  # 2 steps, two parameters
        {"a": 4, "b": "y", "c": 7},  # 3 steps
    ]
    assert neighbours(p, space) == neighbours(p, space, max_params=1)
    with pytest.raises(ValueError, match="max_params"):
        neighbours(p, space, max_params=3)


def test_local_phase_walks_the_incumbents_neighbours(tmp_path):
    """``local``: the last share of the budget goes to valid one- or two-parameter moves from the best point
    found so far (here all of it: after the default, every trial is such a move of the incumbent at its
    time), and the walk ends no worse than where it started."""
    journal = tmp_path / "local.journal"
    res = tune_kernel(SPEC, "fake_fwd", T=1000, trials=20, timer=FakeTimer(fake_time), target=FakeTarget(),
                      storage_path=journal, local=1.0, confirm=0, **KW)
    storage, name = search.study_storage(journal, res.key)
    ev = sorted(search.evaluated_trials(optuna.load_study(study_name=name, storage=storage)),
                key=lambda t: t.number)
    assert len(ev) == 20 and ev[0].params == {p: res.default_config[p] for p in ev[0].params}
    best = None
    for t in ev:
        if best is not None:
            moved = [p for p in t.params if t.params[p] != best.params[p]]
            assert 1 <= len(moved) <= 2, (t.params, best.params)
        if t.state == optuna.trial.TrialState.COMPLETE and (best is None or t.value < best.value):
            best = t
    assert best.value < ev[0].value  # the fake landscape's default is not a local optimum
    assert res.time_ms == pytest.approx(best.value)


def test_each_worker_gets_its_own_compile_pool(monkeypatch):
    """min(8, cores / (2 * workers)) compile processes per worker: with a second GPU on a 32-core host the
    host compiles twice as many candidates at once (the 2-GPU run before this rule split one pool of 8)."""
    import torch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cores, workers, each in ((32, 1, 8), (32, 2, 8), (32, 4, 4), (16, 2, 4), (64, 2, 8), (2, 2, 0)):
        monkeypatch.setattr(search.os, "cpu_count", lambda c=cores: c)
        assert search.auto_compile_jobs(workers) == each, (cores, workers)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert search.auto_compile_jobs(1) == 0  # nothing to compile in the interpreter


@pytest.mark.parametrize("ranks", [[2], [], [0, 0], [-1]])
def test_pool_ranks_must_name_distinct_workers(ranks, tmp_path):
    """``tune_kernel(pool=..., ranks=...)``: a rank outside the pool, none, or one twice is a one-line error
    raised before any worker is asked to search."""

    class NoJobs:
        n = 2

        def run_job(self, *a, **k):  # pragma: no cover - reaching it is the failure
            raise AssertionError("a job was sent to the workers")

    with pytest.raises(ValueError, match=r"ranks: distinct worker ranks in 0\.\.1"):
        tune_kernel(SPEC, "fake_fwd", T=1000, trials=4, target=FakeTarget(), pool=NoJobs(), ranks=ranks,
                    storage_path=tmp_path / "s.journal", save=False, **KW)
