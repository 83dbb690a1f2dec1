"""Generated decode kernels (issue 5) against the full-sequence reference.

CPU: the Triton interpreter, fp32, tiny shapes. Decoding token by token with the kernels must give at every
position the output of ``nsa_dsl.reference.nsa_attention`` on the whole sequence; every split schedule
(single fused launch, split compressed context, split selected/window context, both) is exercised; selected
blocks are compared by their reference scores (ties are legal). Outputs are poisoned before each step.
GPU (marked): bf16 at T = 8k against the reference decode, and a CUDA-graph replay against the eager step.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from nsa_dsl.codegen.decode import CapturedDecodeStep, batch_chunks, decode, decode_plan
from nsa_dsl.codegen.kernels_cmp import topk_available
from nsa_dsl.codegen.kernels_decode import LEGACY
from nsa_dsl.codegen.loader import load_path
from nsa_dsl.codegen.plan import DeviceLimits, get_kernel, make_plan
from nsa_dsl.codegen.render import render

import nsa_dsl
from nsa_dsl.cache import NSACache, decode_reference
from nsa_dsl.reference import compression_probs, nsa_attention, select_blocks, selection_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_cache import SPECS, compressors, inputs  # noqa: E402

# (split_cmp, split_sw, split_topk): one fused launch, split cmp, split slc/win, all split, split top-n
SPLITS = [(1, 1, 1), (2, 1, 1), (1, 3, 1), (3, 2, 2), (2, 1, 3), (2, 8, 2)]

# schedule options of the decode plan (kernels_decode): the pre-second-pass path and the new ones, crossed
OPTIONS = {
    "legacy": LEGACY,
    "new": {"COMBINE": "rows", "LSE_MERGE": "tile", "PREFETCH": 1, "SW_PREFETCH": 1, "CMP_PREFETCH": 1},
    "rows_loop": {"COMBINE": "rows", "LSE_MERGE": "loop", "PREFETCH": 0, "SW_PREFETCH": 1, "CMP_PREFETCH": 0,
                  "SKIP": 0},
    "last_tile": {"COMBINE": "last", "LSE_MERGE": "tile", "PREFETCH": 1, "SW_PREFETCH": 0, "CMP_PREFETCH": 2,
                  "SKIP": 0},  # CMP_PREFETCH 2: prefetch only at split_cmp >= 8
    # the sm90 default: slc/win prefetch only at split_sw == 1 or >= 8
    "sm90": {"COMBINE": "rows", "LSE_MERGE": "tile", "PREFETCH": 1, "SW_PREFETCH": 2, "CMP_PREFETCH": 0},
    "last_rows": {"COMBINE": "last_rows", "LSE_MERGE": "tile", "PREFETCH": 1, "SW_PREFETCH": 1,
                  "CMP_PREFETCH": 0},
    # the window as programs of the top-n launch, the chunk's best through tl.topk (where Triton has it)
    "win_topk": {"COMBINE": "last_rows", "LSE_MERGE": "tile", "PREFETCH": 1, "SW_PREFETCH": 2,
                 "CMP_PREFETCH": 0, "WINDOW_AT": "topk", "SELECT": "topk" if topk_available() else "sort"},
    "win_topk_rows": {"COMBINE": "rows", "LSE_MERGE": "tile", "PREFETCH": 0, "SW_PREFETCH": 1,
                      "CMP_PREFETCH": 0, "WINDOW_AT": "topk", "SKIP": 0},
    # selected / window K/V through TMA descriptors, prefetched and not (SW_PREFETCH 2: at 1 or >= 8 splits)
    "tma": {"COMBINE": "last_rows", "LSE_MERGE": "tile", "PREFETCH": 1, "SW_PREFETCH": 2, "CMP_PREFETCH": 0,
            "LOADS": "tma"},
    "tma_win_topk": {"COMBINE": "rows", "LSE_MERGE": "tile", "PREFETCH": 1, "SW_PREFETCH": 1,
                     "CMP_PREFETCH": 0, "LOADS": "tma", "WINDOW_AT": "topk"},
    # compressed K/V through TMA, prefetched (CMP_PREFETCH 1) and not; the window in the selected kernel
    "cmp_tma": {"COMBINE": "last_rows", "LSE_MERGE": "tile", "PREFETCH": 1, "SW_PREFETCH": 2,
                "CMP_PREFETCH": 1, "CMP_LOADS": "tma", "WINDOW_AT": "sw", "SELECT": "sort"},
    "cmp_tma_nopf": {"COMBINE": "rows", "LSE_MERGE": "tile", "PREFETCH": 0, "SW_PREFETCH": 0,
                     "CMP_PREFETCH": 0, "CMP_LOADS": "tma"},
    # the window tiles as the last programs of the compressed-attention launch
    "win_cmp": {"COMBINE": "last_rows", "LSE_MERGE": "tile", "PREFETCH": 1, "SW_PREFETCH": 2,
                "CMP_PREFETCH": 0, "WINDOW_AT": "cmp"},
    "win_cmp_rows": {"COMBINE": "rows", "LSE_MERGE": "loop", "PREFETCH": 0, "SW_PREFETCH": 1,
                     "CMP_PREFETCH": 1, "WINDOW_AT": "cmp", "SKIP": 0},
    # the logit scratch in fp16 (checked against the reference's top-n within its rounding, not bitwise)
    "lg16": {"COMBINE": "last_rows", "LSE_MERGE": "tile", "PREFETCH": 1, "SW_PREFETCH": 2, "CMP_PREFETCH": 0,
             "WINDOW_AT": "topk", "LOGITS": "fp16"},
    "lg16_loop": {"COMBINE": "rows", "LSE_MERGE": "loop", "PREFETCH": 0, "SW_PREFETCH": 0, "CMP_PREFETCH": 0,
                  "SKIP": 0, "LOGITS": "fp16"},
    # the batch launched as two chains of kernels (on a GPU: two streams, the second's compressed pass
    # overlapping the first's top-n and selected launches)
    "bc2": {"COMBINE": "last_rows", "LSE_MERGE": "tile", "PREFETCH": 1, "SW_PREFETCH": 2, "CMP_PREFETCH": 0,
            "WINDOW_AT": "topk", "batch_chunks": 2},
}
#: options whose top-n is only equal to the reference's within a rounding (not run by the exact-score tests)
ROUNDED = {"lg16", "lg16_loop"}


def _poisoned(B, S, spec, dtype=torch.float32):  # noqa: N803
    a = spec.attention
    return torch.full((B, S, a.heads, a.head_dim_v), float("nan"), dtype=dtype)


def _check_indices(spec, idx, scores, ref_idx, t, rtol=1e-4):
    """idx/ref_idx [Hkv, n]; scores [Hkv, Nslc] (reference, -inf invalid): same score multiset, forced in."""
    s = spec.selection
    cur = t // s.block
    for h in range(idx.shape[0]):
        got = sorted(j for j in idx[h].tolist() if j >= 0)
        want = sorted(j for j in ref_idx[h].tolist() if j >= 0)
        assert len(got) == len(want) and len(set(got)) == len(got), (t, h, got, want)
        assert all(0 <= j <= cur for j in got), (t, h, got)
        forced = {j for j in range(cur + 1) if j < s.force_initial or j > cur - s.force_local}
        assert forced <= set(got), (t, h, got, forced)
        sg = sorted(scores[h, j].item() for j in got if j not in forced)
        sw = sorted(scores[h, j].item() for j in want if j not in forced)
        torch.testing.assert_close(torch.tensor(sg), torch.tensor(sw), rtol=rtol, atol=1e-6)


# every spec with the main option sets; the TMA loads on the specs whose tiles they change most (l' = 24: a
# masked sub-tile of rows past the block; l = d and no window: the compressed tiles alone)
TOKEN_CASES = [(n, o) for o in ("legacy", "new", "sm90", "last_rows", "win_topk") for n in SPECS]
TOKEN_CASES += [("tiny", "tma"), ("lp24", "tma"), ("tiny", "cmp_tma"), ("l_eq_d", "cmp_tma"),
                ("tiny", "win_cmp"), ("g1", "win_cmp"), ("tiny", "bc2")]


@pytest.mark.parametrize("name,option", TOKEN_CASES)
def test_kernel_token_by_token_matches_full_forward(name, option):
    spec = SPECS[name].replace(attention={"dtype": "float32"})
    ops = nsa_dsl.compile(spec, config={"decode": OPTIONS[option]})
    assert all(ops.plan("decode", T=64, B=2).config[k] == v for k, v in OPTIONS[option].items())
    B, T, P = 2, 58, 44  # noqa: N806 - t >= 48 has more valid selection blocks than n for every spec
    q, k, v, g = inputs(spec, B, T, dtype=torch.float32, seed=11)
    ck, cv = compressors(spec, seed=12)
    kc, vc = ck(k), cv(v)
    ref = nsa_attention(q.double(), k.double(), v.double(), kc.double(), vc.double(), g.double(), spec)
    p = compression_probs(q.double(), kc.double(), spec)
    scores = selection_scores(p, spec, T)
    ref_idx = select_blocks(scores, spec, T)
    cache = NSACache(spec, B, capacity=T, dtype=torch.float32, compress_k=ck, compress_v=cv)
    cache.prefill(k[:, :P], v[:, :P])
    for i, t in enumerate(range(P, T)):
        cache.append(k[:, t : t + 1], v[:, t : t + 1])
        out = _poisoned(B, 1, spec)
        o, idx = decode(ops, q[:, t : t + 1], cache, g[:, t : t + 1], out=out, splits=SPLITS[i % len(SPLITS)],
                        return_indices=True)
        assert o.data_ptr() == out.data_ptr()
        torch.testing.assert_close(o[:, 0].double(), ref[:, t], rtol=1e-4, atol=1e-5, msg=f"t={t}")
        for b in range(B):
            _check_indices(spec, idx[b, 0], scores[b, t], ref_idx[b, t], t)


def _mixed_lengths_cache(spec, seed):
    """Three float32 sequences prefilled to lengths 50, 38, 57 of a 64-token cache: the inputs (q, k, v, g)
    for all 64 positions, the compressors, the cache and the prefill lengths."""
    B, T = 3, 64  # noqa: N806
    q, k, v, g = inputs(spec, B, T, dtype=torch.float32, seed=seed)
    ck, cv = compressors(spec, seed=seed + 1)
    pre = [50, 38, 57]
    cache = NSACache(spec, B, capacity=T, dtype=torch.float32, compress_k=ck, compress_v=cv)
    cache.prefill(k[:, :57], v[:, :57], lengths=pre)
    return (q, k, v, g), (ck, cv), cache, pre


@pytest.mark.parametrize("option", ["rows_loop", "last_tile", "last_rows", "sm90", "win_topk_rows",
                                    "tma_win_topk", "cmp_tma_nopf", "win_cmp_rows"])
@pytest.mark.parametrize("S", [1, 3])
def test_kernel_mixed_lengths_multi_token(S, option):  # noqa: N803
    spec = SPECS["tiny"]  # float32
    # the other top-n merge schedule (SKIP = 0) with the row combine / the last split program's merge
    ops = nsa_dsl.compile(spec, config={"decode": OPTIONS[option]})
    (q, k, v, g), (ck, cv), cache, pre = _mixed_lengths_cache(spec, seed=21)
    B = len(pre)  # noqa: N806
    bi = torch.arange(B)[:, None]
    for i in range(2):
        sel = torch.stack([torch.arange(n + i * S, n + (i + 1) * S) for n in pre])
        cache.append(k[bi, sel], v[bi, sel])
        want = decode_reference(q[bi, sel], cache, g[bi, sel])  # itself checked against the full forward
        # twice where the last split program merges (COMBINE "last" / "last_rows"): its tickets must be reset
        # after a step; once for the row combine, which has no tickets
        reps = 2 if OPTIONS[option]["COMBINE"] in ("last", "last_rows") else 1
        for sp in (SPLITS[i], SPLITS[i + 2], SPLITS[4 - i], (8, 2, 2)):
            for _ in range(reps):
                out = _poisoned(B, S, spec)
                o = decode(ops, q[bi, sel], cache, g[bi, sel], out=out, splits=sp)
                torch.testing.assert_close(o, want, rtol=1e-4, atol=1e-5, msg=f"step {i} splits {sp}")
    # and the last step against the full forward of each sequence
    for b, n in enumerate(pre):
        L = n + 2 * S  # noqa: N806
        kb, vb = k[b : b + 1, :L].double(), v[b : b + 1, :L].double()
        qb, gb = q[b : b + 1, :L].double(), g[b : b + 1, :L].double()
        full = nsa_attention(qb, kb, vb, ck(kb), cv(vb), gb, spec)
        torch.testing.assert_close(o[b].double(), full[0, L - S :], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,option", [("tiny", "lg16"), ("g1", "lg16_loop"), ("l_eq_d", "lg16")])
def test_fp16_logits_select_within_their_rounding(name, option):
    """LOGITS = "fp16": the stored logits are rounded to 11 significant bits, so near-equal blocks may be
    ordered differently than by the reference: the chosen blocks must score like the reference top-n within
    that rounding, and the output must equal the reference decode attending to the chosen blocks (tight)."""
    spec = SPECS[name].replace(attention={"dtype": "float32"})
    ops = nsa_dsl.compile(spec, config={"decode": OPTIONS[option]})
    plan = ops.plan("decode", T=64, B=2)
    assert plan.config["LOGITS"] == "fp16"
    B, T, P = 2, 58, 44  # noqa: N806
    q, k, v, g = inputs(spec, B, T, dtype=torch.float32, seed=13)
    ck, cv = compressors(spec, seed=14)
    cache = NSACache(spec, B, capacity=T, dtype=torch.float32, compress_k=ck, compress_v=cv)
    cache.prefill(k[:, :P], v[:, :P])
    ws_dtypes = set()
    for i, t in enumerate(range(P, T)):
        cache.append(k[:, t : t + 1], v[:, t : t + 1])
        qs, gs = q[:, t : t + 1], g[:, t : t + 1]
        details: dict = {}
        decode_reference(qs, cache, gs, details=details)
        o, idx = decode(ops, qs, cache, gs, out=_poisoned(B, 1, spec), splits=SPLITS[i % len(SPLITS)],
                        return_indices=True)
        for b in range(B):
            sc_b, ix_b = details["scores"][(b, 0)], details["indices"][(b, 0)]
            _check_indices(spec, idx[b, 0], sc_b, ix_b, t, rtol=4e-3)
        want = decode_reference(qs, cache, gs, indices=idx.clone())
        torch.testing.assert_close(o, want, rtol=1e-4, atol=1e-5, msg=f"t={t}")
        ws_dtypes |= {w["logits"].dtype for key, w in cache._workspace.items() if key[0] == "decode"}
    assert ws_dtypes == {torch.float16}  # the scratch really is half precision


@pytest.mark.parametrize("S", [1, 3])
def test_batch_chunks_equal_one_chain(S):  # noqa: N803
    """batch_chunks launches the step's batch as chains of kernels over sequence ranges (each with its own
    scratch): every row must be bitwise what one chain gives (same splits), for 2 chunks and 3 (one per
    sequence; more chunks than sequences give the same ranges); indices concatenated in batch order."""
    spec = SPECS["tiny"]  # float32
    (q, k, v, g), _, cache, pre = _mixed_lengths_cache(spec, seed=31)
    B, T = len(pre), cache.capacity  # noqa: N806
    bi = torch.arange(B)[:, None]
    sel = torch.stack([torch.arange(n, n + S) for n in pre])
    cache.append(k[bi, sel], v[bi, sel])
    qs, gs = q[bi, sel], g[bi, sel]
    base = nsa_dsl.compile(spec, config={"decode": OPTIONS["last_rows"]})
    for sp in ((3, 2, 2), (1, 1, 1)) if S == 1 else ((2, 8, 2),):
        want, want_idx = decode(base, qs, cache, gs, out=_poisoned(B, S, spec), splits=sp,
                                return_indices=True)
        want, want_idx = want.clone(), want_idx.clone()
        torch.testing.assert_close(want, decode_reference(qs, cache, gs), rtol=1e-4, atol=1e-5)
        one_each = [(0, 1), (1, 2), (2, 3)]
        more = base.with_config("decode", {**OPTIONS["last_rows"], "batch_chunks": 5})
        assert batch_chunks(decode_plan(more, B=B, S=S, T=T), B, S) == one_each  # at most one per sequence
        for n, ranges in ((2, [(0, 2), (2, 3)]), (3, one_each)):
            ops = base.with_config("decode", {**OPTIONS["last_rows"], "batch_chunks": n})
            plan = decode_plan(ops, B=B, S=S, T=T)
            assert batch_chunks(plan, B, S) == ranges
            o, idx = decode(ops, qs, cache, gs, out=_poisoned(B, S, spec), splits=sp, return_indices=True)
            assert torch.equal(o, want), (n, sp)
            assert torch.equal(idx, want_idx), (n, sp)
            chunk_ws = [key for key in cache._workspace if key[0] == "decode" and key[1] == plan.key]
            assert sorted(key[-2:] for key in chunk_ws) == ranges  # one scratch per chunk
    for bad in (-1, 17, "2", True):
        with pytest.raises(ValueError, match="batch_chunks: must be an integer in 0..16"):
            make_plan(spec, "decode", {"batch_chunks": bad}, DeviceLimits.interpreter_limits())


def test_cmp_stages_emitted_and_checked():
    """cmp_stages sets the compressed kernel's pipeline depth only (0 = num_stages); the shared-memory check
    covers the compressed kernel with its own stages and the selected + window kernel with num_stages."""
    spec = nsa_dsl.load_spec("nsa_paper")
    src = render(make_plan(spec, "decode", {"BLOCK_N": 32, "cmp_stages": 5}, H100))
    assert "CMP_STAGES = 5" in src and "NUM_WARPS, NUM_STAGES = 4, 3" in src
    launches = {n.func.value.id: {k.arg: ast.unparse(k.value) for k in n.keywords if k.arg}
                for n in ast.walk(ast.parse(_functions(src)["run"])) if isinstance(n, ast.Call)
                and isinstance(n.func, ast.Subscript) and isinstance(n.func.value, ast.Name)}
    assert launches["_cmp_kernel"]["num_stages"] == "CMP_STAGES"
    assert launches["_sw_kernel"]["num_stages"] == "NUM_STAGES"
    assert "CMP_STAGES = 3" in render(make_plan(spec, "decode", None, H100))  # 0 follows num_stages
    with pytest.raises(ValueError, match="shared memory"):  # 128-key tiles x 6 stages of dk + dv = 192 + 128
        make_plan(spec, "decode", {"BLOCK_N": 128, "cmp_stages": 6}, H100)
    with pytest.raises(ValueError, match="shared memory"):  # the selected tiles' own stages are checked too
        make_plan(spec, "decode", {"BLOCK_K": 64, "BLOCK_W": 64, "num_stages": 6, "cmp_stages": 2}, H100)


def test_auto_splits_and_emitted_source():
    from nsa_dsl.codegen.kernels_decode import auto_splits
    from nsa_dsl.codegen.plan import DeviceLimits, make_plan
    from nsa_dsl.codegen.render import render

    spec = nsa_dsl.load_spec("nsa_paper")
    h100 = DeviceLimits("H100", (9, 0), 132, 227 * 1024)
    plan = make_plan(spec, "decode", None, h100)
    # B = 1: 4 programs cannot fill 132 SMs -> split the compressed context; B = 64 fills it -> no split
    sc1, ss1, st1 = auto_splits(spec, plan.config, h100, B=1, S=1, max_len=65536)
    sc64, ss64, st64 = auto_splits(spec, plan.config, h100, B=64, S=1, max_len=65536)
    assert sc1 >= 8 and ss1 >= 4 and st1 >= 8  # >= 32 programs per KV head-sequence pair
    assert 1 * 4 * sc1 <= 4 * 132  # never more than a few waves
    assert (sc64, ss64, st64) == (1, 1, 1)  # 256 programs already fill 132 SMs: one fused launch
    src = render(plan)
    assert "def _cmp_kernel" in src and "def _topk_kernel" in src and "def _sw_kernel" in src
    with pytest.raises(ValueError, match="BLOCK_S"):
        make_plan(spec, "decode", {"BLOCK_S": 4}, h100)


def test_auto_batch_chunks():
    """batch_chunks = 0 (the GPU default): two chains where one chain would be the fused single launch and
    half the batch takes the split path (132..263 groups on 132 SMs), one chain elsewhere; the automatic
    splits are then those of one chunk (B = 64 paper: 32 sequences x 4 KV heads = 128 < 132 groups ->
    split), and the interpreter keeps one chain."""
    from nsa_dsl.codegen.decode import _splits
    from nsa_dsl.codegen.kernels_decode import auto_batch_chunks, auto_splits

    h100 = DeviceLimits("H100", (9, 0), 132, 227 * 1024)
    paper, small = nsa_dsl.load_spec("nsa_paper"), nsa_dsl.load_spec("small_group")  # 4 / 16 KV heads
    want = {(paper, 1): 1, (paper, 16): 1, (paper, 32): 1, (paper, 33): 2, (paper, 64): 2, (paper, 66): 1,
            (paper, 128): 1, (small, 1): 1, (small, 8): 1, (small, 9): 2, (small, 16): 2, (small, 17): 1}
    for (spec, B), n in want.items():  # noqa: N806
        assert auto_batch_chunks(spec, h100, B=B, S=1) == n, (spec.name, B)
    assert auto_batch_chunks(paper, h100, B=16, S=4) == 2  # 256 (sequence, token, KV head) groups
    interp = DeviceLimits.interpreter_limits()
    assert auto_batch_chunks(paper, interp, B=64, S=1) == 1
    from nsa_dsl.codegen.ops import NSAOps

    ops = NSAOps(paper, h100, use_tuned=False)
    plan = make_plan(paper, "decode", None, h100)
    assert plan.config["batch_chunks"] == 0
    assert batch_chunks(plan, 64) == [(0, 32), (32, 64)] and batch_chunks(plan, 16) == [(0, 16)]
    assert batch_chunks(make_plan(paper, "decode", None, interp), 64) == [(0, 64)]
    # the splits of a two-chain step are those of one chunk: B = 32 takes the split path, B = 64 would not
    assert _splits(ops, plan, 64, 1, 65536) == auto_splits(paper, plan.config, h100, B=32, S=1, max_len=65536)
    assert _splits(ops, plan, 64, 1, 65536) != (1, 1, 1)


# ------------------------------------------------------------------------------------------------
# PDL (programmatic dependent launch)
# ------------------------------------------------------------------------------------------------

H100 = DeviceLimits("H100", (9, 0), 132, 227 * 1024)
A100 = DeviceLimits("A100", (8, 0), 108, 163 * 1024)


def test_pdl_config_validation():
    spec = nsa_dsl.load_spec("nsa_paper")
    interp = DeviceLimits.interpreter_limits()
    assert make_plan(spec, "decode", None, interp).config["PDL"] == 0
    assert make_plan(spec, "decode", None, A100).config["PDL"] == 0
    assert make_plan(spec, "decode", None, H100).config["PDL"] == 3
    assert make_plan(spec, "decode", LEGACY, H100).config["PDL"] == 0  # the old path stays comparable
    # the logit scratch: fp16 by default for 16-bit specs on a GPU, fp32 for float32 specs and the interpreter
    assert make_plan(spec, "decode", None, H100).config["LOGITS"] == "fp16"
    f32 = spec.replace(attention={"dtype": "float32"})
    assert make_plan(f32, "decode", None, H100).config["LOGITS"] == "fp32"
    assert make_plan(spec, "decode", None, interp).config["LOGITS"] == "fp32"
    kdef = get_kernel("decode")
    assert kdef.space(spec, interp)["PDL"] == [0] and kdef.space(spec, A100)["PDL"] == [0]
    assert {0, 1} <= set(kdef.space(spec, H100)["PDL"])
    for p in (1, 2, 3):
        assert make_plan(spec, "decode", {"PDL": p}, H100).config["PDL"] == p
        for lim in (interp, A100):
            with pytest.raises(ValueError, match="PDL") as e:
                make_plan(spec, "decode", {"PDL": p}, lim)
            assert "\n" not in str(e.value)
    for bad in (4, -1, "1", True):
        with pytest.raises(ValueError, match="PDL"):
            make_plan(spec, "decode", {"PDL": bad}, H100)
    opts = (("PDL_AT", ("entry", "tail"), ("end", 1)), ("LOGITS", ("fp32", "fp16"), ("bf16", 16)),
            ("cmp_stages", (0, 2, 3, 4, 5), (-1, 7, "3", True)))
    for key, good, bad in opts:
        assert set(kdef.space(spec, H100)[key]) == set(good)
        for x in good:
            assert make_plan(spec, "decode", {key: x}, H100).config[key] == x
        for x in bad:
            with pytest.raises(ValueError, match=key) as e:
                make_plan(spec, "decode", {key: x}, H100)
            assert "\n" not in str(e.value)


def _functions(src: str) -> dict[str, str]:
    tree = ast.parse(src)
    return {n.name: ast.get_source_segment(src, n) for n in tree.body if isinstance(n, ast.FunctionDef)}


def _first(text: str, *needles: str) -> int:
    pos = [text.find(x) for x in needles if x in text]
    assert pos, needles
    return min(pos)


@pytest.mark.parametrize("name", ["nsa_paper", "small_group"])
def test_pdl_emitted_source(name):
    spec = nsa_dsl.load_spec(name)
    interp_src = render(make_plan(spec, "decode", None, DeviceLimits.interpreter_limits()))
    off_src = render(make_plan(spec, "decode", {"PDL": 0}, H100))
    for src in (interp_src, off_src):
        assert "tl.extra.cuda" not in src  # no grid dependency control emitted at all
        assert "PDL_MODE = 0" in src
    for pdl, at in [(1, "entry"), (2, "entry"), (3, "entry"), (1, "tail"), (3, "tail")]:
        src = render(make_plan(spec, "decode", {"PDL": pdl, "PDL_AT": at}, H100))
        fns = _functions(src)
        assert f"PDL_MODE = {pdl}" in src
        # every gdc call sits under the kernel's PDL constexpr (the fused step calls _sw_body with PDL=False)
        lines = src.splitlines()
        for i, line in enumerate(lines):
            if "tl.extra.cuda.gdc_" in line:
                assert lines[i - 1].strip().startswith("if PDL:"), lines[i - 1]
        # the first kernel only releases its dependents; it never waits (launched normally)
        first = fns["_cmp_kernel"] + fns["_cmp_body"]
        assert "gdc_wait" not in first and "gdc_launch_dependents" in first
        assert "_sw_body(" in fns["_cmp_body"] and "PDL=False" in fns["_cmp_body"]
        # the dependent kernels wait before their first read of anything an earlier kernel of the step wrote
        step_data = {
            "_topk_body": ("tl.load(PM", "tl.load(PL", "tl.load(PACC", "LOGITS +"),
            "_sw_body": ("CAND +", "IDX +", "tl.load(OC", "CNT +"),
            "_combine_kernel": ("_combine_body(",),
            "_combine_rows_kernel": ("tl.load(PM", "tl.load(PL", "tl.load(OC", "tl.load(PACC"),
        }
        for fn, reads in step_data.items():
            body = fns[fn][fns[fn].index("):\n"):]  # after the signature
            assert body.count("tl.extra.cuda.gdc_wait()") == 1, fn
            assert body.index("gdc_wait()") < _first(body, *reads), fn
        # WINDOW_AT = "topk": the window programs of the top-n launch read only q and the window K/V (no wait)
        assert "gdc_wait" not in fns["_win_part"] and "gdc_wait" not in fns["_topk_kernel"]
        assert not any(x in fns["_win_part"] for x in ("LOGITS", "CAND", "IDX", "tl.load(PM", "tl.load(OC"))
        if at == "entry":
            for fn in ("_cmp_kernel", "_topk_kernel", "_sw_kernel"):  # released on entry
                assert fns[fn].index("gdc_launch_dependents()") < fns[fn].index("tl.program_id")
            bodies = ("_cmp_body", "_topk_body", "_win_part", "_sw_body")
            assert all("gdc_launch" not in fns[f] for f in bodies)
        else:
            # released after each program's main loop, before its stores (never on entry)
            for fn in ("_cmp_kernel", "_topk_kernel", "_sw_kernel"):
                assert "gdc_launch" not in fns[fn]
            for fn, loop_work, first_store in (("_cmp_body", "tl.dot(p.to(", "tl.store(PM"),
                                               ("_topk_body", "LOGITS +", "tl.store(CAND"),
                                               ("_win_part", "tl.dot(p.to(", "tl.store(PM"),
                                               ("_sw_body", "tl.dot(p.to(", "if FINAL:")):
                body = fns[fn]
                assert body.count("gdc_launch_dependents()") == 1, fn
                at_ = body.index("gdc_launch_dependents()")
                assert loop_work in body[:at_] and loop_work not in body[at_:], fn
                assert first_store not in body[:at_] and first_store in body[at_:], fn
        # the window tiles (KW/VW) before the wait with PDL = 1 (and 3), after it with PDL = 2
        sw = fns["_sw_body"]
        if spec.window_size:
            assert (sw.index("KW +") < sw.index("gdc_wait()")) == (pdl != 2)
        # host: the first launch is an ordinary one, every later launch of the step a dependent one
        calls = [n for n in ast.walk(ast.parse(fns["run"])) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Subscript) and isinstance(n.func.value, ast.Name)]
        pdl_kw = {n.func.value.id: any(k.arg is None and getattr(k.value, "id", "") == "pdl_launch"
                                       for k in n.keywords) for n in calls}
        assert pdl_kw == {"_cmp_kernel": False, "_topk_kernel": True, "_sw_kernel": True,
                          "_combine_rows_kernel": True, "_combine_kernel": True}


class _KwRecorder:
    """Stands in for a kernel: records (name, launch keyword arguments) instead of launching."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kw: self.log.append((self.name, kw))


