"""Generated selected-attention kernels (group-centric and KV-outer schedules) against the reference.

CPU: the Triton interpreter at tiny shapes, fp32/fp16. GPU (marked): bf16 against the reference in fp32.
Fresh random inputs per case; kernel outputs are poisoned (NaN) before each launch so unwritten elements show.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from nsa_dsl.codegen.loader import load
from nsa_dsl.codegen.plan import DeviceLimits, make_plan

from nsa_dsl import load_spec
from nsa_dsl.reference import select_blocks, selected_attention

TINY = load_spec("tiny")


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty / empty_like return NaN-filled (float) or -7-filled (int) tensors inside the block."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x.fill_(-7)

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))  # type: ignore[assignment]
    torch.empty_like = lambda *a, **k: fill(real_like(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def make_spec(G=2, hkv=2, dk=16, dv=16, blk=16, n=3, fi=1, fl=1, w=16, dtype="float32"):
    return TINY.replace(
        attention={"heads": G * hkv, "kv_heads": hkv, "head_dim_qk": dk, "head_dim_v": dv, "dtype": dtype},
        compression={"block": 8, "stride": 4},
        selection={"block": blk, "top_n": n, "force_initial": fi, "force_local": fl},
        window={"size": w},
    )


def random_indices(spec, B, T, gen, device="cpu"):
    """A valid index set from random scores through the reference's top-n (forced blocks included)."""
    nslc = spec.num_selection_blocks(T)
    scores = torch.rand(B, T, spec.attention.kv_heads, nslc, generator=gen, dtype=torch.float64)
    return select_blocks(scores, spec, T).to(device)


def inputs(spec, B, T, dtype, gen, device="cpu"):
    a = spec.attention
    q = torch.randn(B, T, a.heads, a.head_dim_qk, generator=gen).to(device, dtype)
    k = torch.randn(B, T, a.kv_heads, a.head_dim_qk, generator=gen).to(device, dtype)
    v = torch.randn(B, T, a.kv_heads, a.head_dim_v, generator=gen).to(device, dtype)
    return q, k, v


def ref_varlen(q, k, v, idx, spec, cu):
    outs, lses = [], []
    for s in range(len(cu) - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        qs, ks, vs = (x[:, a:b].double() for x in (q, k, v))
        o, lse = selected_attention(qs, ks, vs, idx[:, a:b], spec)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1)


def kernel(spec, config=None, limits=None):
    return load(make_plan(spec, "slc_fwd", config, limits or DeviceLimits.detect()))


def check(o, lse, ro, rlse, tol):
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "unwritten (NaN) outputs"
    torch.testing.assert_close(o.double(), ro.double(), atol=tol, rtol=tol)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin), "lse +inf pattern differs"
    torch.testing.assert_close(lse.double()[fin], rlse.double()[fin], atol=tol, rtol=tol)


SCHEDULES = ["group", "kvouter", "keys", "tma"]


def sched(name: str) -> dict:
    """Config of a schedule name: "keys" is the group-centric schedule with the transposed tile, "tma" the
    group-centric one with K/V through tensor descriptors."""
    return {"keys": {"schedule": "group", "LAYOUT": "keys"},
            "tma": {"schedule": "group", "LOADS": "tma"}}.get(name, {"schedule": name})

