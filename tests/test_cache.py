"""NSACache and the PyTorch reference decode step (CPU).

Ground truth: ``nsa_dsl.reference.nsa_attention`` on the full sequence, and the compressor applied to the
full sequence (what prefill computes). Decoding token by token (or a few tokens per step) must give, at every
position, the full forward's output; the compressed cache must equal prefill's compression.
"""

from __future__ import annotations

import pytest
import torch

from nsa_dsl import NSASpec, load_spec
from nsa_dsl.cache import NSACache, decode_reference, mean_compressor
from nsa_dsl.reference import nsa_attention


def make_specs() -> dict[str, NSASpec]:
    tiny = load_spec("tiny")  # G = 2, l = 8, d = 4, l' = 16, n = 3 (1 + 1 forced), w = 16
    return {
        "tiny": tiny,
        "g1": tiny.replace(
            attention={"heads": 2, "kv_heads": 2, "head_dim_v": 8},
            compression={"block": 8, "stride": 4},
            selection={"block": 8, "top_n": 2, "force_initial": 0, "force_local": 1},
            window={"size": 8},
        ),
        "l_eq_d": tiny.replace(
            attention={"heads": 8, "kv_heads": 2},
            compression={"block": 8, "stride": 8, "function": "mean", "position_encoding": False,
                         "mlp_hidden": None},
            selection={"block": 16, "top_n": 2, "force_initial": 0, "force_local": 0},
            window={"size": 0},
        ),
        "lp24": tiny.replace(selection={"block": 24, "top_n": 2, "force_initial": 1, "force_local": 1}),
    }


SPECS = make_specs()


def nonlinear_compressor(spec: NSASpec, dim: int, seed: int):
    """A deterministic nonlinear phi over each block's l tokens (independent of nsa_dsl's compressors)."""
    gen = torch.Generator().manual_seed(seed)
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741
    w = torch.randn(l, dim, generator=gen, dtype=torch.float64) / l
    mix = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5

    def f(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] < l:
            return x.new_zeros(x.shape[0], 0, *x.shape[2:])
        blocks = x.double().unfold(1, l, d)  # [N, Tc, H, D, l]
        y = torch.einsum("nthdl,ld->nthd", blocks, w)
        return torch.tanh(y @ mix).to(x.dtype)

    return f


def compressors(spec: NSASpec, seed: int = 0):
    if spec.compression.function == "mean":
        return mean_compressor(spec), mean_compressor(spec)
    a = spec.attention
    return nonlinear_compressor(spec, a.head_dim_qk, seed), nonlinear_compressor(spec, a.head_dim_v, seed + 1)


def inputs(spec: NSASpec, B: int, T: int, dtype=torch.float64, seed: int = 0):  # noqa: N803
    gen = torch.Generator().manual_seed(seed)
    a = spec.attention

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q = r(B, T, a.heads, a.head_dim_qk)
    k = r(B, T, a.kv_heads, a.head_dim_qk)
    v = r(B, T, a.kv_heads, a.head_dim_v)
    g = torch.rand(B, T, a.heads, 3, generator=gen, dtype=dtype)
    return q, k, v, g


def full_forward(spec, q, k, v, g, ck, cv, lengths=None):
    """Per-sequence reference forward on the first lengths[b] tokens: list of [L_b, Hq, dv]."""
    outs = []
    for b in range(q.shape[0]):
        n = q.shape[1] if lengths is None else lengths[b]
        sl = slice(0, n)
        kb, vb = k[b : b + 1, sl], v[b : b + 1, sl]
        o = nsa_attention(q[b : b + 1, sl], kb, vb, ck(kb), cv(vb), g[b : b + 1, sl], spec)
        outs.append(o[0])
    return outs


