"""Building blocks shared by the graph modules."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


# fp32 over bf16 weights (Proj.upcast) widens a weight this many bytes of fp32 at a time. Whole,
# GMR-7B's gate_up is a 543 MB fp32 copy per call, and oneDNN's reorder of that plain weight
# another as large: 1.1 GB of transients, each a block the kept heap (gmr_fast.memory) must find
# room for again on every call. 64 MiB leaves the GEMMs at least 4,096 outputs wide at GMR-3B's
# hidden size (2,048) and 4,681 at GMR-7B's (3,584).
UPCAST_CHUNK_BYTES = 64 << 20


def gated_mlp(gate_up: "Proj", down: "Proj", x, rows: int | None = None):
    """``down(silu(gate) * up)`` with ``gate, up = gate_up(x)``. With ``rows`` (the torch backend's CPU
    runs; exports never), gate_up's product and the activation run ``rows`` rows of x at a time
    into one [N, intermediate] activation, and ``down`` once over all of it: oneDNN's bf16 GEMM
    with 1 thread ran gate_up ([N, 2,048] x [2,048, 22,016], GMR-3B) at 1,050-1,190 GFLOP/s up to
    768 rows and 820-870 from 1,024 (the vision tower's [N, 1,280] x [1,280, 6,840]: 1,300-1,400 to
    512 rows, 1,050-1,090 from 2,048), while ``down`` runs faster the more rows it gets (DESIGN.md,
    "Row blocks for gate_up"). Each row's products are the same dot products as without ``rows``
    (in bf16 oneDNN may pick another kernel for another row count, which can round a sum
    differently, as another batch composition does), and the [N, 2 x intermediate] product never
    exists whole."""
    n = x.shape[0] if x.dim() == 2 else 0
    if not rows or n <= rows:
        gate, up = gate_up(x).chunk(2, dim=-1)
        return down(F.silu(gate) * up)
    act = None
    for start in range(0, n, rows):
        gate, up = gate_up(x[start:start + rows]).chunk(2, dim=-1)
        if act is None:
            act = gate.new_empty(n, gate.shape[-1])
        torch.mul(F.silu(gate), up, out=act[start:start + rows])
    return down(act)


class Proj(nn.Module):
    """``x @ weight (+ bias)`` with ``weight`` of shape [in, out]: a MatMul in the exported graph
    whose second operand is an initializer, which is what weight quantization rewrites."""

    def __init__(self, fan_in: int, fan_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_in, fan_out), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(fan_out), requires_grad=False) if bias else None
        # The torch backend turns this on: one F.linear (the bias added inside the GEMM, on its
        # fp32 accumulator) instead of a MatMul and an Add, which on the CPU is a second pass over
        # the output (measured at the vision tower's [5,840 x 1,280] x [1,280 x 6,840] in bf16 on
        # a Zen 5: 147 ms against 166). Exports keep MatMul + Add (the quantizer rewrites MatMuls).
        self.fused = False
        # The torch backend sets this on a CPU: the weight in oneDNN's own blocked layout, multiplied
        # by oneDNN's GEMM (``torch.ops.mkldnn._linear_pointwise``) without the reorder of a plain
        # weight on every call (gmr_fast.backends.torch).
        self.packed = None
        # The torch backend sets this to "onednn" or "linear" for fp32 arithmetic over bf16 weights
        # (an engine exported from a bf16 checkpoint, whose values bf16 holds exactly): each call
        # widens the weight to an fp32 [out, in] copy, freed after the GEMM, so the results are the
        # fp32 model's at bf16's weight memory. The copy is made UPCAST_CHUNK_BYTES of output rows
        # at a time (below). "split" (the torch backend's image batches under exact_images bf16-gemm
        # or bf16-vision) and "split3" (bf16x3): fp32 in and out over the packed bf16 weight, without
        # widening (_split).
        self.upcast = None
        # The torch backend sets this on a CPU with oneDNN's own bf16 GEMM (backends.bf16_gemm): the
        # weight packed by gmr_fast._dnnl, which writes fp32 results directly. "split" and "split3"
        # then take one and two bf16 GEMMs instead of two and three, and a bf16 projection sharing
        # the weight rounds its result to bf16 as torch's GEMM does. ``dnnl_bias``: the bias, fp32.
        self.dnnl = None
        self.dnnl_bias = None

    @property
    def compute_dtype(self):
        """The dtype this projection computes in (its input's)."""
        return torch.float32 if self.upcast else self.weight.dtype

    def _widened(self, x, rows: slice):
        """x times the fp32 copy of the weight's output rows ``rows`` (+ their bias)."""
        w = self.weight.t()[rows].float()  # [out, in] storage (gmr_fast.backends.torch): a contiguous copy
        b = None if self.bias is None else self.bias[rows]
        if self.upcast == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)

    def _split(self, x):
        """fp32 x times the bf16 weight, products on the bf16 hardware: x rounded to bf16 once,
        every output an fp32 sum, as oneDNN's bf16 "fpmath" mode computes it over a widened weight
        (backends.torch.Bf16Gemm). torch's bf16 GEMM rounds its output to bf16, so it runs twice on
        the packed weight: ``hi`` is the rounded sum, ``lo`` the sum minus ``hi`` rounded (oneDNN's
        "sub" post-op acts on the fp32 accumulator), and ``hi + lo`` the sum within 2^-16 of it
        (bf16 rounds to 2^-8, so lo's rounding is 2^-8 of 2^-8; fpmath's own rounding of x is 2^-8
        per element). Measured on an Intel Xeon with AMX, 2 threads, GMR-3B shapes (benchmarks/README.md,
        "Split products"): a decoder layer's projections 2.8x the widened fpmath GEMMs at 24 rows,
        1.2x at 512, 1.1x at 2,048 (a vision block's 0.94x there: the second GEMM and two passes
        over the output), and no second, plain copy of the weight in memory. "split3" (bf16x3) is
        1.8x the widened fp32 GEMMs per decoder layer at 512-2,048 rows."""
        xb = x.to(torch.bfloat16)
        hi = torch.ops.mkldnn._linear_pointwise(xb, self.packed, None, "none", [], "")
        lo = torch.ops.mkldnn._linear_pointwise.binary(xb, hi, self.packed, None, "sub")
        y = lo.float()
        y += hi
        if self.upcast == "split3":
            # fp32-accurate: x's own rounding taken back too, as a third GEMM on x - bf16(x) rounded
            # to bf16 (x within 2^-16 as hi + lo halves; that product is ~2^-8 of the sum, so its
            # output rounding is 2^-16 of it): the fp32 product within ~2^-15, no bf16 left in it
            rest = x - xb.float()
            y += torch.ops.mkldnn._linear_pointwise(rest.to(torch.bfloat16), self.packed, None, "none", [], "")
        if self.bias is not None:
            y += self.bias
        return y

    def _onednn(self, x):
        """``forward`` on gmr_fast._dnnl's packed weight: bf16 inputs, each output one fp32 sum
        (bias included), kept fp32 under "split" (x rounded to bf16 once, as Bf16Gemm defines the
        product), with x's rounding taken back by a second product under "split3" (fp32-accurate,
        as _split's), else rounded to bf16."""
        import torch

        n, lead = self.dnnl.out_features, x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xb = x2.to(torch.bfloat16).contiguous()
        fp32_out = self.upcast in ("split", "split3")
        y = torch.empty(x2.shape[0], n, dtype=torch.float32 if fp32_out else torch.bfloat16, device=x.device)
        words = (lambda t: t.view(torch.int16).numpy())  # noqa: E731  (numpy has no bfloat16)
        self.dnnl.multiply(words(xb), y.numpy() if fp32_out else words(y), self.dnnl_bias)
        if self.upcast == "split3":
            rest = (x2 - xb.float()).to(torch.bfloat16)
            self.dnnl.multiply(words(rest), y.numpy(), None, True)
        return y.reshape(*lead, n)

    def forward(self, x):
        if self.dnnl is not None:
            return self._onednn(x)
        if self.upcast in ("split", "split3"):
            return self._split(x)
        if self.upcast:
            out, fan_in = self.weight.shape[1], self.weight.shape[0]
            step = max(1, UPCAST_CHUNK_BYTES // (4 * fan_in))
            if out <= step:
                return self._widened(x, slice(None))
            # Output rows a chunk at a time into one result: the live fp32 copy (and oneDNN's
            # reorder of it) is one chunk's, not the whole weight's, and every output element is
            # still one fp32 dot product over the whole input.
            y = x.new_empty(*x.shape[:-1], out)
            for start in range(0, out, step):
                y[..., start:start + step] = self._widened(x, slice(start, start + step))
            return y
        if x.dtype != self.weight.dtype:  # an fp32 stream into bf16 weights (graphs.decoder, fp32_stream)
            x = x.to(self.weight.dtype)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.fused:
            return F.linear(x, self.weight.t(), self.bias)
        y = torch.matmul(x, self.weight)
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.Module):
    """As HuggingFace's Qwen2 RMSNorm: statistics in fp32, the result cast back before the scale."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps
        # The torch backend sets the weight in fp32 here: an fp32 input then takes one F.rms_norm
        # call, the same arithmetic (bit for bit on CPUs, where it runs these operations) and one
        # kernel on CUDA instead of six (graphs.decoder EAGER). Exports keep the operations.
        self.fused = None

    def forward(self, x):
        if self.fused is not None and x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.fused, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def make_norm(kind: str, size: int, eps: float) -> nn.Module:
    return RMSNorm(size, eps) if kind == "rms" else LayerNorm(size, eps)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def min_value(dtype) -> float:
    return torch.finfo(dtype).min
