"""Stage compositions as tunable choices: ``schedule.cmp_select`` (one fused ``cmp_topk`` kernel vs
``cmp_fwd`` + ``slc_topk``) and ``schedule.combine`` (gated sum in the selection kernel's epilogue vs a
separate ``combine_fwd`` pass), from ``nsa_dsl.codegen.ops.SCHEDULES``.

Each is a pseudo-kernel with the KernelDef interface (space ``{"choice": [...]}``, default from
``DEFAULT_SCHEDULE``) so that the search, the cache and ``lookup`` treat it like any kernel:
``lookup(spec, "schedule.cmp_select", T=..., B=..., limits=...) -> {"choice": "fused"} | None``. Its target
times the whole forward (``NSAOps.forward``) with the choice applied and gates it against
``nsa_dsl.reference.nsa_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .timing import Candidate

__all__ = ["ScheduleDef", "schedule_defs", "ScheduleTarget", "PREFIX"]

PREFIX = "schedule."


@dataclass(frozen=True)
class ScheduleDef:
    name: str  # "schedule.<stage composition>"
    choices: tuple[str, ...]
    default_choice: str
    pass_: str = "fwd"
    template: str = ""

    @property
    def composition(self) -> str:
        return self.name[len(PREFIX) :]

    def space(self, spec: Any, limits: Any) -> dict[str, list[Any]]:
        return {"choice": list(self.choices)}

    def check(self, spec: Any, config: dict[str, Any], limits: Any) -> str | None:
        c = config.get("choice")
        if c not in self.choices:
            return f"choice: must be one of {', '.join(self.choices)}, got {c!r}"
        return None

    def default(self, spec: Any, limits: Any) -> dict[str, Any]:
        return {"choice": self.default_choice}

    def is_enabled(self, spec: Any) -> bool:
        return True


def schedule_defs() -> dict[str, ScheduleDef]:
    """The tunable stage compositions the generator offers (empty if it offers none)."""
    try:
        from nsa_dsl.codegen.ops import DEFAULT_SCHEDULE, SCHEDULES
    except ImportError:
        return {}
    return {
        PREFIX + k: ScheduleDef(PREFIX + k, tuple(v), DEFAULT_SCHEDULE[k])
        for k, v in SCHEDULES.items()
        if k in DEFAULT_SCHEDULE
    }


class ScheduleTarget:
    """Whole-forward target for one stage composition (see module doc)."""

    def __init__(
        self,
        spec: Any,
        kernel: str,
        *,
        T: int,
        B: int = 1,
        limits: Any = None,  # noqa: N803
        device: Any = None,
        n_inputs: int = 2,
        seed: int = 0,
    ):
        from .targets import KernelTarget

        self.kernel = kernel
        self.composition = kernel[len(PREFIX) :]
        # Reuse KernelTarget's input generation and tolerances (a stage target of the combine kernel).
        self._inp = KernelTarget(
            spec, "combine_fwd", T=T, B=B, limits=limits, device=device, n_inputs=n_inputs, seed=seed
        )
        self.spec, self.T, self.B = spec, T, B
        self._gate: dict[str, Any] | None = None
        self._bench: list[tuple] | None = None

    def build(self, config: dict[str, Any]) -> Any:
        from nsa_dsl.codegen.ops import NSAOps

        ops = NSAOps(spec=self.spec, limits=self._inp.limits, schedule={self.composition: config["choice"]})
        return ops

    def _args(self, T: int, B: int, seed: int) -> tuple:  # noqa: N803
        x = self._inp._raw(T, B, seed)
        return (x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["g"])

    def gate(self, built: Any, config: dict[str, Any]) -> str | None:
        import torch

        from nsa_dsl import reference as ref

        from .targets import _close

        if self._gate is None:
            args = self._args(self._inp.gate_T, 1, self._inp.seed + 12345)
            exp = ref.nsa_attention(*(a.double() for a in args), self.spec)
            self._gate = {"args": args, "o": exp}
        with torch.no_grad():
            o = built.forward(*self._gate["args"])
        return _close("o", o, self._gate["o"], self._inp.atol, self._inp.rtol)

    def candidate(self, built: Any, config: dict[str, Any]) -> Candidate:
        import torch

        if self._bench is None:
            self._bench = [
                self._args(self.T, self.B, self._inp.seed + 1 + i) for i in range(self._inp.n_inputs)
            ]
        sets = self._bench

        def run(i: int) -> Any:
            with torch.no_grad():
                return built.forward(*sets[i % len(sets)])

        return Candidate(config=config, run=run, n_inputs=len(sets))
