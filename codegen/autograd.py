"""The differentiable NSA op (issue 4): generated forward + generated backward, one PyTorch custom op.

``nsa_attention(q, k, v, k_cmp, v_cmp, g, ops_or_spec, *, cu_seqlens=None, deterministic=False)`` runs
``NSAOps.forward_train`` and keeps only what the backward needs: the three branch outputs (for D_b and the
gate gradients), the three branch LSEs (fp32) and the selected indices; scores, probabilities and the top-n
are never recomputed in the backward (indices are not differentiated, as in the paper), attention
probabilities are recomputed tile by tile from the LSEs.

The forward and the backward are ``torch.library.custom_op``s (``nsa_dsl::nsa_fwd``, ``nsa_dsl::nsa_bwd``)
with fake (meta) implementations, so ``torch.compile`` traces through them without graph breaks. The compiled
ops object travels as a string key into a process-local registry (custom ops take no Python objects).

Determinism: no backward kernel uses atomics (the selection dK/dV scatter goes through a GPU-built reverse
index, see ``nsa_dsl.codegen.reverse_index``; split reductions are summed in a fixed order), so the default
path is already bitwise reproducible run to run; ``deterministic=True`` is accepted and guarantees it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..spec import NSASpec
from .loader import load
from .ops import NSAOps, ops_by_key
from .ops import compile as _compile
from .plan import make_plan

__all__ = [
    "nsa_attention",
    "nsa_backward",
    "activation_bytes_per_token",
    "selection_dq_scratch_bytes",
    "register_ops",
    "BACKWARD_KERNELS",
]

log = logging.getLogger("nsa_dsl.codegen.autograd")

#: The generated kernels the backward runs (registry names; ``bwd_win`` only when the window is on).
BACKWARD_KERNELS = ("bwd_pre", "bwd_cmp", "bwd_slc", "bwd_win")

_OPS: dict[str, NSAOps] = {}


def register_ops(ops: NSAOps) -> str:
    """Key under which the custom ops find ``ops`` (``ops.op_key``), which is then kept alive for the
    process. Traceable: under torch.compile the key is a constant attribute read, the fake implementations
    find ``ops`` through the weak registry of live ops (``ops_by_key``) during the trace, and the strong
    reference taken here is replayed after it."""
    key = ops.op_key
    if key not in _OPS:
        _OPS[key] = ops
    return key


def _ops(key: str) -> NSAOps:
    ops = _OPS.get(key)
    return ops if ops is not None else ops_by_key(key)


_SPEC_OPS: dict[Any, NSAOps] = {}


def _as_ops(ops_or_spec: Any) -> NSAOps:
    if isinstance(ops_or_spec, NSAOps):
        return ops_or_spec
    if isinstance(ops_or_spec, (NSASpec, str)):
        # one compiled op per spec (a fresh one per call would grow the custom-op registry)
        ops = _SPEC_OPS.get(ops_or_spec)
        if ops is None:
            ops = _SPEC_OPS[ops_or_spec] = _compile(ops_or_spec)
        return ops
    raise ValueError(
        f"ops_or_spec: expected an NSAOps (nsa_dsl.compile(spec)), an NSASpec or a spec name, "
        f"got {type(ops_or_spec).__name__}"
    )


# ------------------------------------------------------------------------------------------------
# backward driver
# ------------------------------------------------------------------------------------------------


def nsa_backward(
    ops_or_spec: Any,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    g: Tensor,
    do: Tensor,
    saved: dict[str, Tensor | None],
    *,
    cu_seqlens: Tensor | None = None,
    deterministic: bool = False,
    profile: dict[str, float] | None = None,
    k_win: Tensor | None = None,
    v_win: Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[Tensor, ...]:
    """Gradients (dq, dk, dv, dk_cmp, dv_cmp, dg) of o = sum_b g_b * O_b for the upstream gradient ``do``.

    ``saved``: what ``NSAOps.forward_train`` returned (``o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win,
    indices``; window entries may be None when the window is off). Gradients come back in the inputs'
    dtypes; all accumulation is fp32. Rows whose branch saw no key (lse = +inf) contribute exactly zero.
    ``deterministic``: accepted for API symmetry; every path is already atomic-free and reproducible.
    ``profile``: if a dict is given, CUDA-event milliseconds per stage (``bwd_cmp``, ...) and per kernel
    launch (``bwd_cmp.dq``, ``bwd_cmp.dkdv``, ...) are added to it (synchronises).
    ``k_win``/``v_win``: the window branch's own K/V (both or neither, as in ``NSAOps.forward``); then two
    more gradients come back, (..., dg, dk_win, dv_win), and dk/dv hold the selection branch's part only.
    ``max_seqlen``: with ``cu_seqlens``, the longest sequence (then nothing is read back from the device).
    """
    ops = _as_ops(ops_or_spec)
    spec = ops.spec
    B, T, Hq, _ = q.shape  # noqa: N806
    hkv, n = spec.attention.kv_heads, spec.selection.top_n
    q, k, v, k_cmp, v_cmp, g, do = (x.contiguous() for x in (q, k, v, k_cmp, v_cmp, g, do))
    separate = k_win is not None or v_win is not None
    if separate:
        from .ops import _window_kv

        k_win, v_win = (x.contiguous() for x in _window_kv(k, v, k_win, v_win))
    f32 = torch.float32
    dq = torch.empty(q.shape, device=q.device, dtype=f32)
    dk = torch.zeros(k.shape, device=q.device, dtype=f32)
    dv = torch.zeros(v.shape, device=q.device, dtype=f32)
    dkc = torch.zeros(k_cmp.shape, device=q.device, dtype=f32)
    dvc = torch.zeros(v_cmp.shape, device=q.device, dtype=f32)
    # the window's dK/dV: accumulated into dk/dv, or a buffer of their own with a separate window K/V
    dkw = torch.zeros(k.shape, device=q.device, dtype=f32) if separate else dk
    dvw = torch.zeros(v.shape, device=q.device, dtype=f32) if separate else dv
    if T == 0 or B == 0:
        extra = (dkw.to(k.dtype), dvw.to(v.dtype)) if separate else ()
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dkc.to(k_cmp.dtype), dvc.to(v_cmp.dtype),
                torch.zeros_like(g), *extra)
    if cu_seqlens is None:
        max_len, nseq = T, B
        cu_packed = torch.arange(B + 1, device=q.device, dtype=torch.int32) * T
        cu_cmp = None
    else:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        nseq = int(cu_seqlens.numel()) - 1
        cu_packed = cu_seqlens
        if max_seqlen is not None:
            max_len, cu_cmp = int(max_seqlen), None  # the kernels derive the compressed offsets on the device
        else:
            lens = cu_seqlens[1:] - cu_seqlens[:-1]
            max_len = int(lens.max().item()) if lens.numel() else 0
            from ..reference import compressed_cu_seqlens

            cu_cmp = compressed_cu_seqlens(cu_seqlens, spec)

    marks: list[tuple[str, Any]] = []

    def mark(name: str) -> None:
        if profile is not None and q.is_cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append((name, ev))

    mark("start")
    # per-launch events inside the generated modules (only when profiling on CUDA)
    kprof: dict[str, Any] | None = {} if (profile is not None and q.is_cuda) else None

    def mod(name: str):
        return ops.module(name, T=max_len, B=nseq)

    def f32c(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(f32).contiguous()

    # where the reverse index's side stream may start: the forward's indices and cu_packed are ready
    start = torch.cuda.Event() if q.is_cuda else None
    if start is not None:
        start.record()
    o_cmp, o_slc, o_win = (saved["o_cmp"], saved["o_slc"], saved.get("o_win"))
    win_on = spec.window_size > 0 and o_win is not None and o_win.numel() > 0
    dg, delta = mod("bwd_pre").run(do, o_cmp, o_slc, o_win if win_on else None, g)
    mark("bwd_pre")
    # bwd_win's DQ_CMP: the window's dQ kernel also does the compressed branch's dQ (no dQ kernel of its own
    # here, and the selection's dQ kernel stores first)
    fuse_dq = win_on and ops.plan("bwd_win", T=max_len, B=nseq).config.get("DQ_CMP", 0) == 1
    lse_cmp = f32c(saved["lse_cmp"])
    # compressed branch: writes dq (no accumulation; not with fuse_dq) and dk_cmp / dv_cmp
    mod("bwd_cmp").run(q, k_cmp, v_cmp, do, g, lse_cmp, delta[0], None if fuse_dq else dq, dkc, dvc,
                       cu_seqlens=cu_seqlens, cu_cmp=cu_cmp, max_len=max_len, profile=kprof)
    mark("bwd_cmp")
    # selection branch: dq += ; dk/dv written per selected block through the reverse index. The index (~50
    # small torch launches) is built on a side stream while the compressed branch's kernels run, instead of
    # after them on the critical path (at 8k it took 1.1 ms there, ~7% of fwd+bwd).
    slc = _slc_module(ops, q, max_len, nseq)
    with _side_stream(q.device, after=start) as join:
        indices = saved["indices"].to(torch.int32).contiguous()
        rev = slc.build_reverse_index(indices.view(B * T, hkv, n), cu_packed, spec.selection.block, slc.CHUNK)
        join(indices, *[t for t in vars(rev).values() if isinstance(t, Tensor)])
    mark("reverse_index")
    slc.run(q, k, v, do, g, f32c(saved["lse_slc"]), delta[1], indices, rev, dq, dk, dv,
            cu_seqlens=cu_seqlens, max_len=max_len, accum_q=not fuse_dq, profile=kprof)
    mark("bwd_slc")
    dq_final = dq
    if win_on:
        kw_, vw_ = (k_win, v_win) if separate else (k, v)
        # the window's dQ kernel is the last to touch dq: it stores the sum in q's dtype (no cast pass)
        dq_final = dq if q.dtype == f32 else torch.empty(q.shape, device=q.device, dtype=q.dtype)
        fused = {"cmp": (k_cmp, v_cmp, lse_cmp, delta[0]), "cu_cmp": cu_cmp} if fuse_dq else {}
        mod("bwd_win").run(q, kw_, vw_, do, g, f32c(saved["lse_win"]), delta[2], dq, dkw, dvw,
                           cu_seqlens=cu_seqlens, max_len=max_len, accum_q=True, accum_kv=True, profile=kprof,
                           dq_out=dq_final, **fused)
        mark("bwd_win")
    out = (dq_final.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dkc.to(k_cmp.dtype), dvc.to(v_cmp.dtype),
           dg.to(g.dtype))
    if separate:
        out = (*out, dkw.to(k.dtype), dvw.to(v.dtype))
    mark("cast")
    if marks:
        torch.cuda.synchronize()
        for (_, a), (name, b) in zip(marks, marks[1:], strict=False):
            profile[name] = profile.get(name, 0.0) + a.elapsed_time(b)
        for name, a, b in (kprof or {}).get("_events", []):
            profile[name] = profile.get(name, 0.0) + a.elapsed_time(b)
    return out


# ------------------------------------------------------------------------------------------------
# activation memory
# ------------------------------------------------------------------------------------------------


def activation_bytes_per_token(spec: NSASpec | str, dtype: torch.dtype | str | None = None) -> dict[str, int]:
    """Bytes per token the op saves for its backward, beyond references to its inputs.

    Returns a dict: ``branch_outputs`` (O_cmp, O_slc, O_win: Hq x dv each in the activation dtype),
    ``lse`` (three fp32 LSEs per query head), ``indices`` (Hkv x n int32), ``total`` (their sum), and
    ``inputs`` (q, k, v, g and the compressed K/V per token, referenced not copied; the compressed part
    amortised as Tc/T ~ 1/d). Everything else (probabilities, scores) is recomputed.
    """
    if isinstance(spec, str):
        from ..spec import load_spec

        spec = load_spec(spec)
    if dtype is None:
        dtype = spec.attention.dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    e = torch.empty((), dtype=dtype).element_size()
    a = spec.attention
    nbr = 3 if spec.window_size > 0 else 2
    out = {
        "branch_outputs": nbr * a.heads * a.head_dim_v * e,
        "lse": nbr * a.heads * 4,
        "indices": a.kv_heads * spec.selection.top_n * 4,
    }
    out["total"] = sum(out.values())
    kv_tok = a.kv_heads * (a.head_dim_qk + a.head_dim_v) * e
    out["inputs"] = (
        a.heads * a.head_dim_qk * e + kv_tok + a.heads * 3 * e + kv_tok // spec.compression.stride
    )
    return out


_SIDE_STREAMS: dict[Any, Any] = {}


@contextlib.contextmanager
def _side_stream(device: torch.device, after: Any) -> Iterator[Callable[..., None]]:
    """``with _side_stream(dev, after=event) as join:`` runs the block's torch work on a second CUDA stream
    of ``dev`` that starts once ``event`` (recorded on the current stream) has passed, concurrently with what
    the current stream runs after it; at the end the current stream waits for the block's work. The block
    passes the tensors it made to ``join`` (allocated on the side stream, used on the current one:
    ``record_stream`` keeps the allocator from reusing them early). Off CUDA, and while the current stream is
    being captured into a CUDA graph, it runs inline (allocations on a side stream break the capture of
    torch.compile's CUDA-graph trees, pytorch/pytorch#151199)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        yield lambda *ts: None
        return
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    side.wait_event(after)
    made: list[Tensor] = []
    with torch.cuda.stream(side):
        yield lambda *ts: made.extend(ts)
    main.wait_stream(side)
    for t in made:
        t.record_stream(main)


def _scratch_budget(device: torch.device) -> int | None:
    """Bytes a temporary of the backward may take on ``device``: half of what is free (driver-free plus
    memory PyTorch's allocator holds unused); None (no limit) off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free + cached) // 2


def _slc_module(ops: NSAOps, q: Tensor, max_len: int, nseq: int) -> Any:
    """The selection backward's module; when the plan's block-outer dQ (``DQ_LAYOUT = "blocks"``) would need
    more scratch than ``_scratch_budget`` allows, the same config with the group-centric dQ instead (logged
    once per shape): the gradients are the same, only slower for small groups."""
    plan = ops.plan("bwd_slc", T=max_len, B=nseq)
    if plan.config.get("DQ_LAYOUT") != "blocks":
        return load(plan)
    need = _dq_partial_bytes(ops.spec, q.shape[0] * q.shape[1])
    budget = _scratch_budget(q.device)
    if budget is None or need <= budget:
        return load(plan)
    rows = {**plan.config, "DQ_LAYOUT": "rows", "DQ_TOKENS": max(1, min(4, 64 // ops.spec.G))}
    key = (ops.op_key, max_len, nseq)
    if key not in _WARNED_SCRATCH:
        _WARNED_SCRATCH.add(key)
        log.warning("bwd_slc: the block-outer dQ would need %.1f GB of scratch (budget %.1f GB): using "
                    "DQ_LAYOUT 'rows' for T = %d", need / 1e9, budget / 1e9, max_len)
    return load(make_plan(ops.spec, "bwd_slc", rows, ops.limits))


_WARNED_SCRATCH: set[tuple] = set()


def _dq_partial_bytes(spec: NSASpec, tokens: int) -> int:
    """fp32 dQ partials of the block-outer selection dQ: one dk row per (token, query head, slot)."""
    a = spec.attention
    return tokens * a.heads * spec.selection.top_n * a.head_dim_qk * 4


def selection_dq_scratch_bytes(ops_or_spec: Any, T: int, B: int = 1) -> int:  # noqa: N803
    """Temporary bytes the selection backward allocates for its dQ at this shape: with the block-outer layout
    (``bwd_slc`` config ``DQ_LAYOUT = "blocks"``, the GPU default for G <= 4) one fp32 partial per (token,
    query head, selected slot) of dk values, B x T x Hq x n x dk x 4; 0 with the other layouts. Released
    when the backward returns; ``DQ_LAYOUT = "rows"`` avoids it at the cost of reading each block once per
    token, and the backward switches to that by itself when the partials would take more than half of the
    device's free memory (logged)."""
    ops = _as_ops(ops_or_spec)
    if ops.config_for("bwd_slc", T=T, B=B).get("DQ_LAYOUT") != "blocks":
        return 0
    return _dq_partial_bytes(ops.spec, B * T)


# ------------------------------------------------------------------------------------------------
# custom ops
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("nsa_dsl::nsa_fwd", mutates_args=())
def _nsa_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    g: Tensor,
    cu_seqlens: Tensor | None,
    ops_key: str,
    deterministic: bool,
    k_win: Tensor | None = None,
    v_win: Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ops = _ops(ops_key)
    o, saved = ops.forward_train(
        q, k, v, k_cmp, v_cmp, g, cu_seqlens=cu_seqlens, k_win=k_win, v_win=v_win, max_seqlen=max_seqlen
    )
    empty = q.new_empty(0)
    return (
        o,
        saved["o_cmp"].contiguous(),
        saved["lse_cmp"].float().contiguous(),
        saved["o_slc"].contiguous(),
        saved["lse_slc"].float().contiguous(),
        saved["o_win"].contiguous() if saved.get("o_win") is not None else empty,
        saved["lse_win"].float().contiguous() if saved.get("lse_win") is not None else empty.float(),
        saved["indices"].to(torch.int32).contiguous(),
    )


@_nsa_fwd.register_fake
def _nsa_fwd_fake(q, k, v, k_cmp, v_cmp, g, cu_seqlens, ops_key, deterministic, k_win=None, v_win=None,
                  max_seqlen=None):
    spec = _ops(ops_key).spec
    B, T, Hq, _ = q.shape  # noqa: N806
    dv = spec.attention.head_dim_v
    o = q.new_empty((B, T, Hq, dv))
    lse = q.new_empty((B, T, Hq), dtype=torch.float32)
    win = spec.window_size > 0
    return (
        o,
        q.new_empty((B, T, Hq, dv)),
        lse.new_empty((B, T, Hq)),
        q.new_empty((B, T, Hq, dv)),
        lse.new_empty((B, T, Hq)),
        q.new_empty((B, T, Hq, dv)) if win else q.new_empty(0),
        lse.new_empty((B, T, Hq)) if win else lse.new_empty(0),
        q.new_empty((B, T, spec.attention.kv_heads, spec.selection.top_n), dtype=torch.int32),
    )


@torch.library.custom_op("nsa_dsl::nsa_bwd", mutates_args=())
def _nsa_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    g: Tensor,
    o_cmp: Tensor,
    lse_cmp: Tensor,
    o_slc: Tensor,
    lse_slc: Tensor,
    o_win: Tensor,
    lse_win: Tensor,
    indices: Tensor,
    cu_seqlens: Tensor | None,
    ops_key: str,
    deterministic: bool,
    k_win: Tensor | None = None,
    v_win: Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dk_cmp, dv_cmp, dg, dk_win, dv_win); the last two are empty without a separate
    window K/V (custom ops cannot return None)."""
    saved = {
        "o_cmp": o_cmp,
        "lse_cmp": lse_cmp,
        "o_slc": o_slc,
        "lse_slc": lse_slc,
        "o_win": o_win if o_win.numel() else None,
        "lse_win": lse_win if lse_win.numel() else None,
        "indices": indices,
    }
    grads = nsa_backward(
        _ops(ops_key), q, k, v, k_cmp, v_cmp, g, do, saved, cu_seqlens=cu_seqlens,
        deterministic=deterministic, k_win=k_win, v_win=v_win, max_seqlen=max_seqlen,
    )
    if k_win is None:
        grads = (*grads, k.new_empty(0), v.new_empty(0))
    return grads


@_nsa_bwd.register_fake
def _nsa_bwd_fake(do, q, k, v, k_cmp, v_cmp, g, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, indices,
                  cu_seqlens, ops_key, deterministic, k_win=None, v_win=None, max_seqlen=None):
    if k_win is not None:
        win = (torch.empty_like(k), torch.empty_like(v))
    else:
        win = (k.new_empty(0), v.new_empty(0))
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(k_cmp),
            torch.empty_like(v_cmp), torch.empty_like(g), *win)


def _setup_context(ctx, inputs, output):
    q, k, v, k_cmp, v_cmp, g, cu_seqlens, ops_key, deterministic, k_win, v_win, max_seqlen = inputs
    _, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, indices = output
    ctx.separate = k_win is not None
    win = (k_win, v_win) if ctx.separate else ()
    ctx.save_for_backward(
        q, k, v, k_cmp, v_cmp, g, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, indices, *win
    )
    ctx.cu_seqlens = cu_seqlens
    ctx.ops_key = ops_key
    ctx.deterministic = deterministic
    ctx.max_seqlen = max_seqlen


def _backward(ctx, do, *unused):
    saved = ctx.saved_tensors
    q, k, v, k_cmp, v_cmp, g, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, indices, *win = saved
    k_win, v_win = win if ctx.separate else (None, None)
    *grads, dkw, dvw = torch.ops.nsa_dsl.nsa_bwd(
        do.contiguous(), q, k, v, k_cmp, v_cmp, g, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, indices,
        ctx.cu_seqlens, ctx.ops_key, ctx.deterministic, k_win, v_win, ctx.max_seqlen,
    )
    if not ctx.separate:
        dkw = dvw = None
    return (*grads, None, None, None, dkw, dvw, None)


_nsa_fwd.register_autograd(_backward, setup_context=_setup_context)


def nsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    g: Tensor,
    ops_or_spec: Any,
    *,
    cu_seqlens: Tensor | None = None,
    deterministic: bool = False,
    return_indices: bool = False,
    k_win: Tensor | None = None,
    v_win: Tensor | None = None,
    max_seqlen: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Differentiable NSA with the generated kernels (forward and backward).

    Same tensors and semantics as ``nsa_dsl.reference.nsa_attention``; ``ops_or_spec`` is an ``NSAOps``
    (``nsa_dsl.compile(spec)``), an ``NSASpec`` or a spec name. Gradients reach q, k, v, k_cmp, v_cmp and g
    (not the indices). ``deterministic=True``: bitwise-reproducible backward (the default already is).
    ``k_win``/``v_win``: the window branch's own K/V (the paper's separate per-branch projections; both or
    neither), differentiated too, in the same single op call. ``max_seqlen``: with ``cu_seqlens``, the
    longest sequence; then neither pass reads anything back from the device (see ``NSAOps.forward``).
    """
    ops = _as_ops(ops_or_spec)
    key = register_ops(ops)
    if k_win is not None or v_win is not None:
        from .ops import _window_kv

        k_win, v_win = _window_kv(k, v, k_win, v_win)
    out = torch.ops.nsa_dsl.nsa_fwd(
        q, k, v, k_cmp, v_cmp, g, cu_seqlens, key, bool(deterministic), k_win, v_win,
        None if max_seqlen is None else int(max_seqlen),
    )
    if return_indices:
        return out[0], out[7]
    return out[0]