def _record_step(mod, spec, B):  # noqa: N803
    """Run one split decode step (S = 1, splits 2, 2, 2) of an emitted module on the CPU with its kernels
    replaced by ``_KwRecorder``s; returns the log of (kernel name, launch keyword arguments)."""
    a = spec.attention
    log: list = []
    for kn in ("_cmp_kernel", "_topk_kernel", "_sw_kernel", "_combine_kernel", "_combine_rows_kernel"):
        setattr(mod, kn, _KwRecorder(kn, log))
    cap, capc, hkv, dk, dv = 256, 16, a.kv_heads, a.head_dim_qk, a.head_dim_v
    q = torch.randn(B, 1, a.heads, dk)
    k, kc = torch.randn(B, cap, hkv, dk), torch.randn(B, capc, hkv, dk)
    v, vc = torch.randn(B, cap, hkv, dv), torch.randn(B, capc, hkv, dv)
    ws = mod.workspace(B, 1, capc, 2, 2, 2, "cpu")
    mod.run(q, k, v, kc, vc, torch.full((B,), cap, dtype=torch.int32), torch.rand(B, 1, a.heads, 3),
            torch.empty(B, 1, a.heads, dv), ws)
    return log


@pytest.mark.parametrize("name", ["nsa_paper", "small_group"])
def test_pdl_auto_launches_dependents_for_small_steps_only(name, tmp_path):
    """PDL = 3 decides per call: dependent launches (and the kernels' PDL constexpr) when the step has at most
    PDL_MAX_GROUPS (sequence, KV head) groups, ordinary launches above; PDL = 1 always."""
    spec = nsa_dsl.load_spec(name)
    a = spec.attention
    for pdl in (3, 1):
        plan = make_plan(spec, "decode", {"PDL": pdl, "COMBINE": "kernel"}, H100)
        path = tmp_path / f"decode_auto{pdl}.py"
        path.write_text(render(plan))
        mod = load_path(path, f"test_decode_auto{pdl}_{name}_{plan.key}")
        for B in (1, 2, 16):  # noqa: N806
            log = [(n, kw.get("launch_pdl", False), kw.get("PDL")) for n, kw in _record_step(mod, spec, B)]
            on = pdl == 1 or B * a.kv_heads <= mod.PDL_MAX_GROUPS
            assert [n for n, _, _ in log] == ["_cmp_kernel", "_topk_kernel", "_sw_kernel", "_combine_kernel"]
            assert log[0][1] is False and all(lp == on for _, lp, _ in log[1:]), (pdl, B, log)
            assert all(p_ == on for _, _, p_ in log), (pdl, B, log)


