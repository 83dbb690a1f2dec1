"""cmp_fwd (compressed attention forward) under the Triton interpreter vs the float64 reference."""

from __future__ import annotations

import pytest
import torch
from _cmp_helpers import make_inputs, make_spec, poisoned_empty, ref_cmp
from nsa_dsl.codegen.loader import load
from nsa_dsl.codegen.plan import make_plan


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NSA_DSL_CACHE_DIR", str(tmp_path_factory.mktemp("nsa_cache")))
    yield
    mp.undo()


def _run(spec, B, T, dtype=torch.float32, cu=None, config=None):  # noqa: N803
    q, kc, vc = make_inputs(spec, B, T, dtype, cu)
    mod = load(make_plan(spec, "cmp_fwd", config))
    with poisoned_empty():
        o, lse = mod.run(q, kc, vc, cu_seqlens=cu)
    ro, rl = ref_cmp(spec, q, kc, vc, cu)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "unwritten outputs"
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(o.double(), ro, rtol=tol, atol=tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)), "+inf LSE pattern differs"
    fin = torch.isfinite(rl)
    torch.testing.assert_close(lse.double()[fin], rl[fin], rtol=1e-5, atol=tol)
    assert bool((o[torch.isinf(lse)] == 0).all()), "rows that see nothing must be zero"
    return o, lse


CASES = [
    # (spec kwargs, B, T, config)
    pytest.param(dict(hq=2, hkv=2, l=8, d=4, lp=16), 2, 37, None, id="G1-d<l<l'"),
    pytest.param(dict(hq=4, hkv=2, l=4, d=4, lp=8), 1, 29, {"BLOCK_M": 16, "BLOCK_N": 16}, id="G2-l=d"),
    pytest.param(dict(hq=6, hkv=2, l=8, d=4, lp=8), 1, 45, {"BLOCK_M": 32}, id="G3-pad-l'=l"),
    pytest.param(dict(hq=4, hkv=1, l=8, d=4, lp=16, dk=24, dv=16), 1, 45, None, id="G4-dk24-dv16"),
    pytest.param(
        dict(hq=16, hkv=1, l=8, d=8, lp=8, dk=48, dv=32), 1, 21, {"BLOCK_M": 32}, id="G16-dk48-dv32"
    ),
    # compressed K/V through TMA descriptors (rows past a sequence or the tensor are read and masked / zero)
    pytest.param(dict(hq=2, hkv=2, l=8, d=4, lp=16), 2, 37, {"LOADS": "tma"}, id="G1-tma"),
    pytest.param(dict(hq=4, hkv=1, l=8, d=4, lp=16, dk=24, dv=16), 1, 45, {"LOADS": "tma"}, id="G4-dk24-tma"),
    pytest.param(dict(hq=4, hkv=2, l=8, d=4, lp=16), 2, 5, None, id="T<l"),
    # no compressed block at all: the descriptors are built over a stand-in row that is never read
    pytest.param(dict(hq=4, hkv=2, l=8, d=4, lp=16), 2, 5, {"LOADS": "tma"}, id="T<l-tma"),
]


@pytest.mark.parametrize("kw,B,T,config", CASES)
def test_cmp_fwd_matches_reference(kw, B, T, config):  # noqa: N803
    _run(make_spec(**kw), B, T, config=config)


def test_cmp_fwd_t_below_l_is_zero_and_inf():
    o, lse = _run(make_spec(l=8, d=4, lp=16), 1, 7)
    assert bool(torch.isinf(lse).all()) and bool((o == 0).all())


def test_cmp_fwd_varlen_matches_per_sequence():
    spec = make_spec(hq=4, hkv=2, l=8, d=4, lp=16)
    cu = torch.tensor([0, 0, 5, 30, 31, 49], dtype=torch.int32)  # an empty one; two shorter than l
    _run(spec, 1, 49, cu=cu, config={"BLOCK_M": 16, "BLOCK_N": 16})
    _run(spec, 1, 49, cu=cu, config={"BLOCK_M": 16, "BLOCK_N": 16, "LOADS": "tma"})


def test_cmp_fwd_fp16():
    _run(make_spec(hq=4, hkv=2, l=8, d=4, lp=16), 1, 40, dtype=torch.float16)


def test_cmp_fwd_rejects_wrong_heads():
    spec = make_spec(hq=4, hkv=2)
    q, kc, vc = make_inputs(make_spec(hq=2, hkv=2), 1, 20)
    with pytest.raises(ValueError, match="spec"):
        load(make_plan(spec, "cmp_fwd")).run(q, kc, vc)


@pytest.mark.gpu
@pytest.mark.parametrize("loads", ["pointers", "tma"])
def test_gpu_cmp_fwd_paper_spec_bf16_varlen(loads):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from nsa_dsl import load_spec

    spec = load_spec("nsa_paper")
    cu = torch.tensor([0, 1000, 1030, 5000, 8192], dtype=torch.int32, device="cuda")
    q, kc, vc = make_inputs(spec, 1, 8192, torch.bfloat16, cu.cpu())
    q, kc, vc = q.cuda(), kc.cuda(), vc.cuda()
    if loads == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9.0")
    mod = load(make_plan(spec, "cmp_fwd", {"LOADS": loads}))
    with poisoned_empty():
        o, lse = mod.run(q, kc, vc, cu_seqlens=cu)
    ro, rl = ref_cmp(spec, q.float(), kc.float(), vc.float(), cu.cpu())
    torch.testing.assert_close(o.double(), ro, rtol=2e-2, atol=2e-2)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
