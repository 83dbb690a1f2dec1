"""``NSAttention``: the NSA attention layer (projections, RoPE, compressors, gates, output projection).

Data flow for x [B, T, hidden] (positions restart at 0 in every varlen sequence):

1. q = RoPE(W_q x) [B, T, Hq, dk]; k = W_k x, v = W_v x [B, T, Hkv, dk|dv].
2. Selection and window branches use RoPE(k), v (with ``separate_kv=True`` each branch has its own W_k, W_v,
   as in the paper; otherwise one shared pair).
3. Compressed branch: k_cmp = RoPE_at(phi_K(k un-rotated), position of the block's last token i*d + l - 1),
   v_cmp = phi_V(v). Compressors see un-rotated keys (their intra-block position encoding supplies positions
   inside a block); rotating the compressed key at its block's last token makes q_t . k_cmp_i depend on the
   relative distance t - (i*d + l - 1) >= 0, like every other key. See SEMANTICS.md, "RoPE".
4. g = sigmoid(gate MLP(x)) [B, T, Hq, 3] in the order (cmp, slc, win).
5. o = NSA(q, k, v, k_cmp, v_cmp, g) via the backend, then W_o.

Backends: ``"reference"`` (``nsa_dsl.reference``, any dtype, exact) and ``"triton"`` (the generated kernels,
``nsa_dsl.compile(spec).forward``; inputs are cast to ``spec.attention.dtype`` and the output back).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from . import reference as ref
from .compression import Compressor, compressed_positions
from .rope import apply_rope, rope_cos_sin, sequence_positions
from .spec import NSASpec

__all__ = ["NSAttention"]

log = logging.getLogger("nsa_dsl.layer")

BACKENDS = ("reference", "triton")


class NSAttention(nn.Module):
    """Native Sparse Attention layer.

    Args:
        hidden_size: model width (input and output features).
        spec: the NSASpec (heads, head dims, block sizes, top-n, window, gate MLP width).
        separate_kv: independent K/V projections for the compressed, selection and window branches (the
            paper); default one shared K/V projection (the compressor still has its own phi). With the
            triton backend the window's K/V go to the same op call (``NSAOps.forward(..., k_win, v_win)``);
            under autograd that op runs its differentiable custom op twice (see ``NSAOps.forward``).
        rope_theta: RoPE base; None switches RoPE off.
        backend: ``"reference"`` or ``"triton"``.
        bias: biases in the q/k/v/o projections (the gate MLP always has biases).

    ``forward(x, *, cu_seqlens=None, max_seqlen=None, cache=None)``: x [B, T, hidden] -> [B, T, hidden].
    With ``cu_seqlens`` (int32 [N+1], B = 1) packed sequences are independent; adding ``max_seqlen`` (the
    longest sequence) makes the triton backend's forward and backward free of host syncs. With ``cache`` the
    call is delegated to ``_forward_with_cache`` (incremental decoding, see ``nsa_dsl.cache``).
    """

    def __init__(
        self,
        hidden_size: int,
        spec: NSASpec,
        *,
        separate_kv: bool = False,
        rope_theta: float | None = 10000.0,
        backend: str = "reference",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(spec, NSASpec):
            raise ValueError(f"spec: expected an NSASpec (see nsa_dsl.load_spec), got {type(spec).__name__}")
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size <= 0:
            raise ValueError(f"hidden_size: must be a positive integer, got {hidden_size!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
        a = spec.attention
        if rope_theta is not None:
            if not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
                raise ValueError(f"rope_theta: must be a positive number or None, got {rope_theta!r}")
            if a.head_dim_qk % 2:
                raise ValueError(f"attention.head_dim_qk: RoPE needs an even head dim, got {a.head_dim_qk}")
        self.spec = spec
        self.hidden_size = hidden_size
        self.separate_kv = bool(separate_kv)
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.backend = backend
        hq, hkv, dk, dv = a.heads, a.kv_heads, a.head_dim_qk, a.head_dim_v

        self.q_proj = nn.Linear(hidden_size, hq * dk, bias=bias)
        self.k_proj = nn.Linear(hidden_size, hkv * dk, bias=bias)  # selection (and window unless separate)
        self.v_proj = nn.Linear(hidden_size, hkv * dv, bias=bias)
        if self.separate_kv:
            self.k_cmp_proj = nn.Linear(hidden_size, hkv * dk, bias=bias)
            self.v_cmp_proj = nn.Linear(hidden_size, hkv * dv, bias=bias)
            if spec.window_size > 0:
                self.k_win_proj = nn.Linear(hidden_size, hkv * dk, bias=bias)
                self.v_win_proj = nn.Linear(hidden_size, hkv * dv, bias=bias)
        self.k_compressor = Compressor(spec, dk)
        self.v_compressor = Compressor(spec, dv)
        gh = spec.gates.hidden
        if gh:
            self.gate = nn.Sequential(nn.Linear(hidden_size, gh), nn.SiLU(), nn.Linear(gh, hq * 3))
        else:
            self.gate = nn.Sequential(nn.Linear(hidden_size, hq * 3))
        self.o_proj = nn.Linear(hq * dv, hidden_size, bias=bias)
        self._op_holder: list[Any] = []  # the compiled triton op (not a submodule, not in state_dict)

    # ---- pieces (also used by incremental decoding) ------------------------------------------------
    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """RoPE on x [B, T, H, D] at positions [T] or [B, T] (identity when rope_theta is None)."""
        if self.rope_theta is None:
            return x
        cos, sin = rope_cos_sin(positions, x.shape[-1], self.rope_theta, dtype=torch.float32)
        return apply_rope(x, cos, sin)

    def gates(self, x: Tensor) -> Tensor:
        """g [B, T, Hq, 3] = sigmoid(gate MLP(x)), order (cmp, slc, win)."""
        B, T, _ = x.shape  # noqa: N806
        return torch.sigmoid(self.gate(x)).view(B, T, self.spec.attention.heads, 3)

    def project(self, x: Tensor, positions: Tensor) -> dict[str, Tensor]:
        """Projections of x [B, T, hidden] at token positions [T] (or [B, T]).

        Returns ``q`` (rotated), ``k``/``v`` (selection; k rotated), ``k_win``/``v_win`` (window; the same
        tensors as k/v unless ``separate_kv``), ``k_raw``/``v_raw`` (un-rotated inputs of the compressors).
        """
        a = self.spec.attention
        B, T, _ = x.shape  # noqa: N806
        q = self.q_proj(x).view(B, T, a.heads, a.head_dim_qk)
        k = self.k_proj(x).view(B, T, a.kv_heads, a.head_dim_qk)
        v = self.v_proj(x).view(B, T, a.kv_heads, a.head_dim_v)
        out = {"q": self.rotate(q, positions)}
        k_rot = self.rotate(k, positions)
        out["k"], out["v"] = k_rot, v
        if self.separate_kv:
            out["k_raw"] = self.k_cmp_proj(x).view(B, T, a.kv_heads, a.head_dim_qk)
            out["v_raw"] = self.v_cmp_proj(x).view(B, T, a.kv_heads, a.head_dim_v)
            if self.spec.window_size > 0:
                kw = self.k_win_proj(x).view(B, T, a.kv_heads, a.head_dim_qk)
                out["k_win"] = self.rotate(kw, positions)
                out["v_win"] = self.v_win_proj(x).view(B, T, a.kv_heads, a.head_dim_v)
            else:
                out["k_win"], out["v_win"] = k_rot, v
        else:
            out["k_raw"], out["v_raw"] = k, v
            out["k_win"], out["v_win"] = k_rot, v
        return out

    def compress_kv(
        self,
        k_raw: Tensor,
        v_raw: Tensor,
        *,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(k_cmp, v_cmp) [B, Tc, Hkv, dk|dv] from un-rotated k/v [B, T, Hkv, .]; k_cmp is rotated at each
        block's last-token position (inside its sequence). With ``cu_seqlens`` and ``max_seqlen`` nothing is
        read back from the device and Tc = ``compressed_capacity(T, spec)`` (packed blocks, then zero rows;
        see ``nsa_dsl.compression.compress``)."""
        k_cmp = self.k_compressor(k_raw, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        v_cmp = self.v_compressor(v_raw, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if self.rope_theta is not None and k_cmp.shape[1] > 0:
            T = k_raw.shape[1]  # noqa: N806
            pos = compressed_positions(T, self.spec, cu_seqlens, max_seqlen=max_seqlen).to(k_raw.device)
            k_cmp = self.rotate(k_cmp, pos + (self.spec.compression.block - 1))
        return k_cmp, v_cmp

    def compress_kv_block(
        self, k_tokens: Tensor, v_tokens: Tensor, end_positions: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One compressed block per batch row, for decoding: k_tokens [B, l, Hkv, dk] and v_tokens
        [B, l, Hkv, dv] (un-rotated, exactly the block's tokens), ``end_positions`` [B] (position of the
        block's last token) -> (k_cmp [B, Hkv, dk] rotated like ``compress_kv``, v_cmp [B, Hkv, dv])."""
        kc = self.k_compressor.compress_block(k_tokens.transpose(1, 2))  # [B, Hkv, dk]
        vc = self.v_compressor.compress_block(v_tokens.transpose(1, 2))
        if self.rope_theta is not None:
            kc = self.rotate(kc[:, None], end_positions.reshape(-1, 1))[:, 0]
        return kc, vc

    # ---- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        *,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        cache: Any = None,
    ) -> Tensor:
        """x [B, T, hidden_size] -> [B, T, hidden_size].

        ``cu_seqlens``: int32 [N+1] offsets of packed sequences (B = 1; positions restart per sequence).
        ``max_seqlen``: with ``cu_seqlens``, the longest sequence's length (as flash-attn's and
        ``NSAOps.forward``'s ``max_seqlen``); given, the compression of K/V runs at static sizes
        (``compressed_capacity``) and, with backend "triton", neither the forward nor the backward reads
        anything back from the device (no host sync). The offsets are then trusted, not validated: a
        ``max_seqlen`` outside 0..T raises, one smaller than the longest sequence cannot be detected without
        a sync and gives undefined results. Backend "reference" loops over the sequences on the host (syncs).
        Ignored without ``cu_seqlens`` and with ``cache``.
        ``cache``: an ``nsa_dsl.NSACache`` built with ``NSACache.for_layer(self, B, capacity)``. On an empty
        cache the call is the prefill (x [B, T, hidden], or a varlen pack with ``cu_seqlens``) and fills it;
        afterwards x [B, S, hidden] holds the S next tokens of every sequence (one decode step; backend
        "triton" runs ``ops.decode``). Outputs equal ``forward`` on the whole sequence at those positions.
        """
        if cache is not None:
            return self._forward_with_cache(x, cache, cu_seqlens=cu_seqlens)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected [B, T, hidden_size={self.hidden_size}], got {shape}")
        B, T, _ = x.shape  # noqa: N806
        if cu_seqlens is None:
            max_seqlen = None
        elif max_seqlen is None:
            ref._check_cu_seqlens(cu_seqlens, x, "x")
        else:
            ref.check_cu_seqlens_static(cu_seqlens, x, "x")
            ref.check_max_seqlen(max_seqlen, T)
        positions = sequence_positions(T, cu_seqlens, device=x.device)
        p = self.project(x, positions)
        k_cmp, v_cmp = self.compress_kv(p["k_raw"], p["v_raw"], cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        g = self.gates(x)
        o = self._attend(p, k_cmp, v_cmp, g, cu_seqlens, max_seqlen)
        return self.o_proj(o.reshape(B, T, -1).to(x.dtype))

    def _attend(
        self,
        p: dict[str, Tensor],
        k_cmp: Tensor,
        v_cmp: Tensor,
        g: Tensor,
        cu_seqlens: Tensor | None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        spec = self.spec
        shared_win = p["k_win"] is p["k"]
        if self.backend == "reference":
            if max_seqlen is not None:  # static-size compressed K/V: keep the packed blocks (a host read)
                tc = int(ref.compressed_cu_seqlens(cu_seqlens, spec)[-1])
                k_cmp, v_cmp = k_cmp[:, :tc], v_cmp[:, :tc]
            if shared_win:
                return ref.nsa_attention(p["q"], p["k"], p["v"], k_cmp, v_cmp, g, spec, cu_seqlens=cu_seqlens)
            br = ref.nsa_branches(
                p["q"],
                p["k"],
                p["v"],
                k_cmp,
                v_cmp,
                spec,
                cu_seqlens=cu_seqlens,
                k_win=p["k_win"],
                v_win=p["v_win"],
            )
            return ref.combine_branches(br, g, spec)
        op = self._triton_op()
        dt = getattr(torch, spec.attention.dtype)
        q, k, v, kc, vc, gg = (t.to(dt) for t in (p["q"], p["k"], p["v"], k_cmp, v_cmp, g))
        if shared_win:
            return op.forward(q, k, v, kc, vc, gg, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        # One op call with the window's own K/V (under autograd the op composes two custom-op calls, see
        # NSAOps.forward).
        kw, vw = p["k_win"].to(dt), p["v_win"].to(dt)
        return op.forward(
            q, k, v, kc, vc, gg, cu_seqlens=cu_seqlens, k_win=kw, v_win=vw, max_seqlen=max_seqlen
        )

    def _triton_op(self) -> Any:
        if not self._op_holder:
            try:
                import nsa_dsl

                compile_fn = nsa_dsl.compile
            except (ImportError, AttributeError) as e:
                raise RuntimeError(
                    f"backend='triton': nsa_dsl.compile (the generated kernels) is not available: {e}"
                ) from e
            self._op_holder.append(compile_fn(self.spec))
        return self._op_holder[0]

    def _forward_with_cache(self, x: Tensor, cache: Any, *, cu_seqlens: Tensor | None = None) -> Tensor:
        """Incremental decoding / chunked prefill with an ``nsa_dsl.NSACache`` (implemented by the decode
        work; must produce the same outputs as ``forward`` on the whole sequence)."""
        from .cache import forward_with_cache

        return forward_with_cache(self, x, cache, cu_seqlens=cu_seqlens)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, spec={self.spec.name!r}, separate_kv={self.separate_kv}, "
            f"rope_theta={self.rope_theta}, backend={self.backend!r}"
        )