def test_combine_auto_merges_in_the_last_program_for_large_steps_only(tmp_path):
    """COMBINE = "auto" decides per call: the row-combine launch for steps of at most COMBINE_ROWS_MAX_GROUPS
    (sequence, token, KV head) groups, the last split program's tile merge (no extra launch) above; the
    fixed values do not depend on the step."""
    spec = nsa_dsl.load_spec("nsa_paper")
    hkv = spec.attention.kv_heads
    for combine in ("auto", "rows", "last_rows"):
        plan = make_plan(spec, "decode", {"COMBINE": combine, "PDL": 0}, H100)
        path = tmp_path / f"decode_combine_{combine}.py"
        path.write_text(render(plan))
        mod = load_path(path, f"test_decode_combine_{combine}_{plan.key}")
        for B in (1, 4, 5, 16):  # noqa: N806
            log = _record_step(mod, spec, B)
            last = combine == "last_rows" or (combine == "auto" and B * hkv > mod.COMBINE_ROWS_MAX_GROUPS)
            names = [n for n, _ in log]
            want = ["_cmp_kernel", "_topk_kernel", "_sw_kernel"] + ([] if last else ["_combine_rows_kernel"])
            assert names == want, (combine, B)
            sw = log[2][1]
            assert sw["LAST"] is last and sw["LAST_TILE"] is last, (combine, B)
            assert log[1][1]["OC_PROG"] == -1  # both merge o_cmp in the last step, not in the top-n kernel
    # B = 4 (16 groups) merges in a launch, B = 5 (20 groups) in the last program
    assert mod.COMBINE_ROWS_MAX_GROUPS == 16


