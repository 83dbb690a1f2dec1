"""NSAttention: shapes, RoPE semantics, varlen, separate K/V, errors, and a toy task whose loss falls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nsa_dsl import NSASpec, NSAttention, load_spec
from nsa_dsl import reference as R
from nsa_dsl.rope import apply_rope, rope_cos_sin


def small_spec(function="mlp", w=8, n=3):
    return NSASpec.from_dict(
        {
            "attention": {"heads": 4, "kv_heads": 2, "head_dim_qk": 8, "head_dim_v": 8, "dtype": "float32"},
            "compression": {
                "block": 4,
                "stride": 2,
                "function": function,
                "position_encoding": function != "mean",
                "mlp_hidden": 16,
            },
            "selection": {"block": 8, "top_n": n, "force_initial": 1, "force_local": 1},
            "window": {"size": w},
            "gates": {"hidden": 8},
        }
    )


@pytest.mark.parametrize("separate_kv", [False, True])
@pytest.mark.parametrize("function", ["mean", "linear", "mlp"])
def test_forward_backward_shapes_and_grads(separate_kv, function):
    torch.manual_seed(0)
    layer = NSAttention(32, small_spec(function), separate_kv=separate_kv).double()
    x = torch.randn(2, 29, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith(("k_compressor.pos", "v_compressor.pos")):
            assert p.grad.abs().sum() > 0, name


def test_layer_matches_manual_composition():
    # The layer = projections, RoPE (q, k at token positions; k_cmp at block-end positions), compressors,
    # sigmoid gates, reference op, output projection -- rebuilt here by hand.
    torch.manual_seed(1)
    spec = small_spec("linear")
    layer = NSAttention(16, spec).double()
    x = torch.randn(1, 21, 16, dtype=torch.float64)
    B, T = 1, 21  # noqa: N806

    def rope(t, pos):
        d = t.shape[-1]
        inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = pos[:, None].double() * inv  # [T, d/2]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        t1, t2 = t[..., : d // 2], t[..., d // 2 :]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)

    pos = torch.arange(T)
    q = rope(layer.q_proj(x).view(B, T, 4, 8), pos)
    k0 = layer.k_proj(x).view(B, T, 2, 8)
    v = layer.v_proj(x).view(B, T, 2, 8)
    kc = layer.k_compressor(k0)
    tc = kc.shape[1]
    kc = rope(kc, torch.arange(tc) * 2 + 3)
    vc = layer.v_compressor(v)
    g = torch.sigmoid(layer.gate(x)).view(B, T, 4, 3)
    o = R.nsa_attention(q, rope(k0, pos), v, kc, vc, g, spec)
    want = layer.o_proj(o.reshape(B, T, -1))
    torch.testing.assert_close(layer(x), want)


def test_rope_is_relative():
    # <R(t) q, R(s) k> depends only on t - s.
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 1, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 8, generator=gen, dtype=torch.float64)

    def dot(t, s):
        ct, st = rope_cos_sin(torch.tensor([t]), 8, dtype=torch.float64)
        cs, ss = rope_cos_sin(torch.tensor([s]), 8, dtype=torch.float64)
        return float((apply_rope(q, ct, st) * apply_rope(k, cs, ss)).sum())

    assert abs(dot(7, 3) - dot(104, 100)) < 1e-10
    assert abs(dot(7, 3) - dot(7, 4)) > 1e-6


def test_varlen_equals_separate_sequences():
    torch.manual_seed(3)
    layer = NSAttention(16, small_spec("mlp"), separate_kv=True).double()
    lens = [13, 4, 20]
    xs = [torch.randn(1, n, 16, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, 13, 17, 37], dtype=torch.int32)
    y = layer(torch.cat(xs, 1), cu_seqlens=cu)
    for s, xi in enumerate(xs):
        torch.testing.assert_close(y[:, int(cu[s]) : int(cu[s + 1])], layer(xi))


def test_compress_kv_block_matches_batched():
    torch.manual_seed(4)
    layer = NSAttention(16, small_spec("mlp")).double()
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    p = layer.project(x, torch.arange(15))
    kc, vc = layer.compress_kv(p["k_raw"], p["v_raw"])
    i = 4  # block 4 covers tokens 8..11
    kb, vb = layer.compress_kv_block(p["k_raw"][:, 8:12], p["v_raw"][:, 8:12], torch.tensor([11, 11]))
    torch.testing.assert_close(kb, kc[:, i])
    torch.testing.assert_close(vb, vc[:, i])


def test_errors_and_hooks():
    spec = small_spec()
    with pytest.raises(ValueError, match="backend: must be one of"):
        NSAttention(16, spec, backend="cuda")
    with pytest.raises(ValueError, match="hidden_size: must be a positive integer"):
        NSAttention(0, spec)
    with pytest.raises(ValueError, match="spec: expected an NSASpec"):
        NSAttention(16, "tiny")
    layer = NSAttention(16, spec)
    with pytest.raises(ValueError, match="x: expected"):
        layer(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="x: expected batch B = 1 with cu_seqlens"):
        layer(torch.randn(2, 5, 16), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    # cache= is delegated to _forward_with_cache (nsa_dsl.cache), which rejects a non-cache object.
    with pytest.raises((TypeError, ValueError, NotImplementedError)):
        layer(torch.randn(1, 1, 16), cache=object())
    # The tiny spec builds and runs.
    assert NSAttention(24, load_spec("tiny"))(torch.randn(1, 40, 24)).shape == (1, 40, 24)


def test_loss_falls_on_toy_task():
    # Copy task: predict the token seen 5 positions earlier (needs attention to the past).
    torch.manual_seed(5)
    vocab, hidden, T, lag = 12, 32, 48, 5  # noqa: N806
    spec = small_spec("mlp", w=8, n=2)
    emb = torch.nn.Embedding(vocab, hidden)
    layer = NSAttention(hidden, spec)
    head = torch.nn.Linear(hidden, vocab)
    params = [*emb.parameters(), *layer.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(40):
        tok = torch.randint(0, vocab, (8, T))
        h = emb(tok)
        logits = head(h + layer(h))
        loss = F.cross_entropy(logits[:, lag:].reshape(-1, vocab), tok[:, :-lag].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_triton_backend_matches_reference_backend():
    # Same weights, backend="triton" (generated kernels; the Triton interpreter on CPU) vs "reference".
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(6)
    spec = small_spec("mlp")
    a = NSAttention(16, spec).to(dev)
    b = NSAttention(16, spec, backend="triton").to(dev)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 27, 16, device=dev, requires_grad=True)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
    (ga,) = torch.autograd.grad(ya.square().sum(), x)
    (gb,) = torch.autograd.grad(yb.square().sum(), x)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)


def test_triton_backend_separate_kv_matches_reference_backend(monkeypatch):
    """separate_kv=True: the window branch reads its own K/V. Without gradients the generated op runs once
    (one forward_train: every branch once); with gradients the custom op is composed twice (it takes one K/V
    for selection and window). Both match the reference backend, outputs and gradients."""
    from nsa_dsl.codegen.ops import NSAOps

    torch.manual_seed(7)
    spec = small_spec("mlp")
    a = NSAttention(16, spec, separate_kv=True)
    b = NSAttention(16, spec, separate_kv=True, backend="triton")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # make the window K/V clearly different from the selection K/V
        b.k_win_proj.weight.mul_(3.0)
        a.k_win_proj.weight.mul_(3.0)
    x = torch.randn(1, 27, 16)
    calls = []
    real = NSAOps.forward_train

    def spy(self, *args, **kw):
        calls.append(kw)
        return real(self, *args, **kw)

    monkeypatch.setattr(NSAOps, "forward_train", spy)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
    assert len(calls) == 1 and calls[0]["k_win"] is not None and calls[0]["v_win"] is not None

    xg = x.clone().requires_grad_(True)
    ya, yb = a(xg), b(xg)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
    (ga,) = torch.autograd.grad(ya.square().sum(), xg)
    (gb,) = torch.autograd.grad(yb.square().sum(), xg)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)
    wa = torch.autograd.grad(a(xg).sum(), a.k_win_proj.weight)[0]
    wb = torch.autograd.grad(b(xg).sum(), b.k_win_proj.weight)[0]
    assert wa.abs().sum() > 0
    torch.testing.assert_close(wb, wa, rtol=1e-4, atol=1e-5)
