"""NSAOps (nsa_dsl.compile) end to end under the interpreter vs nsa_dsl.reference.nsa_attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _cmp_helpers import check_indices, make_spec, ref_scores_and_indices
from nsa_dsl.codegen.ops import NSAOps
from nsa_dsl.codegen.plan import get_kernel

import nsa_dsl
from nsa_dsl.reference import compressed_cu_seqlens, nsa_attention


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NSA_DSL_CACHE_DIR", str(tmp_path_factory.mktemp("nsa_cache")))
    yield
    mp.undo()


def _inputs(spec, B, T, cu=None, dtype=torch.float32, seed=0):  # noqa: N803
    gen = torch.Generator().manual_seed(seed)
    a = spec.attention
    tc = spec.num_compressed(T) if cu is None else int(compressed_cu_seqlens(cu, spec)[-1])

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q = r(B, T, a.heads, a.head_dim_qk)
    k = r(B, T, a.kv_heads, a.head_dim_qk)
    v = r(B, T, a.kv_heads, a.head_dim_v)
    kc = r(B, tc, a.kv_heads, a.head_dim_qk)
    vc = r(B, tc, a.kv_heads, a.head_dim_v)
    g = torch.rand(B, T, a.heads, 3, generator=gen).to(dtype)
    return q, k, v, kc, vc, g


def _compare(ops: NSAOps, spec, B, T, cu=None, dtype=torch.float32):  # noqa: N803
    q, k, v, kc, vc, g = _inputs(spec, B, T, cu, dtype)
    o, idx = ops.forward(q, k, v, kc, vc, g, cu_seqlens=cu, return_indices=True)
    ro = nsa_attention(*(t.double() for t in (q, k, v, kc, vc, g)), spec, cu_seqlens=cu)
    scores, ref_idx = ref_scores_and_indices(spec, q, kc, cu)
    check_indices(spec, idx, ref_idx, scores, cu)
    # Near-tie rows may legally select different blocks: compare o only where the selections agree.
    same = (torch.sort(idx.long(), -1).values == torch.sort(ref_idx.long(), -1).values).all(-1)  # [B,T,Hkv]
    rows = same.repeat_interleave(spec.G, dim=2)
    assert rows.float().mean() > 0.9
    tol = 3e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(o.double()[rows], ro[rows], rtol=tol, atol=tol)
    return o


SPEC_KW = dict(hq=4, hkv=2, dk=16, dv=16, l=8, d=4, lp=16, n=3, fi=1, fl=1, w=16)


@pytest.mark.parametrize(
    "sched",
    [{"cmp_select": "fused"}, {"cmp_select": "separate", "combine": "kernel"}],
    ids=["fused+epilogue", "separate+kernel"],
)
def test_forward_matches_reference(sched):
    spec = make_spec(**SPEC_KW)
    ops = nsa_dsl.compile(spec).with_schedule(**sched)
    _compare(ops, spec, 2, 53)


def test_forward_no_window_dk_ne_dv_g4():
    spec = make_spec(hq=8, hkv=2, dk=32, dv=16, l=4, d=4, lp=8, n=2, fi=0, fl=0, w=0)
    _compare(nsa_dsl.compile(spec), spec, 1, 41)


def test_forward_varlen():
    spec = make_spec(**SPEC_KW)
    cu = torch.tensor([0, 7, 40, 61], dtype=torch.int32)
    _compare(nsa_dsl.compile(spec), spec, 1, 61, cu=cu)


def test_forward_train_saved_and_fp16():
    spec = make_spec(**SPEC_KW)
    ops = nsa_dsl.compile(spec)
    q, k, v, kc, vc, g = _inputs(spec, 1, 37, dtype=torch.float16)
    o, saved = ops.forward_train(q, k, v, kc, vc, g)
    assert set(saved) == {"o_cmp", "lse_cmp", "o_slc", "lse_slc", "o_win", "lse_win", "indices"}
    assert saved["lse_cmp"].dtype == torch.float32 and saved["indices"].dtype == torch.int32
    assert o.dtype == torch.float16 and o.shape == (1, 37, 4, 16)
    ro = nsa_attention(*(t.double() for t in (q, k, v, kc, vc, g)), spec)
    torch.testing.assert_close(o.double(), ro, rtol=5e-3, atol=5e-3)


def test_config_override_and_with_config():
    spec = make_spec(**SPEC_KW)
    ops = nsa_dsl.compile(spec, {"cmp_topk": {"BLOCK_M": 32}})
    assert ops.config_for("cmp_topk", T=64)["BLOCK_M"] == 32
    ops2 = ops.with_config("cmp_topk", {"BLOCK_M": 64})
    assert (
        ops2.config_for("cmp_topk", T=64)["BLOCK_M"] == 64
        and ops.config_for("cmp_topk", T=64)["BLOCK_M"] == 32
    )
    with pytest.raises(ValueError, match="config.nope"):
        nsa_dsl.compile(spec, {"nope": {}})
    with pytest.raises(ValueError, match="BLOCK_M"):
        nsa_dsl.compile(spec, {"cmp_fwd": {"BLOCK_M": 24}})
    with pytest.raises(ValueError, match="schedule.cmp_select"):
        ops.with_schedule(cmp_select="magic")


def test_forward_rejects_bad_shapes():
    spec = make_spec(**SPEC_KW)
    ops = nsa_dsl.compile(spec)
    q, k, v, kc, vc, g = _inputs(spec, 1, 20)
    with pytest.raises(ValueError, match="k_cmp"):
        ops.forward(q, k, v, kc[:, :-1], vc, g)
    with pytest.raises(ValueError, match="^g:"):
        ops.forward(q, k, v, kc, vc, g[..., :2])


def test_tuned_lookup_used_and_stale_record_ignored(monkeypatch):
    import nsa_dsl.tuning as tuning

    spec = make_spec(**SPEC_KW)
    monkeypatch.setattr(tuning, "lookup", lambda s, k, **kw: {"BLOCK_M": 32} if k == "cmp_fwd" else None)
    assert nsa_dsl.compile(spec).config_for("cmp_fwd", T=64)["BLOCK_M"] == 32
    monkeypatch.setattr(tuning, "lookup", lambda s, k, **kw: {"OLD_PARAM": 1})
    ops = nsa_dsl.compile(spec)
    assert ops.config_for("cmp_fwd", T=64) == get_kernel("cmp_fwd").default(spec, ops.limits)
    assert nsa_dsl.compile(spec, {"cmp_fwd": {"BLOCK_N": 32}}).config_for("cmp_fwd", T=64)["BLOCK_N"] == 32


def test_schedule_record_from_the_tuner_is_used(monkeypatch, tmp_path):
    """A ``schedule.cmp_select`` record in the user's tuning cache switches the op to the fused kernel at
    that shape bucket only; an explicit schedule beats it; a record naming an unknown choice is ignored."""
    import nsa_dsl.tuning as tuning
    from nsa_dsl.tuning import store
    from nsa_dsl.tuning.keys import key_fields

    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "SHIPPED_DIR", tmp_path / "no_shipped")
    tuning.clear_memory()
    spec = make_spec(**SPEC_KW)
    lim = nsa_dsl.compile(spec).limits
    store.user_store().put(
        {
            "fields": key_fields(spec, "schedule.cmp_select", T=53, B=2, limits=lim),
            "config": {"choice": "fused"},
            "default_config": {"choice": "separate"},
        }
    )
    try:
        ops = nsa_dsl.compile(spec)
        assert ops.schedule_for("cmp_select", T=53, B=2) == "fused"  # T bucket 64, B bucket 2
        assert ops.schedule_for("cmp_select", T=200, B=2) == "separate"  # no record: the default
        assert ops.schedule_for("cmp_select") == "separate"  # no shape: the default
        assert ops.schedule_for("combine", T=53, B=2) == "epilogue"
        assert ops.with_schedule(cmp_select="separate").schedule_for("cmp_select", T=53, B=2) == "separate"
        assert dataclasses.replace(ops, use_tuned=False).schedule_for("cmp_select", T=53, B=2) == "separate"

        ran = []
        real_module = ops.module
        monkeypatch.setattr(ops, "module", lambda k, **kw: ran.append(k) or real_module(k, **kw))
        _compare(ops, spec, 2, 53)
        assert "cmp_topk" in ran and "cmp_fwd" not in ran and "slc_topk" not in ran

        monkeypatch.setattr(tuning, "lookup", lambda s, k, **kw: {"choice": "magic"})
        assert nsa_dsl.compile(spec).schedule_for("cmp_select", T=53, B=2) == "separate"
        with pytest.raises(ValueError, match="schedule.nope"):
            ops.schedule_for("nope")
    finally:
        tuning.clear_memory()


def test_separate_window_kv_one_pass_and_with_grad():
    """``k_win``/``v_win`` feed only the window branch (reference: ``nsa_branches(..., k_win, v_win)``),
    in one pass without gradients and through the differentiable op with them."""
    from nsa_dsl.reference import combine_branches, nsa_branches

    spec = make_spec(**SPEC_KW)
    ops = nsa_dsl.compile(spec)
    q, k, v, kc, vc, g = _inputs(spec, 1, 45, seed=1)
    kw, vw = (torch.randn_like(t) for t in (k, v))
    o, saved = ops.forward_train(q, k, v, kc, vc, g, k_win=kw, v_win=vw)
    d = [t.double() for t in (q, k, v, kc, vc)]
    br = nsa_branches(*d, spec, k_win=kw.double(), v_win=vw.double())
    torch.testing.assert_close(saved["o_win"].double(), br["o_win"], rtol=3e-5, atol=3e-5)
    idx_same = (torch.sort(saved["indices"].long(), -1).values == torch.sort(br["indices"].long(), -1).values)
    rows = idx_same.all(-1).repeat_interleave(spec.G, dim=2)
    assert rows.float().mean() > 0.9
    ro = combine_branches(br, g.double(), spec)
    torch.testing.assert_close(o.double()[rows], ro[rows], rtol=3e-5, atol=3e-5)
    assert not torch.allclose(o, ops.forward(q, k, v, kc, vc, g), atol=1e-3)  # the window K/V is used

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, kc, vc, g, kw, vw)]
    calls = []
    train = ops.forward_train

    def counting(*a, **kw_):
        calls.append(kw_.get("k_win") is not None)
        return train(*a, **kw_)

    ops.forward_train = counting  # the differentiable op runs every branch in one forward pass
    try:
        og = ops.forward(*leaves[:6], k_win=leaves[6], v_win=leaves[7])
    finally:
        del ops.forward_train
    assert calls == [True]
    torch.testing.assert_close(og.detach(), o, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(og.square().sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    rb = nsa_branches(*ref_leaves[:5], spec, k_win=ref_leaves[6], v_win=ref_leaves[7])
    rg = torch.autograd.grad(combine_branches(rb, ref_leaves[5], spec).square().sum(), ref_leaves)
    assert rows.all()  # this seed has no near-tie selections: gradients are comparable everywhere
    names = ("q", "k", "v", "k_cmp", "v_cmp", "g", "k_win", "v_win")
    for name, a_, b_ in zip(names, grads, rg, strict=True):
        torch.testing.assert_close(a_.double(), b_, rtol=1e-4, atol=1e-4, msg=name)
    assert grads[6].abs().sum() > 0 and grads[7].abs().sum() > 0
    with pytest.raises(ValueError, match="k_win/v_win"):
        ops.forward(q, k, v, kc, vc, g, k_win=kw)
    with pytest.raises(ValueError, match="^k_win:"):
        ops.forward(q, k, v, kc, vc, g, k_win=kw[:, :-1], v_win=vw)


@pytest.mark.parametrize("G", [2, 16])
def test_varlen_max_seqlen_reads_nothing_back(G, monkeypatch):  # noqa: N803
    """With ``cu_seqlens`` and ``max_seqlen`` the differentiable op (forward and backward, separate window K/V
    too) reads no tensor value on the host (on a GPU each read is a device sync) and gives the same output
    and gradients as without ``max_seqlen``."""
    kw = dict(SPEC_KW, hq=G * 2)
    spec = make_spec(**kw)
    ops = nsa_dsl.compile(spec)
    cu = torch.tensor([0, 5, 5, 40, 61], dtype=torch.int32)
    base = _inputs(spec, 1, 61, cu, seed=3)
    kw_, vw_ = (torch.randn_like(t) for t in base[1:3])

    def run(max_seqlen):
        leaves = [t.clone().requires_grad_(True) for t in (*base, kw_, vw_)]
        o = ops.forward(*leaves[:6], cu_seqlens=cu, k_win=leaves[6], v_win=leaves[7], max_seqlen=max_seqlen)
        return o.detach(), torch.autograd.grad(o.square().sum(), leaves)

    want_o, want_g = run(None)

    def refuse(*a, **k):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "__int__", "__bool__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    got_o, got_g = run(35)
    monkeypatch.undo()
    torch.testing.assert_close(got_o, want_o, rtol=0, atol=0)
    for a_, b_ in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a_, b_, rtol=0, atol=0)
    with pytest.raises(ValueError, match="^max_seqlen:"):
        ops.forward(*base, cu_seqlens=cu, max_seqlen=62)
