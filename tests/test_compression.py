"""Compression: shapes, exact token ranges [i*d, i*d + l), explicit loops for each phi, varlen packing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nsa_dsl import NSASpec, compress
from nsa_dsl.compression import Compressor, compressed_block_starts, compressed_positions
from nsa_dsl.reference import compressed_cu_seqlens

DT = torch.float64


def spec_for(function="mean", l=8, d=4, pe=False, hidden=None):  # noqa: E741
    return NSASpec.from_dict(
        {
            "attention": {"heads": 4, "kv_heads": 2, "head_dim_qk": 6, "head_dim_v": 6},
            "compression": {
                "block": l,
                "stride": d,
                "function": function,
                "position_encoding": pe,
                "mlp_hidden": hidden,
            },
            "selection": {"block": 16, "top_n": 2, "force_initial": 1, "force_local": 1},
        }
    )


def test_mean_against_explicit_loop_and_shapes():
    spec = spec_for("mean", l=8, d=4)
    k = torch.randn(2, 37, 3, 5, dtype=DT)
    out = compress(k, spec)
    tc = (37 - 8) // 4 + 1
    assert out.shape == (2, tc, 3, 5)
    for i in range(tc):
        torch.testing.assert_close(out[:, i], k[:, i * 4 : i * 4 + 8].mean(1))
    # T < l: no blocks, no error.
    assert compress(k[:, :7], spec).shape == (2, 0, 3, 5)
    assert compress(k[:, :8], spec).shape == (2, 1, 3, 5)


@pytest.mark.parametrize("pe", [False, True])
def test_linear_against_explicit_loop(pe):
    spec = spec_for("linear", l=4, d=2, pe=pe)
    comp = Compressor(spec, 5).double()
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn_like(p))
    k = torch.randn(2, 11, 3, 5, dtype=DT)
    out = comp(k)
    assert out.shape == (2, 4, 3, 5)
    for i in range(4):
        for h in range(3):
            tok = k[:, i * 2 : i * 2 + 4, h]  # [B, l, D]
            if pe:
                tok = tok + comp.pos
            want = tok.reshape(2, -1) @ comp.weight.T + comp.bias
            torch.testing.assert_close(out[:, i, h], want)


def test_linear_starts_as_mean_pooling():
    spec = spec_for("linear", l=4, d=4, pe=False)
    comp = Compressor(spec, 5).double()
    k = torch.randn(1, 16, 2, 5, dtype=DT)
    torch.testing.assert_close(comp(k), compress(k, spec_for("mean", l=4, d=4)), atol=0.1, rtol=0.1)


def test_mlp_against_explicit_loop_and_hidden_width():
    spec = spec_for("mlp", l=4, d=2, pe=True, hidden=7)
    comp = Compressor(spec, 5).double()
    assert comp.w1.shape == (7, 20) and comp.w2.shape == (5, 7) and comp.pos.shape == (4, 5)
    assert Compressor(spec_for("mlp", l=4, d=2, pe=True), 5).w1.shape == (20, 20)  # default hidden = l*D
    k = torch.randn(1, 10, 2, 5, dtype=DT)
    out = comp(k)
    for i in range(4):
        for h in range(2):
            x = (k[0, i * 2 : i * 2 + 4, h] + comp.pos).reshape(-1)
            want = comp.w2 @ F.gelu(comp.w1 @ x + comp.b1) + comp.b2
            torch.testing.assert_close(out[0, i, h], want)
    # The one-block function (decode) agrees with the batched one on the same tokens.
    blk = k[0, 6:10].transpose(0, 1)  # [H, l, D] = block 3
    torch.testing.assert_close(comp.compress_block(blk), out[0, 3])
    # A mapping of the module's parameters works the same as the module.
    torch.testing.assert_close(compress(k, spec, dict(comp.named_parameters())), out)


def test_blocks_cover_exactly_their_tokens():
    # Perturb one token: only the blocks that contain it change.
    spec = spec_for("mlp", l=8, d=4, pe=True, hidden=16)
    comp = Compressor(spec, 3).double()
    k = torch.randn(1, 40, 1, 3, dtype=DT)
    base = comp(k)
    for t in (0, 5, 21, 39):
        k2 = k.clone()
        k2[0, t] += 1.0
        changed = (comp(k2) - base).abs().amax((0, 2, 3)) > 0
        want = torch.tensor([i * 4 <= t < i * 4 + 8 for i in range(base.shape[1])])
        assert torch.equal(changed, want), t


@pytest.mark.parametrize("function", ["mean", "linear", "mlp"])
def test_varlen_packs_per_sequence(function):
    spec = spec_for(function, l=4, d=2, pe=function != "mean", hidden=8)
    comp = Compressor(spec, 5).double()
    lens = [9, 3, 0, 12, 4]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    k = torch.randn(1, sum(lens), 2, 5, dtype=DT)
    out = comp(k, cu_seqlens=cu)
    ccu = compressed_cu_seqlens(cu, spec)
    assert out.shape == (1, int(ccu[-1]), 2, 5)
    for s in range(len(lens)):
        a, b = int(cu[s]), int(cu[s + 1])
        torch.testing.assert_close(out[:, int(ccu[s]) : int(ccu[s + 1])], comp(k[:, a:b]))
    starts = compressed_block_starts(sum(lens), spec, cu)
    pos = compressed_positions(sum(lens), spec, cu)
    assert starts.tolist() == [0, 2, 4, 12, 14, 16, 18, 20, 24]
    assert pos.tolist() == [0, 2, 4, 0, 2, 4, 6, 8, 0]


def test_gradients_reach_parameters():
    spec = spec_for("mlp", l=4, d=2, pe=True, hidden=8)
    comp = Compressor(spec, 5).double()
    k = torch.randn(1, 10, 2, 5, dtype=DT, requires_grad=True)
    comp(k).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in comp.parameters())
    assert k.grad.abs().sum() > 0


def test_errors():
    spec = spec_for("mlp", l=4, d=2, pe=True, hidden=8)
    comp = Compressor(spec, 5)
    with pytest.raises(ValueError, match="k: expected 4 dimensions"):
        comp(torch.randn(10, 2, 5))
    with pytest.raises(ValueError, match="k: expected head dim D = 5"):
        comp(torch.randn(1, 10, 2, 6))
    with pytest.raises(ValueError, match="needs parameters"):
        compress(torch.randn(1, 10, 2, 5), spec)
    with pytest.raises(ValueError, match="k: expected batch B = 1 with cu_seqlens"):
        comp(torch.randn(2, 10, 2, 5), cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="blocks: expected"):
        comp.compress_block(torch.randn(2, 3, 5))


def _refuse_host_reads(monkeypatch):
    """Make every host read of a tensor value raise (on a GPU each one is a device-to-host sync)."""

    def refuse(*a, **k):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "__int__", "__bool__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("function", ["mean", "linear", "mlp"])
def test_varlen_max_seqlen_static_size_without_host_reads(function, monkeypatch):
    """With ``max_seqlen`` the pack is compressed at the static size T // d without reading anything back:
    the packed blocks (equal to the synchronising path's), then zero rows that pass no gradient back."""
    spec = spec_for(function, l=4, d=2, pe=function != "mean", hidden=8)
    comp = Compressor(spec, 5).double()
    with torch.no_grad():
        for p in comp.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    lens = [9, 3, 0, 12, 4]  # 3 < l: a sequence without a block; 0: an empty one
    cu = torch.tensor([0, 9, 12, 12, 24, 28], dtype=torch.int32)
    k = torch.randn(1, 28, 2, 5, dtype=DT)
    w = torch.randn(1, 14, 2, 5, dtype=DT)  # upstream gradient, non-zero on the empty slots too
    params = list(comp.parameters())

    def run(max_seqlen):
        kk = k.clone().requires_grad_(True)
        out = comp(kk, cu_seqlens=cu, max_seqlen=max_seqlen)
        grads = torch.autograd.grad((out * w[:, : out.shape[1]]).sum(), [kk, *params])
        return out.detach(), grads

    want, want_g = run(None)
    tc = int(compressed_cu_seqlens(cu, spec)[-1])
    assert want.shape == (1, tc, 2, 5) and tc < 14
    _refuse_host_reads(monkeypatch)
    got, got_g = run(max(lens))
    starts = compressed_block_starts(28, spec, cu, max_seqlen=max(lens))
    pos = compressed_positions(28, spec, cu, max_seqlen=max(lens))
    monkeypatch.undo()
    assert got.shape == (1, 14, 2, 5)  # compressed_capacity(28) = 28 // 2
    torch.testing.assert_close(got[:, :tc], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:, tc:], torch.zeros_like(got[:, tc:]))
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(starts[:tc], compressed_block_starts(28, spec, cu)) and not starts[tc:].any()
    assert torch.equal(pos[:tc], compressed_positions(28, spec, cu)) and not pos[tc:].any()


