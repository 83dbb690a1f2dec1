"""Generated sliding-window kernel and gated-sum combine against the reference.

CPU: the Triton interpreter at tiny shapes, fp32/fp16. GPU (marked): bf16 against the reference in fp32.
Fresh random inputs per case; outputs are poisoned (NaN) before each launch so unwritten elements show.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from nsa_dsl.codegen.loader import load
from nsa_dsl.codegen.plan import DeviceLimits, get_kernel, make_plan

from nsa_dsl import load_spec
from nsa_dsl.reference import window_attention

TINY = load_spec("tiny")


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty / empty_like return NaN-filled tensors inside the block."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x.fill_(-7)

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))  # type: ignore[assignment]
    torch.empty_like = lambda *a, **k: fill(real_like(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def make_spec(G=2, hkv=2, dk=16, dv=16, w=16, dtype="float32"):
    return TINY.replace(
        attention={"heads": G * hkv, "kv_heads": hkv, "head_dim_qk": dk, "head_dim_v": dv, "dtype": dtype},
        window={"size": w},
    )


def inputs(spec, B, T, dtype, gen, device="cpu"):
    a = spec.attention
    q = torch.randn(B, T, a.heads, a.head_dim_qk, generator=gen).to(device, dtype)
    k = torch.randn(B, T, a.kv_heads, a.head_dim_qk, generator=gen).to(device, dtype)
    v = torch.randn(B, T, a.kv_heads, a.head_dim_v, generator=gen).to(device, dtype)
    return q, k, v


def check(o, lse, ro, rlse, tol):
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "unwritten (NaN) outputs"
    torch.testing.assert_close(o.double(), ro.double(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), rlse.double(), atol=tol, rtol=tol)


# (G, Hkv, dk, dv, w, T, B, BLOCK_M, BLOCK_N, HEADS)
CASES = [
    (1, 2, 16, 16, 16, 45, 2, 16, 16, 1),  # G = 1, w = one tile, T not a multiple of the tile
    (2, 2, 24, 16, 40, 70, 1, 32, 16, 2),  # dk != dv (16 + masked 8), w % tile != 0, 2 heads/tile
    (4, 1, 48, 32, 7, 33, 1, 16, 32, 1),  # w < tile, BLOCK_N > BLOCK_M, dk = 32 + 16
    (16, 1, 16, 32, 100, 40, 1, 32, 16, 4),  # G = 16, w > T (plain causal), 8 tokens x 4 heads per tile
]


@pytest.mark.parametrize("loads", ["pointers", "tma"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{c[0]}-dk{c[2]}-dv{c[3]}-w{c[4]}-T{c[5]}")
def test_win_fwd_matches_reference(case, loads):
    G, hkv, dk, dv, w, T, B, bm, bn, gh = case
    spec = make_spec(G, hkv, dk, dv, w)
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    q, k, v = inputs(spec, B, T, torch.float32, gen)
    # LOADS "tma": K/V tiles through descriptors (rows before a sequence / past the tensor read and masked)
    mod = load(make_plan(spec, "win_fwd", {"BLOCK_M": bm, "BLOCK_N": bn, "HEADS": gh, "LOADS": loads}))
    with poisoned_empty():
        o, lse = mod.run(q, k, v)
    ro, rlse = window_attention(q.double(), k.double(), v.double(), spec)
    check(o, lse, ro, rlse, 2e-5)


@pytest.mark.parametrize("loads", ["pointers", "tma"])
def test_win_fwd_fp16_varlen(loads):
    """Packed sequences (one shorter than the window, one shorter than a tile) in fp16."""
    spec = make_spec(2, 2, 32, 16, 20, dtype="float16")
    gen = torch.Generator().manual_seed(7)
    cu = torch.tensor([0, 37, 42, 90], dtype=torch.int32)
    q, k, v = inputs(spec, 1, 90, torch.float16, gen)
    mod = load(make_plan(spec, "win_fwd", {"BLOCK_M": 16, "BLOCK_N": 16, "HEADS": 2, "LOADS": loads}))
    with poisoned_empty():
        o, lse = mod.run(q, k, v, cu_seqlens=cu)
    outs, lses = [], []
    for s in range(3):
        a, b = int(cu[s]), int(cu[s + 1])
        ro, rl = window_attention(q[:, a:b].double(), k[:, a:b].double(), v[:, a:b].double(), spec)
        outs.append(ro)
        lses.append(rl)
    check(o, lse, torch.cat(outs, 1), torch.cat(lses, 1), 3e-3)


def test_win_fwd_gated_epilogue_and_combine():
    """Fused gated sum of the window kernel and the stand-alone combine kernel: g·(o_cmp, o_slc, o_win)."""
    spec = make_spec(2, 2, 16, 16, 16)
    gen = torch.Generator().manual_seed(9)
    B, T, H = 1, 33, spec.attention.heads
    q, k, v = inputs(spec, B, T, torch.float32, gen)
    g = torch.rand(B, T, H, 3, generator=gen)
    o_cmp = torch.randn(B, T, H, 16, generator=gen)
    o_slc = torch.randn(B, T, H, 16, generator=gen)
    mod = load(make_plan(spec, "win_fwd"))
    with poisoned_empty():
        o_win, _, o = mod.run(q, k, v, gate=g, o_cmp=o_cmp, o_slc=o_slc)
    ro, _ = window_attention(q.double(), k.double(), v.double(), spec)
    gd = g.double()
    want = gd[..., 0:1] * o_cmp.double() + gd[..., 1:2] * o_slc.double() + gd[..., 2:3] * ro
    torch.testing.assert_close(o.double(), want, atol=2e-5, rtol=2e-5)

    comb = load(make_plan(spec, "combine_fwd"))
    with poisoned_empty():
        o2 = comb.run(o_cmp, o_slc, o_win, g)
    want2 = gd[..., 0:1] * o_cmp.double() + gd[..., 1:2] * o_slc.double() + gd[..., 2:3] * o_win.double()
    torch.testing.assert_close(o2.double(), want2, atol=2e-6, rtol=2e-6)
    spec0 = make_spec(2, 2, 16, 16, 0)
    comb0 = load(make_plan(spec0, "combine_fwd"))
    o3 = comb0.run(o_cmp, o_slc, None, g)  # window off: its gate is ignored
    torch.testing.assert_close(o3.double(), gd[..., 0:1] * o_cmp.double() + gd[..., 1:2] * o_slc.double())


def test_win_fwd_disabled_and_config_checks():
    assert not get_kernel("win_fwd").is_enabled(make_spec(w=0))
    spec = load_spec("nsa_paper")
    h100 = DeviceLimits("H100", (9, 0), 132, 227 * 1024)
    with pytest.raises(ValueError, match="BLOCK_M"):
        make_plan(spec, "win_fwd", {"BLOCK_M": 96}, h100)
    with pytest.raises(ValueError, match="HEADS"):
        make_plan(load_spec("small_group"), "win_fwd", {"HEADS": 4}, h100)  # G = 2
    with pytest.raises(ValueError, match="shared memory"):
        make_plan(spec, "win_fwd", {"BLOCK_N": 128, "num_stages": 4}, h100)
    cfg = make_plan(spec, "win_fwd", None, h100).config
    assert cfg["BLOCK_M"] in (64, 128) and cfg["BLOCK_N"] in (32, 64, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,loads", [(1, "pointers"), (4, "pointers"), (4, "tma")])
@pytest.mark.parametrize("T", [1000, 8192])
def test_win_fwd_bf16_paper_gpu(T, heads, loads):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if loads == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9.0")
    spec = load_spec("nsa_paper")
    gen = torch.Generator().manual_seed(T)
    q, k, v = inputs(spec, 1, T, torch.bfloat16, gen, "cuda")
    o, lse = load(make_plan(spec, "win_fwd", {"HEADS": heads, "LOADS": loads})).run(q, k, v)
    ro, rlse = window_attention(q.float(), k.float(), v.float(), spec)
    torch.testing.assert_close(o.float(), ro.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, rlse.float(), atol=2e-3, rtol=2e-3)
