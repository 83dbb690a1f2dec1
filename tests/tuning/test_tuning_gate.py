"""The correctness gate on real generated kernels, run by Triton's interpreter at tiny shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nsa_dsl import load_spec

plan = pytest.importorskip("nsa_dsl.codegen.plan")

from nsa_dsl.tuning import canonical, tune_kernel  # noqa: E402
from nsa_dsl.tuning.targets import KernelTarget, check_indices  # noqa: E402
from nsa_dsl.tuning.timing import FakeTimer  # noqa: E402

SPEC = load_spec("tiny")  # float32, G = 2: the interpreter computes exactly enough for tight tolerances
INTERP = plan.DeviceLimits.interpreter_limits()


def _need(kernel):
    if kernel not in plan.all_kernels():
        pytest.skip(f"{kernel} not registered")
    return plan.get_kernel(kernel)


class _Proxy:
    """A built module whose output is altered by ``fn`` (a wrong candidate)."""

    def __init__(self, mod, fn):
        self.mod, self.fn = mod, fn

    def run(self, *a, **k):
        return self.fn(self.mod.run(*a, **k))


@pytest.mark.parametrize("kernel", ["cmp_fwd", "win_fwd", "slc_topk"])
def test_default_passes_and_wrong_output_is_rejected(kernel):
    kd = _need(kernel)
    tg = KernelTarget(SPEC, kernel, T=64, limits=INTERP)
    cfg = kd.default(SPEC, INTERP)
    built = tg.build(cfg)
    assert tg.gate(built, cfg) is None
    if kernel == "slc_topk":

        def drop_last(idx):
            idx = idx.clone()
            idx[..., 0] = -1  # drop one selected block (block 0 is forced)
            return idx

        def reverse(idx):
            return idx.flip(-1)  # the same set in another order: legal

        why = tg.gate(_Proxy(built, drop_last), cfg)
        assert why and "indices" in why
        assert tg.gate(_Proxy(built, reverse), cfg) is None
    else:
        why = tg.gate(_Proxy(built, lambda out: (out[0] + 1e-2, out[1])), cfg)
        assert why and why.startswith("o:")
        why = tg.gate(_Proxy(built, lambda out: (out[0], out[1] - 1e-2)), cfg)
        assert why and why.startswith("lse:")


def test_check_indices_scores_not_indices():
    """A tie between two blocks may be broken either way; a lower-scoring block may not replace a higher."""
    from nsa_dsl import reference as ref

    spec = SPEC
    T = 80  # noqa: N806
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, spec.attention.heads, spec.attention.head_dim_qk, generator=g, dtype=torch.float64)
    kc = torch.randn(
        1,
        spec.num_compressed(T),
        spec.attention.kv_heads,
        spec.attention.head_dim_qk,
        generator=g,
        dtype=torch.float64,
    )
    scores = ref.selection_scores(ref.compression_probs(q, kc, spec), spec, T)
    idx = ref.select_blocks(scores, spec, T)
    assert check_indices(idx, scores, idx, spec, tol=1e-9) is None
    # Make blocks 1 and 2 exactly tied for one row, then swap which one is chosen.
    t, h = 79, 0
    row = idx[0, t, h].tolist()
    nslc = scores.shape[-1]
    unchosen = [j for j in range(nslc) if j not in row and j <= t // spec.selection.block]
    chosen_free = [
        j
        for j in row
        if j >= spec.selection.force_initial
        and j < t // spec.selection.block - spec.selection.force_local + 1
    ]
    assert unchosen and chosen_free
    a, b = chosen_free[0], unchosen[0]
    swapped = idx.clone()
    swapped[0, t, h] = torch.tensor(sorted([b if j == a else j for j in row]))
    assert check_indices(swapped, scores, idx, spec, tol=1e-9) is not None  # lower score: wrong
    tied = scores.clone()
    tied[0, t, h, b] = tied[0, t, h, a]
    assert check_indices(swapped, tied, idx, spec, tol=1e-9) is None  # exact tie: either is right


def test_wrong_candidate_never_wins_a_real_search():
    """cmp_fwd through the interpreter: the candidate the timer likes best computes a wrong output."""
    kd = _need("cmp_fwd")
    small = dataclasses.replace(
        kd,
        space=lambda spec, limits: {
            "BLOCK_M": [16, 32],
            "BLOCK_N": [16, 32],
            "num_warps": [4],
            "num_stages": [1],
        },
    )
    bad = {**kd.default(SPEC, INTERP), "BLOCK_M": 32, "BLOCK_N": 32}

    class Corrupting(KernelTarget):
        def build(self, config):
            mod = super().build(config)
            if canonical(config) == canonical(bad):
                return _Proxy(mod, lambda out: (out[0] * 1.01, out[1]))
            return mod

    def fake_ms(cfg):
        return (
            0.5 if canonical(cfg) == canonical(bad) else 1.0 + cfg["BLOCK_M"] / 1000 + cfg["BLOCK_N"] / 10000
        )

    tg = Corrupting(SPEC, "cmp_fwd", T=48, limits=INTERP)
    res = tune_kernel(
        SPEC,
        "cmp_fwd",
        T=48,
        limits=INTERP,
        trials=4,
        timer=FakeTimer(fake_ms),
        target=tg,
        registry={"cmp_fwd": small},
    )
    assert res.rejected == 1 and res.trials == 4
    assert canonical(res.config) != canonical(bad)
    assert res.config["BLOCK_M"] == 16 and res.config["BLOCK_N"] == 16  # the fastest correct one


def test_decode_target_gate():
    _need("decode")
    from nsa_dsl.tuning.targets import default_target

    tg = default_target(SPEC, "decode", T=40, limits=INTERP)
    cfg = plan.get_kernel("decode").default(SPEC, INTERP)
    ops = tg.build(cfg)
    assert tg.gate(ops, cfg) is None

    class Wrong:
        def decode(self, q, cache, g):
            return ops.decode(q, cache, g) * 1.05

    why = tg.gate(Wrong(), cfg)
    assert why and why.startswith("o:")


def test_backward_target_gate():
    _need("bwd_pre")
    from nsa_dsl.tuning.targets import default_target

    tg = default_target(SPEC, "bwd_pre", T=24, limits=INTERP)
    cfg = plan.get_kernel("bwd_pre").default(SPEC, INTERP)
    built = tg.build(cfg)
    assert tg.gate(built, cfg) is None
    ops, mod = built
    real_module = ops.module

    def module(name, **kw):
        m = real_module(name, **kw)
        if name != "bwd_pre":
            return m
        return _Proxy(m, lambda out: (out[0] * 1.1, out[1]))  # wrong dg

    ops.module = module
    why = tg.gate((ops, mod), cfg)
    assert why and why.startswith("dg")


def test_backward_target_window_with_the_compressed_dq():
    """A bwd_win config with DQ_CMP = 1 (the GPU default) passes the gate (the whole backward with it) and its
    timing call runs: the window module is given the compressed branch's inputs it then needs."""
    _need("bwd_win")
    from nsa_dsl.tuning.targets import default_target

    tg = default_target(SPEC, "bwd_win", T=24, limits=INTERP)
    cfg = {**plan.get_kernel("bwd_win").default(SPEC, INTERP), "DQ_CMP": 1}
    built = tg.build(cfg)
    assert tg.gate(built, cfg) is None
    cand = tg.candidate(built, cfg)
    for i in range(cand.n_inputs):
        cand.run(i)


def test_schedule_choice_is_tuned_and_looked_up():
    """The fused-vs-separate compression+selection composition is a tunable record like a kernel's."""
    pytest.importorskip("nsa_dsl.codegen.ops")
    from nsa_dsl.tuning import lookup
    from nsa_dsl.tuning.schedules import schedule_defs

    if "schedule.cmp_select" not in schedule_defs() or "cmp_topk" not in plan.all_kernels():
        pytest.skip("no cmp_select schedule choice in this generator")
    times = {"separate": 2.0, "fused": 1.0}
    res = tune_kernel(
        SPEC,
        "schedule.cmp_select",
        T=40,
        limits=INTERP,
        trials=2,
        timer=FakeTimer(lambda c: times[c["choice"]]),
    )
    assert res.trials == 2 and res.rejected == 0 and res.failed == 0  # both compositions pass the gate
    assert res.config == {"choice": "fused"} and res.default_config == {"choice": "separate"}
    assert lookup(SPEC, "schedule.cmp_select", T=40, B=1, limits=INTERP) == {"choice": "fused"}
