"""The vision graph: patches + grid-derived index tensors -> image embeddings for the decoder.

Inputs   pixel_values float32 [N, patch_dim], rot_pos_ids int64 [N, 2], full_gather int64 [S, Lf],
         full_valid bool [S, Lf], full_inverse int64 [N]; windowed towers (Qwen2.5-VL) add
         window_index int64 [N / merge^2], window_reverse int64 [N / merge^2], window_gather int64
         [W, Lw], window_valid bool [W, Lw], window_inverse int64 [N] (gmr_fast.vision_layout).
Output   image_embeds float32 [N / merge^2, H]: merged patch embeddings, images in input order.

One module serves the Qwen-VL towers; a family picks its norms, MLP and windowing
(``VisionDims``). Attention is computed on a padded [segments, longest] layout with a key mask,
so full-attention blocks cost images x longest_image^2 and windowed blocks windows x 64^2, and
nothing depends on Python-side splitting (dynamic sizes export). Full-attention blocks process
their heads in groups so that at most ``heads / head_groups`` score matrices are alive at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..vision_layout import COMMON_INPUTS, WINDOW_INPUTS
from .common import Proj, RMSNorm, gated_mlp, make_norm, min_value, rotate_half

OUTPUT_NAMES = ["image_embeds"]


@dataclass(frozen=True)
class VisionDims:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_dim: int
    merge_size: int
    norm: str  # "rms" | "layer"
    mlp: str  # "swiglu" | "quick_gelu"
    full_blocks: tuple[int, ...]  # blocks attending over whole images; the others attend per window
    windowed: bool
    rope_theta: float = 10000.0
    eps: float = 1e-6
    head_groups: int = 4  # full-attention heads processed in this many sequential groups

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def full_head_groups(self) -> int:
        """The largest divisor of num_heads that is <= head_groups."""
        return max(g for g in range(1, min(self.head_groups, self.num_heads) + 1) if self.num_heads % g == 0)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionDims":
        return cls(**{**d, "full_blocks": tuple(d["full_blocks"])})


class VisionBlock(nn.Module):
    def __init__(self, d: VisionDims):
        super().__init__()
        self.heads = d.num_heads
        self.norm1 = make_norm(d.norm, d.hidden_size, d.eps)
        self.qkv = Proj(d.hidden_size, 3 * d.hidden_size, bias=True)
        self.proj = Proj(d.hidden_size, d.hidden_size, bias=True)
        self.norm2 = make_norm(d.norm, d.hidden_size, d.eps)
        self.mlp_kind = d.mlp
        if d.mlp == "swiglu":
            self.gate_up = Proj(d.hidden_size, 2 * d.intermediate_size, bias=True)
            self.down = Proj(d.intermediate_size, d.hidden_size, bias=True)
        else:
            self.fc1 = Proj(d.hidden_size, d.intermediate_size, bias=True)
            self.fc2 = Proj(d.intermediate_size, d.hidden_size, bias=True)
        self.scale = d.head_dim ** -0.5
        # The torch backend sets this on a CPU (backends.host_kernels.Kernels): a bf16 block's RoPE and
        # RMSNorms (with the residual addition before the second) as one pass each, torch's
        # arithmetic (csrc/host_kernels.hpp). Exports never do.
        self.kernels = None
        # The torch backend sets this on a CPU: gate_up's product this many rows at a time
        # (common.gated_mlp). Exports never do.
        self.mlp_rows = None

    def _fused(self, x) -> bool:
        return (self.kernels is not None and x.dtype == torch.bfloat16 and isinstance(self.norm1, RMSNorm)
                and self.norm1.weight.dtype == torch.bfloat16 and x.is_contiguous())

    def mlp(self, x):
        if self.mlp_kind == "swiglu":
            return gated_mlp(self.gate_up, self.down, x, self.mlp_rows)
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu

    def attention(self, x, cos, sin, gather, valid, inverse, groups: int, sdpa: bool):
        n = x.shape[0]
        qkv = self.qkv(x)
        if self.kernels is not None and qkv.dtype == torch.bfloat16:  # RoPE in place, one pass (_fused)
            qkv = self.kernels.rope_qk_(qkv.contiguous(), cos, sin, self.heads, qkv.shape[-1] // (3 * self.heads))
            q, k, v = qkv.reshape(n, 3, self.heads, -1).permute(1, 0, 2, 3).unbind(0)  # [N, heads, d]
        else:
            q, k, v = qkv.reshape(n, 3, self.heads, -1).permute(1, 0, 2, 3).unbind(0)  # [N, heads, d]
            c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
            qf, kf = q.float(), k.float()  # rotary in fp32, as HF's vision tower (one conversion each)
            q = (qf * c + rotate_half(qf) * s).to(x.dtype)
            k = (kf * c + rotate_half(kf) * s).to(x.dtype)
        qs, ks, vs = (t[gather].transpose(1, 2) for t in (q, k, v))  # [S, heads, L, d]
        if sdpa:
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=valid[:, None, None, :], scale=self.scale)
        else:
            per = self.heads // groups
            outs = []
            for g in range(groups):  # sequential head groups bound the live score matrices
                hs = slice(g * per, (g + 1) * per)
                scores = torch.matmul(qs[:, hs], ks[:, hs].transpose(-1, -2)) * self.scale
                scores = scores.masked_fill(~valid[:, None, None, :], min_value(scores.dtype))
                outs.append(torch.matmul(torch.softmax(scores.float(), dim=-1).to(vs.dtype), vs[:, hs]))
            out = torch.cat(outs, 1) if groups > 1 else outs[0]
        out = out.transpose(1, 2)  # [S, L, heads, d]
        return self.proj(out.reshape(-1, out.shape[-2] * out.shape[-1])[inverse])

    def forward(self, x, cos, sin, layout, groups: int, sdpa: bool):
        if self._fused(x):  # the same values; the norms one pass each, the first addition inside the second
            h = self.kernels.rms_norm(x, self.norm1.weight, self.norm1.eps)
            x, h = self.kernels.rms_norm(x, self.norm2.weight, self.norm2.eps,
                                         residual=self.attention(h, cos, sin, *layout, groups, sdpa))
            return x + self.mlp(h)
        x = x + self.attention(self.norm1(x), cos, sin, *layout, groups, sdpa)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    def __init__(self, d: VisionDims):
        super().__init__()
        merged = d.hidden_size * d.merge_size ** 2
        self.norm = make_norm(d.norm, d.hidden_size, d.eps)
        self.fc1 = Proj(merged, merged, bias=True)
        self.fc2 = Proj(merged, d.out_hidden_size, bias=True)
        self.merged = merged

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x).reshape(-1, self.merged))))


class VisionEncoder(nn.Module):
    def __init__(self, d: VisionDims):
        super().__init__()
        self.dims = d
        self.patch_embed = Proj(d.patch_dim, d.hidden_size, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(d) for _ in range(d.depth))
        self.merger = Merger(d)
        self.register_buffer("inv_freq", torch.empty(d.head_dim // 4), persistent=False)
        self.merge_unit = d.merge_size ** 2
        self.sdpa = False

    @property
    def input_names(self) -> list[str]:
        return COMMON_INPUTS + (WINDOW_INPUTS if self.dims.windowed else [])

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        spatial = self.dims.head_dim // 2
        return {"inv_freq": 1.0 / (self.dims.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))}

    def _permute(self, x, index):
        n = x.shape[0]
        return x.reshape(n // self.merge_unit, self.merge_unit, -1)[index].reshape(n, -1)

    def forward(self, pixel_values, rot_pos_ids, full_gather, full_valid, full_inverse,
                window_index=None, window_reverse=None, window_gather=None, window_valid=None, window_inverse=None):
        d = self.dims
        dtype = self.patch_embed.compute_dtype
        hidden = self.patch_embed(pixel_values.to(dtype))
        freqs = rot_pos_ids.float().unsqueeze(-1) * self.inv_freq  # [N, 2, d/4]: height and width
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if d.windowed:
            hidden, cos, sin = (self._permute(t, window_index) for t in (hidden, cos, sin))
        full = (full_gather, full_valid, full_inverse)
        window = (window_gather, window_valid, window_inverse)
        for i, block in enumerate(self.blocks):
            is_full = i in d.full_blocks
            hidden = block(hidden, cos, sin, full if is_full else window, d.full_head_groups if is_full else 1,
                           self.sdpa)
        merged = self.merger(hidden)
        return merged[window_reverse] if d.windowed else merged