def _run_module(mod, q, cache, g, splits, ws=None):  # noqa: N803
    B, S = q.shape[:2]  # noqa: N806
    ws = ws or mod.workspace(B, S, cache.k_cmp_buf.shape[1], *splits, q.device)
    out = _poisoned(B, S, cache.spec)
    idx = mod.run(q.contiguous(), cache.k, cache.v, cache.k_cmp_buf, cache.v_cmp_buf, cache.lengths,
                  g.contiguous(), out, ws, k_win=cache.k_win, v_win=cache.v_win)
    return out, idx.clone(), ws


@pytest.mark.parametrize("option", ["last_rows", "sm90"])
def test_pdl_window_first_matches_interpreter(option, tmp_path):
    """PDL = 1's order in the selected + window body (window tiles first, then the wait, then the selected
    blocks) gives bitwise the outputs and indices of PDL = 0 in every launch schedule. The PDL = 1 module is
    rendered for an sm90 device and run in the interpreter with its PDL launches switched off (PDL_MODE = 0:
    no launch_pdl, the gdc calls skipped by their constexpr)."""
    spec = SPECS["tiny"]  # float32
    base = dict(make_plan(spec, "decode", None, DeviceLimits.interpreter_limits()).config)
    base.update(OPTIONS[option], tokens=2)
    mods = {}
    for pdl in (0, 1):
        plan = make_plan(spec, "decode", {**base, "PDL": pdl}, H100)
        path = tmp_path / f"decode_pdl{pdl}.py"
        path.write_text(render(plan))
        mods[pdl] = load_path(path, f"test_decode_pdl{pdl}_{option}_{plan.key}")
    assert "gdc_wait" in path.read_text()
    mods[1].PDL_MODE, mods[1]._PDL_LAUNCH = 0, {}
    B, T = 2, 64  # noqa: N806
    q, k, v, g = inputs(spec, B, T, dtype=torch.float32, seed=31)
    ck, cv = compressors(spec, seed=32)
    pre = [55, 41]
    cache = NSACache(spec, B, capacity=T, dtype=torch.float32, compress_k=ck, compress_v=cv)
    cache.prefill(k[:, :55], v[:, :55], lengths=pre)
    bi = torch.arange(B)[:, None]
    for S in (1, 2):  # noqa: N806
        sel = torch.stack([torch.arange(n, n + S) for n in cache.host_lengths])
        cache.append(k[bi, sel], v[bi, sel])
        qs, gs = q[bi, sel], g[bi, sel]
        want = decode_reference(qs, cache, gs)
        for sp in ((2, 3, 2), (1, 2, 1), (2, 1, 2), (1, 1, 1)):
            o0, i0, _ = _run_module(mods[0], qs, cache, gs, sp)
            ws = None
            for _ in range(2):  # twice on one workspace: the "last program" tickets are reset after a step
                o1, i1, ws = _run_module(mods[1], qs, cache, gs, sp, ws)
                assert torch.equal(o1, o0) and torch.equal(i1, i0), (S, sp)
            torch.testing.assert_close(o1, want, rtol=1e-4, atol=1e-5, msg=f"S={S} splits {sp}")


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


