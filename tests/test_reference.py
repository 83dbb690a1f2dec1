"""The reference against independent facts (issue 2): SDPA, brute-force token overlaps, a per-query loop
implementation written from SEMANTICS.md, varlen vs per-sequence runs, fp64 gradcheck, validation errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nsa_dsl import NSASpec, load_spec
from nsa_dsl import reference as R

DT = torch.float64


def make_spec(
    heads=4,
    kv_heads=2,
    dk=16,
    dv=8,
    l=8,  # noqa: E741
    d=4,
    lp=16,
    n=3,
    fi=1,
    fl=1,
    w=16,
    function="mean",
) -> NSASpec:
    return NSASpec.from_dict(
        {
            "attention": {"heads": heads, "kv_heads": kv_heads, "head_dim_qk": dk, "head_dim_v": dv},
            "compression": {"block": l, "stride": d, "function": function, "position_encoding": False},
            "selection": {"block": lp, "top_n": n, "force_initial": fi, "force_local": fl},
            "window": {"size": w},
        }
    )


def rand_inputs(spec: NSASpec, B: int, T: int, seed: int = 0, dtype=DT, Tc=None):  # noqa: N803
    gen = torch.Generator().manual_seed(seed)
    a = spec.attention
    tc = spec.num_compressed(T) if Tc is None else Tc

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q = r(B, T, a.heads, a.head_dim_qk)
    k = r(B, T, a.kv_heads, a.head_dim_qk)
    v = r(B, T, a.kv_heads, a.head_dim_v)
    kc = r(B, tc, a.kv_heads, a.head_dim_qk)
    vc = r(B, tc, a.kv_heads, a.head_dim_v)
    g = torch.rand(B, T, a.heads, 3, generator=gen, dtype=dtype)
    return q, k, v, kc, vc, g


def sdpa_causal(q, k, v, G):  # noqa: N803
    kk, vv = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), is_causal=True
    )
    return o.transpose(1, 2)


# ---- a slow, loop-based implementation written directly from the semantics --------------------------------


def naive_nsa(q, k, v, kc, vc, g, spec):
    """Per (b, t, kv head) loops over Python lists of token indices. Returns (o, selected sets)."""
    B, T, Hq, _ = q.shape  # noqa: N806
    hkv, G = spec.attention.kv_heads, spec.G  # noqa: N806
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741
    lp, n = spec.selection.block, spec.selection.top_n
    fi, fl = spec.selection.force_initial, spec.selection.force_local
    w = spec.window_size
    sc = spec.scale
    tc = kc.shape[1]
    nslc = math.ceil(T / lp)
    cmp_tokens = [set(range(i * d, i * d + l)) for i in range(tc)]
    slc_tokens = [set(range(j * lp, (j + 1) * lp)) for j in range(nslc)]
    o = torch.zeros(B, T, Hq, v.shape[-1], dtype=q.dtype)
    sel = {}

    def attend(qv, keys, vals):
        if len(keys) == 0:
            return torch.zeros(vals.shape[-1], dtype=q.dtype)
        p = torch.softmax((keys @ qv) * sc, 0)
        return p @ vals

    for b in range(B):
        for t in range(T):
            for hk in range(hkv):
                vis = [i for i in range(tc) if i * d + l - 1 <= t]
                score = [0.0] * nslc
                o_cmp = {}
                for gg in range(G):
                    h = hk * G + gg
                    if vis:
                        logit = torch.stack([kc[b, i, hk] @ q[b, t, h] * sc for i in vis])
                        p = torch.softmax(logit, 0)
                        o_cmp[h] = sum(p[m] * vc[b, i, hk] for m, i in enumerate(vis))
                        for m, i in enumerate(vis):
                            for j in range(nslc):
                                score[j] += float(p[m]) * len(cmp_tokens[i] & slc_tokens[j]) / d
                    else:
                        o_cmp[h] = torch.zeros(v.shape[-1], dtype=q.dtype)
                valid = list(range(t // lp + 1))
                forced = {j for j in valid if j < fi} | set(valid[::-1][:fl])
                rest = sorted((j for j in valid if j not in forced), key=lambda j: (-score[j], j))
                chosen = sorted(forced | set(rest[: max(0, n - len(forced))]))
                sel[(b, t, hk)] = chosen
                toks = sorted(s for j in chosen for s in range(j * lp, (j + 1) * lp) if s <= t)
                wtoks = list(range(max(0, t - w + 1), t + 1)) if w else []
                for gg in range(G):
                    h = hk * G + gg
                    o_slc = attend(q[b, t, h], k[b, toks, hk], v[b, toks, hk])
                    out = g[b, t, h, 0] * o_cmp[h] + g[b, t, h, 1] * o_slc
                    if w:
                        out = out + g[b, t, h, 2] * attend(q[b, t, h], k[b, wtoks, hk], v[b, wtoks, hk])
                    o[b, t, h] = out
    return o, sel


@pytest.mark.parametrize(
    "cfg,T",
    [
        (dict(), 45),  # l=8,d=4,l'=16, n=3, fi=1, fl=1
        (
            dict(l=8, d=8, lp=8, n=2, fi=0, fl=0, w=0),
            37,
        ),  # l = d = l' (fla-like), no window, no forced blocks
        (dict(heads=4, kv_heads=1, l=4, d=2, lp=8, n=4, fi=1, fl=2, w=5), 41),  # G = 4, l < l'
        (dict(heads=2, kv_heads=2, l=8, d=4, lp=8, n=2, fi=2, fl=0, w=7), 30),  # G = 1
    ],
)
def test_matches_naive_loop(cfg, T):  # noqa: N803
    spec = make_spec(**cfg)
    q, k, v, kc, vc, g = rand_inputs(spec, 2, T, seed=T)
    o, idx = R.nsa_attention(q, k, v, kc, vc, g, spec, return_indices=True)
    o_ref, sel = naive_nsa(q, k, v, kc, vc, g, spec)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    for (b, t, hk), chosen in sel.items():
        got = [int(x) for x in idx[b, t, hk] if x >= 0]
        assert got == chosen, (b, t, hk)
        assert all(int(x) == -1 for x in idx[b, t, hk, len(got) :])
    assert idx.dtype == torch.int32 and idx.shape == (2, T, spec.attention.kv_heads, spec.selection.top_n)


@pytest.mark.parametrize("T", [1, 31, 64, 100])
def test_full_selection_and_window_equal_causal_sdpa(T):  # noqa: N803
    # n*l' >= T and w >= T: selection and window both see every causal key.
    spec = make_spec(n=7, lp=16, w=128)
    q, k, v, kc, vc, _ = rand_inputs(spec, 2, T, seed=1)
    ref = sdpa_causal(q, k, v, spec.G)
    idx = R.select_blocks(R.selection_scores(R.compression_probs(q, kc, spec), spec, T), spec, T)
    o_slc, lse_slc = R.selected_attention(q, k, v, idx, spec)
    o_win, lse_win = R.window_attention(q, k, v, spec)
    torch.testing.assert_close(o_slc, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o_win, ref, rtol=1e-12, atol=1e-12)
    # LSE against an explicit causal logsumexp.
    logits = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(spec.G, 2)) * spec.scale
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    lse = torch.logsumexp(logits.masked_fill(~causal, -math.inf), -1).transpose(1, 2)
    torch.testing.assert_close(lse_slc, lse)
    torch.testing.assert_close(lse_win, lse)
    # Gates (0, 1, 0) and (0, 0, 1) through the full op.
    g = torch.zeros(2, T, spec.attention.heads, 3, dtype=DT)
    g[..., 1] = 1
    torch.testing.assert_close(R.nsa_attention(q, k, v, kc, vc, g, spec), ref)
    g = g.roll(1, -1)
    torch.testing.assert_close(R.nsa_attention(q, k, v, kc, vc, g, spec), ref)


def test_window_band_against_sdpa_mask():
    spec = make_spec(w=5)
    T = 40  # noqa: N806
    q, k, v, *_ = rand_inputs(spec, 1, T, seed=2)
    t = torch.arange(T)
    mask = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - 5)
    kk, vv = k.repeat_interleave(spec.G, 2), v.repeat_interleave(spec.G, 2)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    o, _ = R.window_attention(q, k, v, spec)
    torch.testing.assert_close(o, ref)


def test_compressed_branch_against_loop_and_no_block_rows():
    spec = make_spec(l=8, d=4)
    T = 30  # noqa: N806
    q, k, v, kc, vc, _ = rand_inputs(spec, 1, T, seed=3)
    o, lse = R.compressed_attention(q, kc, vc, spec)
    for t in range(T):
        vis = [i for i in range(kc.shape[1]) if i * 4 + 7 <= t]
        for h in range(spec.attention.heads):
            hk = h // spec.G
            if not vis:
                assert torch.all(o[0, t, h] == 0) and lse[0, t, h] == math.inf
                continue
            s = torch.stack([q[0, t, h] @ kc[0, i, hk] for i in vis]) * spec.scale
            torch.testing.assert_close(lse[0, t, h], torch.logsumexp(s, 0))
            torch.testing.assert_close(o[0, t, h], torch.softmax(s, 0) @ vc[0, vis, hk])


def test_scores_against_brute_force_token_overlaps():
    # The paper's l=32, d=16, l'=64 at a small head size; overlaps counted token by token.
    spec = make_spec(heads=2, kv_heads=1, dk=8, dv=8, l=32, d=16, lp=64, n=4, w=0)
    T = 300  # noqa: N806
    gen = torch.Generator().manual_seed(4)
    tc = spec.num_compressed(T)
    p = torch.rand(1, T, 2, tc, generator=gen, dtype=DT)
    s = R.selection_scores(p, spec, T)
    nslc = math.ceil(T / 64)
    assert s.shape == (1, T, 1, nslc)
    for t in (0, 63, 64, 130, 299):
        for j in range(nslc):
            if j > t // 64:
                assert s[0, t, 0, j] == -math.inf
                continue
            want = 0.0
            for i in range(tc):
                ov = len(set(range(i * 16, i * 16 + 32)) & set(range(j * 64, j * 64 + 64)))
                want += (float(p[0, t, 0, i]) + float(p[0, t, 1, i])) * ov / 16
            assert abs(float(s[0, t, 0, j]) - want) < 1e-9
    # The paper's weights 1,2,2,2,1 on blocks 4j-1..4j+3, read off the matrix.
    m = R.overlap_matrix(spec, tc, nslc)
    assert m[5:13, 2].tolist() == [0, 0, 1, 2, 2, 2, 1, 0]  # blocks 7..11 for j = 2


def test_select_blocks_forced_ties_and_padding():
    spec = make_spec(heads=2, kv_heads=1, l=4, d=2, lp=4, n=4, fi=1, fl=2)
    T = 40  # noqa: N806
    nslc = 10
    gen = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 3, (1, T, 1, nslc), generator=gen).to(DT)  # many ties
    idx = R.select_blocks(scores, spec, T)
    for t in range(T):
        cur = t // 4
        row = [int(x) for x in idx[0, t, 0]]
        chosen = [x for x in row if x >= 0]
        assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
        assert row[len(chosen) :] == [-1] * (4 - len(chosen))
        assert len(chosen) == min(4, cur + 1)
        forced = {0, cur, max(cur - 1, 0)}
        assert forced <= set(chosen)
        assert all(0 <= x <= cur for x in chosen)
        # The others: highest scores, ties -> lower index.
        others = sorted(
            (j for j in range(cur + 1) if j not in forced), key=lambda j: (-scores[0, t, 0, j], j)
        )
        assert set(chosen) - forced == set(others[: len(chosen) - len(forced)])


def test_gqa_heads_of_a_group_share_indices():
    spec = make_spec(heads=8, kv_heads=2, l=4, d=2, lp=4, n=3, w=0)
    T = 64  # noqa: N806
    q, k, v, kc, vc, g = rand_inputs(spec, 1, T, seed=6)
    _, idx = R.nsa_attention(q, k, v, kc, vc, g, spec, return_indices=True)
    assert idx.shape[2] == 2
    # The selection branch of every head in group 0 attends exactly the tokens of idx[..., 0, :]:
    o_slc, _ = R.selected_attention(q, k, v, idx, spec)
    for t in (5, 33, 63):
        toks = sorted(s for j in idx[0, t, 0].tolist() if j >= 0 for s in range(j * 4, j * 4 + 4) if s <= t)
        for h in range(4):
            p = torch.softmax(k[0, toks, 0] @ q[0, t, h] * spec.scale, 0)
            torch.testing.assert_close(o_slc[0, t, h], p @ v[0, toks, 0])
    # Group scores are sums over the heads of a group: permuting heads inside a group changes nothing.
    perm = torch.tensor([1, 3, 0, 2, 4, 5, 6, 7])
    _, idx2 = R.nsa_attention(q[:, :, perm], k, v, kc, vc, g, spec, return_indices=True)
    assert torch.equal(idx, idx2)


def test_t_shorter_than_block():
    spec = make_spec(l=8, d=4)
    T = 7  # noqa: N806
    q, k, v, kc, vc, g = rand_inputs(spec, 2, T, seed=7)
    assert kc.shape[1] == 0
    o_cmp, lse_cmp = R.compressed_attention(q, kc, vc, spec)
    assert torch.all(o_cmp == 0) and torch.all(lse_cmp == math.inf)
    o, idx = R.nsa_attention(q, k, v, kc, vc, g, spec, return_indices=True)
    assert torch.isfinite(o).all()
    assert (idx[..., 0] == 0).all() and (idx[..., 1:] == -1).all()
    ref = sdpa_causal(q, k, v, spec.G)
    torch.testing.assert_close(o, (g[..., 1:2] + g[..., 2:3]) * ref)
    # Gradients are finite too.
    q.requires_grad_(True)
    R.nsa_attention(q, k, v, kc, vc, g, spec).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_varlen_equals_per_sequence_runs():
    spec = make_spec(l=8, d=4, lp=16, n=2, w=9)
    lens = [37, 5, 64, 0, 20]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    ccu = R.compressed_cu_seqlens(cu, spec)
    assert ccu.dtype == torch.int32
    assert ccu.tolist() == [0, 8, 8, 23, 23, 27]
    T = sum(lens)  # noqa: N806
    q, k, v, kc, vc, g = rand_inputs(spec, 1, T, seed=8, Tc=int(ccu[-1]))
    o, idx = R.nsa_attention(q, k, v, kc, vc, g, spec, cu_seqlens=cu, return_indices=True)
    for s in range(len(lens)):
        a, b = int(cu[s]), int(cu[s + 1])
        ca, cb = int(ccu[s]), int(ccu[s + 1])
        if a == b:
            continue
        o1, i1 = R.nsa_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], kc[:, ca:cb], vc[:, ca:cb], g[:, a:b], spec, return_indices=True
        )
        torch.testing.assert_close(o[:, a:b], o1, rtol=0, atol=0)
        assert torch.equal(idx[:, a:b], i1)


def test_fp64_gradcheck():
    spec = make_spec(heads=2, kv_heads=1, dk=2, dv=2, l=4, d=2, lp=4, n=2, fi=1, fl=1, w=3)
    q, k, v, kc, vc, g = rand_inputs(spec, 1, 10, seed=9)
    inputs = [x.requires_grad_(True) for x in (q, k, v, kc, vc, g)]

    def f(*xs):
        return R.nsa_attention(*xs, spec)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


def test_fp64_gradcheck_varlen():
    spec = make_spec(heads=2, kv_heads=1, dk=4, dv=3, l=4, d=4, lp=4, n=2, fi=0, fl=1, w=0)
    cu = torch.tensor([0, 6, 13], dtype=torch.int32)
    tc = int(R.compressed_cu_seqlens(cu, spec)[-1])
    q, k, v, kc, vc, g = rand_inputs(spec, 1, 13, seed=10, Tc=tc)
    inputs = [x.requires_grad_(True) for x in (q, k, v, kc, vc, g)]
    assert torch.autograd.gradcheck(lambda *xs: R.nsa_attention(*xs, spec, cu_seqlens=cu), inputs, eps=1e-6)


def test_low_precision_inputs_computed_in_fp32():
    spec = make_spec()
    q, k, v, kc, vc, g = rand_inputs(spec, 1, 50, seed=11)
    o64 = R.nsa_attention(q, k, v, kc, vc, g, spec)
    for dt in (torch.float32, torch.bfloat16):
        o = R.nsa_attention(*(x.to(dt) for x in (q, k, v, kc, vc, g)), spec)
        assert o.dtype == dt
        tol = 1e-5 if dt == torch.float32 else 3e-2
        torch.testing.assert_close(o.double(), o64, rtol=tol, atol=tol)
    _, lse = R.compressed_attention(q.float(), kc.float(), vc.float(), spec)
    assert lse.dtype == torch.float32


def test_tiny_spec_and_scale_argument():
    spec = load_spec("tiny")
    q, k, v, kc, vc, g = rand_inputs(spec, 1, 33, seed=12)
    o1 = R.nsa_attention(q, k, v, kc, vc, g, spec, scale=0.3)
    o2 = R.nsa_attention(q, k, v, kc, vc, g, spec.replace(attention={"scale": 0.3}))
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    assert not torch.allclose(o1, R.nsa_attention(q, k, v, kc, vc, g, spec))


# ---- validation --------------------------------------------------------------------------------------------


def test_validation_errors_are_one_line():
    spec = make_spec()
    T = 100  # noqa: N806
    q, k, v, kc, vc, g = rand_inputs(spec, 1, T, seed=13)
    cases = [
        ((q[0], k, v, kc, vc, g), {}, "q: expected 4 dimensions"),
        ((q[..., :8], k, v, kc, vc, g), {}, "q: expected attention.head_dim_qk (dk) = 16"),
        ((q, k[:, :, :1], v, kc, vc, g), {}, "k: expected attention.kv_heads (Hkv) = 2"),
        ((q, k.float(), v, kc, vc, g), {}, "k: expected dtype torch.float64"),
        ((q, k, v[:, :50], kc, vc, g), {}, "v: expected [B, T]"),
        (
            (q, k, v, kc[:, :23], vc, g),
            {},
            "k_cmp: expected 24 compressed blocks for T=100 (l=8, d=4), got 23",
        ),
        ((q, k, v, kc, vc[..., :4], g), {}, "v_cmp: expected attention.head_dim_v (dv) = 8"),
        ((q, k, v, kc, vc, g[..., :2]), {}, "g: expected shape"),
        ((q, k, v, kc, vc, g.long()), {}, "g: expected a floating-point dtype"),
        ((q, k, v, kc, vc, g), {"scale": -1.0}, "scale: expected a positive"),
        (
            (q, k, v, kc, vc, g),
            {"cu_seqlens": torch.tensor([0, 100])},
            "cu_seqlens: expected dtype torch.int32",
        ),
        (
            (q, k, v, kc, vc, g),
            {"cu_seqlens": torch.tensor([0, 50, 90], dtype=torch.int32)},
            "cu_seqlens: last offset must equal",
        ),
        (
            (q, k, v, kc, vc, g),
            {"cu_seqlens": torch.tensor([0, 50, 100], dtype=torch.int32)},
            "k_cmp: expected 22 compressed blocks",
        ),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError) as ei:
            R.nsa_attention(*args, spec, **kw)
        assert msg in str(ei.value), (msg, str(ei.value))
        assert "\n" not in str(ei.value)
    with pytest.raises(ValueError, match="spec: expected an NSASpec"):
        R.nsa_attention(q, k, v, kc, vc, g, {"heads": 4})
    with pytest.raises(ValueError, match="k: expected device cpu"):
        R.nsa_attention(q, k.to("meta"), v, kc, vc, g, spec)
    with pytest.raises(ValueError, match="g: expected device cpu"):
        R.nsa_attention(q, k, v, kc, vc, g.to("meta"), spec)
    with pytest.raises(ValueError, match="indices: expected selection.top_n"):
        R.selected_attention(q, k, v, torch.zeros(1, T, 2, 5, dtype=torch.int32), spec)
    with pytest.raises(ValueError, match="q: expected batch B = 1 with cu_seqlens"):
        q2, k2, v2, kc2, vc2, g2 = rand_inputs(spec, 2, T, seed=14)
        R.nsa_attention(q2, k2, v2, kc2, vc2, g2, spec, cu_seqlens=torch.tensor([0, 100], dtype=torch.int32))


@pytest.mark.parametrize("path", ["union", "gather"])
def test_selected_attention_paths_against_loop(path, monkeypatch):
    # Arbitrary index rows (not from select_blocks): -1 slots, a repeated block (counts once), future blocks.
    monkeypatch.setattr(R, "_SELECTION_PATH", path)
    spec = make_spec(heads=6, kv_heads=2, l=4, d=2, lp=4, n=3)
    T = 23  # noqa: N806
    q, k, v, *_ = rand_inputs(spec, 2, T, seed=15)
    gen = torch.Generator().manual_seed(16)
    idx = torch.randint(-1, 6, (2, T, 2, 3), generator=gen, dtype=torch.int32)
    idx[0, 5, 0] = torch.tensor([1, 1, -1], dtype=torch.int32)
    idx[1, 0, 1] = torch.tensor([-1, -1, -1], dtype=torch.int32)
    o, lse = R.selected_attention(q, k, v, idx, spec)
    for b in range(2):
        for t in range(T):
            for h in range(6):
                hk = h // 3
                blocks = {int(j) for j in idx[b, t, hk] if j >= 0}
                toks = sorted(s for j in blocks for s in range(4 * j, 4 * j + 4) if s <= t)
                if not toks:
                    assert torch.all(o[b, t, h] == 0) and lse[b, t, h] == math.inf
                    continue
                s = k[b, toks, hk] @ q[b, t, h] * spec.scale
                torch.testing.assert_close(lse[b, t, h], torch.logsumexp(s, 0))
                torch.testing.assert_close(o[b, t, h], torch.softmax(s, 0) @ v[b, toks, hk])


def test_chunking_does_not_change_results(monkeypatch):
    # Tiny chunks (one query per chunk where the code allows) against the default single-chunk run.
    spec = make_spec(l=8, d=4, lp=8, n=3, w=6)
    q, k, v, kc, vc, g = rand_inputs(spec, 2, 70, seed=17)
    want = R.nsa_branches(q, k, v, kc, vc, spec)
    monkeypatch.setattr(R, "_CHUNK_BYTES", 1)
    got = R.nsa_branches(q, k, v, kc, vc, spec)
    for key, val in want.items():
        if key == "indices":
            assert torch.equal(got[key], val)
        else:
            torch.testing.assert_close(got[key], val, rtol=1e-12, atol=1e-12)


def test_lse_gradients_are_finite_where_no_key():
    spec = make_spec(l=8, d=4, w=0)
    q, k, v, kc, vc, _ = rand_inputs(spec, 1, 20, seed=18)
    q.requires_grad_(True)
    kc.requires_grad_(True)
    _, lse = R.compressed_attention(q, kc, vc, spec)
    assert torch.isinf(lse[:, :7]).all() and torch.isfinite(lse[:, 7:]).all()
    lse.masked_fill(torch.isinf(lse), 0.0).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(kc.grad).all()
    assert (q.grad[:, :7] == 0).all() and (q.grad[:, 7:] != 0).any()


def test_selection_indices_matches_pipeline_and_varlen():
    spec = make_spec(l=8, d=4, lp=8, n=3)
    q, k, v, kc, vc, g = rand_inputs(spec, 1, 50, seed=19)
    want = R.select_blocks(R.selection_scores(R.compression_probs(q, kc, spec), spec, 50), spec, 50)
    assert torch.equal(R.selection_indices(q, kc, spec), want)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    ccu = R.compressed_cu_seqlens(cu, spec)
    q2, k2, v2, kc2, vc2, g2 = rand_inputs(spec, 1, 50, seed=20, Tc=int(ccu[-1]))
    _, idx = R.nsa_attention(q2, k2, v2, kc2, vc2, g2, spec, cu_seqlens=cu, return_indices=True)
    assert torch.equal(R.selection_indices(q2, kc2, spec, cu_seqlens=cu), idx)
