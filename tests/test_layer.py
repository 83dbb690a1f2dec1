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


def _refuse_host_reads(monkeypatch):
    """Make every host read of a tensor value raise (on a GPU each one is a device-to-host sync)."""

    def refuse(*a, **k):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "__int__", "__bool__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def _grads(out, leaves, grad_out=None):
    """d out / d leaves; zeros for a leaf outside the graph (a sequence shorter than the compression block
    leaves the compressors unused)."""
    g = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return [torch.zeros_like(t) if gi is None else gi for t, gi in zip(leaves, g, strict=True)]


@pytest.mark.parametrize(
    "backend,function,separate_kv",
    [
        ("reference", "mlp", True),
        ("triton", "mean", False),
        ("triton", "linear", True),
        ("triton", "mlp", True),
    ],
)
def test_varlen_max_seqlen_equals_synchronising_path_and_separate_sequences(
    backend, function, separate_kv, monkeypatch
):
    """cu_seqlens + max_seqlen: the same outputs and gradients (input and every parameter) as without
    max_seqlen and as each sequence run on its own; with the triton backend neither forward nor backward
    reads a tensor value on the host. The pack holds a sequence shorter than the compression block (3 < l
    = 4) and an empty one."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(8)
    layer = NSAttention(16, small_spec(function), separate_kv=separate_kv, backend=backend).to(dev)
    with torch.no_grad():  # non-trivial compressor biases / position embeddings
        for name, p in layer.named_parameters():
            if "compressor" in name:
                p.add_(torch.randn_like(p) * 0.1)
    lens = [13, 3, 0, 20]
    cu = torch.tensor([0, 13, 16, 16, 36], dtype=torch.int32, device=dev)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 36, 16, generator=gen).to(dev)
    w = torch.randn(1, 36, 16, generator=gen).to(dev)  # upstream gradient
    names, params = zip(*layer.named_parameters(), strict=True)

    def run(xx, ww, **kw):
        xx = xx.clone().requires_grad_(True)
        y = layer(xx, **kw)
        return y.detach(), _grads((y * ww).sum(), [xx, *params])

    want_y, want_g = run(x, w, cu_seqlens=cu)
    if backend == "triton":
        _refuse_host_reads(monkeypatch)
    got_y, got_g = run(x, w, cu_seqlens=cu, max_seqlen=max(lens))
    monkeypatch.undo()
    torch.testing.assert_close(got_y, want_y, rtol=1e-6, atol=1e-6)
    for name, a, b in zip(("x", *names), got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    if function != "mean":
        assert got_g[1 + names.index("k_compressor.pos")].abs().sum() > 0

    # each sequence on its own (the empty one contributes nothing)
    sep_y, sep_gx = torch.zeros_like(x), torch.zeros_like(x)
    sep_g = [torch.zeros_like(p) for p in params]
    for s in range(len(lens)):
        a, b = int(cu[s]), int(cu[s + 1])
        if a == b:
            continue
        y, g = run(x[:, a:b], w[:, a:b])
        sep_y[:, a:b], sep_gx[:, a:b] = y, g[0]
        for acc, gi in zip(sep_g, g[1:], strict=True):
            acc += gi
    torch.testing.assert_close(got_y, sep_y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_g[0], sep_gx, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(names, got_g[1:], sep_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_max_seqlen_errors():
    layer = NSAttention(16, small_spec())
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    x = torch.randn(1, 12, 16)
    for bad in (13, -1, False, 7.0):
        with pytest.raises(ValueError, match=r"^max_seqlen: must be an int in 0\.\.T = 12"):
            layer(x, cu_seqlens=cu, max_seqlen=bad)
    with pytest.raises(ValueError, match="^cu_seqlens: expected dtype torch.int32"):
        layer(x, cu_seqlens=cu.long(), max_seqlen=7)
    with pytest.raises(ValueError, match="^x: expected batch B = 1 with cu_seqlens"):
        layer(torch.randn(2, 12, 16), cu_seqlens=cu, max_seqlen=7)


@pytest.mark.gpu
def test_gpu_triton_varlen_max_seqlen_no_sync_matches_unpacked():
    """backend="triton", bf16 attention, a pack of 3 sequences (one shorter than the compression block):
    with max_seqlen, forward + backward run under CUDA's sync debug mode "error" (any device-to-host sync
    raises) and match the pack without max_seqlen and each sequence run on its own."""
    spec = NSASpec.from_dict(
        {
            "attention": {
                "heads": 8, "kv_heads": 2, "head_dim_qk": 64, "head_dim_v": 64, "dtype": "bfloat16"
            },
            "compression": {"block": 16, "stride": 8, "function": "mlp", "position_encoding": True},
            "selection": {"block": 32, "top_n": 4, "force_initial": 1, "force_local": 2},
            "window": {"size": 64},
            "gates": {"hidden": 32},
        }
    )
    torch.manual_seed(10)
    layer = NSAttention(128, spec, separate_kv=True, backend="triton").cuda()
    lens = [300, 11, 517]
    cu = torch.tensor([0, 300, 311, 828], dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(1, 828, 128, device="cuda", generator=gen)
    dy = torch.randn(1, 828, 128, device="cuda", generator=gen)
    names, params = zip(*layer.named_parameters(), strict=True)

    def run(xx, dd, **kw):
        xx = xx.clone().requires_grad_(True)
        y = layer(xx, **kw)
        return y.detach(), _grads(y, [xx, *params], dd)

    run(x, dy, cu_seqlens=cu, max_seqlen=max(lens))  # build and load the kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got_y, got_g = run(x, dy, cu_seqlens=cu, max_seqlen=max(lens))
        torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want_y, want_g = run(x, dy, cu_seqlens=cu)
    sep_y, sep_gx = torch.zeros_like(x), torch.zeros_like(x)
    sep_g = [torch.zeros_like(p) for p in params]
    for s in range(len(lens)):
        a, b = int(cu[s]), int(cu[s + 1])
        y, g = run(x[:, a:b], dy[:, a:b])
        sep_y[:, a:b], sep_gx[:, a:b] = y, g[0]
        for acc, gi in zip(sep_g, g[1:], strict=True):
            acc += gi

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6))

    for ref_y, ref_g in ((want_y, want_g), (sep_y, [sep_gx, *sep_g])):
        assert bool(torch.isfinite(got_y).all()) and rel(got_y, ref_y) < 1e-2
        for name, a, b in zip(("x", *names), got_g, ref_g, strict=True):
            assert bool(torch.isfinite(a).all()), name
            assert rel(a, b) < 1e-2, f"{name}: relative error {rel(a, b):.3e}"
