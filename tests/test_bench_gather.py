"""The gather floor of ``bench/sel_gather_bound.py`` reads exactly the selected blocks (interpreter)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sel_gather_bound = pytest.importorskip("sel_gather_bound")


@pytest.mark.parametrize("bk", [8, 4])
def test_gather_sums_exactly_the_selected_blocks(bk):
    gen = torch.Generator().manual_seed(3)
    T, H, dk, dv, n, blk = 40, 2, 24, 16, 3, 8  # noqa: N806 - T not a multiple of the block, dk not a power of 2
    k = torch.randn(1, T, H, dk, generator=gen)
    v = torch.randn(1, T, H, dv, generator=gen)
    idx = torch.randint(0, T // blk + 1, (1, T, H, n), generator=gen, dtype=torch.int32)
    idx[0, 5, 1, 2] = -1  # an unused slot reads nothing
    out = sel_gather_bound.gather(k, v, idx, blk, bk, 4, 2)
    want = torch.zeros(T, H)
    for t in range(T):
        for h in range(H):
            for j in idx[0, t, h].tolist():
                if j >= 0:
                    rows = slice(j * blk, min((j + 1) * blk, T))
                    want[t, h] += k[0, rows, h].sum() + v[0, rows, h].sum()
    torch.testing.assert_close(out.view(T, H), want, rtol=1e-5, atol=1e-4)
