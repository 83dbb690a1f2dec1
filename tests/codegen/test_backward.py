"""Backward kernels (issue 4) against the reference's autograd.

CPU: the Triton interpreter at tiny shapes in fp32: every gradient (q, k, v, k_cmp, v_cmp, g) of the generated
backward, fed with the reference's forward intermediates (branch outputs, LSEs, indices), against
``torch.autograd`` through ``nsa_dsl.reference.nsa_attention``. Matrix: G in {1, 2, 4, 16}, odd T, B = 2,
varlen packs (with a sequence shorter than the compressed block), window off, dk != dv and dk not a power of
two, both reverse-index paths (split lists with partial sums / direct writes; statically sized, so with empty
work slots), the query-split dK/dV path, one- and multi-token selection dQ programs.
GPU (marked): bf16 against fp32, bitwise determinism, a short training run through NSAttention.
Fresh random inputs per case; fp32 gradient buffers that a kernel must fully write are poisoned (NaN).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from nsa_dsl.codegen import reverse_index
from nsa_dsl.codegen.autograd import activation_bytes_per_token, nsa_attention, nsa_backward
from nsa_dsl.codegen.ops import NSAOps
from nsa_dsl.codegen.plan import DeviceLimits

import nsa_dsl
from nsa_dsl import load_spec
from nsa_dsl import reference as R

TINY = load_spec("tiny")


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty / empty_like return NaN-filled float tensors inside the block (unwritten rows show)."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))  # type: ignore[assignment]
    torch.empty_like = lambda *a, **k: fill(real_like(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def make_spec(G=2, hkv=2, dk=16, dv=16, l=8, d=4, blk=16, n=3, fi=1, fl=1, w=16):  # noqa: E741
    return TINY.replace(
        attention={
            "heads": G * hkv, "kv_heads": hkv, "head_dim_qk": dk, "head_dim_v": dv, "dtype": "float32"
        },
        compression={"block": l, "stride": d},
        selection={"block": blk, "top_n": n, "force_initial": fi, "force_local": fl},
        window={"size": w},
    )


def make_inputs(spec, B, T, gen, tc=None, dtype=torch.float32, device="cpu"):
    a = spec.attention
    tc = spec.num_compressed(T) if tc is None else tc

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    q = r(B, T, a.heads, a.head_dim_qk)
    k = r(B, T, a.kv_heads, a.head_dim_qk)
    v = r(B, T, a.kv_heads, a.head_dim_v)
    kc = r(B, tc, a.kv_heads, a.head_dim_qk)
    vc = r(B, tc, a.kv_heads, a.head_dim_v)
    g = torch.rand(B, T, a.heads, 3, generator=gen).to(device, dtype)
    return q, k, v, kc, vc, g


def ref_grads(spec, xs, do, cu_seqlens=None):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    o = R.nsa_attention(*xs, spec, cu_seqlens=cu_seqlens)
    o.backward(do)
    return [x.grad if x.grad is not None else torch.zeros_like(x) for x in xs]


def ref_grads_given_indices(spec, xs, do, indices):
    """Reference gradients with the selection fixed to ``indices`` (e.g. the kernels' own top-n, so that
    near-tie picks of a lower-precision forward do not count as gradient errors). B rows, no varlen."""
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    q, k, v, kc, vc, g = xs
    o_cmp, _ = R.compressed_attention(q, kc, vc, spec)
    o_slc, _ = R.selected_attention(q, k, v, indices, spec)
    o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc
    if spec.window_size > 0:
        o = o + g[..., 2:3] * R.window_attention(q, k, v, spec)[0]
    o.backward(do)
    return [x.grad if x.grad is not None else torch.zeros_like(x) for x in xs]


def kernel_grads(spec, xs, do, cu_seqlens=None, config=None, ops=None):
    q, k, v, kc, vc, g = (x.detach() for x in xs)
    saved = R.nsa_branches(q, k, v, kc, vc, spec, cu_seqlens=cu_seqlens)
    saved = {key: (t.float() if key.startswith("lse") else t) for key, t in saved.items()}
    if spec.window_size == 0:
        saved["o_win"] = saved["lse_win"] = None
    ops = ops or NSAOps(spec=spec, limits=DeviceLimits.detect(q.device), config=config or {})
    with poisoned_empty():
        return nsa_backward(ops, q, k, v, kc, vc, g, do, saved, cu_seqlens=cu_seqlens)


NAMES = ("dq", "dk", "dv", "dk_cmp", "dv_cmp", "dg")


def assert_close(got, want, atol=2e-4, rtol=2e-4):
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert a.shape == b.shape, name
        assert bool(torch.isfinite(a).all()), f"{name}: non-finite values"
        torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


CASES = {
    # id: (spec kwargs, B, T)
    "G1": (dict(G=1, hkv=2), 1, 37),
    "G2-B2": (dict(G=2, hkv=2, dk=32, dv=16), 2, 29),
    "G4-l=d": (dict(G=4, hkv=1, l=8, d=8, blk=8, n=4, fi=0, fl=2, w=8), 1, 41),
    "G16-dk48": (dict(G=16, hkv=1, dk=48, dv=16, n=2, fi=0, fl=1, w=8), 1, 23),
    "G2-nowin": (dict(G=2, hkv=2, w=0, l=16, d=8, blk=16), 1, 35),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_grads_match_reference(case):
    kw, B, T = CASES[case]
    spec = make_spec(**kw)
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    xs = make_inputs(spec, B, T, gen)
    do = torch.randn(B, T, spec.attention.heads, spec.attention.head_dim_v, generator=gen)
    assert_close(kernel_grads(spec, xs, do), ref_grads(spec, xs, do))


@pytest.mark.parametrize("case", ["G2-B2", "G16-dk48", "G4-l=d"])
@pytest.mark.parametrize("loads", ["pointers", "tma"])
def test_grads_dq_cmp_fused_into_window(case, loads):
    """bwd_win's DQ_CMP = 1: the window's dQ kernel also runs the compressed branch's dQ loop (bwd_cmp then
    has no dQ kernel and the selection's dQ stores first). Every gradient against the reference, with
    pointer loads and TMA descriptors; the compressed plan rejects the option."""
    kw, B, T = CASES[case]
    spec = make_spec(**kw)
    gen = torch.Generator().manual_seed(hash((case, "dq_cmp", loads)) % 2**31)
    xs = make_inputs(spec, B, T, gen)
    do = torch.randn(B, T, spec.attention.heads, spec.attention.head_dim_v, generator=gen)
    cfg = {"bwd_cmp": {"LOADS": loads}, "bwd_win": {"LOADS": loads, "DQ_CMP": 1}}
    ops = NSAOps(spec=spec, limits=DeviceLimits.interpreter_limits(), config=cfg)
    src = ops.module("bwd_win", T=T, B=B).__file__
    assert "KC, VC, LSEC, DELTAC" in Path(src).read_text()
    assert_close(kernel_grads(spec, xs, do, ops=ops), ref_grads(spec, xs, do))
    with pytest.raises(ValueError, match="DQ_CMP: only the window plan"):
        NSAOps(spec=spec, limits=DeviceLimits.interpreter_limits(), config={"bwd_cmp": {"DQ_CMP": 1}}).plan(
            "bwd_cmp", T=T, B=B)


@pytest.mark.parametrize("case", ["G2-B2", "G16-dk48", "G2-nowin"])
def test_grads_dense_branches_tma(case):
    """The compressed and window backward with their tiles through TMA descriptors (LOADS = "tma": the dK/dV
    loop's query tiles read past the sequence and masked, the dQ loop's key tiles likewise)."""
    kw, B, T = CASES[case]
    spec = make_spec(**kw)
    gen = torch.Generator().manual_seed(hash((case, "tma")) % 2**31)
    xs = make_inputs(spec, B, T, gen)
    do = torch.randn(B, T, spec.attention.heads, spec.attention.head_dim_v, generator=gen)
    cfg = {"bwd_cmp": {"LOADS": "tma"}, "bwd_win": {"LOADS": "tma"}}
    assert_close(kernel_grads(spec, xs, do, config=cfg), ref_grads(spec, xs, do))


@pytest.mark.parametrize("loads", ["pointers", "tma"])
def test_grads_short_sequence_no_nan(loads):
    """T < l: no compressed block at all (Tc = 0, lse_cmp = +inf everywhere) - gradients finite and exact,
    also with every K/V tile through TMA descriptors (built over a stand-in row when there is none)."""
    spec = make_spec(G=2, hkv=1)
    gen = torch.Generator().manual_seed(17)
    xs = make_inputs(spec, 1, 6, gen)
    do = torch.randn(1, 6, spec.attention.heads, spec.attention.head_dim_v, generator=gen)
    cfg = None
    if loads == "tma":
        cfg = {"cmp_fwd": {"LOADS": "tma"}, "slc_fwd": {"LOADS": "tma"}, "win_fwd": {"LOADS": "tma"},
               "bwd_cmp": {"LOADS": "tma"}, "bwd_win": {"LOADS": "tma", "DQ_CMP": 1},
               "bwd_slc": {"DQ_LAYOUT": "rows", "DQ_LOADS": "tma"}}
    assert_close(kernel_grads(spec, xs, do, config=cfg), ref_grads(spec, xs, do))


def test_grads_fp16_inputs():
    """fp16 inputs, fp32 accumulation: close to the fp32 reference on the same (rounded) inputs."""
    spec = make_spec(G=4, hkv=1, n=2)
    gen = torch.Generator().manual_seed(19)
    xs = make_inputs(spec, 1, 31, gen, dtype=torch.float16)
    do = torch.randn(1, 31, spec.attention.heads, spec.attention.head_dim_v, generator=gen).half()
    got = kernel_grads(spec, xs, do)
    want = ref_grads(spec, [x.float() for x in xs], do.float())
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert a.dtype == torch.float16, name
        assert bool(torch.isfinite(a).all()), name
        err = (a.float() - b).norm() / b.norm().clamp_min(1e-6)
        assert err < 1e-2, f"{name}: relative error {err:.3e}"


def test_grads_varlen():
    spec = make_spec(G=2, hkv=2, n=2)
    cu = torch.tensor([0, 5, 26, 47], dtype=torch.int32)  # first sequence shorter than l = 8: no cmp block
    gen = torch.Generator().manual_seed(7)
    tc = int(R.compressed_cu_seqlens(cu, spec)[-1])
    xs = make_inputs(spec, 1, 47, gen, tc=tc)
    do = torch.randn(1, 47, spec.attention.heads, spec.attention.head_dim_v, generator=gen)
    want = ref_grads(spec, xs, do, cu_seqlens=cu)
    assert_close(kernel_grads(spec, xs, do, cu_seqlens=cu), want)
    # query-split dK/dV (partials in an uninitialised buffer: every row must be written) on the pack
    qsplit = {"bwd_cmp": {"Q_CHUNK": 8}, "bwd_win": {"Q_CHUNK": 8}}
    assert_close(kernel_grads(spec, xs, do, cu_seqlens=cu, config=qsplit), want)
    # longest-first launch order of the dense branches (grid axes swapped) with the query split
    lpt = {k: {**v, "ORDER": "lpt"} for k, v in qsplit.items()}
    assert_close(kernel_grads(spec, xs, do, cu_seqlens=cu, config=lpt), want)
    # the dense branches' tiles through TMA descriptors (tiles crossing into the next packed sequence)
    tma = {k: {**v, "LOADS": "tma"} for k, v in qsplit.items()}
    assert_close(kernel_grads(spec, xs, do, cu_seqlens=cu, config=tma), want)
    # one loop over (head, query tile) pairs in the dK/dV kernels (programs with no query tile included)
    flat = {k: {**v, "KV_LOOP": "flat"} for k, v in qsplit.items()}
    assert_close(kernel_grads(spec, xs, do, cu_seqlens=cu, config=flat), want)
    # the compressed dQ inside the window's dQ kernel (a sequence without any compressed block in the pack)
    fused = {"bwd_cmp": qsplit["bwd_cmp"], "bwd_win": {**qsplit["bwd_win"], "DQ_CMP": 1}}
    assert_close(kernel_grads(spec, xs, do, cu_seqlens=cu, config=fused), want)


def test_schedule_variants_agree():
    """Reverse-index chunking (split lists with fp32 partials vs direct writes), the key split of the
    selection dK/dV, the query split of the compressed dK/dV and other tiles change the schedule, not the
    result."""
    spec = make_spec(G=2, hkv=1, blk=32, n=2, w=24)
    gen = torch.Generator().manual_seed(11)
    xs = make_inputs(spec, 1, 71, gen)
    do = torch.randn(1, 71, spec.attention.heads, spec.attention.head_dim_v, generator=gen)
    want = ref_grads(spec, xs, do)
    variants = [
        {"bwd_slc": {"CHUNK": 4096, "BLOCK_T": 16, "KEY_SPLIT": 1, "DQ_TOKENS": 4},
         "bwd_cmp": {"Q_CHUNK": 16, "KV_PASSES": 2, "ORDER": "lpt"}},
        {"bwd_slc": {"CHUNK": 5, "BLOCK_T": 8, "KEY_SPLIT": 2, "DQ_TOKENS": 1, "dq_stages": 2,
                     "num_stages": 2},
         "bwd_win": {"DQ_BLOCK_N": 32, "BLOCK_N": 32, "KV_PASSES": 2}},
        {"bwd_cmp": {"KV_LOOP": "flat", "KV_PASSES": 2, "Q_CHUNK": 16},
         "bwd_win": {"KV_LOOP": "flat", "BLOCK_M": 32}},
    ]
    for cfg in variants:
        assert_close(kernel_grads(spec, xs, do, config=cfg), want)


@pytest.mark.parametrize("G,tokens", [(1, 4), (16, 2)])
def test_slc_dq_multi_token(G, tokens):  # noqa: N803
    """The multi-token selection dQ (a union of the tokens' blocks, rows masked per token) at the ends of the
    G range (the default, one token per program, runs in every other case), odd T."""
    spec = make_spec(G=G, hkv=1, n=3, fl=2)
    gen = torch.Generator().manual_seed(23 + G)
    xs = make_inputs(spec, 1, 45, gen)
    do = torch.randn(1, 45, spec.attention.heads, spec.attention.head_dim_v, generator=gen)
    cfg = {"bwd_slc": {"DQ_TOKENS": tokens, "dq_stages": 2}}
    assert_close(kernel_grads(spec, xs, do, config=cfg), ref_grads(spec, xs, do))


@pytest.mark.parametrize("layout", ["keys", "blocks", "rows_tma", "keys_tma"])
@pytest.mark.parametrize("case", ["G1", "G2-B2", "G4-l=d", "G16-dk48"])
def test_slc_dq_layouts(case, layout):
    """The other selection dQ layouts on the case matrix: "keys" (transposed one-token dQ, dQ^T += K^T dS^T)
    and "blocks" (block-outer: per-(token, slot) fp32 partials written by the dK/dV kernel into a poisoned
    buffer, summed per token), the latter with direct and split reverse-index lists; "*_tma": the one-token
    layouts reading the selected blocks through TMA descriptors (DQ_LOADS)."""
    kw, B, T = CASES[case]
    spec = make_spec(**kw)
    gen = torch.Generator().manual_seed(hash((case, layout)) % 2**31)
    xs = make_inputs(spec, B, T, gen)
    do = torch.randn(B, T, spec.attention.heads, spec.attention.head_dim_v, generator=gen)
    want = ref_grads(spec, xs, do)
    cfgs = {"keys": [{"DQ_LAYOUT": "keys", "dq_stages": 2}],
            "blocks": [{"DQ_LAYOUT": "blocks", "CHUNK": chunk} for chunk in (8, 3)],
            "rows_tma": [{"DQ_LAYOUT": "rows", "DQ_LOADS": "tma"}],
            "keys_tma": [{"DQ_LAYOUT": "keys", "dq_stages": 2, "DQ_LOADS": "tma"}]}[layout]
    for cfg in cfgs:
        assert_close(kernel_grads(spec, xs, do, config={"bwd_slc": cfg}), want)


@pytest.mark.parametrize("layout,G,cu", [("keys", 4, [0, 13, 13, 44]), ("blocks", 2, [0, 5, 26, 47]),
                                         ("rows", 4, [0, 13, 13, 44])])
def test_slc_dq_layouts_varlen(layout, G, cu):  # noqa: N803
    spec = make_spec(G=G, hkv=4 // G, n=2)
    cu = torch.tensor(cu, dtype=torch.int32)
    T = int(cu[-1])  # noqa: N806
    gen = torch.Generator().manual_seed(29 + G)
    tc = int(R.compressed_cu_seqlens(cu, spec)[-1])
    xs = make_inputs(spec, 1, T, gen, tc=tc)
    do = torch.randn(1, T, spec.attention.heads, spec.attention.head_dim_v, generator=gen)
    # the one-token layouts through TMA descriptors (rows of other sequences are loaded and masked)
    cfg = {"bwd_slc": {"DQ_LAYOUT": layout, **({"DQ_LOADS": "tma"} if layout == "rows" else {})}}
    want = ref_grads(spec, xs, do, cu_seqlens=cu)
    assert_close(kernel_grads(spec, xs, do, cu_seqlens=cu, config=cfg), want)


def test_slc_dq_blocks_layout_checks():
    spec = make_spec(G=2, hkv=2, n=2)
    from nsa_dsl.codegen.plan import get_kernel

    kdef = get_kernel("bwd_slc")
    lim = DeviceLimits.interpreter_limits()
    base = kdef.default(spec, lim)
    assert kdef.check(spec, {**base, "DQ_LAYOUT": "blocks"}, lim) is None
    assert "KEY_SPLIT" in kdef.check(spec, {**base, "DQ_LAYOUT": "blocks", "KEY_SPLIT": 2}, lim)
    assert "blocks" in kdef.space(spec, lim)["DQ_LAYOUT"]
    assert "blocks" not in kdef.space(make_spec(G=16, hkv=1), lim)["DQ_LAYOUT"]
    # TMA descriptor loads of the one-token dQ: the forward's rules, named by this kernel's parameter
    assert kdef.check(spec, {**base, "DQ_LOADS": "tma"}, lim) is None
    assert kdef.check(spec, {**base, "DQ_LOADS": "tex"}, lim).startswith("DQ_LOADS: must be")
    a100 = DeviceLimits("A100", (8, 0), 108, 163 * 1024)
    assert "DQ_LOADS: 'tma' needs compute capability" in kdef.check(spec, {**base, "DQ_LOADS": "tma"}, a100)


def test_deterministic_interpreter():
    spec = make_spec(G=2, hkv=2)
    gen = torch.Generator().manual_seed(3)
    xs = make_inputs(spec, 1, 33, gen)
    do = torch.randn(1, 33, spec.attention.heads, spec.attention.head_dim_v, generator=gen)
    a = kernel_grads(spec, xs, do)
    b = kernel_grads(spec, xs, do)
    for name, x, y in zip(NAMES, a, b, strict=True):
        assert torch.equal(x, y), name


def test_reverse_index_brute_force():
    gen = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, 9, 9, 40], dtype=torch.int32)
    T, hkv, n, lp = 40, 2, 3, 8
    idx = torch.full((T, hkv, n), -1, dtype=torch.int32)
    for t in range(T):
        s = 0 if t < 9 else 2
        local = t - int(cu[s])
        nb = local // lp + 1
        pick = torch.randperm(nb, generator=gen)[: min(n, nb)]
        for h in range(hkv):
            idx[t, h, : len(pick)] = pick.sort().values.to(torch.int32)
    rev = reverse_index.build(idx, cu, lp, chunk=3)
    got: dict[tuple[int, int], list[int]] = {}
    dst: dict[tuple[int, int], list[int]] = {}
    for w in range(rev.n_items):  # a static upper bound: empty slots past the real items
        lo, hi = int(rev.item_lo[w]), int(rev.item_hi[w])
        if lo == hi:
            continue
        key = (int(rev.item_tok0[w]), int(rev.item_hkv[w]))
        assert int(rev.item_kend[w]) == int(cu[1 + (key[0] >= 9) + (key[0] >= 9)])
        toks = rev.tokens[lo:hi].tolist()
        assert 1 <= len(toks) <= 3
        got.setdefault(key, []).extend(toks)
        dst.setdefault(key, []).append(int(rev.item_dst[w]))
    want: dict[tuple[int, int], list[int]] = {}
    for t in range(T):
        s = 0 if t < 9 else 2
        for h in range(hkv):
            for j in idx[t, h].tolist():
                if j >= 0:
                    want.setdefault((int(cu[s]) + j * lp, h), []).append(t)
    assert got == want  # same blocks, same tokens, ascending order
    # blocks with one item write directly; split blocks own contiguous partial slots, each reduced once
    reds = {}
    for r in range(rev.n_reduce):
        lo, hi = int(rev.red_lo[r]), int(rev.red_hi[r])
        if lo < hi:
            reds[(int(rev.red_tok0[r]), int(rev.red_hkv[r]))] = list(range(lo, hi))
    for key, toks in want.items():
        if len(toks) <= 3:
            assert dst[key] == [-1], key
        else:
            assert reds[key] == dst[key], key
    assert len(reds) == sum(1 for toks in want.values() if len(toks) > 3)
    slots = sorted(x for v in reds.values() for x in v)
    assert slots == list(range(len(slots))) and len(slots) <= rev.n_partials
    # no device-to-host synchronisation: the sizes come from the shapes alone
    bounds = reverse_index.bounds(T, hkv, n, 3, lp, 3)
    assert (rev.n_items, rev.n_partials, rev.n_reduce) == bounds[2:]


def test_custom_op_end_to_end_and_compile():
    """The custom op trains through the generated forward + backward and traces under torch.compile
    without graph breaks (fullgraph=True)."""
    spec = make_spec(G=2, hkv=1, n=2)
    ops = nsa_dsl.compile(spec)
    gen = torch.Generator().manual_seed(13)
    xs = [x.requires_grad_(True) for x in make_inputs(spec, 1, 27, gen)]
    o = nsa_attention(*xs, ops)
    do = torch.randn_like(o)
    torch.testing.assert_close(o, R.nsa_attention(*[x.detach() for x in xs], spec), atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(o, xs, do)
    assert_close(grads, ref_grads(spec, xs, do))
    # varlen through the op (generated forward + backward), against the reference per sequence
    cu = torch.tensor([0, 11, 27], dtype=torch.int32)
    tc = int(R.compressed_cu_seqlens(cu, spec)[-1])
    xv = [x.requires_grad_(True) for x in make_inputs(spec, 1, 27, gen, tc=tc)]
    ov = ops.forward(*xv, cu_seqlens=cu)
    assert_close(torch.autograd.grad(ov, xv, do), ref_grads(spec, xv, do, cu_seqlens=cu))
    fn = torch.compile(lambda *a: nsa_attention(*a, ops), backend="aot_eager", fullgraph=True)
    o2 = fn(*xs)
    grads2 = torch.autograd.grad(o2, xs, do)
    for name, a, b in zip(NAMES, grads, grads2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_custom_op_separate_window_kv_compiles_and_matches_reference():
    """With the window's own K/V the op is still one custom-op call that traces under torch.compile
    (fullgraph), and its eight gradients (k_win / v_win included) match the reference's autograd."""
    from nsa_dsl.reference import combine_branches, nsa_branches

    spec = make_spec(G=2, hkv=1, n=2)
    ops = nsa_dsl.compile(spec)
    gen = torch.Generator().manual_seed(17)
    base = make_inputs(spec, 1, 29, gen)
    kw, vw = (torch.randn(t.shape, generator=gen) for t in base[1:3])
    xs = [x.detach().clone().requires_grad_(True) for x in (*base, kw, vw)]
    do = torch.randn(1, 29, spec.attention.heads, spec.attention.head_dim_v, generator=gen)
    fn = torch.compile(lambda *a: nsa_attention(*a[:6], ops, k_win=a[6], v_win=a[7]), backend="aot_eager",
                       fullgraph=True)
    grads = torch.autograd.grad(fn(*xs), xs, do)
    ref = [x.detach().clone().requires_grad_(True) for x in xs]
    rb = nsa_branches(*ref[:5], spec, k_win=ref[6], v_win=ref[7])
    want = torch.autograd.grad(combine_branches(rb, ref[5], spec), ref, do)
    for name, a, b in zip((*NAMES, "dk_win", "dv_win"), grads, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert grads[6].abs().sum() > 0 and grads[7].abs().sum() > 0


def test_layer_triton_backend_grads_match_reference():
    """NSAttention(backend="triton") backpropagates through the generated op: every parameter gradient
    (projections, gate MLP, compressors) matches the reference backend's."""
    from nsa_dsl import NSAttention

    grads = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        layer = NSAttention(32, TINY, backend=backend)
        x = torch.randn(1, 37, 32, generator=torch.Generator().manual_seed(1))
        layer(x).square().mean().backward()
        grads[backend] = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    assert grads["reference"].keys() == grads["triton"].keys() and len(grads["triton"]) > 5
    for n, g in grads["reference"].items():
        torch.testing.assert_close(
            grads["triton"][n], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}"
        )


def test_selection_dq_scratch_bytes():
    """The block-outer selection dQ's partial buffer (GPU default for G <= 4) is reported per shape; the
    other layouts need none."""
    from nsa_dsl.codegen.autograd import selection_dq_scratch_bytes

    h100 = DeviceLimits(name="NVIDIA H100", capability=(9, 0), sm_count=132, smem_per_block=227 * 1024)
    small = NSAOps(spec=load_spec("small_group"), limits=h100)
    # 32 query heads x 16 slots x dk 128 x fp32 per token
    assert selection_dq_scratch_bytes(small, 65536) == 65536 * 32 * 16 * 128 * 4
    assert selection_dq_scratch_bytes(small, 1000, B=3) == 3 * 1000 * 32 * 16 * 128 * 4
    rows = NSAOps(spec=load_spec("small_group"), limits=h100, config={"bwd_slc": {"DQ_LAYOUT": "rows"}})
    assert selection_dq_scratch_bytes(rows, 65536) == 0
    assert selection_dq_scratch_bytes(NSAOps(spec=load_spec("nsa_paper"), limits=h100), 65536) == 0


def test_blocks_dq_falls_back_to_rows_without_memory(monkeypatch, caplog):
    """When the block-outer dQ's partials would not fit the scratch budget, the backward runs the same config
    with the group-centric dQ instead (logged): same gradients."""
    import logging

    from nsa_dsl.codegen import autograd

    spec = make_spec(G=2, hkv=2, n=2)
    gen = torch.Generator().manual_seed(37)
    xs = make_inputs(spec, 1, 33, gen)
    do = torch.randn(1, 33, spec.attention.heads, spec.attention.head_dim_v, generator=gen)
    want = ref_grads(spec, xs, do)
    used = []
    real_load = autograd.load
    monkeypatch.setattr(autograd, "load", lambda plan: used.append(dict(plan.config)) or real_load(plan))
    monkeypatch.setattr(autograd, "_scratch_budget", lambda device: 1024)  # bytes: far too little
    lim = DeviceLimits.detect(xs[0].device)
    ops = NSAOps(spec=spec, limits=lim, config={"bwd_slc": {"DQ_LAYOUT": "blocks"}})
    with caplog.at_level(logging.WARNING, logger="nsa_dsl.codegen.autograd"):
        assert_close(kernel_grads(spec, xs, do, ops=ops), want)
    assert [c["DQ_LAYOUT"] for c in used] == ["rows"]
    assert "DQ_LAYOUT 'rows'" in caplog.text
    used.clear()
    monkeypatch.setattr(autograd, "_scratch_budget", lambda device: None)  # no limit: the plan's own layout
    assert_close(kernel_grads(spec, xs, do, ops=ops), want)
    assert [c["DQ_LAYOUT"] for c in used] == ["blocks"]


def test_activation_memory_paper():
    m = activation_bytes_per_token(load_spec("nsa_paper"))
    # 3 branch outputs x 64 heads x 128 x bf16, 3 fp32 LSEs x 64 heads, 4 KV heads x 16 int32 indices
    assert m["branch_outputs"] == 3 * 64 * 128 * 2
    assert m["lse"] == 3 * 64 * 4
    assert m["indices"] == 4 * 16 * 4
    assert m["total"] == 49152 + 768 + 256
    nowin = activation_bytes_per_token(load_spec("fla_compat"))
    assert nowin["branch_outputs"] == 2 * 64 * 128 * 2


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


def _paper_case(T, seed, device="cuda", dtype=torch.bfloat16):
    spec = load_spec("nsa_paper")
    gen = torch.Generator().manual_seed(seed)
    xs = make_inputs(spec, 1, T, gen, dtype=dtype, device=device)
    do = torch.randn(1, T, 64, 128, generator=gen).to(device, dtype)
    return spec, xs, do


@pytest.mark.gpu
def test_gpu_bf16_paper_vs_fp32_reference():
    spec, xs, do = _paper_case(1024 + 37, 0)
    ops = nsa_dsl.compile(spec)
    xs_b = [x.requires_grad_(True) for x in xs]
    o, idx = nsa_attention(*xs_b, ops, return_indices=True)
    got = torch.autograd.grad(o, xs_b, do)
    want = ref_grads_given_indices(spec, [x.float() for x in xs], do.float(), idx)
    o_ref = R.nsa_attention(*[x.detach().float() for x in xs], spec)
    assert float((o.float() - o_ref).norm() / o_ref.norm()) < 2e-2
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert bool(torch.isfinite(a).all()), name
        err = (a.float() - b).norm() / b.norm().clamp_min(1e-6)
        assert err < 2e-2, f"{name}: relative error {err:.3e}"


@pytest.mark.gpu
def test_gpu_fwd_bwd_captured_in_a_cuda_graph_equals_eager():
    """The op's forward and backward capture into one CUDA graph (no host synchronisation; the reverse index,
    built on a side stream in eager mode, is built inline while capturing) and a replay on new input values
    gives the eager step's output and gradients on those values, bit for bit."""
    spec, xs, do = _paper_case(2048 + 11, 4)
    ops = nsa_dsl.compile(spec)
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]

    def step():
        o = nsa_attention(*leaves, ops, deterministic=True)
        return (o, *torch.autograd.grad(o, leaves, do))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (compiles, allocator pools)
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, x in enumerate(leaves):  # new values into the graph's static inputs (gates in [0, 1])
            draw = torch.rand if i == len(leaves) - 1 else torch.randn
            x.copy_(draw(x.shape, generator=gen).to(x.device, x.dtype))
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    for name, a, b in zip(("o", *NAMES), captured, want, strict=True):
        assert bool(torch.isfinite(a).all()), name
        assert torch.equal(a, b), name


