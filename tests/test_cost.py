"""The cost model against the paper's Table 4 and against brute-force counts written from the semantics."""

from __future__ import annotations

import pytest
import sympy as sp

from nsa_dsl import NSASpec, cost_model, load_spec

# NSA paper (arXiv 2502.11089), Table 4: expected decode tokens and speedup vs full attention.
PAPER_TABLE4 = {8192: (2048, 4.0), 16384: (2560, 6.4), 32768: (3584, 9.1), 65536: (5632, 11.6)}


@pytest.mark.parametrize("T", sorted(PAPER_TABLE4))
def test_paper_table4(T):  # noqa: N803
    cm = cost_model(load_spec("nsa_paper"))
    tokens, speedup = PAPER_TABLE4[T]
    assert cm.at(cm.paper_decode_tokens, T) == tokens
    assert round(cm.paper_decode_speedup(T), 1) == speedup
    # the exact count differs by at most l/d tokens and gives the same speedup after rounding
    exact = cm.at(cm.nsa.decode_tokens, T)
    assert 0 <= tokens - exact <= 2
    assert round(cm.decode_speedup(T), 1) == speedup
    assert cm.at(cm.dense.decode_tokens, T) == T


def _brute_keys(spec: NSASpec, s: int) -> dict[str, int]:
    """Keys each branch reads for a query that sees s tokens (positions 0..s-1), from SEMANTICS."""
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741
    t = s - 1
    cmp = sum(1 for i in range(s) if i * d + l - 1 <= t)
    slc = min(s, spec.selection.top_n * spec.selection.block)
    win = len(range(max(0, t - spec.window_size + 1), t + 1)) if spec.window_size else 0
    return {"cmp": cmp, "slc": slc, "win": win, "nsa": cmp + slc + win, "dense": s}


SPECS = ["nsa_paper", "fla_compat", "tiny", "small_group"]


@pytest.mark.parametrize("name", SPECS)
def test_keys_per_query_and_totals_against_brute_force(name):
    spec = load_spec(name)
    cm = cost_model(spec)
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741
    lengths = sorted({1, l - 1, l, l + 1, l + d, 3 * l + d - 1, 100, 257, 1100, 2500})
    for T in lengths:  # noqa: N806
        per = [_brute_keys(spec, s) for s in range(1, T + 1)]
        for key in ("cmp", "slc", "win", "nsa", "dense"):
            assert cm.at(cm.keys[key], T) == per[-1][key], (key, T)
            assert cm.at(cm.keys_total[key], T) == sum(p[key] for p in per), (key, T)


def test_fla_compat_decode_tokens():
    cm = cost_model(load_spec("fla_compat"))
    for T in (4096, 65536, 131072):  # noqa: N806
        assert (
            cm.at(cm.nsa.decode_tokens, T) == T // 64 + 16 * 64
        )  # mean-pool blocks + top-16 x 64, no window


def test_dense_flops_and_bytes_by_hand():
    spec = NSASpec.from_dict(
        {
            "attention": {"heads": 4, "kv_heads": 2, "head_dim_qk": 16, "head_dim_v": 8, "dtype": "float16"},
            "compression": {"block": 8, "stride": 4},
            "selection": {"block": 16, "top_n": 3, "force_local": 1},
            "window": {"size": 16},
        }
    )
    cm = cost_model(spec)
    B, T = 3, 10  # noqa: N806
    # causal: 55 (query, key) pairs per head; 2 FLOPs per MAC; QK^T (16) + PV (8)
    assert cm.at(cm.dense.forward.flops, T, batch=B) == 3 * 4 * 55 * 2 * (16 + 8)
    assert cm.at(cm.dense.backward.flops, T, batch=B) == 3 * 4 * 55 * 2 * (3 * 16 + 2 * 8)
    # decode: read all K and V of 2 KV heads in fp16, plus q (16) and o (8) of 4 heads
    assert cm.at(cm.dense.decode.bytes, T, batch=B) == 3 * (2 * 10 * (16 + 8) * 2 + 4 * (16 + 8) * 2)
    assert cm.at(cm.dense.decode.flops, T, batch=B) == 3 * 4 * 10 * 2 * (16 + 8)
    # forward reads q, k, v and writes o once (fp16) plus a float32 LSE per query head
    io = 10 * 4 * 16 + 10 * 2 * (16 + 8) + 10 * 4 * 8
    assert cm.at(cm.dense.forward.bytes, T, batch=B) == 3 * (io * 2 + 10 * 4 * 4)


def test_backward_to_forward_flop_ratio_is_the_per_key_factor():
    cm = cost_model(load_spec("nsa_paper"))
    for att in (cm.nsa, cm.dense):
        r = cm.at(att.backward.flops, 4096) / cm.at(att.forward.flops, 4096)
        assert r == pytest.approx((3 * 192 + 2 * 128) / (192 + 128))


def test_forward_flop_ratio_large_T_matches_hand_estimate():
    cm = cost_model(load_spec("nsa_paper"))
    T = 65536  # noqa: N806
    # dense ~ T^2/2 keys; NSA ~ T^2/(2d) compressed + T (n l' + w) selected/window
    estimate = (T * T / 2) / (T * T / 32 + T * (1024 + 512))
    assert cm.flop_ratio(T, "forward") == pytest.approx(estimate, rel=0.01)
    assert cm.flop_ratio(T, "backward") == pytest.approx(cm.flop_ratio(T, "forward"))


def test_nsa_decode_reads_fewer_bytes_at_long_context():
    cm = cost_model(load_spec("nsa_paper"))
    ratio = cm.at(cm.dense.decode.bytes, 65536) / cm.at(cm.nsa.decode.bytes, 65536)
    assert 10 < ratio < 12  # memory bound: close to the token ratio 11.6


def test_expressions_are_sympy_in_T_and_B():
    cm = cost_model(load_spec("tiny"))
    for e in (cm.nsa.forward.flops, cm.nsa.backward.bytes, cm.dense.decode.bytes, cm.keys_total["cmp"]):
        assert isinstance(e, sp.Expr)
        assert e.free_symbols <= {cm.T, cm.B}
    assert cm.nsa.forward.flops.has(cm.B)


def test_bad_arguments():
    with pytest.raises(ValueError, match="spec"):
        cost_model("nsa_paper")  # type: ignore[arg-type]
    cm = cost_model(load_spec("tiny"))
    with pytest.raises(ValueError, match="T and batch"):
        cm.at(cm.keys["nsa"], 0)
    with pytest.raises(ValueError, match="which"):
        cm.flop_ratio(1024, "sideways")
