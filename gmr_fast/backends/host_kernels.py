"""Fused elementwise passes for the torch backend's CPU runs (``gmr_fast._kernels``,
csrc/host_kernels.hpp): RoPE of a bf16 qkv product in place and bf16 RMSNorm (of a sum with the
residual when given), each one pass over memory where eager torch makes seven or eight, with
torch's arithmetic (DESIGN.md "Decisions", "Fused
elementwise passes"). The graph modules call them through ``Kernels`` where the torch backend set
it (``VisionBlock.kernels``); exports never do.

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

    def rope_qk_(self, qkv, cos, sin, heads: int, head_dim: int):
        """RoPE in place on the query and key heads of ``qkv`` (bf16 [N, 3 x heads x head_dim]); cos
        and sin fp32 [N, head_dim]. Returns ``qkv``."""
        self._m.rope_qk(qkv.view(self._torch.int16).numpy(), cos.contiguous().numpy(), sin.contiguous().numpy(),
                        heads, head_dim)
        return qkv

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
