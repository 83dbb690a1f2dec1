"""The compiled op (pipeline step 6): ``nsa_dsl.compile(spec) -> NSAOps``.

``NSAOps`` composes the generated kernels into the reference's forward (``forward`` has the signature of
``nsa_dsl.reference.nsa_attention`` minus ``spec``). Each stage resolves its kernel's config per call shape:
an explicit ``config`` given to ``compile``/``with_config`` wins, else ``nsa_dsl.tuning.lookup`` (memory ->
user cache -> shipped -> None), else ``KernelDef.default`` for the device's architecture. Stage compositions
(``SCHEDULES``) resolve the same way: an explicit ``schedule`` > the tuner's ``"schedule.<name>"`` record >
``DEFAULT_SCHEDULE``. Plans are rendered, written and imported once (``loader.load``); later calls are
dictionary look-ups.

A stage whose kernel is not registered (yet) falls back to the reference implementation, with a warning
logged once per stage, so the op always works end to end.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..reference import check_max_seqlen
from ..spec import NSASpec
from .loader import load
from .plan import DeviceLimits, KernelPlan, all_kernels, make_plan

if TYPE_CHECKING:
    from ..cache import NSACache

__all__ = ["compile", "NSAOps", "STAGES", "SCHEDULES", "DEFAULT_SCHEDULE", "SCHEDULE_PREFIX"]

log = logging.getLogger("nsa_dsl.codegen.ops")

#: Stage name -> kernel name (the registry key whose emitted module's ``run`` implements it).
STAGES = {
    "cmp_fwd": "cmp_fwd",
    "select": "slc_topk",
    "slc_fwd": "slc_fwd",
    "win_fwd": "win_fwd",
    "combine": "combine_fwd",
}

#: Stage compositions the op can run (the tuner may compare them); first value = fallback order.
SCHEDULES = {"cmp_select": ("separate", "fused"), "combine": ("epilogue", "kernel")}
# cmp_fwd + slc_topk beat the fused kernel on H200 (26.4 vs 33.7 ms at 64k, paper spec; bench/RESULTS.md).
DEFAULT_SCHEDULE = {"cmp_select": "separate", "combine": "epilogue"}
#: Tuning-record name of a composition, e.g. ``"schedule.cmp_select"`` (see ``nsa_dsl.tuning.schedules``).
SCHEDULE_PREFIX = "schedule."

_WARNED: set[str] = set()


def _warn_once(stage: str, why: str) -> None:
    if stage not in _WARNED:
        _WARNED.add(stage)
        log.warning("stage %s: %s; using the PyTorch reference for it", stage, why)


def _lookup_tuned(spec: NSASpec, kernel: str, T: int, B: int, limits: DeviceLimits) -> dict | None:  # noqa: N803
    try:
        from .. import tuning  # type: ignore[attr-defined]
    except Exception:  # the tuner is optional here
        return None
    fn = getattr(tuning, "lookup", None)
    if fn is None:
        return None
    try:
        return fn(spec, kernel, T=T, B=B, limits=limits)
    except Exception as e:  # a broken record must not break the op
        log.warning("tuning.lookup(%s) failed: %s; using the default config", kernel, e)
        return None


def _bucket(T: int) -> int:  # noqa: N803
    """Config-resolution cache bucket: the next power of two (the tuner stores per-T-bucket records)."""
    return 1 << max(0, int(T - 1).bit_length())


#: Every live NSAOps by ``op_key`` (weak: an ops object no one holds is not kept alive by this).
_LIVE_OPS: weakref.WeakValueDictionary[str, NSAOps] = weakref.WeakValueDictionary()


def ops_by_key(key: str) -> NSAOps:
    """The live ``NSAOps`` whose ``op_key`` is ``key`` (KeyError if it was garbage-collected)."""
    return _LIVE_OPS[key]


@dataclasses.dataclass
class NSAOps:
    """Generated NSA forward for one spec on one device. Build with ``nsa_dsl.compile(spec)``.

    ``config``: kernel name -> params that override the defaults/tuned records for that kernel.
    ``use_tuned``: consult ``nsa_dsl.tuning.lookup`` (False: explicit config or the defaults only).
    ``schedule``: how stages are composed (see ``SCHEDULES``; a missing key takes the tuned
    ``"schedule.<name>"`` record for the call's shape, else ``DEFAULT_SCHEDULE``; see ``schedule_for``):
    ``cmp_select`` = "fused" (one kernel ``cmp_topk``: o_cmp, lse_cmp and indices) or "separate"
    (``cmp_fwd`` then ``slc_topk``); ``combine`` = "epilogue" (the gated sum written by the selection
    kernel's epilogue) or "kernel" (a separate ``combine_fwd`` pass).
    """

    spec: NSASpec
    limits: DeviceLimits
    config: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    use_tuned: bool = True
    schedule: dict[str, str] = dataclasses.field(default_factory=dict)
    _resolved: dict[tuple, KernelPlan] = dataclasses.field(default_factory=dict, repr=False)
    _schedules: dict[tuple, str] = dataclasses.field(default_factory=dict, repr=False)
    #: Key under which the differentiable op's custom ops find this object (``ops_by_key``); a plain string
    #: attribute, so that torch.compile reads it as a constant while tracing a first call.
    op_key: str = dataclasses.field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.op_key = f"nsa_ops_{id(self):x}"
        _LIVE_OPS[self.op_key] = self

    # ---- plans and modules --------------------------------------------------------------------------
    def has_kernel(self, kernel: str) -> bool:
        """True if ``kernel`` is registered and this spec uses it (e.g. ``win_fwd`` needs a window)."""
        kdef = all_kernels().get(kernel)
        return kdef is not None and kdef.is_enabled(self.spec)

    def config_for(self, kernel: str, *, T: int, B: int = 1) -> dict[str, Any]:  # noqa: N803
        """The config ``kernel`` runs with at this shape (explicit > tuned > default)."""
        return dict(self.plan(kernel, T=T, B=B).config)

    def plan(self, kernel: str, *, T: int, B: int = 1) -> KernelPlan:  # noqa: N803
        """The ``KernelPlan`` ``kernel`` runs with at shape (T, B): explicit config > tuned record
        (``nsa_dsl.tuning.lookup``; a record the generator rejects is logged and skipped) > default.
        Resolved once per (kernel, next power of two of T, B)."""
        ck = (kernel, _bucket(T), B)
        p = self._resolved.get(ck)
        if p is not None:
            return p
        cfg = self.config.get(kernel)
        if cfg is None and self.use_tuned:
            tuned = _lookup_tuned(self.spec, kernel, T, B, self.limits)
            if tuned is not None:
                try:
                    p = make_plan(self.spec, kernel, tuned, self.limits)
                except ValueError as e:  # a stale record (older generator) must not break the op
                    log.warning("tuned config for %s rejected (%s); using the default", kernel, e)
                else:
                    self._resolved[ck] = p
                    return p
        p = make_plan(self.spec, kernel, cfg, self.limits)
        self._resolved[ck] = p
        return p

    def module(self, kernel: str, *, T: int, B: int = 1) -> ModuleType:  # noqa: N803
        """The imported generated module for ``kernel`` at this shape."""
        return load(self.plan(kernel, T=T, B=B))

    def with_config(self, kernel: str, params: Mapping[str, Any]) -> NSAOps:
        """A copy whose ``kernel`` runs with ``params`` (validated now; other kernels unchanged)."""
        make_plan(self.spec, kernel, params, self.limits)  # validate early: one-line ValueError
        cfg = {k: dict(v) for k, v in self.config.items()}
        cfg[kernel] = dict(params)
        return NSAOps(
            spec=self.spec,
            limits=self.limits,
            config=cfg,
            use_tuned=self.use_tuned,
            schedule=dict(self.schedule),
        )

    def with_schedule(self, **choices: str) -> NSAOps:
        """A copy with some stage compositions changed, e.g. ``ops.with_schedule(cmp_select="separate")``."""
        for k, v in choices.items():
            if k not in SCHEDULES:
                raise ValueError(f"schedule.{k}: unknown stage composition (known: {', '.join(SCHEDULES)})")
            if v not in SCHEDULES[k]:
                raise ValueError(f"schedule.{k}: must be one of {', '.join(SCHEDULES[k])}, got {v!r}")
        cfg = {k: dict(v) for k, v in self.config.items()}
        return NSAOps(
            spec=self.spec,
            limits=self.limits,
            config=cfg,
            use_tuned=self.use_tuned,
            schedule={**self.schedule, **choices},
        )

    def schedule_for(self, name: str, *, T: int | None = None, B: int = 1) -> str:  # noqa: N803
        """The composition ``name`` (a key of ``SCHEDULES``) runs with at shape (T, B).

        Same order as kernel configs: an explicit choice (``schedule=`` / ``with_schedule``) wins, else the
        tuner's record ``"schedule.<name>"`` for this shape (``nsa_dsl.tuning.lookup``; only when ``T`` is
        given and ``use_tuned``), else ``DEFAULT_SCHEDULE[name]``. A record naming an unknown choice is
        ignored (logged).
        """
        if name not in SCHEDULES:
            raise ValueError(f"schedule.{name}: unknown stage composition (known: {', '.join(SCHEDULES)})")
        if name in self.schedule:
            return self.schedule[name]
        if T is None or not self.use_tuned:
            return DEFAULT_SCHEDULE[name]
        ck = (name, _bucket(T), B)
        choice = self._schedules.get(ck)
        if choice is None:
            choice = DEFAULT_SCHEDULE[name]
            rec = _lookup_tuned(self.spec, SCHEDULE_PREFIX + name, T, B, self.limits)
            if rec is not None:
                got = rec.get("choice") if isinstance(rec, Mapping) else None
                if got in SCHEDULES[name]:
                    choice = got
                else:
                    log.warning("tuned %s%s record %r ignored; using %r", SCHEDULE_PREFIX, name, rec, choice)
            self._schedules[ck] = choice
        return choice

    # ---- helpers --------------------------------------------------------------------------------
    def _shape(
        self, q: Tensor, cu_seqlens: Tensor | None, max_seqlen: int | None = None
    ) -> tuple[int, int]:
        """(longest sequence T, number of sequences B); with ``cu_seqlens`` and no ``max_seqlen`` this reads
        the lengths on the host (a device sync)."""
        if cu_seqlens is None:
            return int(q.shape[1]), int(q.shape[0])
        if max_seqlen is not None:
            return int(max_seqlen), int(cu_seqlens.numel()) - 1
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        return int(lens.max().item()) if lens.numel() else 0, int(lens.numel())

    def _cu_cmp(self, cu_seqlens: Tensor | None) -> Tensor | None:
        if cu_seqlens is None:
            return None
        from ..reference import compressed_cu_seqlens

        return compressed_cu_seqlens(cu_seqlens, self.spec)

    def _per_seq(
        self, fn: Callable[..., Any], cu_seqlens: Tensor | None, tensors: list, cmp_tensors: list
    ) -> Any:
        """Run a per-batch reference function once per packed sequence and concatenate (fallback path)."""
        if cu_seqlens is None:
            return fn(*tensors, *cmp_tensors)
        offs = [int(x) for x in cu_seqlens.tolist()]
        coffs = [int(x) for x in self._cu_cmp(cu_seqlens).tolist()]
        parts = []
        for s in range(len(offs) - 1):
            a, b, ca, cb = offs[s], offs[s + 1], coffs[s], coffs[s + 1]
            parts.append(fn(*[t[:, a:b] for t in tensors], *[t[:, ca:cb] for t in cmp_tensors]))
        if isinstance(parts[0], tuple):
            return tuple(torch.cat([p[i] for p in parts], 1) for i in range(len(parts[0])))
        return torch.cat(parts, 1)

    # ---- stages ---------------------------------------------------------------------------------
    def cmp_fwd(
        self, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Compressed attention: (o_cmp [B,T,Hq,dv] in q's dtype, lse_cmp [B,T,Hq] float32, +inf if none)."""
        T, B = self._shape(q, cu_seqlens, max_seqlen)  # noqa: N806
        if self.has_kernel("cmp_fwd"):
            return self.module("cmp_fwd", T=T, B=B).run(
                q, k_cmp, v_cmp, cu_seqlens=cu_seqlens, max_len=T if cu_seqlens is not None else None
            )
        _warn_once("cmp_fwd", "kernel cmp_fwd not registered")
        from ..reference import compressed_attention

        o, lse = self._per_seq(
            lambda a, b, c: compressed_attention(a, b, c, self.spec), cu_seqlens, [q], [k_cmp, v_cmp]
        )
        return o, lse.float()

    def select(
        self, q: Tensor, k_cmp: Tensor, lse_cmp: Tensor, cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        """Selection scoring + top-n: indices [B,T,Hkv,n] int32 (-1 for unused slots)."""
        T, B = self._shape(q, cu_seqlens, max_seqlen)  # noqa: N806
        if self.has_kernel("slc_topk"):
            return self.module("slc_topk", T=T, B=B).run(
                q, k_cmp, lse_cmp, cu_seqlens=cu_seqlens, max_len=T if cu_seqlens is not None else None
            )
        _warn_once("select", "kernel slc_topk not registered")
        from ..reference import compression_probs, select_blocks, selection_scores

        def f(qq: Tensor, kc: Tensor) -> Tensor:
            p = compression_probs(qq, kc, self.spec)
            return select_blocks(selection_scores(p, self.spec, qq.shape[1]), self.spec, qq.shape[1])

        return self._per_seq(f, cu_seqlens, [q], [k_cmp])

    def slc_fwd(
        self, q: Tensor, k: Tensor, v: Tensor, indices: Tensor, cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Selected attention: (o_slc, lse_slc)."""
        T, B = self._shape(q, cu_seqlens, max_seqlen)  # noqa: N806
        if self.has_kernel("slc_fwd"):
            return self.module("slc_fwd", T=T, B=B).run(q, k, v, indices, cu_seqlens=cu_seqlens)
        _warn_once("slc_fwd", "kernel slc_fwd not registered")
        from ..reference import selected_attention

        o, lse = self._per_seq(
            lambda a, b, c, d: selected_attention(a, b, c, d, self.spec), cu_seqlens, [q, k, v, indices], []
        )
        return o, lse.float()

    def win_fwd(
        self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sliding-window attention: (o_win, lse_win)."""
        T, B = self._shape(q, cu_seqlens, max_seqlen)  # noqa: N806
        if self.has_kernel("win_fwd"):
            return self.module("win_fwd", T=T, B=B).run(q, k, v, cu_seqlens=cu_seqlens)
        _warn_once("win_fwd", "kernel win_fwd not registered")
        from ..reference import window_attention

        o, lse = self._per_seq(
            lambda a, b, c: window_attention(a, b, c, self.spec), cu_seqlens, [q, k, v], []
        )
        return o, lse.float()

    def combine(self, o_cmp: Tensor, o_slc: Tensor, o_win: Tensor | None, g: Tensor) -> Tensor:
        """o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win (fp32 math, output in o_cmp's dtype)."""
        T, B = int(o_cmp.shape[1]), int(o_cmp.shape[0])  # noqa: N806
        if self.has_kernel("combine_fwd"):
            return self.module("combine_fwd", T=T, B=B).run(o_cmp, o_slc, o_win, g)
        gf = g.float()
        o = gf[..., 0:1] * o_cmp.float() + gf[..., 1:2] * o_slc.float()
        if o_win is not None and self.spec.window_size > 0:
            o = o + gf[..., 2:3] * o_win.float()
        return o.to(o_cmp.dtype)

    def cmp_select(
        self, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(o_cmp, lse_cmp, indices): fused ``cmp_topk`` or ``cmp_fwd`` + ``select``, per the schedule."""
        T, B = self._shape(q, cu_seqlens, max_seqlen)  # noqa: N806
        ml = T if cu_seqlens is not None else None
        if self.schedule_for("cmp_select", T=T, B=B) == "fused" and self.has_kernel("cmp_topk"):
            return self.module("cmp_topk", T=T, B=B).run(q, k_cmp, v_cmp, cu_seqlens=cu_seqlens, max_len=ml)
        o_cmp, lse_cmp = self.cmp_fwd(q, k_cmp, v_cmp, cu_seqlens, ml)
        return o_cmp, lse_cmp, self.select(q, k_cmp, lse_cmp, cu_seqlens, ml)

    # ---- the op ---------------------------------------------------------------------------------
    def forward_train(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cmp: Tensor,
        v_cmp: Tensor,
        g: Tensor,
        *,
        cu_seqlens: Tensor | None = None,
        k_win: Tensor | None = None,
        v_win: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[Tensor, dict[str, Tensor | None]]:
        """(o, saved): saved holds ``o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win, indices`` (window
        entries are None when the window is off). No autograd (see ``forward``).

        ``k_win``/``v_win``: the window branch's own K/V (the paper's separate per-branch projections; shapes
        of ``k``/``v``); default: ``k``/``v``, shared with selection. ``max_seqlen``: see ``forward``."""
        _check_inputs(self.spec, q, k, v, k_cmp, v_cmp, g, cu_seqlens, max_seqlen)
        k_win, v_win = _window_kv(k, v, k_win, v_win)
        T, B = self._shape(q, cu_seqlens, max_seqlen)  # noqa: N806
        ml = T if cu_seqlens is not None else None
        o_cmp, lse_cmp, indices = self.cmp_select(q, k_cmp, v_cmp, cu_seqlens, ml)
        o_win = lse_win = None
        if self.spec.window_size > 0:
            o_win, lse_win = self.win_fwd(q, k_win, v_win, cu_seqlens, ml)
        if self.schedule_for("combine", T=T, B=B) == "epilogue" and self.has_kernel("slc_fwd"):
            mod = self.module("slc_fwd", T=T, B=B)
            o_slc, lse_slc, o = mod.run(
                q, k, v, indices, cu_seqlens=cu_seqlens, gate=g, o_cmp=o_cmp, o_win=o_win
            )
        else:
            o_slc, lse_slc = self.slc_fwd(q, k, v, indices, cu_seqlens, ml)
            o = self.combine(o_cmp, o_slc, o_win, g)
        saved = {
            "o_cmp": o_cmp,
            "lse_cmp": lse_cmp,
            "o_slc": o_slc,
            "lse_slc": lse_slc,
            "o_win": o_win,
            "lse_win": lse_win,
            "indices": indices,
        }
        return o, saved

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cmp: Tensor,
        v_cmp: Tensor,
        g: Tensor,
        *,
        cu_seqlens: Tensor | None = None,
        return_indices: bool = False,
        k_win: Tensor | None = None,
        v_win: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """NSA forward with the reference's signature and semantics (``nsa_dsl.reference.nsa_attention``).

        q [B,T,Hq,dk], k [B,T,Hkv,dk], v [B,T,Hkv,dv], k_cmp/v_cmp [B,Tc,Hkv,dk|dv], g [B,T,Hq,3] (gates in
        [0, 1], order cmp, slc, win) -> o [B,T,Hq,dv] in q's dtype (and the selected blocks [B,T,Hkv,n] int32
        with ``return_indices``). ``cu_seqlens``: int32 [N+1] offsets of packed sequences (B = 1).
        ``k_win``/``v_win``: a separate K/V for the window branch (``reference.nsa_branches``'s arguments of
        the same names); default ``k``/``v``. ``max_seqlen``: with ``cu_seqlens``, the longest sequence's
        length (as flash-attn's ``max_seqlen``); given, the op reads nothing back from the device (no host
        sync, forward and backward) and trusts ``cu_seqlens`` (its values are not validated).

        Differentiable: when grad mode is on and an input requires grad, it runs as the custom op of
        ``nsa_dsl.codegen.autograd`` (generated backward kernels, torch.compile-friendly), one op call with
        or without a separate window K/V (which then gets its own gradients).
        """
        inputs = (q, k, v, k_cmp, v_cmp, g, k_win, v_win)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
            from .autograd import nsa_attention

            if self.spec.window_size == 0:
                k_win = v_win = None  # no window branch: its K/V are unused (and get no gradient)
            return nsa_attention(
                q, k, v, k_cmp, v_cmp, g, self, cu_seqlens=cu_seqlens, return_indices=return_indices,
                k_win=k_win, v_win=v_win, max_seqlen=max_seqlen,
            )
        o, saved = self.forward_train(
            q, k, v, k_cmp, v_cmp, g, cu_seqlens=cu_seqlens, k_win=k_win, v_win=v_win, max_seqlen=max_seqlen
        )
        if return_indices:
            return o, saved["indices"]  # type: ignore[return-value]
        return o

    __call__ = forward

    def decode(self, q: Tensor, cache: NSACache, g: Tensor, **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
        """One generation step over an ``nsa_dsl.NSACache`` (see ``nsa_dsl.codegen.decode.decode`` for the
        keyword options ``out``, ``splits``, ``plan_length``, ``return_indices``): q [B, S, Hq, dk] and
        g [B, S, Hq, 3] of the S newest tokens, whose K/V are already appended (``cache.append``)
        -> o [B, S, Hq, dv]. No host synchronisation (``decode.CapturedDecodeStep``: a CUDA-graph step)."""
        from .decode import decode

        return decode(self, q, cache, g, **kwargs)


def _window_kv(
    k: Tensor, v: Tensor, k_win: Tensor | None, v_win: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The window branch's (K, V): ``k_win``/``v_win`` (both or neither; same shape, dtype, device as
    ``k``/``v``) or ``k``/``v``."""
    if k_win is None and v_win is None:
        return k, v
    if k_win is None or v_win is None:
        raise ValueError("k_win/v_win: give both (the window branch's own K and V) or neither")
    for name, x, like in (("k_win", k_win, k), ("v_win", v_win, v)):
        ref_name = name[0]
        if not isinstance(x, Tensor) or tuple(x.shape) != tuple(like.shape):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected {ref_name}'s shape {tuple(like.shape)}, got {shape}")
        if x.dtype != like.dtype or x.device != like.device:
            raise ValueError(
                f"{name}: must have {ref_name}'s dtype and device ({like.dtype}, {like.device}), "
                f"got ({x.dtype}, {x.device})"
            )
    return k_win, v_win


def _check_inputs(spec: NSASpec, q, k, v, k_cmp, v_cmp, g, cu_seqlens, max_seqlen=None) -> None:
    """Shape/dtype/device checks (one-line ValueErrors naming the argument and the rule). With
    ``cu_seqlens`` and ``max_seqlen`` nothing is read back from the device: the offsets' values and the
    packed compressed length are not checked."""
    a = spec.attention
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cmp", k_cmp), ("v_cmp", v_cmp), ("g", g)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(
                f"{name}: expected a 4-D torch.Tensor, got {getattr(x, 'shape', type(x).__name__)}"
            )
        if x.device != q.device:
            raise ValueError(f"{name}: must be on q's device {q.device}, got {x.device}")
    B, T, Hq, dk = q.shape  # noqa: N806
    want = {
        "q": (B, T, a.heads, a.head_dim_qk),
        "k": (B, T, a.kv_heads, a.head_dim_qk),
        "v": (B, T, a.kv_heads, a.head_dim_v),
        "g": (B, T, a.heads, 3),
    }
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if tuple(x.shape) != want[name]:
            raise ValueError(f"{name}: expected shape {want[name]} (from spec and q), got {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: must have q's dtype {q.dtype}, got {x.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q: dtype must be float32, float16 or bfloat16, got {q.dtype}")
    if cu_seqlens is None:
        tc = spec.num_compressed(T)
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens: requires B = 1 (packed sequences), got B = {B}")
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise ValueError("cu_seqlens: expected a 1-D int32 tensor [N+1]")
        if max_seqlen is not None:
            check_max_seqlen(max_seqlen, T)
            tc = k_cmp.shape[1]  # trusted: reading the offsets would synchronise
        elif int(cu_seqlens[-1]) != T or int(cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens: must start at 0 and end at T = {T}")
        else:
            from ..reference import compressed_cu_seqlens

            tc = int(compressed_cu_seqlens(cu_seqlens, spec)[-1])
    if tuple(k_cmp.shape) != (B, tc, a.kv_heads, a.head_dim_qk):
        raise ValueError(
            f"k_cmp: expected shape {(B, tc, a.kv_heads, a.head_dim_qk)}, got {tuple(k_cmp.shape)}"
        )
    if tuple(v_cmp.shape) != (B, tc, a.kv_heads, a.head_dim_v):
        raise ValueError(
            f"v_cmp: expected shape {(B, tc, a.kv_heads, a.head_dim_v)}, got {tuple(v_cmp.shape)}"
        )


def compile(  # noqa: A001 - the public name the contract asks for
    spec: NSASpec | str,
    config: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    tune: bool = False,
    device: Any = None,
) -> NSAOps:
    """Build the generated NSA op for ``spec`` (an ``NSASpec``, a built-in name or a YAML path).

    ``config``: kernel name -> params overriding that kernel's config. ``tune=True`` runs the tuner
    (``nsa_dsl.tuning.tune``) for this spec and device first. ``device``: the CUDA device whose limits pick
    default configs (default: current; CPU -> the Triton interpreter).

    Returns an ``NSAOps``: ``forward`` (the reference's signature; differentiable), ``forward_train``,
    the stage entry points, ``decode``, ``with_config`` / ``with_schedule``. Kernels are generated, written
    to the cache (``NSA_DSL_CACHE_DIR``) and imported on first use per shape. Raises ``ValueError`` (one
    line naming the kernel and parameter) for a bad ``config``, ``SpecError`` for a bad spec.
    """
    if not isinstance(spec, NSASpec):
        from ..spec import load_spec

        spec = load_spec(spec)
    limits = DeviceLimits.detect(device)
    known = all_kernels()
    cfg: dict[str, dict[str, Any]] = {}
    for kname, params in (config or {}).items():
        if kname not in known:
            raise ValueError(f"config.{kname}: unknown kernel (registered: {', '.join(sorted(known))})")
        make_plan(spec, kname, params, limits)  # validates: one-line ValueError
        cfg[kname] = dict(params)
    ops = NSAOps(spec=spec, limits=limits, config=cfg)
    if tune:
        try:
            from ..tuning import tune as _tune  # type: ignore[attr-defined]
        except Exception as e:
            raise RuntimeError(f"tune: the tuner is not available ({e})") from None
        _tune(spec, limits=limits)
    return ops
