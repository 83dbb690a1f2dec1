"""Shared benchmark helpers (forward, backward and decode benchmarks reuse these).

* ``env_info()``: card, versions, date (recorded with every result);
* ``bench_ms(fn)``: median milliseconds (``triton.testing.do_bench`` on CUDA, with a CPU fallback);
* ``matmul_tflops()``: the card's bf16 matmul rate measured now (the ceiling kernels are compared against);
* ``make_inputs(spec, T)``: random q, k, v, k_cmp, v_cmp, g for a spec;
* FLOP counts of each branch and of dense causal attention;
* ``sdpa_backends()`` / ``sdpa_dense(...)``: dense causal GQA attention through each torch SDPA backend;
* ``write_results(name, rows, meta)``: JSON + Markdown table under ``bench/results/``; ``plot_lines``: PNG.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------
# environment and timing
# ------------------------------------------------------------------------------------------------


def env_info() -> dict[str, Any]:
    """Card, driver-visible capability, library versions and the UTC date."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        info["triton"] = None
    try:
        import nsa_dsl

        info["nsa_dsl"] = nsa_dsl.__version__
    except Exception:  # pragma: no cover
        info["nsa_dsl"] = None
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "?")
    except Exception:
        info["fla"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            card=p.name,
            capability=f"{p.major}.{p.minor}",
            sm_count=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        info["card"] = "cpu"
    return info


def bench_ms(fn: Callable[[], Any], *, warmup: int = 25, rep: int = 100) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA: triton's do_bench, L2 flushed between runs)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def warm_on_side_stream(fn: Callable[[], Any], calls: int = 2) -> None:
    """``calls`` eager calls of ``fn`` on a side stream, then synchronise: the usual warm-up before a
    CUDA-graph capture (allocations and compilation happen outside it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def capture_graph(fn: Callable[[], Any], *, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph after ``warmup`` calls on a side stream (``warm_on_side_stream``)."""
    warm_on_side_stream(fn, warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """The card's dense matmul rate (n x n x n, ``dtype``) measured now, in TFLOP/s."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = bench_ms(lambda a=a, b=b: a @ b)
    free_memory()
    return 2 * n**3 / (ms * 1e-3) / 1e12


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12 if ms and ms > 0 and math.isfinite(ms) else float("nan")


# ------------------------------------------------------------------------------------------------
# inputs and FLOP counts
# ------------------------------------------------------------------------------------------------


def make_inputs(spec: Any, T: int, B: int = 1, *, device: str = "cuda", dtype: torch.dtype | None = None,  # noqa: N803
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Random q, k, v [B,T,H,D], k_cmp/v_cmp [B,Tc,Hkv,D] and gates g [B,T,Hq,3] in (0, 1)."""
    a = spec.attention
    dtype = dtype or getattr(torch, a.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    tc = spec.num_compressed(T)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    return {
        "q": r(B, T, a.heads, a.head_dim_qk),
        "k": r(B, T, a.kv_heads, a.head_dim_qk),
        "v": r(B, T, a.kv_heads, a.head_dim_v),
        "k_cmp": r(B, tc, a.kv_heads, a.head_dim_qk),
        "v_cmp": r(B, tc, a.kv_heads, a.head_dim_v),
        "g": torch.rand(B, T, a.heads, 3, generator=gen, device=device, dtype=torch.float32).to(dtype),
    }


def _per_key(spec: Any) -> int:
    a = spec.attention
    return 2 * a.heads * (a.head_dim_qk + a.head_dim_v)


def dense_causal_flop(spec: Any, T: int, B: int = 1) -> float:  # noqa: N803
    """QK^T + PV FLOPs of causal attention (keys visible per query summed exactly)."""
    return float(B * _per_key(spec) * T * (T + 1) / 2)


def window_flop(spec: Any, T: int, B: int = 1) -> float:  # noqa: N803
    w = spec.window_size
    if w == 0:
        return 0.0
    full = max(0, T - w)  # queries that see w keys
    head = T - full  # queries 0..min(T,w)-1 see t+1 keys
    return float(B * _per_key(spec) * (full * w + head * (head + 1) / 2))


def cmp_flop(spec: Any, T: int, B: int = 1) -> float:  # noqa: N803
    """Compressed attention: query t sees floor((t - l + 1)/d) + 1 blocks when t >= l - 1."""
    lc, d = spec.compression.block, spec.compression.stride
    t = torch.arange(T, dtype=torch.float64)
    vis = torch.where(t >= lc - 1, torch.floor((t - lc + 1) / d) + 1, torch.zeros_like(t))
    return float(B * _per_key(spec) * vis.sum().item())


def selection_flop(spec: Any, indices: torch.Tensor) -> float:
    """Exact keys attended per (token, KV head) from the indices, times G heads and 2(dk + dv)."""
    a, bs = spec.attention, spec.selection.block
    B, T = indices.shape[:2]  # noqa: N806
    t = torch.arange(T, device=indices.device).view(1, T, 1, 1)
    idx = indices.long()
    cnt = torch.where(idx >= 0, (t - idx * bs + 1).clamp(0, bs), torch.zeros_like(idx))
    return float(cnt.sum().item()) * spec.G * 2 * (a.head_dim_qk + a.head_dim_v)


# ------------------------------------------------------------------------------------------------
# dense baselines
# ------------------------------------------------------------------------------------------------


def sdpa_backends() -> dict[str, Any]:
    """name -> torch SDPBackend member (those this torch knows)."""
    from torch.nn.attention import SDPBackend

    out = {}
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        if hasattr(SDPBackend, name):
            out[name.lower().replace("_attention", "")] = getattr(SDPBackend, name)
    return out


def sdpa_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Any) -> Callable[[], torch.Tensor]:
    """A closure running dense causal GQA attention on [B,T,H,D] inputs through one SDPA backend.

    GQA through ``enable_gqa`` when this torch has it, else K/V repeated to the query heads (outside the
    timed closure)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) >= (2, 5):  # enable_gqa exists from torch 2.5
        kw: dict[str, Any] = {"enable_gqa": True}
    else:
        kt, vt = kt.repeat_interleave(g, 1), vt.repeat_interleave(g, 1)
        kw = {}

    def run() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **kw)

    return run


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            return "-"
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return "-" if x is None else str(x)


def markdown_table(rows: list[dict[str, Any]], columns: Iterable[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out) + "\n"


def write_results(name: str, rows: list[dict[str, Any]], meta: dict[str, Any],
                  tables: dict[str, tuple[list[dict[str, Any]], list[str] | None]] | None = None,
                  outdir: Path | None = None) -> dict[str, Path]:
    """Write ``{name}.json`` (meta + rows) and ``{name}.md`` (meta + one Markdown table per entry of
    ``tables``, or all rows) to ``outdir`` (default ``bench/results``). Returns the paths."""
    outdir = Path(outdir or RESULTS_DIR)
    outdir.mkdir(parents=True, exist_ok=True)
    jp, mp = outdir / f"{name}.json", outdir / f"{name}.md"
    jp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    lines = [f"# {name}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines.append("")
    for title, (trows, cols) in (tables or {"results": (rows, None)}).items():
        lines += [f"## {title}", "", markdown_table(trows, cols)]
    mp.write_text("\n".join(lines))
    return {"json": jp, "md": mp}


def plot_lines(path: Path, series: dict[str, list[tuple[float, float]]], *, title: str,
               xlabel: str = "T (tokens)", ylabel: str = "time (ms)") -> str | None:
    """Log-log line plot of name -> [(x, y)]; returns None on success or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib unavailable ({e.__class__.__name__}): plot skipped"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, pts in series.items():
        pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
        if pts:
            xs, ys = zip(*sorted(pts), strict=True)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