def _gpu_cache(spec, B, T, dev, seed=0, compressors=None):  # noqa: N803
    torch.manual_seed(seed)
    a = spec.attention
    k = torch.randn(B, T, a.kv_heads, a.head_dim_qk, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, T, a.kv_heads, a.head_dim_v, device=dev, dtype=torch.bfloat16)
    ck, cv = compressors or (None, None)
    if ck is None:  # compressed K/V are given explicitly below; no step appends
        ck = cv = lambda x: x  # noqa: E731
    cache = NSACache(spec, B, capacity=T + 64, device=dev, dtype=torch.bfloat16, compress_k=ck,
                     compress_v=cv)
    tc = spec.num_compressed(T)
    kc = torch.randn(B, tc, a.kv_heads, a.head_dim_qk, device=dev, dtype=torch.bfloat16)
    vc = torch.randn(B, tc, a.kv_heads, a.head_dim_v, device=dev, dtype=torch.bfloat16)
    cache.prefill(k, v, lengths=[T - 37 * b for b in range(B)], k_cmp=kc, v_cmp=vc)
    return cache


@pytest.mark.gpu
def test_gpu_bf16_decode_8k_matches_reference():
    spec = nsa_dsl.load_spec("nsa_paper")
    ops = nsa_dsl.compile(spec, device="cuda")
    B, T = 2, 8192  # noqa: N806
    cache = _gpu_cache(spec, B, T, "cuda")
    a = spec.attention
    q = torch.randn(B, 1, a.heads, a.head_dim_qk, device="cuda", dtype=torch.bfloat16)
    g = torch.rand(B, 1, a.heads, 3, device="cuda", dtype=torch.bfloat16)
    ref_cache = _as_float(cache)
    details: dict = {}
    decode_reference(q.float(), ref_cache, g.float(), details=details)
    variants = {n: ops.with_config("decode", OPTIONS[n]) for n in OPTIONS if n != "new"}
    more = [(v, x) for v in variants.values() for x in ((3, 2, 2), None)]
    more.append((variants["last_tile"], (8, 4, 4)))  # CMP_PREFETCH = 2 prefetches at split_cmp >= 8
    for op, sp in [(ops, x) for x in SPLITS + [None]] + more:
        o, idx = decode(op, q, cache, g, splits=sp, return_indices=True)
        # bf16 scores may order near-equal blocks differently: the chosen blocks must score like the
        # reference top-n (sorted scores within bf16 tolerance), and the output must equal the reference
        # attending to exactly those blocks
        for b in range(B):
            scores, ref_idx = details["scores"][(b, 0)], details["indices"][(b, 0)]
            for h in range(a.kv_heads):
                got = torch.sort(scores[h, idx[b, 0, h].long()]).values
                want_s = torch.sort(scores[h, ref_idx[h]]).values
                torch.testing.assert_close(got, want_s, rtol=2e-2, atol=1e-4)
        want = decode_reference(q.float(), ref_cache, g.float(), indices=idx.clone())
        torch.testing.assert_close(o.float(), want, rtol=2e-2, atol=2e-2, msg=f"splits {sp}")