@pytest.mark.parametrize("name", list(SPECS))
def test_token_by_token_matches_full_forward(name):
    spec = SPECS[name]
    B, T, P = 2, 60, 5  # noqa: N806
    q, k, v, g = inputs(spec, B, T, seed=1)
    ck, cv = compressors(spec)
    ref = full_forward(spec, q, k, v, g, ck, cv)
    cache = NSACache(spec, B, capacity=16, dtype=torch.float64, compress_k=ck, compress_v=cv)
    cache.prefill(k[:, :P], v[:, :P])
    for t in range(P, T):
        cache.append(k[:, t : t + 1], v[:, t : t + 1])
        o = decode_reference(q[:, t : t + 1], cache, g[:, t : t + 1])
        for b in range(B):
            torch.testing.assert_close(o[b, 0], ref[b][t], rtol=1e-10, atol=1e-10, msg=f"t={t} b={b}")
    assert cache.capacity >= T  # grew from 16
    # the compressed cache equals prefill's compression of the whole sequence
    tc = spec.num_compressed(T)
    torch.testing.assert_close(cache.k_cmp[:, :tc], ck(k), rtol=0, atol=1e-12)
    torch.testing.assert_close(cache.v_cmp[:, :tc], cv(v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("S", [2, 5])
def test_multi_token_steps_and_mixed_lengths(S):  # noqa: N803
    spec = SPECS["tiny"]  # d = 4: S = 5 completes up to two compressed blocks per step
    B, T = 3, 62  # noqa: N806
    q, k, v, g = inputs(spec, B, T, seed=2)
    ck, cv = compressors(spec, seed=3)
    pre = [7, 20, 13]  # mixed prefill lengths (right-padded batch)
    steps = (T - max(pre)) // S
    final = [p + steps * S for p in pre]
    ref = full_forward(spec, q, k, v, g, ck, cv, lengths=final)
    cache = NSACache(spec, B, capacity=8, dtype=torch.float64, compress_k=ck, compress_v=cv)
    kp = torch.randn(B, max(pre), *k.shape[2:], dtype=k.dtype)  # poison the padding
    vp = torch.randn(B, max(pre), *v.shape[2:], dtype=v.dtype)
    for b, n in enumerate(pre):
        kp[b, :n], vp[b, :n] = k[b, :n], v[b, :n]
    cache.prefill(kp, vp, lengths=pre)
    assert cache.host_lengths == pre and cache.lengths.tolist() == pre
    for i in range(steps):
        sel = torch.stack([torch.arange(p + i * S, p + (i + 1) * S) for p in pre])  # [B, S]
        bi = torch.arange(B)[:, None]
        cache.append(k[bi, sel], v[bi, sel])
        o = decode_reference(q[bi, sel], cache, g[bi, sel])
        for b in range(B):
            torch.testing.assert_close(o[b], ref[b][sel[b]], rtol=1e-10, atol=1e-10, msg=f"step {i} b={b}")
    for b, n in enumerate(final):
        tc = spec.num_compressed(n)
        torch.testing.assert_close(cache.k_cmp[b, :tc], ck(k[b : b + 1, :n])[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(cache.v_cmp[b, :tc], cv(v[b : b + 1, :n])[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", ["mlp", "linear"])
def test_project_compressors(fn):
    """With nsa_dsl's own Compressor modules (phi with intra-block position encoding): decoding equals the
    full forward on compress(k), and the compressed cache equals prefill's compression."""
    from nsa_dsl import Compressor, compress

    spec = SPECS["tiny"].replace(compression={"function": fn})
    a = spec.attention
    torch.manual_seed(7)
    ck = Compressor(spec, a.head_dim_qk).double()
    cv = Compressor(spec, a.head_dim_v).double()
    B, T, P = 2, 40, 9  # noqa: N806
    q, k, v, g = inputs(spec, B, T, seed=8)
    with torch.no_grad():
        kc, vc = compress(k, spec, ck), compress(v, spec, cv)
    ref = nsa_attention(q, k, v, kc, vc, g, spec)
    cache = NSACache(spec, B, capacity=T, dtype=torch.float64, compress_k=ck, compress_v=cv)
    cache.prefill(k[:, :P], v[:, :P])
    for t in range(P, T):
        cache.append(k[:, t : t + 1], v[:, t : t + 1])
        o = decode_reference(q[:, t : t + 1], cache, g[:, t : t + 1])
        torch.testing.assert_close(o[:, 0], ref[:, t], rtol=1e-9, atol=1e-9, msg=f"t={t}")
    tc = spec.num_compressed(T)
    torch.testing.assert_close(cache.k_cmp[:, :tc], kc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache.v_cmp[:, :tc], vc, rtol=1e-12, atol=1e-12)


def test_prefill_varlen_and_static_compress_mode():
    spec = SPECS["tiny"]
    lens = [11, 30]
    T = sum(lens)  # noqa: N806
    _, k, v, _ = inputs(spec, 1, T, seed=4)
    ck, cv = compressors(spec, seed=5)
    cu = torch.tensor([0, 11, 41], dtype=torch.int32)
    cache = NSACache(spec, 2, capacity=64, dtype=torch.float64, compress_k=ck, compress_v=cv)
    cache.prefill(k, v, cu_seqlens=cu)
    assert cache.host_lengths == lens
    torch.testing.assert_close(cache.k[1, :30], k[0, 11:41])
    torch.testing.assert_close(cache.k_cmp[1, : spec.num_compressed(30)], ck(k[:, 11:41])[0])
    # compress="always" (the CUDA-graph mode) writes only blocks that complete: same result as "auto"
    other = NSACache(spec, 2, capacity=64, dtype=torch.float64, compress_k=ck, compress_v=cv)
    other.prefill(k, v, cu_seqlens=cu)
    new_k = torch.randn(2, 3, *k.shape[2:], dtype=k.dtype)
    new_v = torch.randn(2, 3, *v.shape[2:], dtype=v.dtype)
    for _ in range(4):
        cache.append(new_k, new_v, compress="auto")
        other.append(new_k, new_v, compress="always")
    torch.testing.assert_close(cache.k_cmp, other.k_cmp, rtol=0, atol=0)
    torch.testing.assert_close(cache.v_cmp, other.v_cmp, rtol=0, atol=0)


def test_memory_report():
    spec = load_spec("nsa_paper")
    ident = lambda x: x  # noqa: E731
    cache = NSACache(spec, 2, capacity=256, dtype=torch.bfloat16, compress_k=ident, compress_v=ident)
    per_tok_raw = 4 * (192 + 128) * 2  # Hkv x (dk + dv) x bf16
    assert cache.memory_per_token() == pytest.approx(per_tok_raw * (1 + 1 / 16))
    rep = cache.memory_report()
    assert rep["allocated_bytes"]["k"] == 2 * 256 * 4 * 192 * 2
    assert rep["capacity_cmp"] == (256 - 32) // 16 + 1
    assert rep["dense_bytes_per_token"] == per_tok_raw
    assert rep["lengths"] == [0, 0]


def test_errors():
    spec = SPECS["tiny"]
    with pytest.raises(ValueError, match="compress_k"):
        NSACache(spec, 2)  # mlp compression needs the layer's compressors
    ck, cv = compressors(spec)
    cache = NSACache(spec, 2, capacity=32, dtype=torch.float64, compress_k=ck, compress_v=cv)
    with pytest.raises(ValueError, match="k_new"):
        z = torch.zeros(2, 1, 2, 16, dtype=torch.float64)
        cache.append(torch.zeros(2, 1, 3, 16, dtype=torch.float64), z)
    with pytest.raises(ValueError, match="lengths"):
        cache.prefill(torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16), lengths=[5, 1])
    q, k, v, g = inputs(spec, 2, 4)
    cache.prefill(k, v)
    with pytest.raises(ValueError, match="S = 5"):
        decode_reference(torch.zeros(2, 5, 4, 16, dtype=torch.float64), cache, torch.zeros(2, 5, 4, 3))


# ---- NSAttention with a cache -------------------------------------------------------------------


@pytest.mark.parametrize("separate_kv,rope", [(False, True), (True, True), (False, False)])
def test_layer_prefill_then_decode_matches_forward(separate_kv, rope):
    from nsa_dsl import NSAttention

    spec = SPECS["tiny"]
    torch.manual_seed(3)
    layer = NSAttention(24, spec, separate_kv=separate_kv, rope_theta=10000.0 if rope else None).double()
    B, T, P = 2, 52, 13  # noqa: N806
    x = torch.randn(B, T, 24, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = NSACache.for_layer(layer, B, capacity=16, max_step=2)
        outs = [layer(x[:, :P], cache=cache)]
        t = P
        for S in [1, 1, 3, 1, 4, 2, 5] * 4:  # noqa: N806 - speculative-style steps of several tokens
            if t + S > T:
                break
            outs.append(layer(x[:, t : t + S], cache=cache))
            t += S
    got = torch.cat(outs, 1)
    torch.testing.assert_close(got, full[:, :t], rtol=1e-10, atol=1e-10)
    assert cache.host_lengths == [t, t]
    assert cache.ring >= spec.compression.block + 5 - 1 if (separate_kv or rope) else cache.ring == 0


def test_layer_varlen_prefill_mixed_lengths():
    from nsa_dsl import NSAttention

    spec = SPECS["tiny"]
    torch.manual_seed(4)
    layer = NSAttention(24, spec, separate_kv=True).double()
    lens, steps = [9, 30], 22
    xs = [torch.randn(1, n + steps, 24, dtype=torch.float64) for n in lens]
    with torch.no_grad():
        fulls = [layer(x) for x in xs]
        cache = NSACache.for_layer(layer, 2, capacity=64)
        packed = torch.cat([x[:, :n] for x, n in zip(xs, lens, strict=True)], 1)
        cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
        o = layer(packed, cu_seqlens=cu, cache=cache)
        torch.testing.assert_close(o[0, : lens[0]], fulls[0][0, : lens[0]], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(o[0, lens[0] :], fulls[1][0, : lens[1]], rtol=1e-10, atol=1e-10)
        assert cache.host_lengths == lens
        for i in range(steps):
            xt = torch.cat([x[:, n + i : n + i + 1] for x, n in zip(xs, lens, strict=True)], 0)
            ot = layer(xt, cache=cache)
            for b, n in enumerate(lens):
                torch.testing.assert_close(ot[b, 0], fulls[b][0, n + i], rtol=1e-10, atol=1e-10)
