"""Search spaces: validity of every kept point, pruning of invalid ones before compiling."""

from __future__ import annotations

import itertools

import pytest
from nsa_dsl.tuning import space as sp
from nsa_dsl.tuning.testing import FakeKernelDef, FakeTarget, fake_registry, fake_time
from nsa_dsl.tuning.timing import FakeTimer

from nsa_dsl import load_spec


class _Limits:
    def __init__(self, smem=1 << 30, name="fake-gpu", capability=(9, 0), sm_count=132, interpreter=False):
        self.name, self.capability, self.sm_count = name, capability, sm_count
        self.smem_per_block, self.interpreter = smem, interpreter


SPEC = load_spec("tiny")


def test_fake_space_pruning_matches_brute_force():
    kd = FakeKernelDef()
    good, bad = sp.valid_points(kd, SPEC, _Limits())
    # Independent count: BLOCK_M * BLOCK_N <= 4096 is the only rule that bites in this space.
    expect_good = sum(
        1
        for m, n, w, s, sch in itertools.product([16, 32, 64, 128], [16, 32, 64], [2, 4, 8], [1, 2, 3], "ab")
        if m * n <= 4096
    )
    assert len(good) == expect_good == 198
    assert len(bad) == 4 * 3 * 3 * 3 * 2 - 198
    for cfg in good:
        assert kd.check(SPEC, cfg, _Limits()) is None
        assert sp.device_check(kd, SPEC, cfg, _Limits()) is None
    for cfg, why in bad:
        assert cfg["BLOCK_M"] * cfg["BLOCK_N"] > 4096 and "BLOCK_M*BLOCK_N" in why


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"BLOCK_N": 48}, "powers of two"),
        ({"BLOCK_M": 0}, "powers of two"),
        ({"num_warps": 3}, "num_warps"),
        ({"num_warps": 64}, "num_warps"),
        ({"num_stages": 0}, "num_stages"),
        ({"num_stages": 9}, "num_stages"),
    ],
)
def test_device_check_rules(patch, needle):
    kd = FakeKernelDef()
    cfg = {**kd.default(SPEC, _Limits()), **patch}
    why = sp.device_check(kd, SPEC, cfg, _Limits())
    assert why is not None and needle in why


def test_shared_memory_estimate_prunes():
    kd = FakeKernelDef()
    paper = load_spec("nsa_paper")  # dk 192 -> 256 padded, dv 128, bf16
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "schedule": "group"}
    big = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "schedule": "group"}
    need_small = sp.smem_estimate(kd, paper, small)
    need_big = sp.smem_estimate(kd, paper, big)
    # q tile 16x256 + one kv stage 16x(256+128), 2 bytes each
    assert need_small == 2 * (16 * 256 + 16 * 384)
    assert need_big > need_small
    lim = _Limits(smem=(need_small + need_big) // 2)
    assert sp.device_check(kd, paper, small, lim) is None
    why = sp.device_check(kd, paper, big, lim)
    assert why and "shared memory" in why
    good, bad = sp.valid_points(kd, paper, lim)
    assert all(sp.smem_estimate(kd, paper, c) <= lim.smem_per_block for c in good)
    assert any("shared memory" in w for _, w in bad)


def test_check_that_raises_rejects_point():
    class Broken(FakeKernelDef):
        def check(self, spec, config, limits):
            raise ZeroDivisionError("boom")

    why = sp.why_invalid(Broken(), SPEC, Broken().default(SPEC, None), _Limits())
    assert why and "ZeroDivisionError" in why


def test_search_never_compiles_invalid_points(tmp_path):
    from nsa_dsl.tuning import tune_kernel

    built = []

    class Recording(FakeTarget):
        def build(self, config):
            built.append(dict(config))
            return super().build(config)

    kd = FakeKernelDef()
    res = tune_kernel(
        SPEC,
        "fake_fwd",
        T=100,
        limits=_Limits(),
        trials=25,
        timer=FakeTimer(fake_time),
        target=Recording(),
        registry=fake_registry(),
        confirm=0,
    )
    assert built and res.trials == 25
    for cfg in built:
        assert sp.why_invalid(kd, SPEC, cfg, _Limits()) is None


def _real_fwd_kernels():
    from nsa_dsl.tuning._compat import get_registry

    return sorted(k for k, d in get_registry().items() if d.pass_ == "fwd")


@pytest.mark.parametrize("spec_name", ["nsa_paper", "small_group"])
def test_registered_kernels_spaces_are_valid_on_h100(spec_name):
    """Every point the tuner keeps for a real kernel is accepted by make_plan; the default is kept."""
    plan = pytest.importorskip("nsa_dsl.codegen.plan")
    spec = load_spec(spec_name)
    lim = plan.DeviceLimits(
        name="NVIDIA H100 80GB HBM3", capability=(9, 0), sm_count=132, smem_per_block=232448
    )
    kernels = _real_fwd_kernels()
    if not kernels:
        pytest.skip("no forward kernels registered yet")
    for k in kernels:
        kd = plan.get_kernel(k)
        if not kd.is_enabled(spec):
            continue
        space = kd.space(spec, lim)
        step = max(1, sp.grid_size(space) // 150)  # a deterministic sample of big grids
        kept = 0
        for p in itertools.islice(sp.iter_points(space), 0, None, step):
            cfg = sp.full_config(kd, spec, p, lim)
            why = sp.why_invalid(kd, spec, cfg, lim)
            if why is None:
                plan.make_plan(spec, k, cfg, lim)  # raises on anything the generator rejects
                kept += 1
        assert kept, f"{k}: no valid point in the sample"
        default = kd.default(spec, lim)
        assert sp.why_invalid(kd, spec, default, lim) is None, k


def test_bwd_slc_keys_layout_needs_two_stages_on_gpus_only():
    """The selection dQ's "keys" layout with one stage faults on sm90 (measured on an H200): its check
    prunes it on GPUs, keeps it in the interpreter (where it is exact and tested), and keeps 2+ stages."""
    plan = pytest.importorskip("nsa_dsl.codegen.plan")
    spec = load_spec("nsa_paper")
    gpu = plan.DeviceLimits(name="NVIDIA H200", capability=(9, 0), sm_count=132, smem_per_block=232448)
    cpu = plan.DeviceLimits.interpreter_limits()
    kd = plan.get_kernel("bwd_slc")
    base = {**kd.default(spec, gpu), "DQ_LAYOUT": "keys", "DQ_TOKENS": 1}
    assert kd.check(spec, {**base, "dq_stages": 2}, gpu) is None
    why = kd.check(spec, {**base, "dq_stages": 1}, gpu)
    assert why and why.startswith("dq_stages:")
    assert kd.check(spec, {**base, "dq_stages": 1}, cpu) is None
