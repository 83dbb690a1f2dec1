"""slc_topk (scoring + top-n) and the fused cmp_topk under the Triton interpreter vs the float64 reference.

Indices are compared through the reference scores of the selected blocks (ties are legal), plus structural
checks (ascending, unique, valid, forced blocks present, -1 only trailing and as many as the reference).
"""

from __future__ import annotations

import pytest
import torch
from _cmp_helpers import (
    check_indices,
    make_inputs,
    make_spec,
    poisoned_empty,
    ref_cmp,
    ref_scores_and_indices,
)
from nsa_dsl.codegen.loader import load
from nsa_dsl.codegen.plan import make_plan

from nsa_dsl.derived import derive


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NSA_DSL_CACHE_DIR", str(tmp_path_factory.mktemp("nsa_cache")))
    yield
    mp.undo()


def _check(spec, B, T, dtype=torch.float32, cu=None, config=None, fused=False):  # noqa: N803
    q, kc, vc = make_inputs(spec, B, T, dtype, cu, seed=T)
    ro, rl = ref_cmp(spec, q, kc, vc, cu)
    scores, ref_idx = ref_scores_and_indices(spec, q, kc, cu)
    if fused:
        mod = load(make_plan(spec, "cmp_topk", config))
        with poisoned_empty():
            o, lse, idx = mod.run(q, kc, vc, cu_seqlens=cu)
        tol = 2e-5 if dtype == torch.float32 else 3e-3
        assert not torch.isnan(o).any() and not torch.isnan(lse).any()
        torch.testing.assert_close(o.double(), ro, rtol=tol, atol=tol)
        assert torch.equal(torch.isinf(lse), torch.isinf(rl))
        torch.testing.assert_close(
            lse.double()[torch.isfinite(rl)], rl[torch.isfinite(rl)], rtol=1e-5, atol=tol
        )
    else:
        mod = load(make_plan(spec, "slc_topk", config))
        with poisoned_empty():
            idx = mod.run(q, kc, rl.float(), cu_seqlens=cu)
    assert not (idx == -7).any(), "unwritten index slots"
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    check_indices(spec, idx, ref_idx, scores, cu, rtol=rtol, atol=1e-5 if dtype == torch.float32 else 1e-3)
    return idx


# (spec kwargs, B, T, config); large BLOCK_M keeps the interpreter fast (few programs).
CASES = [
    pytest.param(dict(hq=2, hkv=2, l=8, d=4, lp=16, n=3, fi=1, fl=1), 2, 77, {"BLOCK_M": 64}, id="G1-d<l<l'"),
    pytest.param(
        dict(hq=4, hkv=2, l=4, d=4, lp=8, n=2, fi=0, fl=0), 1, 50, {"BLOCK_M": 64}, id="G2-l=d-noforce"
    ),
    pytest.param(
        dict(hq=4, hkv=1, l=8, d=4, lp=8, n=4, fi=1, fl=2, dk=24),
        1,
        70,
        {"BLOCK_M": 64, "BLOCK_S": 8},
        id="G4-l'=l",
    ),
    pytest.param(
        dict(hq=16, hkv=1, l=8, d=8, lp=8, n=2, fi=0, fl=1), 1, 40, {"BLOCK_M": 128}, id="G16-l=d=l'"
    ),
    pytest.param(dict(hq=4, hkv=2, l=4, d=4, lp=12, n=3, fi=1, fl=1), 1, 61, {"BLOCK_M": 64}, id="ratio3"),
    pytest.param(
        dict(hq=4, hkv=2, l=12, d=4, lp=24, n=2, fi=1, fl=0), 1, 97, {"BLOCK_M": 128}, id="l12d4lp24"
    ),
    pytest.param(dict(hq=4, hkv=2, l=8, d=4, lp=16, n=3, fi=1, fl=1), 1, 10, None, id="T<l'"),
    pytest.param(dict(hq=4, hkv=2, l=8, d=4, lp=16, n=3, fi=1, fl=1), 1, 5, None, id="T<l"),
    pytest.param(
        dict(hq=4, hkv=2, l=8, d=4, lp=8, n=3, fi=0, fl=1),
        1,
        83,
        {"BLOCK_M": 16, "BLOCK_S": 8},
        id="small-tiles",
    ),
]


