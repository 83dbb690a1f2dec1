"""Reverse index for the selection backward: selection block -> the tokens that selected it.

The forward's ``indices`` [T, Hkv, n] (packed tokens, block ids local to each sequence, -1 unused) say which
blocks each token reads. dK/dV of a block is a sum over the tokens that read it, so the backward turns the
index around: one sort of int64 keys ``block_key * T + token`` on the GPU (block_key = hkv * NB + global
block), then a count per block. Tokens of a block come out in ascending order, so the accumulation order of
the dK/dV kernel is fixed and the result is bitwise reproducible without atomics.

Long lists (block 0 is read by every token when ``force_initial`` >= 1) are split into work items of at most
``chunk`` tokens; such blocks' items write fp32 partials that a second kernel sums in item order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ReverseIndex", "build"]


@dataclass(frozen=True)
class ReverseIndex:
    """Work list of the selection dK/dV kernel (all int32/int64 tensors on the indices' device).

    ``tokens``: packed token ids grouped by block key, ascending inside a block. Work item w covers
    ``tokens[item_lo[w]:item_hi[w]]`` of the block whose first key token is ``item_tok0[w]`` (packed), whose
    sequence ends at ``item_kend[w]``, for KV head ``item_hkv[w]``; ``item_dst[w]`` is -1 (write dK/dV) or a
    partial slot. Reduction r sums partial slots ``red_lo[r]:red_hi[r]`` into block ``red_tok0[r]``.
    """

    tokens: Tensor
    item_tok0: Tensor
    item_kend: Tensor
    item_hkv: Tensor
    item_lo: Tensor
    item_hi: Tensor
    item_dst: Tensor
    red_tok0: Tensor
    red_kend: Tensor
    red_hkv: Tensor
    red_lo: Tensor
    red_hi: Tensor
    n_items: int
    n_partials: int
    n_reduce: int
    n_entries: int


def build(indices: Tensor, cu_seqlens: Tensor, block: int, chunk: int) -> ReverseIndex:
    """Build the reverse index.

    Args:
        indices: int32 [T, Hkv, n] selected blocks per packed token (local to its sequence, -1 unused).
        cu_seqlens: int32 [N+1] sequence offsets into the packed tokens (same device).
        block: selection block size l'.
        chunk: most tokens per work item (>= 1).
    """
    if indices.dim() != 3:
        raise ValueError(f"indices: expected [T, Hkv, n], got shape {tuple(indices.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk: must be >= 1, got {chunk}")
    dev = indices.device
    T, hkv, n = indices.shape  # noqa: N806
    cu = cu_seqlens.to(device=dev, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    nblk = (lens + block - 1) // block
    blk_off = torch.zeros_like(cu)
    blk_off[1:] = torch.cumsum(nblk, 0)
    nb_total = int(blk_off[-1].item()) if cu.numel() > 1 else 0
    i32 = torch.int32

    def _empty(dtype=i32):
        return torch.zeros(0, dtype=dtype, device=dev)

    if T == 0 or nb_total == 0:
        e = _empty()
        return ReverseIndex(e, e, e, e, e, e, e, e, e, e, e, e, 0, 0, 0, 0)
    nseq = lens.numel()
    tok_seq = torch.repeat_interleave(torch.arange(nseq, device=dev), lens, output_size=T)  # [T]
    idx = indices.to(torch.int64)
    valid = idx >= 0
    gblk = blk_off[tok_seq][:, None, None] + idx  # [T, Hkv, n]
    head = torch.arange(hkv, device=dev)[None, :, None]
    bkey = head * nb_total + gblk
    tok = torch.arange(T, device=dev)[:, None, None]
    sentinel = torch.iinfo(torch.int64).max
    keys = torch.where(valid, bkey * T + tok, torch.full_like(bkey, sentinel)).reshape(-1)
    skeys = torch.sort(keys).values
    nkeys = hkv * nb_total
    n_entries = int(valid.sum().item())
    skeys = skeys[:n_entries]
    tokens = (skeys % T).to(i32)
    # per-block offsets by binary search over the sorted block keys (no bincount: deterministic-mode safe)
    bounds = torch.searchsorted(skeys // T, torch.arange(nkeys + 1, device=dev))
    offs = bounds[:-1]
    counts = bounds[1:] - bounds[:-1]
    nch = (counts + chunk - 1) // chunk
    n_items = int(nch.sum().item())
    if n_items == 0:
        e = _empty()
        return ReverseIndex(tokens, e, e, e, e, e, e, e, e, e, e, e, 0, 0, 0, n_entries)
    item_blk = torch.repeat_interleave(torch.arange(nkeys, device=dev), nch, output_size=n_items)
    first_item = torch.cumsum(nch, 0) - nch
    item_k = torch.arange(n_items, device=dev) - first_item[item_blk]
    item_lo = offs[item_blk] + item_k * chunk
    item_hi = torch.minimum(item_lo + chunk, (offs + counts)[item_blk])
    split = nch[item_blk] > 1
    slot = torch.cumsum(split.to(torch.int64), 0) - 1
    item_dst = torch.where(split, slot, torch.full_like(slot, -1))
    n_partials = int(split.sum().item())

    def _block_geom(keys_: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = keys_ // nb_total
        gb = keys_ % nb_total
        s = torch.searchsorted(blk_off, gb, right=True) - 1
        tok0 = cu[s] + (gb - blk_off[s]) * block
        return tok0, cu[s + 1], h

    it_tok0, it_kend, it_h = _block_geom(item_blk)
    red_keys = torch.nonzero(nch > 1).reshape(-1)
    red_tok0, red_kend, red_h = _block_geom(red_keys)
    # partial slots of a split block are contiguous (items are ordered by block key)
    red_lo = slot[first_item[red_keys]] if red_keys.numel() else _empty(torch.int64)
    red_hi = red_lo + nch[red_keys]
    return ReverseIndex(
        tokens=tokens,
        item_tok0=it_tok0,
        item_kend=it_kend,
        item_hkv=it_h.to(i32),
        item_lo=item_lo.to(i32),
        item_hi=item_hi.to(i32),
        item_dst=item_dst.to(i32),
        red_tok0=red_tok0,
        red_kend=red_kend,
        red_hkv=red_h.to(i32),
        red_lo=red_lo.to(i32),
        red_hi=red_hi.to(i32),
        n_items=n_items,
        n_partials=n_partials,
        n_reduce=int(red_keys.numel()),
        n_entries=n_entries,
    )
