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
        self.stage = stage_of(kernel, self.kdef)
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

    # ---- inputs -----------------------------------------------------------------------------------------
    def _raw(self, T: int, B: int, seed: int) -> dict[str, Any]:  # noqa: N803
        import torch

        a, spec = self.spec.attention, self.spec
        g = torch.Generator(device=self.device).manual_seed(seed)
        tc = spec.num_compressed(T)

        def rnd(*shape: int) -> Any:
            return torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32).to(self.dtype)

        return {
            "q": rnd(B, T, a.heads, a.head_dim_qk),
            "k": rnd(B, T, a.kv_heads, a.head_dim_qk),
            "v": rnd(B, T, a.kv_heads, a.head_dim_v),
            "k_cmp": rnd(B, tc, a.kv_heads, a.head_dim_qk),
            "v_cmp": rnd(B, tc, a.kv_heads, a.head_dim_v),
            "g": torch.rand(B, T, a.heads, 3, generator=g, device=self.device).to(self.dtype),
            "o_cmp": rnd(B, T, a.heads, a.head_dim_v),
            "o_slc": rnd(B, T, a.heads, a.head_dim_v),
            "o_win": rnd(B, T, a.heads, a.head_dim_v),
        }

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
                idx = ref._indices_from_q(x["q"], x["k_cmp"], spec, spec.scale)
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


def default_target(
    spec: Any,
    kernel: str,
    *,
    T: int,
    B: int = 1,
    limits: Any = None,  # noqa: N803
    device: Any = None,
) -> KernelTarget:
    """The target ``tune_kernel`` uses unless told otherwise."""
    return KernelTarget(spec, kernel, T=T, B=B, limits=limits, device=device, n_inputs=2 if T >= 32768 else 3)
