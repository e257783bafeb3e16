"""The vision graph: patches + grid-derived indices -> image embeddings for the decoder.

Inputs   pixel_values float32 [N, 1176], rot_pos_ids int64 [N, 2], full_gather int64 [S, Lf],
         full_valid bool [S, Lf], full_inverse int64 [N]; Qwen2.5-VL adds window_index int64
         [N/4], window_reverse int64 [N/4], window_gather int64 [W, Lw], window_valid bool
         [W, Lw], window_inverse int64 [N] (all from gmr_fast.vision_layout).
Output   image_embeds float32 [N/4, H]: merged patch embeddings, images in input order.

The HF tower's weights are used as they are (patch embedding, rotary frequencies, norms, MLPs,
merger); only attention is restated: on a padded [segments, longest] layout with a key mask,
so that full-attention layers cost images x longest_image^2 and windowed layers cost
windows x 64^2, and nothing depends on Python-side splitting (dynamic sizes export).
"""

from __future__ import annotations

import torch
from torch import nn

COMMON_INPUTS = ["pixel_values", "rot_pos_ids", "full_gather", "full_valid", "full_inverse"]
WINDOW_INPUTS = ["window_index", "window_reverse", "window_gather", "window_valid", "window_inverse"]
OUTPUT_NAMES = ["image_embeds"]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def segment_attention(attn: nn.Module, x, cos, sin, gather, valid, inverse):
    """HF vision attention restricted to segments, computed on the padded segment layout."""
    n = x.shape[0]
    heads = attn.num_heads
    q, k, v = attn.qkv(x).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # [N, heads, d]
    c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q = ((q.float() * c) + (_rotate_half(q.float()) * s)).to(x.dtype)
    k = ((k.float() * c) + (_rotate_half(k.float()) * s)).to(x.dtype)
    qs, ks, vs = (t[gather].transpose(1, 2) for t in (q, k, v))  # [S, heads, L, d]
    scores = torch.matmul(qs, ks.transpose(-1, -2)) * attn.scaling
    scores = scores.masked_fill(~valid[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(vs.dtype)
    out = torch.matmul(probs, vs).transpose(1, 2)  # [S, L, heads, d]
    out = out.reshape(-1, out.shape[-2] * out.shape[-1])[inverse]
    return attn.proj(out)


class VisionEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.visual = model.model.visual
        self.windowed = hasattr(self.visual, "fullatt_block_indexes")
        self.full_blocks = set(getattr(self.visual, "fullatt_block_indexes", range(len(self.visual.blocks))))
        self.merge_unit = self.visual.spatial_merge_size ** 2

    @property
    def input_names(self) -> list[str]:
        return COMMON_INPUTS + (WINDOW_INPUTS if self.windowed else [])

    def _permute(self, x, index):
        n = x.shape[0]
        return x.reshape(n // self.merge_unit, self.merge_unit, -1)[index].reshape(n, -1)

    def forward(self, pixel_values, rot_pos_ids, full_gather, full_valid, full_inverse,
                window_index=None, window_reverse=None, window_gather=None, window_valid=None, window_inverse=None):
        vis = self.visual
        hidden = vis.patch_embed(pixel_values)
        cos, sin = vis.rotary_pos_emb(hidden, rot_pos_ids)
        if self.windowed:
            hidden, cos, sin = (self._permute(t, window_index) for t in (hidden, cos, sin))
        for i, block in enumerate(vis.blocks):
            if i in self.full_blocks:
                layout = (full_gather, full_valid, full_inverse)
            else:
                layout = (window_gather, window_valid, window_inverse)
            hidden = hidden + segment_attention(block.attn, block.norm1(hidden), cos, sin, *layout)
            hidden = hidden + block.mlp(block.norm2(hidden))
        merged = vis.merger(hidden)
        if self.windowed:
            merged = merged[window_reverse]
        return merged