def _as_float(cache):
    c = NSACache(cache.spec, cache.batch_size, capacity=cache.capacity, device=cache.device,
                 dtype=torch.float32, compress_k=cache.compress_k, compress_v=cache.compress_v)
    c.k.copy_(cache.k)
    c.v.copy_(cache.v)
    c.k_cmp_buf.copy_(cache.k_cmp_buf)
    c.v_cmp_buf.copy_(cache.v_cmp_buf)
    c.lengths.copy_(cache.lengths)
    c._host_lengths = cache.host_lengths
    return c


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_eager():
    spec = nsa_dsl.load_spec("small_group")
    ops = nsa_dsl.compile(spec, device="cuda")
    B, T = 3, 4096  # noqa: N806
    a = spec.attention
    torch.manual_seed(5)
    comp = (nsa_dsl.Compressor(spec, a.head_dim_qk).cuda().bfloat16(),
            nsa_dsl.Compressor(spec, a.head_dim_v).cuda().bfloat16())  # the paper's MLP phi, captured too
    eager = _gpu_cache(spec, B, T, "cuda", seed=1, compressors=comp)
    graphed = _gpu_cache(spec, B, T, "cuda", seed=1, compressors=comp)
    step = CapturedDecodeStep(ops, graphed, S=1)
    for _ in range(20):  # crosses compressed-block boundaries (d = 16)
        q = torch.randn(B, 1, a.heads, a.head_dim_qk, device="cuda", dtype=torch.bfloat16)
        g = torch.rand(B, 1, a.heads, 3, device="cuda", dtype=torch.bfloat16)
        kn = torch.randn(B, 1, a.kv_heads, a.head_dim_qk, device="cuda", dtype=torch.bfloat16)
        vn = torch.randn(B, 1, a.kv_heads, a.head_dim_v, device="cuda", dtype=torch.bfloat16)
        eager.append(kn, vn)
        want = decode(ops, q, eager, g, splits=step.splits, plan_length=step.plan_length)
        got = step(q, g, kn, vn)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert graphed.host_lengths == eager.host_lengths
    assert torch.equal(graphed.lengths, eager.lengths)
    assert torch.equal(graphed.k_cmp, eager.k_cmp)