def _assert_same_grads_bitwise(seed, cfg_a, cfg_b):
    """Paper spec, bf16, odd T: the six gradients under two op configs are finite and bitwise equal."""
    spec, xs, do = _paper_case(4096 + 5, seed)
    grads = []
    for cfg in (cfg_a, cfg_b):
        ops = nsa_dsl.compile(spec, config=cfg)
        xs_b = [x.detach().clone().requires_grad_(True) for x in xs]
        o = nsa_attention(*xs_b, ops, deterministic=True)
        grads.append(torch.autograd.grad(o, xs_b, do))
    for name, a, b in zip(NAMES, *grads, strict=True):
        assert bool(torch.isfinite(a).all()) and torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["keys", "rows"])
def test_gpu_selection_dq_tma_equals_pointer_loads(layout):
    """The one-token selection dQ through TMA descriptors (DQ_LOADS = "tma") gives bitwise the gradients of
    the pointer loads (same products and sums; rows out of range are zero instead of masked, and masked
    anyway): paper spec, bf16, odd T."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9.0")
    cfgs = ({"bwd_slc": {"DQ_LAYOUT": layout, "DQ_LOADS": x}} for x in ("pointers", "tma"))
    _assert_same_grads_bitwise(2, *cfgs)


@pytest.mark.gpu
def test_gpu_dense_branches_tma_equals_pointer_loads():
    """The compressed / window backward through TMA descriptors gives bitwise the pointer loads' gradients
    (paper spec, bf16, odd T, split query ranges in the compressed dK/dV)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9.0")
    cfgs = ({"bwd_cmp": {"LOADS": x}, "bwd_win": {"LOADS": x}} for x in ("pointers", "tma"))
    _assert_same_grads_bitwise(3, *cfgs)


