"""Fused elementwise passes for the torch backend's CPU runs (``gmr_fast._kernels``,
csrc/host_kernels.hpp): RoPE of bf16 heads in place, RMSNorm of bf16 (the vision tower) or of an
fp32 stream into bf16 (the bf16 decoder), of a sum with the residual when given, each one pass
over memory where eager torch makes seven or eight, with torch's arithmetic (DESIGN.md "Decisions", "Fused
elementwise passes"). The graph modules call them through ``Kernels`` where the torch backend set
it (``VisionBlock.kernels``, ``DecoderLayer.kernels``); exports never do.

``load()`` returns a ``Kernels`` or None with the reason in ``unavailable()``: the module was not
built (no OpenMP at build time) or could not be loaded.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_state: dict = {}


class Kernels:
    """The passes on torch tensors (CPU, contiguous; bf16 passed as int16 words)."""

    def __init__(self, module):
        import torch

        self._m, self._torch = module, torch

    def rope_(self, t, cos, sin, blocks: int, head_dim: int, signed_sin: bool = False):
        """RoPE in place on the first ``blocks`` heads of each row of ``t`` (bf16 [..., width],
        contiguous); cos and sin fp32 [..., head_dim] with t's leading shape (``signed_sin``: sin's
        first half negated, graphs.decoder.eager_rope). Returns ``t``."""
        torch = self._torch
        if not t.is_contiguous():  # a reshape would copy, and the result would be lost
            raise ValueError("rope_: t must be contiguous")
        if cos.shape != sin.shape or tuple(t.shape[:cos.dim() - 1]) != tuple(cos.shape[:-1]):
            raise ValueError(f"rope_: cos and sin must be [{', '.join(map(str, t.shape[:cos.dim() - 1]))}, head_dim] "
                             f"for t of shape {tuple(t.shape)}, not {tuple(cos.shape)} and {tuple(sin.shape)}")
        lead = cos.shape[:-1].numel()
        self._m.rope(t.reshape(lead, -1).view(torch.int16).numpy(), cos.reshape(lead, -1).contiguous().numpy(),
                     sin.reshape(lead, -1).contiguous().numpy(), blocks, head_dim, signed_sin)
        return t

    def rope_qk_(self, qkv, cos, sin, heads: int, head_dim: int):
        """RoPE in place on the query and key heads of ``qkv`` (bf16 [N, 3 x heads x head_dim]); cos
        and sin fp32 [N, head_dim]. Returns ``qkv``."""
        return self.rope_(qkv, cos, sin, 2 * heads, head_dim)

    def rms_norm(self, x, weight, eps: float, residual=None):
        """bf16 RMSNorm of x [N, C] (HF's Qwen2 arithmetic). With ``residual``: (x + residual, its norm)."""
        torch = self._torch
        out = torch.empty_like(x)
        words = lambda t: t.view(torch.int16).numpy()  # noqa: E731
        if residual is None:
            self._m.rms_norm(words(x), None, None, words(out), words(weight), float(eps))
            return out
        total = torch.empty_like(x)
        self._m.rms_norm(words(x), words(residual), words(total), words(out), words(weight), float(eps))
        return total, out

    def norm_to_bf16(self, x, weight, eps: float, residual=None):
        """F.rms_norm of fp32 x [..., C] with the fp32 weight, rounded to bf16. With ``residual`` (bf16,
        x's shape): (x + residual in fp32, its norm in bf16)."""
        torch = self._torch
        c = x.shape[-1]
        x2 = x.reshape(-1, c)
        out = torch.empty(x2.shape, dtype=torch.bfloat16)
        words = lambda t: t.view(torch.int16).numpy()  # noqa: E731
        if residual is None:
            self._m.rms_norm_f32(x2.numpy(), None, None, words(out), weight.numpy(), float(eps))
            return out.reshape(x.shape)
        total = torch.empty(x2.shape, dtype=torch.float32)
        self._m.rms_norm_f32(x2.numpy(), words(residual.reshape(-1, c)), total.numpy(), words(out), weight.numpy(),
                             float(eps))
        return total.reshape(x.shape), out.reshape(x.shape)


def load() -> Kernels | None:
    """The passes ready to use, or None (``unavailable()`` says why). torch is imported first, so
    that the module binds to torch's OpenMP runtime."""
    with _lock:
        if "kernels" in _state:
            return _state["kernels"]
        kernels, why = None, None
        try:
            import torch  # noqa: F401  (its libgomp first)

            from .. import _kernels
            kernels = Kernels(_kernels)
        except ImportError as e:
            why = f"gmr_fast._kernels could not be loaded ({e}); it is built where OpenMP is present"
        _state.update(kernels=kernels, why=why)
        return kernels


def unavailable() -> str | None:
    load()
    return _state["why"]