@pytest.mark.gpu
def test_gpu_pdl_equals_no_pdl_eager_and_graph():
    """PDL = 1 / 2 (dependent launches, window before the wait / plain wait) and PDL = 1 with PDL_AT = "tail"
    (each grid released after its main loop) give bitwise the outputs and
    indices of PDL = 0: paper spec, bf16, T = 8k, B = 2 of mixed lengths, eager and replayed from a captured
    step, in the default schedule with automatic splits (4 launches: split compressed attention, top-n,
    selected/window, row combine) and with the top-n fused into the first kernel + 2 selected/window splits
    merged by the last one (COMBINE = "last_rows": 2 launches, tickets reset across replays)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability >= 9.0")
    spec = nsa_dsl.load_spec("nsa_paper")
    ops = nsa_dsl.compile(spec, device="cuda")
    assert ops.plan("decode", T=8192, B=2).config["PDL"] == 3  # the sm90 default
    B, T = 2, 8192  # noqa: N806
    cache = _gpu_cache(spec, B, T, "cuda", seed=3)
    a = spec.attention
    for extra, splits in (({}, None), ({"COMBINE": "last_rows"}, (1, 2, 1))):
        steps = {}
        for pdl in (0, 1, 2, 3, "1tail"):  # "1tail": PDL 1 with each grid released after its main loop
            cfg = {**extra, "PDL": 1, "PDL_AT": "tail"} if pdl == "1tail" else {**extra, "PDL": pdl}
            op = ops.with_config("decode", cfg)
            steps[pdl] = (op, CapturedDecodeStep(op, cache, S=1, append=False, splits=splits))
        for rep in range(3):
            q = torch.randn(B, 1, a.heads, a.head_dim_qk, device="cuda", dtype=torch.bfloat16)
            g = torch.rand(B, 1, a.heads, 3, device="cuda", dtype=torch.bfloat16)
            got = {}
            for pdl, (op, step) in steps.items():
                o, idx = decode(op, q, cache, g, splits=step.splits, plan_length=step.plan_length,
                                return_indices=True)
                got[pdl] = (o.clone(), idx.clone(), step(q, g).clone())
            o0, i0, go0 = got[0]
            assert torch.isfinite(o0).all()
            torch.testing.assert_close(go0, o0, rtol=0, atol=0)  # graph = eager without PDL
            for pdl in (1, 2, "1tail"):
                o, idx, go = got[pdl]
                msg = f"PDL {pdl} {extra} splits {steps[pdl][1].splits} rep {rep}"
                assert torch.equal(idx, i0), msg
                torch.testing.assert_close(o, o0, rtol=0, atol=0, msg=msg)
                torch.testing.assert_close(go, o0, rtol=0, atol=0, msg=msg + " (graph)")


@pytest.mark.gpu
def test_gpu_batch_chunks_on_streams_equal_one_chain_eager_and_graph():
    """batch_chunks = 2 / 3 on the GPU (chunks on their own streams, chunk i + 1 after chunk i's compressed
    launch): bitwise the outputs and indices of one chain with the same splits, eager and replayed from a
    captured step (the streams fork from and join the capture stream), repeated so a stale scratch shows."""
    spec = nsa_dsl.load_spec("nsa_paper")
    # a fixed final merge: "auto" would pick per chain by its group count (rows for the smaller chunks)
    ops = nsa_dsl.compile(spec, device="cuda", config={"decode": {"COMBINE": "last_rows"}})
    B, T = 5, 8192  # noqa: N806
    cache = _gpu_cache(spec, B, T, "cuda", seed=4)
    for n in (2, 3):
        op = ops.with_config("decode", {"COMBINE": "last_rows", "batch_chunks": n})  # (replaces the params)
        step = CapturedDecodeStep(op, cache, S=1, append=False)
        for rep in range(3):
            q, g = _gpu_qg(spec, B)
            want, want_idx = decode(ops, q, cache, g, splits=step.splits, plan_length=step.plan_length,
                                    return_indices=True)
            want, want_idx = want.clone(), want_idx.clone()
            assert torch.isfinite(want).all()
            o, idx = decode(op, q, cache, g, splits=step.splits, plan_length=step.plan_length,
                            return_indices=True)
            msg = f"batch_chunks {n} splits {step.splits} rep {rep}"
            assert torch.equal(idx, want_idx), msg
            torch.testing.assert_close(o, want, rtol=0, atol=0, msg=msg)
            torch.testing.assert_close(step(q, g), want, rtol=0, atol=0, msg=msg + " (graph)")


def _gpu_qg(spec, B):  # noqa: N803
    a = spec.attention
    return (torch.randn(B, 1, a.heads, a.head_dim_qk, device="cuda", dtype=torch.bfloat16),
            torch.rand(B, 1, a.heads, 3, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("separate_kv", [False, True])
def test_layer_triton_backend_decode(separate_kv):
    """NSAttention(backend="triton") with a cache: prefill + decode steps through ops.decode equal the
    reference layer's full forward (separate_kv: the window reads its own K/V buffers in the kernels)."""
    spec = SPECS["tiny"]
    torch.manual_seed(6)
    layer = nsa_dsl.NSAttention(24, spec, separate_kv=separate_kv, backend="reference")
    B, T, P = 2, 56, 47  # noqa: N806
    x = torch.randn(B, T, 24)
    with torch.no_grad():
        full = layer(x)
        layer.backend = "triton"
        cache = nsa_dsl.NSACache.for_layer(layer, B, capacity=T)
        assert cache.dtype == torch.float32 and cache.separate_window == separate_kv
        layer(x[:, :P], cache=cache)
        for t in range(P, T, 3):
            o = layer(x[:, t : t + 3], cache=cache)  # S = 3 new tokens per step
            torch.testing.assert_close(o, full[:, t : t + 3], rtol=1e-4, atol=1e-5, msg=f"t={t}")