@pytest.mark.gpu
def test_gpu_dense_kv_loop_flat_equals_nested():
    """KV_LOOP = "flat" (one loop over (head, query tile) pairs) gives bitwise the nested loops' gradients:
    the same products accumulated in the same order (paper spec, bf16, odd T)."""
    cfgs = ({"bwd_cmp": {"KV_LOOP": x}, "bwd_win": {"KV_LOOP": x}} for x in ("nested", "flat"))
    _assert_same_grads_bitwise(3, *cfgs)


@pytest.mark.gpu
def test_gpu_dq_cmp_fused_matches_reference_and_is_deterministic():
    """bwd_win DQ_CMP = 1 on the card (paper spec, bf16, odd T, the default loads; pointer loads and TMA are
    both covered in the interpreter): every gradient against the fp32 reference given the same indices, dk /
    dv / dk_cmp / dv_cmp / dg bitwise those of the separate dQ kernels (the option changes only dQ's summation
    order), and two runs bitwise equal."""
    spec, xs, do = _paper_case(4096 + 5, 5)
    for loads in ("default",):
        base, fused = {}, {"bwd_win": {"DQ_CMP": 1}}
        runs = []
        for cfg in (base, fused, fused):
            ops = nsa_dsl.compile(spec, config=cfg)
            xs_b = [x.detach().clone().requires_grad_(True) for x in xs]
            o, idx = nsa_attention(*xs_b, ops, return_indices=True, deterministic=True)
            runs.append(torch.autograd.grad(o, xs_b, do))
        want = ref_grads_given_indices(spec, [x.float() for x in xs], do.float(), idx)
        for name, a, b, c, w in zip(NAMES, *runs, want, strict=True):
            assert bool(torch.isfinite(b).all()) and torch.equal(b, c), (loads, name)
            if name != "dq":
                assert torch.equal(a, b), (loads, name)
            err = (b.float() - w).norm() / w.norm().clamp_min(1e-6)
            assert err < 2e-2, f"{loads} {name}: relative error {err:.3e}"


