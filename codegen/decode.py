"""The host side of the decode step: ``ops.decode(q, cache, g)`` and a CUDA-graph captured step.

``decode`` resolves the ``decode`` kernel's plan for the step shape (explicit config > tuned record > default,
with ``tokens`` raised to cover S), picks the context splits (``kernels_decode.auto_splits``: flash-decoding
when B x Hkv programs cannot fill the GPU), keeps the kernels' scratch buffers in the cache's workspace and
launches the generated kernels. It never reads device memory on the host. With config ``batch_chunks`` > 1
the batch is launched as that many chains of kernels over sequence ranges, on their own CUDA streams, each
chain starting after the previous chain's compressed-attention launch (``batch_chunks``, ``_chunk_streams``).

``CapturedDecodeStep`` captures "append the new tokens' K/V (+ compress completed blocks) and decode" for a
fixed batch and S into CUDA graphs (one with the compressor, one without; the host's length mirror picks
which to replay), so a step costs one graph launch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..cache import NSACache, _check_decode_inputs, decode_reference
from .loader import load
from .plan import KernelPlan, make_plan, next_pow2

if TYPE_CHECKING:
    from .ops import NSAOps

__all__ = ["decode", "decode_plan", "batch_chunks", "CapturedDecodeStep"]

log = logging.getLogger("nsa_dsl.codegen.decode")


def decode_plan(ops: NSAOps, *, B: int, S: int, T: int) -> KernelPlan:  # noqa: N803
    """The ``decode`` kernel plan for a step of S tokens over caches of about T tokens."""
    base = ops.plan("decode", T=max(1, T), B=B)
    if base.config["tokens"] >= S:
        return base
    key = ("decode", "tokens", next_pow2(S), base.key)
    p = ops._resolved.get(key)
    if p is None:
        cfg = dict(base.config)
        cfg["tokens"] = next_pow2(S)
        p = make_plan(ops.spec, "decode", cfg, ops.limits)
        ops._resolved[key] = p
    return p


def batch_chunks(plan: KernelPlan, B: int, S: int = 1) -> list[tuple[int, int]]:  # noqa: N803
    """The [b0, b1) sequence ranges a step of B sequences x S tokens is launched in (config
    ``batch_chunks``, at most B chunks; sizes differ by at most one, the larger first). ``batch_chunks`` = 0
    (auto): two chunks when the step has at least one and less than two (sequence, token, KV head) groups
    per SM, one otherwise (``kernels_decode.auto_batch_chunks``)."""
    from .kernels_decode import auto_batch_chunks

    n = int(plan.config.get("batch_chunks", 1))
    if n == 0:
        n = auto_batch_chunks(plan.spec, plan.limits, B=B, S=S)
    n = max(1, min(B, n))
    size, extra = divmod(B, n)
    out, b0 = [], 0
    for i in range(n):
        b1 = b0 + size + (1 if i < extra else 0)
        out.append((b0, b1))
        b0 = b1
    return out


def _splits(ops: NSAOps, plan: KernelPlan, B: int, S: int, max_len: int) -> tuple[int, int, int]:  # noqa: N803
    """The automatic split counts of a step of batch B: chosen for one batch chunk (the largest)."""
    from .kernels_decode import auto_splits

    b0, b1 = batch_chunks(plan, B, S)[0]
    return auto_splits(ops.spec, plan.config, ops.limits, B=b1 - b0, S=S, max_len=max_len)


#: the side streams of batch-chunked steps, per (device, chunk index, chunk count)
_STREAMS: dict[tuple[int, int, int], torch.cuda.Stream] = {}


def _chunk_streams(dev: torch.device, n: int) -> list[torch.cuda.Stream]:
    """One stream per chunk, chunk i at a higher priority than chunk i + 1 (its launches are the critical
    path once chunk i + 1's compressed pass has started)."""
    least, greatest = torch.cuda.Stream.priority_range()  # e.g. (0, -5): lower values run first
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    out = []
    for i in range(n):
        key = (idx, i, n)
        if key not in _STREAMS:
            pri = max(greatest, least - (n - 1 - i))
            _STREAMS[key] = torch.cuda.Stream(device=idx, priority=pri)
        out.append(_STREAMS[key])
    return out


def decode(
    ops: NSAOps,
    q: Tensor,
    cache: NSACache,
    g: Tensor,
    *,
    out: Tensor | None = None,
    splits: tuple[int, ...] | None = None,
    plan_length: int | None = None,
    return_indices: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """One decode step with the generated kernels: o [B, S, Hq, dv] (q's dtype).

    ``q`` [B, S, Hq, dk] and ``g`` [B, S, Hq, 3] are the S newest tokens of each sequence of ``cache``, whose
    K/V must already be appended (``cache.append``). ``splits`` = (split_cmp, split_sw[, split_topk])
    overrides the plan's; ``plan_length`` fixes the length the plan and splits are chosen for (default: the
    longest sequence); ``out`` receives the output. ``return_indices``: also the selected blocks
    [B, S, Hkv, n] (int32, a view of the workspace, overwritten by the next step; a new tensor when the plan
    launches the batch in chunks, config ``batch_chunks``).
    """
    if not isinstance(cache, NSACache):
        raise TypeError(f"cache: must be an NSACache, got {type(cache).__name__}")
    if cache.spec != ops.spec:
        raise ValueError(f"cache: built for spec {cache.spec.name!r}, ops for {ops.spec.name!r}")
    B, S = _check_decode_inputs(q, cache, g)  # noqa: N806
    if q.dtype != cache.dtype:
        raise ValueError(f"q: must have the cache's dtype {cache.dtype}, got {q.dtype}")
    a = ops.spec.attention
    if out is None:
        out = torch.empty(B, S, a.heads, a.head_dim_v, dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (B, S, a.heads, a.head_dim_v) or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {(B, S, a.heads, a.head_dim_v)} {q.dtype} tensor")
    if not ops.has_kernel("decode"):
        log.warning("kernel decode not registered; using the PyTorch reference decode")
        o = decode_reference(q, cache, g)
        out.copy_(o)
        return (out, None) if return_indices else out  # type: ignore[return-value]
    T = plan_length if plan_length is not None else cache.max_length  # noqa: N806
    plan = decode_plan(ops, B=B, S=S, T=T)
    mod = load(plan)
    if splits is None:
        splits = _splits(ops, plan, B, S, T)
    if len(splits) == 2:
        splits = (*splits, 1)
    sc, ss, st = (int(x) for x in splits)
    if min(sc, ss, st) < 1:
        raise ValueError(f"splits: must be positive integers (split_cmp, split_sw, split_topk), got {splits}")
    capc = cache.k_cmp_buf.shape[1]
    chunks = batch_chunks(plan, B, S)
    wkeys = [("decode", plan.key, B, S, capc, str(q.device), sc, ss, st, b0, b1) for b0, b1 in chunks]
    if wkeys[0] not in cache._workspace:
        for key in [k for k in cache._workspace if k[0] == "decode" and k[2:6] == wkeys[0][2:6]]:
            del cache._workspace[key]  # other plans/splits of this shape (a captured step keeps its own refs)
        for (b0, b1), key in zip(chunks, wkeys, strict=True):
            cache._workspace[key] = mod.workspace(b1 - b0, S, capc, sc, ss, st, q.device)
    q, g = q.contiguous(), g.contiguous()
    bufs = (cache.k, cache.v, cache.k_cmp_buf, cache.v_cmp_buf, cache.lengths, cache.k_win, cache.v_win)

    def launch(b0: int, b1: int, ws: dict, after_cmp: Any = None) -> Tensor:
        k, v, kc, vc, lengths, kw, vw = (x if x is None else x[b0:b1] for x in bufs)
        return mod.run(q[b0:b1], k, v, kc, vc, lengths, g[b0:b1], out[b0:b1], ws, k_win=kw, v_win=vw,
                       after_cmp=after_cmp)

    if len(chunks) == 1:
        idx = launch(0, B, cache._workspace[wkeys[0]])
        return (out, idx) if return_indices else out
    idxs = []
    if q.device.type != "cuda":  # no streams: the chunks one after another
        for (b0, b1), key in zip(chunks, wkeys, strict=True):
            idxs.append(launch(b0, b1, cache._workspace[key]))
    else:
        # chunk i + 1 starts when chunk i's compressed pass has been launched and has run (an event after it),
        # on its own stream: its compressed pass overlaps chunk i's top-n and selected launches
        main = torch.cuda.current_stream(q.device)
        streams = _chunk_streams(q.device, len(chunks))
        prev: torch.cuda.Event | None = None
        for (b0, b1), key, s in zip(chunks, wkeys, streams, strict=True):
            if prev is None:
                s.wait_stream(main)
            else:
                s.wait_event(prev)
            ev = torch.cuda.Event()
            with torch.cuda.stream(s):
                idxs.append(launch(b0, b1, cache._workspace[key], after_cmp=lambda ev=ev, s=s: ev.record(s)))
            prev = ev
        for s in streams:
            main.wait_stream(s)
    if not return_indices:
        return out
    return out, torch.cat(idxs, 0)


class CapturedDecodeStep:
    """A decode step (append K/V, compress completed blocks, attend) captured in CUDA graphs.

    ``step = CapturedDecodeStep(ops, cache, S=1)`` then ``o = step(q, g, k_new, v_new)`` every step:
    copies the inputs into static buffers, replays the graph and advances the cache's host length mirror.
    The cache must not grow while the step is in use (create it with enough ``capacity``); the plan and the
    splits are fixed at capture for ``plan_length`` (default: the capacity). Pass ``append=False`` to capture
    only the attention (then ``o = step(q, g)`` after appending yourself, with ``compress="always"`` or
    ``"auto"``). ``o`` is a static buffer overwritten by the next replay.
    """

    def __init__(
        self,
        ops: NSAOps,
        cache: NSACache,
        S: int = 1,  # noqa: N803
        *,
        append: bool = True,
        plan_length: int | None = None,
        splits: tuple[int, ...] | None = None,
        warmup: int = 2,
    ) -> None:
        if cache.device.type != "cuda":
            raise ValueError(f"cache: CUDA graphs need a CUDA cache, got device {cache.device}")
        a = ops.spec.attention
        B, dev, dt = cache.batch_size, cache.device, cache.dtype  # noqa: N806
        self.ops, self.cache, self.S, self.append = ops, cache, S, append
        self.plan_length = plan_length or cache.capacity
        plan = decode_plan(ops, B=B, S=S, T=self.plan_length)
        self.splits = splits or _splits(ops, plan, B, S, self.plan_length)
        self.q = torch.randn(B, S, a.heads, a.head_dim_qk, device=dev, dtype=dt)
        self.g = torch.rand(B, S, a.heads, 3, device=dev, dtype=dt)
        self.k_new = torch.randn(B, S, a.kv_heads, a.head_dim_qk, device=dev, dtype=dt)
        self.v_new = torch.randn(B, S, a.kv_heads, a.head_dim_v, device=dev, dtype=dt)
        self.out = torch.empty(B, S, a.heads, a.head_dim_v, device=dev, dtype=dt)
        if min(cache.host_lengths) + (S if append else 0) < S:
            raise ValueError(f"cache: every sequence needs >= {S} tokens before capture (prefill first)")
        if cache.max_length + S > cache.capacity:
            raise ValueError(f"cache: capacity {cache.capacity} leaves no room for a step of {S} tokens")
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        modes = ("never", "always") if append else ("none",)
        saved = (cache.lengths.clone(), cache.host_lengths)
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for mode in modes:
                for _ in range(max(1, warmup)):
                    self._run(mode)
                    self._restore(saved)
        torch.cuda.current_stream(dev).wait_stream(stream)
        for mode in modes:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._run(mode)
            self._restore(saved)
            self.graphs[mode] = graph
        torch.cuda.synchronize(dev)
        # the graphs address these buffers: keep them alive even if the cache's workspace moves on
        self._keep = (dict(cache._workspace), cache._buffers(), cache.lengths)

    def _restore(self, saved: tuple[Tensor, list[int]]) -> None:
        self.cache.lengths.copy_(saved[0])
        self.cache._host_lengths = list(saved[1])

    def _run(self, mode: str) -> None:
        if mode != "none":
            self.cache.append(self.k_new, self.v_new, compress=mode)
        decode(
            self.ops, self.q, self.cache, self.g, out=self.out, splits=self.splits,
            plan_length=self.plan_length,
        )

    def __call__(
        self, q: Tensor, g: Tensor, k_new: Tensor | None = None, v_new: Tensor | None = None
    ) -> Tensor:
        cache, S = self.cache, self.S  # noqa: N806
        self.q.copy_(q)
        self.g.copy_(g)
        if not self.append:
            self.graphs["none"].replay()
            return self.out
        if k_new is None or v_new is None:
            raise ValueError("k_new/v_new: required when the step was captured with append=True")
        if cache.max_length + S > cache.capacity:
            raise ValueError(f"cache: full (capacity {cache.capacity}); captured steps cannot grow it")
        self.k_new.copy_(k_new)
        self.v_new.copy_(v_new)
        old = cache.host_lengths
        mode = "always" if any(cache._completes(n, n + S) for n in old) else "never"
        self.graphs[mode].replay()
        cache._host_lengths = [n + S for n in old]
        return self.out

    def info(self) -> dict[str, Any]:
        """Step size, splits, plan length and the captured graph variants."""
        return {
            "S": self.S, "splits": self.splits, "plan_length": self.plan_length, "graphs": list(self.graphs),
        }