# (G, Hkv, dk, dv, l', n, force_initial, force_local, T, B, BLOCK_N)
CASES = [
    (1, 2, 16, 16, 16, 3, 1, 1, 45, 2, 16),  # G = 1, T not a multiple of l'
    (2, 2, 24, 16, 16, 3, 1, 1, 37, 1, 16),  # dk != dv, dk not a power of two (16 + masked 8)
    (4, 1, 48, 32, 24, 2, 0, 1, 53, 1, 16),  # l' = 24 not a multiple of the tile, dk = 32 + 16
    (16, 1, 16, 32, 16, 4, 1, 2, 40, 1, 16),  # G = 16 (the paper's group)
    (2, 2, 16, 16, 16, 4, 1, 1, 11, 1, 16),  # T < l': one partial block
    (2, 1, 16, 16, 24, 2, 0, 0, 70, 1, 32),  # tile larger than the block (masked), no forced blocks
]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{c[0]}-dk{c[2]}-dv{c[3]}-blk{c[4]}-T{c[8]}")
def test_slc_fwd_matches_reference(case, schedule):
    G, hkv, dk, dv, blk, n, fi, fl, T, B, bn = case
    if schedule == "kvouter" and not any(case is c for c in (CASES[0], CASES[2], CASES[3])):
        pytest.skip("KV-outer runs a subset (interpreter time)")
    if schedule == "keys" and not any(case is c for c in (CASES[0], CASES[3], CASES[4], CASES[5])):
        pytest.skip("the transposed tile runs a subset (interpreter time)")
    if schedule == "tma" and not any(case is c for c in (CASES[1], CASES[2], CASES[3], CASES[4])):
        pytest.skip("the descriptor loads run a subset (interpreter time)")
    spec = make_spec(G, hkv, dk, dv, blk, n, fi, fl)
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    q, k, v = inputs(spec, B, T, torch.float32, gen)
    idx = random_indices(spec, B, T, gen)
    cfg = {"BLOCK_N": bn, **sched(schedule)}
    if schedule == "kvouter" and case is CASES[0]:  # several steps per work item, K/V reloaded per step
        cfg.update({"BLOCK_M": 16, "CHUNK": 32, "KV_RESIDENT": False})
    if schedule != "kvouter" and (case is CASES[0] or case is CASES[3]):  # tokens per program; B*T % 4 != 0
        cfg["TPP"] = 4
    mod = kernel(spec, cfg)
    with poisoned_empty():
        o, lse = mod.run(q, k, v, idx)
    ro, rlse = selected_attention(q.double(), k.double(), v.double(), idx, spec)
    check(o, lse, ro, rlse, 2e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_slc_fwd_unused_slots_and_fp16(schedule):
    """Rows with fewer valid blocks than n (-1 slots, also in the middle of a row) in fp16."""
    spec = make_spec(2, 2, 32, 16, 16, 4, 1, 1, dtype="float16")
    gen = torch.Generator().manual_seed(11)
    B, T = 1, 50
    q, k, v = inputs(spec, B, T, torch.float16, gen)
    idx = random_indices(spec, B, T, gen)
    idx[0, 40:, 1, 1] = -1  # a hole in the middle of a full row: the slot is skipped
    mod = kernel(spec, sched(schedule))
    with poisoned_empty():
        o, lse = mod.run(q, k, v, idx)
    ro, rlse = selected_attention(q.double(), k.double(), v.double(), idx, spec)
    check(o, lse, ro, rlse, 3e-3)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_slc_fwd_varlen(schedule):
    """Packed sequences (one shorter than a block) behave exactly as if run alone."""
    spec = make_spec(4, 2, 16, 16, 16, 3, 1, 1)
    gen = torch.Generator().manual_seed(5)
    lens = [19, 7, 40]
    cu = torch.tensor([0, 19, 26, 66], dtype=torch.int32)
    q, k, v = inputs(spec, 1, sum(lens), torch.float32, gen)
    idx = torch.cat([random_indices(spec, 1, n, gen) for n in lens], 1)
    mod = kernel(spec, {**sched(schedule), "TPP": 2})
    with poisoned_empty():
        o, lse = mod.run(q, k, v, idx, cu_seqlens=cu)
    ro, rlse = ref_varlen(q, k, v, idx, spec, cu)
    check(o, lse, ro, rlse, 2e-5)


@pytest.mark.parametrize("layout", ["rows", "keys"])
@pytest.mark.parametrize("with_win", [False, True])
def test_slc_fwd_gated_epilogue(with_win, layout):
    """The fused gated sum o = g_cmp*o_cmp + g_slc*o_slc (+ g_win*o_win)."""
    spec = make_spec(2, 2, 16, 16, 16, 3, 1, 1, w=16 if with_win else 0)
    gen = torch.Generator().manual_seed(3)
    B, T = 1, 33
    q, k, v = inputs(spec, B, T, torch.float32, gen)
    idx = random_indices(spec, B, T, gen)
    g = torch.rand(B, T, spec.attention.heads, 3, generator=gen)
    o_cmp = torch.randn(B, T, spec.attention.heads, 16, generator=gen)
    o_win = torch.randn(B, T, spec.attention.heads, 16, generator=gen) if with_win else None
    mod = kernel(spec, {"LAYOUT": layout})
    with poisoned_empty():
        o_slc, lse, o = mod.run(q, k, v, idx, gate=g, o_cmp=o_cmp, o_win=o_win)
    ro, _ = selected_attention(q.double(), k.double(), v.double(), idx, spec)
    want = g[..., 0:1].double() * o_cmp.double() + g[..., 1:2].double() * ro
    if with_win:
        want = want + g[..., 2:3].double() * o_win.double()
    torch.testing.assert_close(o.double(), want, atol=2e-5, rtol=2e-5)


def test_slc_fwd_config_checks():
    spec = load_spec("nsa_paper")
    h100 = DeviceLimits("H100", (9, 0), 132, 227 * 1024)
    with pytest.raises(ValueError, match="BLOCK_N"):
        make_plan(spec, "slc_fwd", {"BLOCK_N": 48}, h100)
    with pytest.raises(ValueError, match="shared memory"):
        make_plan(spec, "slc_fwd", {"BLOCK_N": 64, "num_stages": 6}, h100)
    plan = make_plan(spec, "slc_fwd", None, h100)
    assert plan.config["BLOCK_N"] == 64 and plan.config["schedule"] == "group"  # G = 16
    small = make_plan(load_spec("small_group"), "slc_fwd", None, h100)
    assert small.config["schedule"] == "kvouter"  # G = 2: no padded MMA rows
    with pytest.raises(ValueError, match="CHUNK"):
        make_plan(spec, "slc_fwd", {"schedule": "kvouter", "BLOCK_M": 64, "CHUNK": 6}, h100)
    with pytest.raises(ValueError, match="schedule"):
        make_plan(spec, "slc_fwd", {"schedule": "diagonal"}, h100)
    # K/V through TMA descriptors: the sm90 default where the rows are 16-byte multiples; rejected below sm90
    assert plan.config["LOADS"] == "tma"
    a100 = DeviceLimits("A100", (8, 0), 108, 163 * 1024)
    assert make_plan(spec, "slc_fwd", None, a100).config["LOADS"] == "pointers"
    with pytest.raises(ValueError, match="LOADS: 'tma' needs compute capability"):
        make_plan(spec, "slc_fwd", {"LOADS": "tma"}, a100)
    with pytest.raises(ValueError, match="LOADS: 'tma' needs K/V rows"):
        make_plan(spec.replace(attention={"head_dim_v": 100}), "slc_fwd", {"LOADS": "tma"}, h100)
    with pytest.raises(ValueError, match="LOADS: must be"):
        make_plan(spec, "slc_fwd", {"LOADS": "tex"}, h100)
    # the KV-outer schedule on top of the default ignores it
    assert make_plan(spec, "slc_fwd", {"schedule": "kvouter"}, h100).config["schedule"] == "kvouter"


def test_slc_fwd_tma_needs_tensor_descriptors(monkeypatch):
    """A Triton without host-side tensor descriptors keeps the pointer loads by default and names the rule."""
    from nsa_dsl.codegen import loads

    monkeypatch.setattr(loads, "tma_available", lambda: False)
    spec = load_spec("nsa_paper")
    h100 = DeviceLimits("H100", (9, 0), 132, 227 * 1024)
    assert make_plan(spec, "slc_fwd", None, h100).config["LOADS"] == "pointers"
    with pytest.raises(ValueError, match=r"LOADS: 'tma' needs Triton >= 3.4"):
        make_plan(spec, "slc_fwd", {"LOADS": "tma"}, h100)


# ------------------------------------------------------------------------------------------------
# GPU: bf16 against the reference in fp32
# ------------------------------------------------------------------------------------------------


GPU_CONFIGS = [
    {"schedule": "group"},
    {"schedule": "kvouter"},
    {"schedule": "group", "TPP": 2, "BLOCK_N": 32, "num_stages": 3},
    {"schedule": "group", "LAYOUT": "keys", "num_warps": 4},
    {"schedule": "group", "LOADS": "tma"},
    {"schedule": "kvouter", "BLOCK_M": 128, "KV_RESIDENT": False, "KV_WARPS": 8, "BLOCK_R": 32},
]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("T", [1000, 8192])
def test_slc_fwd_bf16_paper_gpu(T, cfg):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if T == 1000 and len(cfg) > 1:
        pytest.skip("config variants run at 8192 only")
    spec = load_spec("nsa_paper")
    gen = torch.Generator().manual_seed(T)
    q, k, v = inputs(spec, 1, T, torch.bfloat16, gen, "cuda")
    idx = random_indices(spec, 1, T, gen, "cuda")
    mod = kernel(spec, cfg)
    o, lse = mod.run(q, k, v, idx)
    ro, rlse = selected_attention(q.float(), k.float(), v.float(), idx, spec)
    torch.testing.assert_close(o.float(), ro.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, rlse.float(), atol=2e-3, rtol=2e-3)


def _rows_ref_gpu(q, k, v, idx, spec, rows):
    """fp32 selected + window attention for sampled token rows (own gather, independent of the kernels)."""
    G, bs, w = spec.G, spec.selection.block, spec.window_size
    out_s, out_w = [], []
    for t in rows:
        o_s, o_w = [], []
        for h in range(spec.attention.kv_heads):
            qq = q[0, t, h * G:(h + 1) * G].float() * spec.scale
            blocks = [int(b) for b in idx[0, t, h].tolist() if b >= 0]
            pos = torch.cat([torch.arange(b * bs, min((b + 1) * bs, t + 1)) for b in blocks]).cuda()
            for keys, dst in ((pos, o_s), (torch.arange(max(0, t - w + 1), t + 1).cuda(), o_w)):
                p = torch.softmax(qq @ k[0, keys, h].float().T, -1)
                dst.append(p @ v[0, keys, h].float())
        out_s.append(torch.cat(o_s))
        out_w.append(torch.cat(o_w))
    return torch.stack(out_s), torch.stack(out_w)


@pytest.mark.gpu
def test_paper_128k_sampled_rows_gpu():
    """T = 128k on the paper spec: both selection schedules and the window kernel on sampled rows, and the
    full op's gated sum (runs on an 80 GB card)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import nsa_dsl

    spec = load_spec("nsa_paper")
    T = 131072
    gen = torch.Generator().manual_seed(1)
    q, k, v = inputs(spec, 1, T, torch.bfloat16, gen, "cuda")
    scores = torch.rand(1, T, spec.attention.kv_heads, spec.num_selection_blocks(T), device="cuda")
    idx = select_blocks(scores, spec, T)
    del scores
    rows = sorted({0, 1, 63, 64, 511, 512, 4097, 65535, 65536, T - 1, *torch.randint(0, T, (14,)).tolist()})
    rs, rw = _rows_ref_gpu(q, k, v, idx, spec, rows)
    for schedule in SCHEDULES:
        o, lse = kernel(spec, sched(schedule)).run(q, k, v, idx)
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o[0, rows].float(), rs, atol=2e-2, rtol=2e-2)
        del o, lse
    ow, _ = load(make_plan(spec, "win_fwd")).run(q, k, v)
    torch.testing.assert_close(ow[0, rows].float(), rw, atol=2e-2, rtol=2e-2)
    del ow
    ops = nsa_dsl.compile(spec)
    tc = spec.num_compressed(T)
    kc = torch.randn(1, tc, 4, 192, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(1, tc, 4, 128, device="cuda", dtype=torch.bfloat16)
    g = torch.rand(1, T, 64, 3, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        o, saved = ops.forward_train(q, k, v, kc, vc, g)
    want = sum(g[..., i:i + 1].float() * saved[n].float() for i, n in enumerate(("o_cmp", "o_slc", "o_win")))
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o[0, rows].float(), want[0, rows], atol=2e-2, rtol=2e-2)
