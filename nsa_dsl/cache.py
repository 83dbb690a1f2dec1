"""The NSA KV cache for generation (``nsa_dsl.NSACache``), the PyTorch reference decode step, and
``NSAttention``'s cached forward.

One ``NSACache`` serves one attention layer and a batch of ``B`` sequences of different lengths:

* ``k``/``v`` [B, capacity, Hkv, dk/dv]: the selection branch's keys/values (preallocated, grown by
  ``grow_factor``); the window branch reads the last ``w`` tokens of the same buffers (a view), or of its
  own ``k_win``/``v_win`` when the layer has separate window projections (``separate_window``);
* ``k_cmp``/``v_cmp`` [B, capacity_cmp + 1, Hkv, dk/dv]: the compressed keys/values. Block i (tokens
  [i*d, i*d + l)) is written when it completes, by running the layer's compressor on exactly those l tokens,
  as prefill's compression does (the last row is a scratch row for writes of blocks that did not complete);
* ``k_src``/``v_src`` (``separate_source``): a ring buffer of the compressors' own input tokens (the layer's
  un-rotated K/V), only the last l + max_step - 1 of them, since completed blocks never change;
* ``lengths`` int32 [B] on the device (plus a host mirror, so no step ever synchronises with the GPU).

``prefill`` fills the cache from a full forward (right-padded batch with per-sequence lengths, or a varlen
pack); ``append`` adds S new tokens to every sequence (S = 1 for plain decoding, a few for speculative
decoding) at static shapes: every step is capturable in a CUDA graph as long as the capacity does not grow
(``nsa_dsl.codegen.decode.CapturedDecodeStep``). ``memory_per_token`` / ``memory_report`` account the bytes.

Compressors: whole-sequence callables ``f(x [N, L, Hkv, D]) -> [N, Tc(L), Hkv, D]`` (``nsa_dsl.Compressor``
modules, ``nsa_dsl.compress``; the mean by default for ``function: mean``), or a block compressor
``f(k_tokens, v_tokens, end_positions)`` such as ``NSAttention.compress_kv_block`` (which also applies RoPE
to k_cmp at the block's last token). ``NSACache.for_layer(layer, B, capacity)`` wires a layer's.

``decode_reference(q, cache, g)`` is the decode step in plain PyTorch (the generated kernels are tested
against it and against the full-sequence reference ``nsa_dsl.reference.nsa_attention``);
``forward_with_cache`` is ``NSAttention(...)(x, cache=cache)`` (prefill, then decode steps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .derived import derive
from .spec import NSASpec

__all__ = ["NSACache", "decode_reference", "forward_with_cache", "mean_compressor"]

log = logging.getLogger("nsa_dsl.cache")

Compressor = Callable[[Tensor], Tensor]
BlockCompressor = Callable[[Tensor, Tensor, Tensor], "tuple[Tensor, Tensor]"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def mean_compressor(spec: NSASpec) -> Compressor:
    """phi = mean over each compression block's l tokens: [N, L, H, D] -> [N, Tc(L), H, D]."""
    l, d = spec.compression.block, spec.compression.stride  # noqa: E741

    def f(x: Tensor) -> Tensor:
        tc = spec.num_compressed(x.shape[1])
        if tc == 0:
            return x.new_zeros(x.shape[0], 0, *x.shape[2:])
        blocks = x.unfold(1, l, d)  # [N, Tc, H, D, l]
        return blocks.float().mean(-1).to(x.dtype)

    return f


def _num_cmp(spec: NSASpec, n: int) -> int:
    return spec.num_compressed(n)


