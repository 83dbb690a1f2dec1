"""Tuning targets: how to compile, check and run one kernel of a spec at one shape.

A target has ``build(config) -> built`` (render + load the generated module; raises on compile errors),
``gate(built, config) -> str | None`` (run it on a small input and compare with ``nsa_dsl.reference``; a
reason string rejects the candidate) and ``candidate(built, config) -> Candidate`` (a ``run(i)`` over rotating
input sets at the tuning shape, for the timer).

``KernelTarget`` drives the generated module directly through ``make_plan`` + ``loader.load`` and the
emitted ``run`` launcher, whose signature is the stage's (``cmp_fwd``, ``slc_topk`` (select), ``slc_fwd``,
``win_fwd``, ``combine_fwd``, and the fused ``cmp_topk``). Kernels with another stage (backward, decode)
have no target yet: ``default_target`` raises ``NoTarget`` and the CLI skips them with a message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .timing import Candidate

__all__ = ["NoTarget", "KernelTarget", "default_target", "stage_of", "STAGE_OF_KERNEL"]

log = logging.getLogger("nsa_dsl.tuning.targets")

#: kernel name -> stage (the signature of the emitted module's ``run``)
STAGE_OF_KERNEL = {
    "cmp_fwd": "cmp_fwd",
    "slc_topk": "select",
    "cmp_topk": "cmp_topk",
    "slc_fwd": "slc_fwd",
    "win_fwd": "win_fwd",
    "combine_fwd": "combine",
}


class NoTarget(LookupError):
    """No tuning target exists for this kernel (yet)."""


def stage_of(kernel: str, kdef: Any = None) -> str | None:
    """The stage a kernel implements: the table above, else ``kdef.stage`` if the KernelDef has one, else a
    known stage name the kernel name starts with (e.g. ``slc_fwd_kvouter`` -> ``slc_fwd``)."""
    if kernel in STAGE_OF_KERNEL:
        return STAGE_OF_KERNEL[kernel]
    st = getattr(kdef, "stage", None)
    if st:
        return str(st)
    for k, v in STAGE_OF_KERNEL.items():
        if kernel.startswith(k + "_"):
            return v
    return None


def _torch_dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _gate_T(spec: Any, T: int) -> int:  # noqa: N802
    """A small gate length that still exercises every rule: more selection blocks than n, more tokens than w,
    a partial last block."""
    s = spec.selection
    want = (
        max((s.top_n + 3) * s.block, spec.window_size + 2 * s.block, 4 * spec.compression.block)
        + s.block // 2
    )
    return int(min(max(T, 1), want))


class KernelTarget:
    """Target for a registered forward kernel (see module doc).

    ``T``, ``B``: the tuning shape; ``n_inputs`` input sets are rotated while timing; ``gate_T`` (default: a
    small length covering every rule) is the correctness-gate input. On the Triton interpreter a bfloat16
    spec is gated in float32 (the interpreter's bf16 dot is broken).
    """

    def __init__(
        self,
        spec: Any,
        kernel: str,
        *,
        T: int,
        B: int = 1,
        limits: Any = None,
        device: Any = None,  # noqa: N803
        n_inputs: int = 3,
        gate_T: int | None = None,
        seed: int = 0,  # noqa: N803
        atol: float | None = None,
        rtol: float | None = None,
    ):
        import torch

        from ._compat import detect_limits, get_kernel_def

        self.spec, self.kernel, self.T, self.B = spec, kernel, int(T), int(B)
        self.kdef = get_kernel_def(kernel)
        self.stage = self._stage()
        if self.stage is None:
            raise NoTarget(
                f"kernel {kernel}: no tuning target for pass '{getattr(self.kdef, 'pass_', '?')}' yet"
            )
        self.limits = limits if limits is not None else detect_limits(device)
        interp = bool(getattr(self.limits, "interpreter", False)) or not torch.cuda.is_available()
        self.device = torch.device("cpu" if interp else (device or "cuda"))
        dt = spec.attention.dtype
        self.dtype = _torch_dtype("float32" if interp and dt == "bfloat16" else dt)
        low = self.dtype != torch.float32
        self.atol = atol if atol is not None else (3e-2 if low else 2e-3)
        self.rtol = rtol if rtol is not None else (3e-2 if low else 2e-3)
        self.n_inputs = max(1, int(n_inputs))
        self.gate_T = int(gate_T) if gate_T is not None else _gate_T(spec, self.T)
        self.seed = seed
        self._gate_data: dict[str, Any] | None = None
        self._bench: list[tuple] | None = None

    def _stage(self) -> str | None:
        return stage_of(self.kernel, self.kdef)

    # ---- inputs -----------------------------------------------------------------------------------------
    def _raw(self, T: int, B: int, seed: int) -> dict[str, Any]:  # noqa: N803
        import torch

        a, spec = self.spec.attention, self.spec
        g = torch.Generator(device=self.device).manual_seed(seed)
        tc = spec.num_compressed(T)

        def rnd(*shape: int) -> Any:
            return torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32).to(self.dtype)

        x = {
            "q": rnd(B, T, a.heads, a.head_dim_qk),
            "k": rnd(B, T, a.kv_heads, a.head_dim_qk),
            "v": rnd(B, T, a.kv_heads, a.head_dim_v),
            "k_cmp": rnd(B, tc, a.kv_heads, a.head_dim_qk),
            "v_cmp": rnd(B, tc, a.kv_heads, a.head_dim_v),
            "g": torch.rand(B, T, a.heads, 3, generator=g, device=self.device).to(self.dtype),
        }
        if self.stage in ("combine", "bwd"):  # branch outputs / an upstream gradient, only where used
            for name in ("o_cmp", "o_slc", "o_win"):
                x[name] = rnd(B, T, a.heads, a.head_dim_v)
        return x

    def _args(self, x: dict[str, Any], *, exact: bool) -> tuple:
        """Positional args of the stage's ``run`` for inputs ``x`` (adds lse_cmp / indices from the reference
        when ``exact`` or no default kernel is available, else from the default generated kernels)."""
        from nsa_dsl import reference as ref

        st, spec = self.stage, self.spec
        if st in ("cmp_fwd", "cmp_topk"):
            return (x["q"], x["k_cmp"], x["v_cmp"])
        if st == "win_fwd":
            return (x["q"], x["k"], x["v"])
        if st == "combine":
            return (x["o_cmp"], x["o_slc"], x["o_win"] if spec.window_size else None, x["g"])
        if st == "select":
            lse = None
            if not exact:
                lse = self._try_default("cmp_fwd", x["q"], x["k_cmp"], x["v_cmp"])
                lse = None if lse is None else lse[1]
            if lse is None:
                lse = ref.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], spec)[1].float()
            return (x["q"], x["k_cmp"], lse)
        if st == "slc_fwd":
            idx = None
            if not exact:
                lse = self._try_default("cmp_fwd", x["q"], x["k_cmp"], x["v_cmp"])
                if lse is not None:
                    idx = self._try_default("slc_topk", x["q"], x["k_cmp"], lse[1])
            if idx is None:
                idx = ref.selection_indices(x["q"], x["k_cmp"], spec)
            return (x["q"], x["k"], x["v"], idx.to(dtype=_int32()))
        raise NoTarget(f"kernel {self.kernel}: unknown stage {st!r}")

    def _try_default(self, kernel: str, *args: Any) -> Any:
        from ._compat import get_registry

        if kernel not in get_registry():
            return None
        try:
            return self._load(kernel, None).run(*args)
        except Exception as e:
            log.info("default %s unavailable for input preparation (%s); using the reference", kernel, e)
            return None

    def _load(self, kernel: str, config: dict[str, Any] | None) -> Any:
        from nsa_dsl.codegen.loader import load
        from nsa_dsl.codegen.plan import make_plan

        return load(make_plan(self.spec, kernel, config, self.limits))

    # ---- the target protocol -------------------------------------------------------------------------------
    def build(self, config: dict[str, Any]) -> Any:
        return self._load(self.kernel, config)

    def _gate_inputs(self) -> dict[str, Any]:
        if self._gate_data is None:
            x = self._raw(self.gate_T, 1, self.seed + 12345)
            args = self._args(x, exact=True)
            self._gate_data = {"x": x, "args": args, "expected": self._expected(x, args)}
        return self._gate_data

    def _expected(self, x: dict[str, Any], args: tuple) -> Any:
        from nsa_dsl import reference as ref

        spec, st = self.spec, self.stage
        d64 = {k: v.double() for k, v in x.items()}
        if st == "cmp_fwd":
            return ref.compressed_attention(d64["q"], d64["k_cmp"], d64["v_cmp"], spec)
        if st == "win_fwd":
            return ref.window_attention(d64["q"], d64["k"], d64["v"], spec)
        if st == "slc_fwd":
            return ref.selected_attention(d64["q"], d64["k"], d64["v"], args[3], spec)
        if st == "combine":
            gg = d64["g"]
            o = gg[..., 0:1] * d64["o_cmp"] + gg[..., 1:2] * d64["o_slc"]
            if spec.window_size:
                o = o + gg[..., 2:3] * d64["o_win"]
            return o
        if st in ("select", "cmp_topk"):
            p = ref.compression_probs(d64["q"], d64["k_cmp"], spec)
            T = x["q"].shape[1]  # noqa: N806
            scores = ref.selection_scores(p, spec, T)
            out = {"scores": scores, "indices": ref.select_blocks(scores, spec, T)}
            if st == "cmp_topk":
                out["cmp"] = ref.compressed_attention(d64["q"], d64["k_cmp"], d64["v_cmp"], spec)
            return out
        raise AssertionError(st)

    def gate(self, built: Any, config: dict[str, Any]) -> str | None:
        """Run on the small gate input; None if the output matches the reference, else why not."""
        import torch

        data = self._gate_inputs()
        out = built.run(*data["args"])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        exp = data["expected"]
        if self.stage == "select":
            return check_indices(out, exp["scores"], exp["indices"], self.spec, tol=self.atol)
        if self.stage == "cmp_topk":
            o_ref, lse_ref = exp["cmp"]
            return (
                _close("o", out[0], o_ref, self.atol, self.rtol)
                or _close_lse(out[1], lse_ref, self.atol, self.rtol)
                or check_indices(out[2], exp["scores"], exp["indices"], self.spec, tol=self.atol)
            )
        if self.stage == "combine":
            return _close("o", out, exp, self.atol, self.rtol)
        o, lse = out[0], out[1]
        return _close("o", o, exp[0], self.atol, self.rtol) or _close_lse(lse, exp[1], self.atol, self.rtol)

    def candidate(self, built: Any, config: dict[str, Any]) -> Candidate:
        if self._bench is None:
            self._bench = [
                self._args(self._raw(self.T, self.B, self.seed + 1 + i), exact=False)
                for i in range(self.n_inputs)
            ]
        sets = self._bench
        fn: Callable[..., Any] = built.run
        return Candidate(config=config, run=lambda i: fn(*sets[i % len(sets)]), n_inputs=len(sets))


def _int32() -> Any:
    import torch

    return torch.int32


def _close(name: str, got: Any, exp: Any, atol: float, rtol: float) -> str | None:
    import torch

    if tuple(got.shape) != tuple(exp.shape):
        return f"{name}: shape {tuple(got.shape)} != reference {tuple(exp.shape)}"
    g, e = got.double(), exp.double().to(got.device)
    bad = ~torch.isclose(g, e, atol=atol, rtol=rtol) | torch.isnan(g)
    if bool(bad.any()):
        n = int(bad.sum())
        err = float((g - e).abs().nan_to_num(float("inf")).max())
        return f"{name}: {n} of {g.numel()} elements differ from the reference (max abs error {err:.3g})"
    return None


def _close_lse(got: Any, exp: Any, atol: float, rtol: float) -> str | None:
    import torch

    g, e = got.double(), exp.double().to(got.device)
    if tuple(g.shape) != tuple(e.shape):
        return f"lse: shape {tuple(g.shape)} != reference {tuple(e.shape)}"
    inf_e, inf_g = torch.isinf(e), torch.isinf(g)
    if bool((inf_e != inf_g).any()):
        return f"lse: {int((inf_e != inf_g).sum())} rows differ in seeing no key (+inf)"
    fin = ~inf_e
    return _close("lse", g[fin], e[fin], atol, rtol)


def check_indices(got: Any, scores: Any, ref_idx: Any, spec: Any, *, tol: float) -> str | None:
    """Selected blocks are right if every row holds valid, distinct blocks, the forced ones, as many as
    the reference, and the sorted scores of the chosen non-forced blocks match the reference's (ties are
    legal)."""
    import torch

    if tuple(got.shape) != tuple(ref_idx.shape):
        return f"indices: shape {tuple(got.shape)} != reference {tuple(ref_idx.shape)}"
    got = got.long().to(scores.device)
    ref_idx = ref_idx.long()
    B, T, H, n = got.shape  # noqa: N806
    nslc = scores.shape[-1]
    s = spec.selection
    t_pos = torch.arange(T, device=got.device)[None, :, None, None]
    cur = torch.div(t_pos, s.block, rounding_mode="floor")
    if bool(((got < -1) | (got >= nslc)).any()):
        return "indices: out-of-range block index"
    used = got >= 0
    if bool((used & (got > cur)).any()):
        return "indices: a block after the query's current block was selected"
    if int(used.sum()) != int((ref_idx >= 0).sum()) or bool((used.sum(-1) != (ref_idx >= 0).sum(-1)).any()):
        return "indices: wrong number of selected blocks in some rows"
    srt, _ = torch.sort(torch.where(used, got, torch.full_like(got, -1 - nslc)), dim=-1)
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if bool(dup.any()):
        return "indices: duplicate block in a row"
    j = torch.arange(nslc, device=got.device)[None, None, None, :]
    forced = (j <= cur) & ((j < s.force_initial) | (j > cur - s.force_local))
    big = 1e6
    adj = torch.where(forced, torch.full_like(scores, big), scores)

    def chosen(idx: Any) -> Any:
        v = torch.gather(adj, -1, idx.clamp(min=0))
        v = torch.where(idx >= 0, v, torch.full_like(v, -big))
        return torch.sort(v, dim=-1, descending=True)[0]

    a, b = chosen(got), chosen(ref_idx)
    bad = (a - b).abs() > tol
    if bool(bad.any()):
        return f"indices: selected-block scores differ from the reference in {int(bad.any(-1).sum())} rows"
    return None


# ----------------------------------------------------------------------------------------------------------
# backward and decode kernels: built through NSAOps (the kernel under test replaced by the candidate)
# ----------------------------------------------------------------------------------------------------------


def _rel_close(name: str, got: Any, exp: Any, tol: float) -> str | None:
    """max |got - exp| <= tol * max |exp| (gradients: a scale-aware comparison)."""
    import torch

    g, e = got.double(), exp.double().to(got.device)
    if tuple(g.shape) != tuple(e.shape):
        return f"{name}: shape {tuple(g.shape)} != reference {tuple(e.shape)}"
    if not bool(torch.isfinite(g).all()):
        return f"{name}: non-finite values"
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = float((g - e).abs().max()) if e.numel() else 0.0
    if err > tol * max(scale, 1e-6):
        return f"{name}: max abs error {err:.3g} > {tol} x max |reference| {scale:.3g}"
    return None


class _OpsTarget(KernelTarget):
    """Shared part: inputs for the full op, an NSAOps whose kernel under test runs the candidate config."""

    def _stage(self) -> str | None:
        return str(getattr(self.kdef, "pass_", "?"))

    def _ops(self, config: dict[str, Any] | None) -> Any:
        from nsa_dsl.codegen.ops import NSAOps

        cfg = {} if config is None else {self.kernel: dict(config)}
        return NSAOps(spec=self.spec, limits=self.limits, config=cfg, use_tuned=False)


class BwdTarget(_OpsTarget):
    """A backward kernel (``bwd_pre``, ``bwd_cmp``, ``bwd_slc``, ``bwd_win``). The gate runs the whole
    backward (``nsa_dsl.codegen.autograd.nsa_backward``) with the candidate and compares all six gradients
    with autograd through the float64 reference; the timer times the candidate kernel alone, on inputs
    prepared by the default forward."""

    def __init__(self, spec: Any, kernel: str, **kw: Any):
        super().__init__(spec, kernel, **kw)
        self.grad_tol = 3e-2 if self.dtype != _torch_dtype("float32") else 1e-4

    def build(self, config: dict[str, Any]) -> Any:
        ops = self._ops(config)
        return ops, ops.module(self.kernel, T=self.T, B=self.B)

    def gate(self, built: Any, config: dict[str, Any]) -> str | None:
        import torch
        from nsa_dsl.codegen.autograd import nsa_backward

        from nsa_dsl import reference as ref

        if self._gate_data is None:
            x = self._raw(self.gate_T, 1, self.seed + 12345)
            do = x["o_win"]  # a random upstream gradient of o's shape
            leaves = {n: x[n].double().requires_grad_(True) for n in ("q", "k", "v", "k_cmp", "v_cmp", "g")}
            o = ref.nsa_attention(
                leaves["q"],
                leaves["k"],
                leaves["v"],
                leaves["k_cmp"],
                leaves["v_cmp"],
                leaves["g"],
                self.spec,
            )
            o.backward(do.double())
            self._gate_data = {"x": x, "do": do, "grads": {n: t.grad for n, t in leaves.items()}}
        data = self._gate_data
        x, ops = data["x"], built[0]
        args = (x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["g"])
        with torch.no_grad():
            _, saved = ops.forward_train(*args)
            grads = nsa_backward(ops, *args, data["do"], saved)
        for name, got in zip(("q", "k", "v", "k_cmp", "v_cmp", "g"), grads, strict=True):
            why = _rel_close(f"d{name}", got, data["grads"][name], self.grad_tol)
            if why:
                return why
        return None

    def _bench_sets(self) -> list[dict[str, Any]]:
        import torch

        if self._bench is None:
            sets = []
            ops = self._ops(None)
            for i in range(self.n_inputs):
                x = self._raw(self.T, self.B, self.seed + 1 + i)
                args = (x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["g"])
                with torch.no_grad():
                    _, saved = ops.forward_train(*args)
                do = x["o_win"]
                win_on = self.spec.window_size > 0
                pre = ops.module("bwd_pre", T=self.T, B=self.B)
                dg, delta = pre.run(
                    do, saved["o_cmp"], saved["o_slc"], saved["o_win"] if win_on else None, x["g"]
                )
                sets.append({"x": x, "do": do, "saved": saved, "delta": delta})
            self._bench = sets  # type: ignore[assignment]
        return self._bench  # type: ignore[return-value]

    def candidate(self, built: Any, config: dict[str, Any]) -> Candidate:
        import torch
        from nsa_dsl.codegen import reverse_index

        mod = built[1]
        f32 = torch.float32
        calls = []
        for s in self._bench_sets():
            x, do, sv, delta = s["x"], s["do"], s["saved"], s["delta"]
            q, k, v, kc, vc, g = x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["g"]
            T = self.T  # noqa: N806
            if self.kernel == "bwd_pre":
                o_win = sv["o_win"] if self.spec.window_size > 0 else None
                calls.append((mod.run, (do, sv["o_cmp"], sv["o_slc"], o_win, g), {}))
            elif self.kernel == "bwd_cmp":
                bufs = (
                    torch.empty(q.shape, device=q.device, dtype=f32),
                    torch.zeros(kc.shape, device=q.device, dtype=f32),
                    torch.zeros(vc.shape, device=q.device, dtype=f32),
                )
                calls.append(
                    (mod.run, (q, kc, vc, do, g, sv["lse_cmp"].float(), delta[0], *bufs), {"max_len": T})
                )
            elif self.kernel == "bwd_win":
                bufs = (
                    torch.zeros(q.shape, device=q.device, dtype=f32),
                    torch.zeros(k.shape, device=q.device, dtype=f32),
                    torch.zeros(v.shape, device=q.device, dtype=f32),
                )
                # DQ_CMP (not searched, but a default or a given config may have it): the window's dQ kernel
                # also takes the compressed branch's dQ
                fused = {"cmp": (kc, vc, sv["lse_cmp"].float(), delta[0])} if config.get("DQ_CMP", 0) else {}
                calls.append(
                    (
                        mod.run,
                        (q, k, v, do, g, sv["lse_win"].float(), delta[2], *bufs),
                        {"max_len": T, "accum_q": True, "accum_kv": True, **fused},
                    )
                )
            elif self.kernel == "bwd_slc":
                idx = sv["indices"].to(torch.int32).contiguous()
                hkv, n = self.spec.attention.kv_heads, self.spec.selection.top_n
                cu = torch.arange(self.B + 1, device=q.device, dtype=torch.int32) * T
                rev = reverse_index.build(
                    idx.view(self.B * T, hkv, n), cu, self.spec.selection.block, mod.CHUNK
                )
                bufs = (
                    torch.zeros(q.shape, device=q.device, dtype=f32),
                    torch.zeros(k.shape, device=q.device, dtype=f32),
                    torch.zeros(v.shape, device=q.device, dtype=f32),
                )
                calls.append(
                    (
                        mod.run,
                        (q, k, v, do, g, sv["lse_slc"].float(), delta[1], idx, rev, *bufs),
                        {"max_len": T, "accum_q": True},
                    )
                )
            else:
                raise NoTarget(f"kernel {self.kernel}: no backward timing recipe")

        def run(i: int) -> Any:
            fn, a, kw = calls[i % len(calls)]
            return fn(*a, **kw)

        return Candidate(config=config, run=run, n_inputs=len(calls))


class DecodeTarget(_OpsTarget):
    """The ``decode`` step: a cache prefilled with T tokens (B sequences), one new token per sequence. The
    gate compares ``ops.decode`` with ``nsa_dsl.cache.decode_reference`` at a small T; the timer
    times the step."""

    def _cache(self, T: int, seed: int) -> tuple[Any, Any, Any]:  # noqa: N803
        from nsa_dsl.cache import NSACache, mean_compressor

        x = self._raw(T, self.B, seed)
        cache = NSACache(
            self.spec,
            self.B,
            capacity=T + 16,
            device=self.device,
            dtype=self.dtype,
            compress_k=mean_compressor(self.spec),
            compress_v=mean_compressor(self.spec),
        )
        cache.prefill(x["k"], x["v"], k_cmp=x["k_cmp"], v_cmp=x["v_cmp"])
        return cache, x["q"][:, -1:].contiguous(), x["g"][:, -1:].contiguous()

    def build(self, config: dict[str, Any]) -> Any:
        ops = self._ops(config)
        ops.plan("decode", T=self.T, B=self.B)  # render + validate now (compile errors are failed trials)
        return ops

    def gate(self, built: Any, config: dict[str, Any]) -> str | None:
        from nsa_dsl.cache import decode_reference

        if self._gate_data is None:
            cache, q, g = self._cache(self.gate_T, self.seed + 12345)
            self._gate_data = {"cache": cache, "q": q, "g": g, "o": decode_reference(q, cache, g)}
        d = self._gate_data
        o = built.decode(d["q"], d["cache"], d["g"])
        return _close("o", o, d["o"], self.atol, self.rtol)

    def candidate(self, built: Any, config: dict[str, Any]) -> Candidate:
        if self._bench is None:
            self._bench = [self._cache(self.T, self.seed + 1 + i) for i in range(self.n_inputs)]  # type: ignore
        sets = self._bench
        return Candidate(
            config=config,
            run=lambda i: built.decode(
                sets[i % len(sets)][1], sets[i % len(sets)][0], sets[i % len(sets)][2]
            ),
            n_inputs=len(sets),
        )


def default_target(
    spec: Any,
    kernel: str,
    *,
    T: int,
    B: int = 1,
    limits: Any = None,  # noqa: N803
    device: Any = None,
) -> KernelTarget:
    """The target ``tune_kernel`` uses unless told otherwise (by the kernel's pass)."""
    from ._compat import get_kernel_def

    n_inputs = 2 if T * B >= 32768 else 3
    if kernel.startswith("schedule."):
        from .schedules import ScheduleTarget

        return ScheduleTarget(spec, kernel, T=T, B=B, limits=limits, device=device, n_inputs=n_inputs)
    kdef = get_kernel_def(kernel)
    kw = dict(T=T, B=B, limits=limits, device=device, n_inputs=n_inputs)
    p = getattr(kdef, "pass_", "fwd")
    if p == "bwd":
        if kernel not in ("bwd_pre", "bwd_cmp", "bwd_slc", "bwd_win"):
            raise NoTarget(f"kernel {kernel}: no tuning target for this backward kernel yet")
        return BwdTarget(spec, kernel, **kw)
    if p == "decode":
        if kernel != "decode":
            raise NoTarget(f"kernel {kernel}: no tuning target for this decode kernel yet")
        return DecodeTarget(spec, kernel, **kw)
    return KernelTarget(spec, kernel, **kw)