@pytest.mark.gpu
def test_gpu_deterministic_bitwise():
    spec, xs, do = _paper_case(4096 + 5, 1)
    ops = nsa_dsl.compile(spec)
    runs = []
    for _ in range(2):
        xs_b = [x.detach().clone().requires_grad_(True) for x in xs]
        o = nsa_attention(*xs_b, ops, deterministic=True)
        runs.append(torch.autograd.grad(o, xs_b, do))
    for name, a, b in zip(NAMES, *runs, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_gpu_training_tracks_reference():
    from nsa_dsl import NSAttention

    spec = make_spec(G=4, hkv=2, dk=64, dv=64, l=16, d=8, blk=32, n=4, fi=1, fl=2, w=64)
    losses = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        layer = NSAttention(128, spec, backend=backend).cuda()
        head = torch.nn.Linear(128, 128).cuda()
        opt = torch.optim.AdamW([*layer.parameters(), *head.parameters()], lr=3e-3)
        gen = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(2, 256, 128, device="cuda", generator=gen)
        y = torch.roll(x, 1, dims=1)
        hist = []
        for _ in range(30):
            loss = torch.nn.functional.mse_loss(head(layer(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            hist.append(float(loss))
        losses[backend] = hist
    ref, tri = torch.tensor(losses["reference"]), torch.tensor(losses["triton"])
    assert tri[-1] < tri[0] * 0.9
    assert bool(((tri - ref).abs() / ref).max() < 0.05), (losses["reference"], losses["triton"])


@pytest.mark.gpu
def test_gpu_separate_window_kv_compiled_bf16():
    """Paper spec, bf16: the window's own K/V train through the single custom-op call, compiled with
    torch.compile (inductor, fullgraph; the first call is the compiled one), against the fp32 reference with
    the kernels' own selection."""
    spec, xs, do = _paper_case(2048 + 19, 2)
    gen = torch.Generator().manual_seed(3)
    kw, vw = (torch.randn(t.shape, generator=gen).to("cuda", torch.bfloat16) for t in xs[1:3])
    ops = nsa_dsl.compile(spec)
    leaves = [x.detach().clone().requires_grad_(True) for x in (*xs, kw, vw)]
    fn = torch.compile(lambda *a: nsa_attention(*a[:6], ops, k_win=a[6], v_win=a[7], return_indices=True),
                       fullgraph=True)
    o, idx = fn(*leaves)
    got = torch.autograd.grad(o, leaves, do)
    ref = [x.detach().float().requires_grad_(True) for x in leaves]
    q, k, v, kc, vc, g, kw_, vw_ = ref
    o_ref = (g[..., 0:1] * R.compressed_attention(q, kc, vc, spec)[0]
             + g[..., 1:2] * R.selected_attention(q, k, v, idx, spec)[0]
             + g[..., 2:3] * R.window_attention(q, kw_, vw_, spec)[0])
    want = torch.autograd.grad(o_ref, ref, do.float())
    assert float((o.float() - o_ref).norm() / o_ref.norm()) < 2e-2
    for name, a, b in zip((*NAMES, "dk_win", "dv_win"), got, want, strict=True):
        assert bool(torch.isfinite(a).all()), name
        err = (a.float() - b).norm() / b.norm().clamp_min(1e-6)
        assert err < 2e-2, f"{name}: relative error {err:.3e}"


@pytest.mark.gpu
def test_gpu_varlen_max_seqlen_no_sync():
    """A varlen pack with ``max_seqlen``: forward + backward run under CUDA's sync debug mode set to error
    (any device-to-host synchronisation raises) and give the same bits as without ``max_seqlen``."""
    spec = load_spec("nsa_paper")
    cu = torch.tensor([0, 700, 2748, 3001], dtype=torch.int32, device="cuda")
    tc = int(R.compressed_cu_seqlens(cu.cpu(), spec)[-1])
    gen = torch.Generator().manual_seed(4)
    xs = make_inputs(spec, 1, 3001, gen, tc=tc, dtype=torch.bfloat16, device="cuda")
    do = torch.randn(1, 3001, 64, 128, generator=gen).to("cuda", torch.bfloat16)
    ops = nsa_dsl.compile(spec)

    def run(max_seqlen):
        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        o = ops.forward(*leaves, cu_seqlens=cu, max_seqlen=max_seqlen)
        return o.detach(), torch.autograd.grad(o, leaves, do)

    want_o, want_g = run(None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got_o, got_g = run(2048)
        torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got_o, want_o)
    for name, a, b in zip(NAMES, got_g, want_g, strict=True):
        assert torch.equal(a, b), name