@pytest.mark.parametrize("kw,B,T,config", CASES)
def test_slc_topk_matches_reference(kw, B, T, config):  # noqa: N803
    _check(make_spec(**kw), B, T, config=config)


@pytest.mark.parametrize("kw,B,T,config", CASES[:4] + CASES[5:6])
def test_fused_cmp_topk_matches_reference(kw, B, T, config):  # noqa: N803
    _check(make_spec(**kw), B, T, config=config, fused=True)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize(
    "variant",
    [
        {"MAP": "dot"},
        {"SKIP": 1},
        {"MAP": "dot", "SKIP": 1, "MERGE": "bitonic", "SELECT": "sort"},
        {"SELECT": "sort"},
        {"SELECT": "topk", "SKIP": 1},
    ],
    ids=str,
)
@pytest.mark.parametrize(
    "kw,T",
    [
        (dict(hq=4, hkv=2, l=8, d=4, lp=16, n=3, fi=1, fl=1), 77),
        (dict(hq=16, hkv=1, l=12, d=4, lp=24, n=2, fi=1, fl=0), 97),
    ],
    ids=["G2", "G16-l12d4lp24"],
)
def test_topk_schedule_variants(kw, T, variant, fused):  # noqa: N803
    """MAP='dot' (hi/lo 16-bit MMAs for the overlap mapping), SKIP=1 (merge only on improvement),
    SELECT='topk' (the running list kept ascending)."""
    cfg = {"BLOCK_M": 64 if kw["hq"] // kw["hkv"] < 16 else 128, "BLOCK_S": 16, **variant}
    _check(make_spec(**kw), 1, T, config=cfg, fused=fused)


def test_topk_bitonic_merge_top16():
    # n = 16 (NP = 16: four half-cleaner stages) over 25 selection blocks, forced initial + 2 local
    spec = make_spec(hq=4, hkv=1, l=8, d=4, lp=8, n=16, fi=1, fl=2)
    _check(spec, 1, 200, config={"BLOCK_M": 64, "BLOCK_S": 16, "MERGE": "bitonic", "SELECT": "sort"})


@pytest.mark.parametrize(
    "kw,T,cfg",
    [
        # ratio 1, chunks wider than the list (fla_compat's shape): tl.topk halves 32 keys to 4 (NP 4 > n 3)
        (dict(hq=4, hkv=2, l=4, d=4, lp=4, n=3, fi=0, fl=0), 150, {"BLOCK_M": 64, "BLOCK_S": 32}),
        # n = 16 with forced blocks, 64-key chunks, the overlap gather (ratio 2)
        (dict(hq=4, hkv=1, l=8, d=4, lp=8, n=16, fi=1, fl=2), 300, {"BLOCK_M": 64, "BLOCK_S": 64}),
        # n = 5 (NP = 8: the best five are the last slots of the ascending list), G = 16
        (dict(hq=16, hkv=1, l=8, d=8, lp=8, n=5, fi=1, fl=1), 120, {"BLOCK_M": 128, "BLOCK_S": 16}),
    ],
    ids=["ratio1-n3-S32", "n16-S64", "G16-n5"],
)
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_topk_select_topk(kw, T, cfg, fused):  # noqa: N803
    """SELECT='topk': a chunk's best from tl.topk, the running list ascending, merged by tl.bitonic_merge."""
    _check(make_spec(**kw), 1, T, config={**cfg, "SELECT": "topk"}, fused=fused)


def test_topk_merge_bitonic_needs_select_sort():
    spec = make_spec(hq=4, hkv=2, l=8, d=4, lp=16, n=3)
    with pytest.raises(ValueError, match=r"MERGE: 'bitonic' applies to SELECT = 'sort' only"):
        make_plan(spec, "slc_topk", {"MERGE": "bitonic", "SELECT": "topk"})


def test_topk_select_topk_varlen():
    spec = make_spec(hq=4, hkv=2, l=4, d=4, lp=4, n=3, fi=1, fl=1)
    cu = torch.tensor([0, 6, 80, 81, 140], dtype=torch.int32)
    _check(spec, 1, 140, cu=cu, config={"BLOCK_M": 64, "BLOCK_S": 16, "SELECT": "topk"})


def test_topk_varlen_matches_per_sequence():
    spec = make_spec(hq=4, hkv=2, l=8, d=4, lp=16, n=3, fi=1, fl=1)
    cu = torch.tensor([0, 6, 45, 46, 90], dtype=torch.int32)
    _check(spec, 1, 90, cu=cu, config={"BLOCK_M": 64})
    _check(spec, 1, 90, cu=cu, config={"BLOCK_M": 64}, fused=True)


def test_topk_varlen_empty_sequences_g3():
    spec = make_spec(hq=6, hkv=2, l=8, d=4, lp=16, n=3, fi=1, fl=1)  # G = 3: padded to 4 rows per token
    cu = torch.tensor([0, 0, 20, 20, 33], dtype=torch.int32)
    _check(spec, 1, 33, cu=cu, config={"BLOCK_M": 32})


def test_topk_fp16():
    _check(make_spec(hq=4, hkv=2, l=8, d=4, lp=16, n=3), 1, 70, dtype=torch.float16, config={"BLOCK_M": 64})


def test_overlap_levels_exercised():
    # The l=12, d=4, l'=24 case spans two groups per block (taps moved back by a gather).
    der = derive(make_spec(l=12, d=4, lp=24, n=2, fi=1, fl=0))
    assert len(der.overlap) > der.ratio


def test_topk_config_check():
    spec = make_spec(n=3)
    with pytest.raises(ValueError, match="BLOCK_S"):
        make_plan(spec, "slc_topk", {"BLOCK_S": 2})
    with pytest.raises(ValueError, match="unknown parameter"):
        make_plan(spec, "slc_topk", {"BLOCK_Q": 16})


# ---- GPU: bf16 at the paper spec against the fp32 reference (same bf16-rounded inputs) -------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "T,fused,spec_name,select",
    [
        (2048, False, "nsa_paper", "sort"),
        (8192, False, "nsa_paper", "sort"),
        (2048, True, "nsa_paper", "sort"),
        (8192, True, "nsa_paper", "sort"),
        (8192, False, "nsa_paper", "topk"),
        (8192, True, "nsa_paper", "topk"),
        (8192, False, "fla_compat", "sort"),
        (8192, False, "fla_compat", "topk"),
    ],
)
def test_gpu_paper_spec_bf16(T, fused, spec_name, select):  # noqa: N803
    """bf16 compression + top-n (separate and fused, both SELECT ways) against the fp32 reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from nsa_dsl.codegen.kernels_cmp import topk_available

    import nsa_dsl
    from nsa_dsl import load_spec

    if select == "topk" and not topk_available():
        pytest.skip("this Triton has no tl.topk / tl.bitonic_merge")
    spec = load_spec(spec_name)
    a = spec.attention
    gen = torch.Generator(device="cuda").manual_seed(T)
    tc = spec.num_compressed(T)
    q = torch.randn(1, T, a.heads, a.head_dim_qk, device="cuda", generator=gen).bfloat16()
    kc = torch.randn(1, tc, a.kv_heads, a.head_dim_qk, device="cuda", generator=gen).bfloat16()
    vc = torch.randn(1, tc, a.kv_heads, a.head_dim_v, device="cuda", generator=gen).bfloat16()
    ops = nsa_dsl.compile(spec).with_schedule(cmp_select="fused" if fused else "separate")
    ops = ops.with_config("cmp_topk" if fused else "slc_topk", {"SELECT": select})
    with poisoned_empty():
        o, lse, idx = ops.cmp_select(q, kc, vc)
    from nsa_dsl.reference import compressed_attention, compression_probs, select_blocks, selection_scores

    ro, rl = compressed_attention(q.float(), kc.float(), vc.float(), spec)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(o.float(), ro, rtol=2e-2, atol=2e-2)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    fin = torch.isfinite(rl)
    torch.testing.assert_close(lse[fin], rl[fin], rtol=1e-4, atol=1e-3)
    del ro
    scores = selection_scores(compression_probs(q.float(), kc.float(), spec), spec, T)
    ref_idx = select_blocks(scores, spec, T)
    check_indices(spec, idx.cpu(), ref_idx.cpu(), scores.double().cpu(), None, rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
def test_gpu_paper_spec_128k_sampled_rows():
    """T = 128k (paper spec, bf16): cmp_fwd + slc_topk run; 45 sampled rows match an fp64 recomputation."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import nsa_dsl
    from nsa_dsl import load_spec
    from nsa_dsl.reference import overlap_matrix

    spec = load_spec("nsa_paper")
    a, T = spec.attention, 131072  # noqa: N806
    tc, nslc, lp = spec.num_compressed(T), spec.num_selection_blocks(T), spec.selection.block
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, T, a.heads, a.head_dim_qk, device="cuda", generator=gen).bfloat16()
    kc = torch.randn(1, tc, a.kv_heads, a.head_dim_qk, device="cuda", generator=gen).bfloat16()
    vc = torch.randn(1, tc, a.kv_heads, a.head_dim_v, device="cuda", generator=gen).bfloat16()
    ops = nsa_dsl.compile(spec).with_schedule(cmp_select="separate")
    o, lse, idx = ops.cmp_select(q, kc, vc)
    torch.cuda.synchronize()
    rows = torch.cat(
        [
            torch.tensor([0, 30, 31, 63, 64, 4095]),
            torch.randint(0, T, (36,), generator=torch.Generator().manual_seed(0)),
            torch.tensor([T - 1]),
        ]
    )
    rows = rows.tolist() + [T - 64 * 5 - 1, T - 2]
    M = overlap_matrix(spec, tc, nslc, device="cuda")  # noqa: N806
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741
    for t in rows:
        nv = max(0, (t - l + 1) // d + 1) if t >= l - 1 else 0
        if nv == 0:
            assert bool(torch.isinf(lse[0, t]).all()) and bool((o[0, t] == 0).all())
            continue
        qt = q[0, t].double().view(a.kv_heads, spec.G, -1)
        s = torch.einsum("hgd,nhd->hgn", qt, kc[0, :nv].double()) * spec.scale
        p = torch.softmax(s, -1)
        ot = torch.einsum("hgn,nhd->hgd", p, vc[0, :nv].double()).reshape(a.heads, -1)
        torch.testing.assert_close(o[0, t].double(), ot, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(
            lse[0, t].double(), torch.logsumexp(s, -1).reshape(-1), rtol=1e-4, atol=1e-3
        )
        sc = (p.sum(1) @ M[:nv]).clone()  # [Hkv, Nslc]
        cur = t // lp
        sc[:, cur + 1 :] = float("-inf")
        forced = [j for j in range(spec.selection.force_initial)] + [
            cur - k for k in range(spec.selection.force_local)
        ]
        forced = [j for j in forced if 0 <= j <= cur]
        for h in range(a.kv_heads):
            sel = idx[0, t, h].long()
            sel = sel[sel >= 0]
            assert len(sel) == min(spec.selection.top_n, cur + 1)
            assert all(j in sel.tolist() for j in forced)
            s_forced = sc[h].clone()
            s_forced[forced] = float("inf")
            want = torch.topk(s_forced, len(sel)).values
            got = torch.sort(s_forced[sel], descending=True).values
            fin = torch.isfinite(want)
            torch.testing.assert_close(got[fin], want[fin], rtol=1e-3, atol=1e-6)


def test_select_topk_needs_tl_topk(monkeypatch):
    """A Triton without tl.topk / tl.bitonic_merge defaults to SELECT = "sort"; "topk" names the rule."""
    from nsa_dsl.codegen import kernels_cmp

    spec = make_spec(hq=4, hkv=2, l=8, d=4, lp=16, n=3)
    has = kernels_cmp.topk_available()
    assert make_plan(spec, "slc_topk").config["SELECT"] == ("topk" if has else "sort")
    monkeypatch.setattr(kernels_cmp, "topk_available", lambda: False)
    assert make_plan(spec, "slc_topk").config["SELECT"] == "sort"
    why = r"^config\.slc_topk: SELECT: 'topk' needs tl\.topk and tl\.bitonic_merge"
    with pytest.raises(ValueError, match=why):
        make_plan(spec, "slc_topk", {"SELECT": "topk"})
