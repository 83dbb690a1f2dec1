"""Helpers for the compression / top-n kernel tests (specs, inputs, reference, score-based index checks)."""

from __future__ import annotations

import torch

from nsa_dsl import NSASpec
from nsa_dsl.reference import (
    compressed_attention,
    compressed_cu_seqlens,
    compression_probs,
    select_blocks,
    selection_scores,
)


def make_spec(hq=4, hkv=2, dk=16, dv=16, l=8, d=4, lp=16, n=3, fi=1, fl=1, w=16, dtype="float32") -> NSASpec:  # noqa: E741
    return NSASpec.from_dict(
        {
            "name": f"t_g{hq // hkv}_l{l}d{d}lp{lp}n{n}",
            "attention": {"heads": hq, "kv_heads": hkv, "head_dim_qk": dk, "head_dim_v": dv, "dtype": dtype},
            "compression": {"block": l, "stride": d, "function": "mean", "position_encoding": False},
            "selection": {"block": lp, "top_n": n, "force_initial": fi, "force_local": fl},
            "window": {"size": w},
        }
    )


def make_inputs(spec: NSASpec, B: int, T: int, dtype=torch.float32, cu_seqlens=None, seed=0):  # noqa: N803
    g = torch.Generator().manual_seed(seed)
    a = spec.attention
    tc = spec.num_compressed(T) if cu_seqlens is None else int(compressed_cu_seqlens(cu_seqlens, spec)[-1])
    q = torch.randn(B, T, a.heads, a.head_dim_qk, generator=g).to(dtype)
    kc = torch.randn(B, tc, a.kv_heads, a.head_dim_qk, generator=g).to(dtype)
    vc = torch.randn(B, tc, a.kv_heads, a.head_dim_v, generator=g).to(dtype)
    return q, kc, vc


def per_seq(fn, cu_seqlens, tensors, cmp_tensors, spec):
    """Run a per-batch reference function once per packed sequence and concatenate along T."""
    if cu_seqlens is None:
        return fn(*tensors, *cmp_tensors)
    offs = cu_seqlens.tolist()
    coffs = compressed_cu_seqlens(cu_seqlens, spec).tolist()
    outs = [
        fn(*[t[:, a:b] for t in tensors], *[t[:, ca:cb] for t in cmp_tensors])
        for a, b, ca, cb in zip(offs[:-1], offs[1:], coffs[:-1], coffs[1:], strict=True)
    ]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat([o[i] for o in outs], 1) for i in range(len(outs[0])))
    return torch.cat(outs, 1)


def ref_cmp(spec, q, kc, vc, cu_seqlens=None):
    return per_seq(
        lambda a, b, c: compressed_attention(a.double(), b.double(), c.double(), spec),
        cu_seqlens,
        [q],
        [kc, vc],
        spec,
    )


def ref_scores_and_indices(spec, q, kc, cu_seqlens=None):
    """(scores [B,T,Hkv,Nslc] float64 per sequence, padded with -inf to the longest, indices)."""

    def f(qq, kk):
        T = qq.shape[1]  # noqa: N806
        sc = selection_scores(compression_probs(qq.double(), kk.double(), spec), spec, T)
        return sc, select_blocks(sc, spec, T)

    if cu_seqlens is None:
        return f(q, kc)
    offs = cu_seqlens.tolist()
    coffs = compressed_cu_seqlens(cu_seqlens, spec).tolist()
    nmax = max(spec.num_selection_blocks(b - a) for a, b in zip(offs[:-1], offs[1:], strict=True))
    scs, idxs = [], []
    for a, b, ca, cb in zip(offs[:-1], offs[1:], coffs[:-1], coffs[1:], strict=True):
        sc, ix = f(q[:, a:b], kc[:, ca:cb])
        pad = torch.full((*sc.shape[:3], nmax - sc.shape[3]), float("-inf"), dtype=sc.dtype)
        scs.append(torch.cat([sc, pad], 3))
        idxs.append(ix)
    return torch.cat(scs, 1), torch.cat(idxs, 1)


def local_positions(T, cu_seqlens):  # noqa: N803
    if cu_seqlens is None:
        return torch.arange(T)
    offs = cu_seqlens.tolist()
    return torch.cat([torch.arange(b - a) for a, b in zip(offs[:-1], offs[1:], strict=True)])


def check_indices(spec, idx, ref_idx, scores, cu_seqlens=None, rtol=1e-4, atol=1e-6):
    """Kernel indices vs the reference, compared by the selected blocks' scores (ties are legal).

    Checks: dtype/shape; each row ascending, unique, valid (j <= t // l'), -1 only in trailing slots and as
    many as the reference; forced blocks present; sorted selected scores equal the reference's.
    """
    assert idx.dtype == torch.int32 and idx.shape == ref_idx.shape, (idx.dtype, idx.shape, ref_idx.shape)
    B, T, H, n = idx.shape  # noqa: N806
    idx, ref_idx = idx.long(), ref_idx.long()
    t = local_positions(T, cu_seqlens)[None, :, None, None]
    cur = t // spec.selection.block
    used = idx >= 0
    assert torch.equal(used.sum(-1), (ref_idx >= 0).sum(-1)), "number of selected blocks differs"
    assert torch.equal(used, torch.sort(used.int(), -1, descending=True).values.bool()), "-1 not trailing"
    assert bool(((idx <= cur) | ~used).all()), "selected a block in the future"
    big = torch.where(used, idx, torch.full_like(idx, 1 << 40))
    srt = torch.sort(big, -1).values
    assert torch.equal(srt, big), "indices not ascending"
    assert bool((srt[..., 1:] != srt[..., :-1]).logical_or(srt[..., 1:] == 1 << 40).all()), (
        "duplicate indices"
    )
    fi, fl = spec.selection.force_initial, spec.selection.force_local
    for j in range(fi):
        need = cur >= j
        assert bool(((idx == j).any(-1, keepdim=True) | ~need).all()), f"forced initial block {j} missing"
    for k in range(fl):
        j = cur - k
        need = j >= 0
        assert bool(((idx == j).any(-1, keepdim=True) | ~need).all()), f"forced local block cur-{k} missing"
    s_k = torch.gather(scores, 3, idx.clamp(min=0)).masked_fill(~used, 0.0)
    s_r = torch.gather(scores, 3, ref_idx.clamp(min=0)).masked_fill(ref_idx < 0, 0.0)
    torch.testing.assert_close(
        torch.sort(s_k, -1).values, torch.sort(s_r, -1).values, rtol=rtol, atol=atol, check_dtype=False
    )


class poisoned_empty:  # noqa: N801 - used as a context manager
    """Inside the block ``torch.empty`` gives NaN-filled floats and -7-filled ints (shows unwritten slots)."""

    def __enter__(self):
        self._orig = torch.empty
        orig = self._orig

        def empty(*args, **kwargs):
            t = orig(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif t.dtype in (torch.int32, torch.int64):
                t.fill_(-7)
            return t

        torch.empty = empty
        return self

    def __exit__(self, *exc):
        torch.empty = self._orig
        return False