class NSACache:
    """Per-layer NSA KV cache for a batch of ``batch_size`` sequences (see the module docstring).

    Args:
        spec: the layer's spec (head counts, dims, block sizes).
        batch_size: B, the number of sequences decoded together.
        capacity: tokens preallocated per sequence (grows by ``grow_factor`` when exceeded; growth
            reallocates, so a CUDA-graph captured step needs enough capacity up front).
        device, dtype: of the cached tensors (default: CPU, the spec's dtype).
        compress_k, compress_v: whole-sequence compressors ``f(x [N, L, Hkv, D]) -> [N, Tc(L), Hkv, D]``
            (e.g. ``nsa_dsl.Compressor`` modules); default the mean when the spec's compression is ``mean``.
        compress_block: instead of compress_k/v, a block compressor ``f(k_tokens [N, l, Hkv, dk], v_tokens
            [N, l, Hkv, dv], end_positions [N]) -> (k_cmp [N, Hkv, dk], v_cmp [N, Hkv, dv])`` (e.g.
            ``NSAttention.compress_kv_block``, which also rotates k_cmp at the block's last token).
        separate_source: the compressors read their own tokens (the layer's un-rotated K/V, or separate
            compression projections) instead of the cached selection K/V; only the last
            ``l + max_step - 1`` of them are kept (a ring buffer).
        separate_window: the window branch has its own K/V (the paper's per-branch projections).
        max_step: the most tokens one ``append`` adds (sizes the compression-source ring buffer; grows).
    """

    def __init__(
        self,
        spec: NSASpec,
        batch_size: int,
        capacity: int = 1024,
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
        compress_k: Compressor | None = None,
        compress_v: Compressor | None = None,
        compress_block: BlockCompressor | None = None,
        separate_source: bool = False,
        separate_window: bool = False,
        max_step: int = 16,
        grow_factor: float = 2.0,
    ) -> None:
        if not isinstance(spec, NSASpec):
            raise TypeError(f"spec: must be an NSASpec, got {type(spec).__name__}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity: must be a positive integer, got {capacity!r}")
        if grow_factor <= 1.0:
            raise ValueError(f"grow_factor: must be > 1, got {grow_factor}")
        if not isinstance(max_step, int) or max_step <= 0:
            raise ValueError(f"max_step: must be a positive integer, got {max_step!r}")
        if compress_block is None:
            if compress_k is None or compress_v is None:
                if spec.compression.function != "mean":
                    raise ValueError(
                        f"compress_k/compress_v: required for compression.function = "
                        f"{spec.compression.function!r} (pass the layer's compressors, or use "
                        f"NSACache.for_layer)"
                    )
                compress_k = compress_k or mean_compressor(spec)
                compress_v = compress_v or mean_compressor(spec)
            compress_block = _block_compressor(compress_k, compress_v)
        self.spec = spec
        self.batch_size = batch_size
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda" and dev.index is None:  # tensors report "cuda:N": compare like with like
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.dtype = dtype or _DTYPES[spec.attention.dtype]
        self.compress_k, self.compress_v = compress_k, compress_v
        self.compress_block = compress_block
        self.separate_source = bool(separate_source)
        self.separate_window = bool(separate_window) and spec.window_size > 0
        self.grow_factor = float(grow_factor)
        self._workspace: dict[Any, Any] = {}  # scratch buffers of the decode kernels (codegen.decode)
        a = spec.attention
        self._hkv, self._dk, self._dv = a.kv_heads, a.head_dim_qk, a.head_dim_v
        self.capacity = 0
        self._alloc(capacity)
        self.ring = 0
        self._alloc_ring(max_step)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self._host_lengths = [0] * batch_size

    @classmethod
    def for_layer(
        cls, layer: Any, batch_size: int, capacity: int = 1024, *, device: Any = None,
        dtype: torch.dtype | None = None, max_step: int = 16,
    ) -> NSACache:
        """A cache for ``nsa_dsl.NSAttention`` ``layer``: its block compressor (RoPE on k_cmp), an
        un-rotated compression source, and separate window K/V when the layer has them. ``dtype`` default:
        the spec's dtype for the triton backend, else the layer's parameter dtype."""
        p = next(layer.parameters())
        if dtype is None:
            dtype = _DTYPES[layer.spec.attention.dtype] if layer.backend == "triton" else p.dtype
        return cls(
            layer.spec, batch_size, capacity, device=device if device is not None else p.device, dtype=dtype,
            compress_block=layer.compress_kv_block,
            separate_source=layer.rope_theta is not None or layer.separate_kv,
            separate_window=layer.separate_kv, max_step=max_step,
        )

    # ---- storage ------------------------------------------------------------------------------
    @property
    def capacity_cmp(self) -> int:
        """Compressed blocks preallocated per sequence (Tc(capacity))."""
        return _num_cmp(self.spec, self.capacity)

    def _buffers(self) -> dict[str, Tensor]:
        out = {"k": self.k, "v": self.v, "k_cmp": self.k_cmp_buf, "v_cmp": self.v_cmp_buf}
        if self.separate_window:
            out.update(k_win=self.k_win, v_win=self.v_win)
        if self.separate_source:
            out.update(k_src=self.k_src, v_src=self.v_src)
        return out

    def _alloc(self, capacity: int) -> None:
        B, H, dk, dv = self.batch_size, self._hkv, self._dk, self._dv  # noqa: N806
        tc = _num_cmp(self.spec, capacity) + 1  # + scratch row
        kw = {"device": self.device, "dtype": self.dtype}
        new = {
            "k": torch.zeros(B, capacity, H, dk, **kw),
            "v": torch.zeros(B, capacity, H, dv, **kw),
            "k_cmp_buf": torch.zeros(B, tc, H, dk, **kw),
            "v_cmp_buf": torch.zeros(B, tc, H, dv, **kw),
        }
        if self.separate_window:
            new["k_win"] = torch.zeros(B, capacity, H, dk, **kw)
            new["v_win"] = torch.zeros(B, capacity, H, dv, **kw)
        if self.capacity:
            n, nc = self.capacity, _num_cmp(self.spec, self.capacity)
            for name, t in new.items():
                t[:, : (nc if "cmp" in name else n)] = getattr(self, name)[:, : (nc if "cmp" in name else n)]
            log.info("NSACache: capacity %d -> %d tokens per sequence", self.capacity, capacity)
        for name, t in new.items():
            setattr(self, name, t)
        if not self.separate_window:
            self.k_win, self.v_win = self.k, self.v  # the window is a view of the raw K/V
        self.capacity = capacity
        self._workspace.clear()

    def _alloc_ring(self, max_step: int) -> None:
        """Compression-source ring buffer: the last l + max_step - 1 tokens (rounded up to a power of two)."""
        if not self.separate_source:
            return
        need = self.spec.compression.block + max_step - 1
        ring = 1 << (need - 1).bit_length()
        if ring <= self.ring:
            return
        B, H = self.batch_size, self._hkv  # noqa: N806
        kw = {"device": self.device, "dtype": self.dtype}
        k_src = torch.zeros(B, ring, H, self._dk, **kw)
        v_src = torch.zeros(B, ring, H, self._dv, **kw)
        if self.ring:  # re-place the kept tokens at their new ring slots
            for b, n in enumerate(self._host_lengths):
                pos = torch.arange(max(0, n - self.ring), n, device=self.device)
                k_src[b, pos % ring] = self.k_src[b, pos % self.ring]
                v_src[b, pos % ring] = self.v_src[b, pos % self.ring]
        self.k_src, self.v_src, self.ring = k_src, v_src, ring

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` tokens per sequence (reallocates: pointers change)."""
        if n_tokens > self.capacity:
            new = max(n_tokens, int(self.capacity * self.grow_factor))
            self._alloc(new)

    @property
    def k_cmp(self) -> Tensor:
        """Compressed keys [B, capacity_cmp, Hkv, dk] (rows >= Tc(length) of a sequence are not valid)."""
        return self.k_cmp_buf[:, : self.capacity_cmp]

    @property
    def v_cmp(self) -> Tensor:
        """Compressed values [B, capacity_cmp, Hkv, dv] (rows >= Tc(length) of a sequence are not valid)."""
        return self.v_cmp_buf[:, : self.capacity_cmp]

    @property
    def host_lengths(self) -> list[int]:
        """Per-sequence lengths as Python ints (kept on the host; no device sync)."""
        return list(self._host_lengths)

    @property
    def max_length(self) -> int:
        """The longest sequence's length in tokens (from the host copy; no device sync)."""
        return max(self._host_lengths)

    def window(self, b: int) -> tuple[Tensor, Tensor]:
        """The window branch's keys/values of sequence ``b`` (last w tokens; views of the cache)."""
        n, w = self._host_lengths[b], self.spec.window_size
        lo = max(0, n - w) if w else n
        return self.k_win[b, lo:n], self.v_win[b, lo:n]

    # ---- filling ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every sequence (keeps the buffers)."""
        self.lengths.zero_()
        self._host_lengths = [0] * self.batch_size

    def prefill(
        self,
        k: Tensor,
        v: Tensor,
        lengths: Sequence[int] | Tensor | None = None,
        *,
        k_cmp: Tensor | None = None,
        v_cmp: Tensor | None = None,
        k_src: Tensor | None = None,
        v_src: Tensor | None = None,
        k_win: Tensor | None = None,
        v_win: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> None:
        """Fill the cache from a full forward's K/V (replaces the contents).

        ``k`` [B, T, Hkv, dk], ``v`` [B, T, Hkv, dv] (selection K/V), right-padded; ``lengths`` (default all
        T) gives each sequence's real length. Or a varlen pack: [1, total, ...] tensors with ``cu_seqlens``
        int32 [B+1] (``k_cmp``/``v_cmp`` then packed at ``compressed_cu_seqlens``). ``k_cmp``/``v_cmp``
        [B, Tc(T), Hkv, ·]: the forward's compressed K/V (blocks that reach into padding are recomputed when
        they complete); default: computed here, block by block. ``k_src``/``v_src``: the compressors' input
        tokens (required with ``separate_source``); ``k_win``/``v_win``: the window K/V (required with
        ``separate_window``).
        """
        if self.separate_source and (k_src is None or v_src is None):
            raise ValueError("k_src/v_src: required (this cache keeps the compressors' own input tokens)")
        if self.separate_window and (k_win is None or v_win is None):
            raise ValueError("k_win/v_win: required (this cache keeps separate window K/V)")
        if cu_seqlens is not None:
            return self._prefill_varlen(k, v, k_cmp, v_cmp, k_src, v_src, k_win, v_win, cu_seqlens)
        self._check_kv("k", k, self._dk)
        self._check_kv("v", v, self._dv)
        B, T = k.shape[:2]  # noqa: N806
        if lengths is None:
            lens = [T] * B
        else:
            lens = [int(x) for x in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
            if len(lens) != B or any(n < 0 or n > T for n in lens):
                raise ValueError(f"lengths: expected {B} values in 0..{T}, got {lens}")
        self.reserve(T)
        self.k[:, :T] = k.to(self.dtype)
        self.v[:, :T] = v.to(self.dtype)
        if self.separate_window:
            self.k_win[:, :T] = k_win.to(self.dtype)
            self.v_win[:, :T] = v_win.to(self.dtype)
        if self.separate_source:
            pos = torch.arange(max(0, T - self.ring), T, device=self.device)
            self.k_src[:, pos % self.ring] = k_src[:, pos].to(self.dtype)
            self.v_src[:, pos % self.ring] = v_src[:, pos].to(self.dtype)
        tc = _num_cmp(self.spec, T)
        if tc:
            if k_cmp is None or v_cmp is None:
                with torch.no_grad():
                    k_cmp, v_cmp = self._compress_range(
                        k_src if self.separate_source else k, v_src if self.separate_source else v, tc
                    )
            for name, x, d in (("k_cmp", k_cmp, self._dk), ("v_cmp", v_cmp, self._dv)):
                if tuple(x.shape) != (B, tc, self._hkv, d):
                    raise ValueError(f"{name}: expected shape {(B, tc, self._hkv, d)}, got {tuple(x.shape)}")
            self.k_cmp_buf[:, :tc] = k_cmp.to(self.dtype)
            self.v_cmp_buf[:, :tc] = v_cmp.to(self.dtype)
        self._host_lengths = lens
        self.lengths.copy_(torch.tensor(lens, dtype=torch.int32))

    def _prefill_varlen(self, k, v, k_cmp, v_cmp, k_src, v_src, k_win, v_win, cu_seqlens) -> None:
        from .reference import compressed_cu_seqlens

        offs = [int(x) for x in cu_seqlens.tolist()]
        lens = [b - a for a, b in zip(offs[:-1], offs[1:], strict=True)]
        if len(lens) != self.batch_size:
            raise ValueError(f"cu_seqlens: expected {self.batch_size + 1} entries, got {len(offs)}")
        T = max(lens) if lens else 0  # noqa: N806

        def unpack(x: Tensor | None, cu: list[int], n: int) -> Tensor | None:
            if x is None:
                return None
            out = x.new_zeros(self.batch_size, n, *x.shape[2:])
            for i, (a, b) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
                out[i, : b - a] = x[0, a:b]
            return out

        tc_offs = None
        if k_cmp is not None and v_cmp is not None:
            tc_offs = [int(x) for x in compressed_cu_seqlens(cu_seqlens, self.spec).tolist()]
        tc = _num_cmp(self.spec, T)
        self.prefill(
            unpack(k, offs, T), unpack(v, offs, T), lens,
            k_cmp=unpack(k_cmp, tc_offs, tc) if tc_offs else None,
            v_cmp=unpack(v_cmp, tc_offs, tc) if tc_offs else None,
            k_src=unpack(k_src, offs, T), v_src=unpack(v_src, offs, T),
            k_win=unpack(k_win, offs, T), v_win=unpack(v_win, offs, T),
        )
        if self.separate_source:  # the ring holds each sequence's own last tokens
            for b, n in enumerate(lens):
                pos = torch.arange(max(0, n - self.ring), n, device=self.device)
                self.k_src[b, pos % self.ring] = k_src[0, offs[b] + pos].to(self.dtype)
                self.v_src[b, pos % self.ring] = v_src[0, offs[b] + pos].to(self.dtype)

    def _check_kv(self, name: str, x: Tensor, d: int, s: int | None = None) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, S, Hkv, D], got {getattr(x, 'shape', x)}")
        if x.shape[0] != self.batch_size or x.shape[2] != self._hkv or x.shape[3] != d:
            raise ValueError(
                f"{name}: expected shape [{self.batch_size}, S, {self._hkv}, {d}], got {tuple(x.shape)}"
            )
        if s is not None and x.shape[1] != s:
            raise ValueError(f"{name}: expected S = {s} new tokens, got {x.shape[1]}")
        if x.device != self.device:
            raise ValueError(f"{name}: must be on the cache's device {self.device}, got {x.device}")

    def append(
        self,
        k_new: Tensor,
        v_new: Tensor,
        *,
        k_src: Tensor | None = None,
        v_src: Tensor | None = None,
        k_win: Tensor | None = None,
        v_win: Tensor | None = None,
        compress: str = "auto",
    ) -> None:
        """Append S new tokens to every sequence: ``k_new`` [B, S, Hkv, dk], ``v_new`` [B, S, Hkv, dv]
        (plus ``k_src``/``v_src`` with ``separate_source`` and ``k_win``/``v_win`` with ``separate_window``).

        Writes land at each sequence's own length (device-side indices; no sync). Compressed blocks that
        complete (i*d + l in (L_old, L_new]) are computed from exactly their l source tokens. ``compress``:
        ``"auto"`` runs the compressor only when the host mirror says some block completes; ``"always"``
        runs it every step at a static shape (for CUDA-graph capture); ``"never"`` skips it.
        """
        if compress not in ("auto", "always", "never"):
            raise ValueError(f"compress: must be 'auto', 'always' or 'never', got {compress!r}")
        self._check_kv("k_new", k_new, self._dk)
        S = k_new.shape[1]  # noqa: N806
        self._check_kv("v_new", v_new, self._dv, S)
        extra = []
        if self.separate_source:
            if k_src is None or v_src is None:
                raise ValueError("k_src/v_src: required (this cache keeps the compressors' own input tokens)")
            self._check_kv("k_src", k_src, self._dk, S)
            self._check_kv("v_src", v_src, self._dv, S)
        if self.separate_window:
            if k_win is None or v_win is None:
                raise ValueError("k_win/v_win: required (this cache keeps separate window K/V)")
            self._check_kv("k_win", k_win, self._dk, S)
            self._check_kv("v_win", v_win, self._dv, S)
        self.reserve(self.max_length + S)
        if self.separate_window:
            extra = [(self.k_win, k_win), (self.v_win, v_win)]
        self._alloc_ring(S)
        B = self.batch_size  # noqa: N806
        old = self.lengths
        pos = old.long()[:, None] + torch.arange(S, device=self.device)[None, :]
        bi = torch.arange(B, device=self.device)[:, None].expand(B, S)
        for buf, x in [(self.k, k_new), (self.v, v_new), *extra]:
            buf[bi, pos] = x.to(self.dtype)
        if self.separate_source:
            self.k_src[bi, pos % self.ring] = k_src.to(self.dtype)
            self.v_src[bi, pos % self.ring] = v_src.to(self.dtype)
        new = old + S
        host_old = self._host_lengths
        self._host_lengths = [n + S for n in host_old]
        if compress == "always" or (compress == "auto" and any(self._completes(a, a + S) for a in host_old)):
            self._compress_new(old, new, S)
        self.lengths.copy_(new)

    def _completes(self, n_old: int, n_new: int) -> bool:
        return _num_cmp(self.spec, n_new) > _num_cmp(self.spec, n_old)

    def _gather_blocks(self, start: Tensor) -> tuple[Tensor, Tensor]:
        """Source tokens of the blocks starting at ``start`` [B, C]: [B*C, l, Hkv, dk], [B*C, l, Hkv, dv]."""
        l = self.spec.compression.block  # noqa: E741
        B, C = start.shape  # noqa: N806
        tok = start[:, :, None] + torch.arange(l, device=self.device)[None, None, :]  # [B, C, l]
        bi = torch.arange(B, device=self.device)[:, None, None].expand(B, C, l)
        if self.separate_source:
            kb, vb = self.k_src[bi, tok % self.ring], self.v_src[bi, tok % self.ring]
        else:
            kb, vb = self.k[bi, tok], self.v[bi, tok]
        return kb.reshape(B * C, l, self._hkv, self._dk), vb.reshape(B * C, l, self._hkv, self._dv)

    def _run_compressor(self, kb: Tensor, vb: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
        B, C = start.shape  # noqa: N806
        end = (start + self.spec.compression.block - 1).reshape(-1)
        kc, vc = self.compress_block(kb, vb, end)
        return kc.reshape(B, C, self._hkv, self._dk), vc.reshape(B, C, self._hkv, self._dv)

    def _compress_range(self, k: Tensor, v: Tensor, tc: int) -> tuple[Tensor, Tensor]:
        """Prefill: blocks 0..tc-1 of full source tensors k/v [B, T, ...], block by block."""
        l, d = self.spec.compression.block, self.spec.compression.stride  # noqa: E741
        B = k.shape[0]  # noqa: N806
        start = (torch.arange(tc, device=k.device) * d)[None, :].expand(B, tc)
        tok = start[:, :, None] + torch.arange(l, device=k.device)
        bi = torch.arange(B, device=k.device)[:, None, None]
        kb = k[bi, tok].reshape(B * tc, l, self._hkv, self._dk)
        vb = v[bi, tok].reshape(B * tc, l, self._hkv, self._dv)
        return self._run_compressor(kb, vb, start)

    @torch.no_grad()
    def _compress_new(self, old: Tensor, new: Tensor, S: int) -> None:  # noqa: N803
        """Compute the compressed blocks completing in (old, new] per sequence, static shapes."""
        l, d = self.spec.compression.block, self.spec.compression.stride  # noqa: E741
        B, dev = self.batch_size, self.device  # noqa: N806
        C = (S - 1) // d + 1  # noqa: N806 - most blocks S tokens can complete
        top = torch.div(new.long() - l, d, rounding_mode="floor")  # last complete block (may be < 0)
        cand = top[:, None] - torch.arange(C, device=dev)[None, :]  # [B, C]
        ok = (cand >= 0) & (cand * d + l > old.long()[:, None])
        start = cand.clamp(min=0) * d
        kb, vb = self._gather_blocks(start)
        kc, vc = self._run_compressor(kb, vb, start)
        dest = torch.where(ok, cand, torch.full_like(cand, self.capacity_cmp))  # scratch row if not complete
        bc = torch.arange(B, device=dev)[:, None].expand(B, C)
        self.k_cmp_buf[bc, dest] = kc.to(self.dtype)
        self.v_cmp_buf[bc, dest] = vc.to(self.dtype)

    # ---- memory -------------------------------------------------------------------------------
    def memory_per_token(self) -> float:
        """Bytes this layer's cache holds per token of one sequence: raw K/V (+ separate window K/V) +
        compressed K/V / d (the compression-source ring buffer is a constant, see ``memory_report``)."""
        e = torch.empty(0, dtype=self.dtype).element_size()
        raw = self._hkv * (self._dk + self._dv) * e
        return raw * ((2.0 if self.separate_window else 1.0) + 1.0 / self.spec.compression.stride)

    def memory_report(self) -> dict[str, Any]:
        """Allocated bytes per buffer, bytes per token (NSA vs a dense cache), capacity and lengths."""
        e = torch.empty(0, dtype=self.dtype).element_size()
        allocated = {n: t.numel() * t.element_size() for n, t in self._buffers().items()}
        ws = sum(
            t.numel() * t.element_size()
            for w in self._workspace.values()
            for t in (w.values() if isinstance(w, dict) else [])
            if isinstance(t, Tensor)
        )
        dense = self._hkv * (self._dk + self._dv) * e
        return {
            "batch_size": self.batch_size,
            "capacity": self.capacity,
            "capacity_cmp": self.capacity_cmp,
            "lengths": self.host_lengths,
            "dtype": str(self.dtype),
            "allocated_bytes": allocated,
            "workspace_bytes": ws,
            "total_bytes": sum(allocated.values()) + ws,
            "bytes_per_token": self.memory_per_token(),
            "dense_bytes_per_token": float(dense),
            "used_bytes": int(self.memory_per_token() * sum(self._host_lengths)),
            "window_bytes": allocated.get("k_win", 0) + allocated.get("v_win", 0),
        }

    def __repr__(self) -> str:
        return (
            f"NSACache(spec={self.spec.name!r}, B={self.batch_size}, capacity={self.capacity}, "
            f"lengths={self._host_lengths}, dtype={self.dtype}, device={self.device})"
        )


def _block_compressor(compress_k: Compressor, compress_v: Compressor) -> BlockCompressor:
    """Adapt whole-sequence compressors to the block interface (one block of l tokens -> one row)."""

    def f(kb: Tensor, vb: Tensor, end_positions: Tensor) -> tuple[Tensor, Tensor]:
        return compress_k(kb)[:, 0], compress_v(vb)[:, 0]

    return f


# ------------------------------------------------------------------------------------------------
# the reference decode step
# ------------------------------------------------------------------------------------------------


def _check_decode_inputs(q: Tensor, cache: NSACache, g: Tensor) -> tuple[int, int]:
    a = cache.spec.attention
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected a 4-D tensor [B, S, Hq, dk], got {getattr(q, 'shape', q)}")
    B, S = q.shape[:2]  # noqa: N806
    if tuple(q.shape) != (cache.batch_size, S, a.heads, a.head_dim_qk):
        raise ValueError(
            f"q: expected shape {(cache.batch_size, S, a.heads, a.head_dim_qk)}, got {tuple(q.shape)}"
        )
    if not isinstance(g, Tensor) or tuple(g.shape) != (B, S, a.heads, 3):
        raise ValueError(f"g: expected shape {(B, S, a.heads, 3)}, got {tuple(getattr(g, 'shape', ()))}")
    if q.device != cache.device or g.device != cache.device:
        raise ValueError(f"q/g: must be on the cache's device {cache.device}")
    if S == 0 or S > min(cache.host_lengths):
        raise ValueError(f"q: S = {S} new tokens must be in 1..min(lengths) = {min(cache.host_lengths)}")
    return B, S


def decode_reference(
    q: Tensor,
    cache: NSACache,
    g: Tensor,
    *,
    scale: float | None = None,
    indices: Tensor | None = None,
    details: dict[str, Any] | None = None,
) -> Tensor:
    """One decode step in plain PyTorch: the S newest tokens of every sequence attend to the cache.

    ``q`` [B, S, Hq, dk], ``g`` [B, S, Hq, 3]; query s of sequence b sits at position t = L_b - S + s
    (the new tokens' K/V must already be appended). Returns o [B, S, Hq, dv] in q's dtype (computed in
    float32, float64 for float64 inputs). Top-n ties go to the lower block index.
    ``indices`` [B, S, Hkv, n] (-1 = unused): attend to these selection blocks instead of the top-n (to check
    a kernel whose choice among near-equal scores differed). ``details``: a dict that receives ``scores``
    (per (b, s): group scores [Hkv, t // l' + 1], forced blocks +inf) and ``indices`` (the reference top-n).
    """
    B, S = _check_decode_inputs(q, cache, g)  # noqa: N806
    spec = cache.spec
    a, s_ = spec.attention, spec.selection
    G, H = spec.G, a.heads  # noqa: N806
    scale = spec.scale if scale is None else scale
    der = derive(spec)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lp, w, n_top = s_.block, spec.window_size, s_.top_n
    out = torch.zeros(B, S, H, a.head_dim_v, dtype=cdt, device=q.device)
    head_kv = torch.arange(H, device=q.device) // G

    def attend(qh: Tensor, kk: Tensor, vv: Tensor) -> tuple[Tensor, Tensor]:
        # qh [H, dk]; kk [H, n, dk] / vv [H, n, dv] -> (o [H, dv], p [H, n])
        if kk.shape[1] == 0:
            return qh.new_zeros(H, vv.shape[-1]), qh.new_zeros(H, 0)
        logits = torch.einsum("hd,hnd->hn", qh, kk) * scale
        p = torch.softmax(logits, -1)
        return torch.einsum("hn,hnd->hd", p, vv), p

    for b in range(B):
        L = cache.host_lengths[b]  # noqa: N806
        kb = cache.k[b, :L].to(cdt)  # [L, Hkv, dk]
        vb = cache.v[b, :L].to(cdt)
        kcb = cache.k_cmp_buf[b].to(cdt)
        vcb = cache.v_cmp_buf[b].to(cdt)
        for s in range(S):
            t = L - S + s
            qh = q[b, s].to(cdt)
            gs = g[b, s].to(cdt)
            # compressed branch
            nv = _num_cmp(spec, t + 1)
            kc = kcb[:nv, head_kv].transpose(0, 1)  # [H, nv, dk]
            vc = vcb[:nv, head_kv].transpose(0, 1)
            o_cmp, p_cmp = attend(qh, kc, vc)
            # selection scores -> top-n per KV head
            nb = t // lp + 1
            p_slc = qh.new_zeros(H, nb)
            for k_, wk in enumerate(der.overlap):
                ci = torch.arange(nb, device=q.device) * der.ratio + der.overlap_offset + k_
                ok = (ci >= 0) & (ci < nv)
                vals = p_cmp[:, ci.clamp(0, max(nv - 1, 0))] if nv else qh.new_zeros(H, nb)
                p_slc += wk * torch.where(ok[None, :], vals, torch.zeros_like(vals))
            grp = p_slc.view(a.kv_heads, G, nb).sum(1)  # [Hkv, nb]
            j = torch.arange(nb, device=q.device)
            forced = (j < s_.force_initial) | (j > t // lp - s_.force_local)
            grp = torch.where(forced[None, :], torch.full_like(grp, float("inf")), grp)
            order = torch.sort(grp, dim=1, descending=True, stable=True).indices[:, : min(n_top, nb)]
            if details is not None:
                details.setdefault("scores", {})[(b, s)] = grp
                details.setdefault("indices", {})[(b, s)] = order
            sel = torch.zeros(a.kv_heads, nb + 1, dtype=torch.bool, device=q.device)  # + a column for -1
            if indices is None:
                sel.scatter_(1, order, True)
            else:
                given = indices[b, s].long().to(q.device)
                sel.scatter_(1, torch.where((given >= 0) & (given < nb), given, nb), True)
            sel = sel[:, :nb]
            tok_blk = torch.arange(t + 1, device=q.device) // lp
            tok_mask = sel[:, tok_blk][head_kv]  # [H, t+1]
            kk = kb[: t + 1, head_kv].transpose(0, 1)
            vv = vb[: t + 1, head_kv].transpose(0, 1)
            logits = torch.einsum("hd,hnd->hn", qh, kk) * scale
            logits = logits.masked_fill(~tok_mask, float("-inf"))
            o_slc = torch.einsum("hn,hnd->hd", torch.softmax(logits, -1), vv)
            o = gs[:, 0:1] * o_cmp + gs[:, 1:2] * o_slc
            if w:
                lo = max(0, t - w + 1)
                kw = cache.k_win[b, lo : t + 1, head_kv].to(cdt).transpose(0, 1)
                vw = cache.v_win[b, lo : t + 1, head_kv].to(cdt).transpose(0, 1)
                o_win, _ = attend(qh, kw, vw)
                o = o + gs[:, 2:3] * o_win
            out[b, s] = o
    return out.to(q.dtype)


# ------------------------------------------------------------------------------------------------
# NSAttention with a cache
# ------------------------------------------------------------------------------------------------


def forward_with_cache(layer: Any, x: Tensor, cache: NSACache, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """``NSAttention(...)(x, cache=cache)``: prefill when the cache is empty, else a decode step.

    Prefill: x [B, T, hidden] (every sequence T tokens) or a varlen pack x [1, total, hidden] with
    ``cu_seqlens`` (B = cache.batch_size sequences of different lengths): the full forward's output, and
    the cache filled with its K/V, compression-source tokens and compressed K/V.
    Decode: x [B, S, hidden], the S next tokens of every sequence (positions = cached lengths + 0..S-1):
    projects, appends (compressing the blocks that complete), attends with ``decode_reference``
    (backend "reference") or the generated kernels (backend "triton"), and returns [B, S, hidden].
    """
    from .rope import sequence_positions

    if not isinstance(cache, NSACache):
        raise TypeError(f"cache: must be an NSACache (see NSACache.for_layer), got {type(cache).__name__}")
    if cache.spec != layer.spec:
        raise ValueError(f"cache: built for spec {cache.spec.name!r}, the layer has {layer.spec.name!r}")
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != layer.hidden_size:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected [B, T, hidden_size={layer.hidden_size}], got {shape}")
    B, T, _ = x.shape  # noqa: N806
    separate = layer.separate_kv and layer.spec.window_size > 0
    if (layer.rope_theta is not None or layer.separate_kv) and not cache.separate_source:
        raise ValueError("cache: the layer compresses un-rotated or separate K/V: use NSACache.for_layer")
    if separate and not cache.separate_window:
        raise ValueError("cache: this layer has separate window K/V: build it with NSACache.for_layer")
    if cache.max_length == 0:  # prefill
        if cu_seqlens is None and B != cache.batch_size:
            raise ValueError(f"x: expected batch {cache.batch_size} (the cache's), got {B}")
        positions = sequence_positions(T, cu_seqlens, device=x.device)
        p = layer.project(x, positions)
        k_cmp, v_cmp = layer.compress_kv(p["k_raw"], p["v_raw"], cu_seqlens=cu_seqlens)
        g = layer.gates(x)
        o = layer._attend(p, k_cmp, v_cmp, g, cu_seqlens)
        with torch.no_grad():
            cache.prefill(
                p["k"], p["v"], k_cmp=k_cmp, v_cmp=v_cmp, cu_seqlens=cu_seqlens,
                k_src=p["k_raw"] if cache.separate_source else None,
                v_src=p["v_raw"] if cache.separate_source else None,
                k_win=p["k_win"] if separate else None, v_win=p["v_win"] if separate else None,
            )
        return layer.o_proj(o.reshape(B, T, -1).to(x.dtype))
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens: only for the prefill call (decode steps take x [B, S, hidden])")
    if B != cache.batch_size:
        raise ValueError(f"x: expected batch {cache.batch_size} (the cache's), got {B}")
    positions = cache.lengths.long()[:, None] + torch.arange(T, device=x.device)[None, :]  # [B, S]
    p = layer.project(x, positions)
    with torch.no_grad():
        cache.append(
            p["k"], p["v"],
            k_src=p["k_raw"] if cache.separate_source else None,
            v_src=p["v_raw"] if cache.separate_source else None,
            k_win=p["k_win"] if separate else None, v_win=p["v_win"] if separate else None,
        )
    g = layer.gates(x)
    if layer.backend == "triton":
        o = layer._triton_op().decode(p["q"].to(cache.dtype), cache, g.to(cache.dtype))
    else:
        o = decode_reference(p["q"].to(cache.dtype), cache, g)
    return layer.o_proj(o.reshape(B, T, -1).to(x.dtype))