def test_varlen_max_seqlen_pack_shorter_than_a_block():
    # T = 3 < l = 4: one empty slot, whose gathered block is clamped inside the pack; output zero.
    spec = spec_for("mlp", l=4, d=2, pe=True, hidden=8)
    comp = Compressor(spec, 5).double()
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    k = torch.randn(1, 3, 2, 5, dtype=DT, requires_grad=True)
    out = comp(k, cu_seqlens=cu, max_seqlen=2)
    assert out.shape == (1, 1, 2, 5) and torch.equal(out, torch.zeros_like(out))
    assert comp(k, cu_seqlens=cu).shape == (1, 0, 2, 5)
    (g,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), k)
    assert torch.equal(g, torch.zeros_like(g))


def test_varlen_max_seqlen_errors():
    spec = spec_for("mean", l=4, d=2)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    k = torch.randn(1, 10, 2, 5)
    for bad in (11, -1, True, 5.0):
        with pytest.raises(ValueError, match=r"^max_seqlen: must be an int in 0\.\.T = 10"):
            compress(k, spec, cu_seqlens=cu, max_seqlen=bad)
    with pytest.raises(ValueError, match="^cu_seqlens: expected dtype torch.int32"):
        compress(k, spec, cu_seqlens=cu.long(), max_seqlen=5)
    with pytest.raises(ValueError, match="^k: expected batch B = 1 with cu_seqlens"):
        compress(torch.randn(2, 10, 2, 5), spec, cu_seqlens=cu, max_seqlen=5)
