"""The decoder graph: Qwen2's language model with the relevance head fused, and prefix reuse.

Inputs   input_ids int64 [B, S], attention_mask int64 [B, S] (1 = real token; left or right
         padding), position_ids int64 [3, B, S] (M-RoPE, HF's get_rope_index; a suffix continues
         after its prefix's largest position), image_embeds float32 [N, H] (the vision graph's
         rows for every image pad of the batch in row-major order; N may be 0),
         past_kv float32 [layers, 2, NP, kv_heads, P, head_dim] (keys after RoPE and values of NP
         prefixes), past_mask int64 [NP, P] (1 = a real prefix token), past_index int64 [B] (the
         prefix row b continues), kv_rows int64 [R] (rows whose keys/values to return).
Outputs  score float32 [B] = final-norm hidden state of each row's last real token
         . (W[yes] - W[no]), in fp32: the vocabulary projection is never materialised;
         present_kv float32 [layers, 2, R, kv_heads, S, head_dim] of the rows in kv_rows.

Three uses of one graph: whole prompts (past = one fully masked slot, kv_rows empty), prefixes
(kv_rows = every row: their keys/values are what suffixes attend to) and suffixes (past = the
prefixes they continue). Every row attends to its own past and, causally, to itself. In the last
layer only the last real token's query, attention and MLP are computed: nothing else feeds the
score. Attention keeps grouped-query heads grouped ([B, kv_heads, group x S, d] against
[B, kv_heads, d, S]) so keys and values are never repeated per query head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..manifest import DecoderDims
from .common import Proj, RMSNorm, gated_mlp, min_value, rotate_half

INPUT_NAMES = ["input_ids", "attention_mask", "position_ids", "image_embeds", "past_kv", "past_mask", "past_index",
               "kv_rows"]
OUTPUT_NAMES = ["score", "present_kv"]


def _as(t: torch.Tensor, dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (None: as it is); no operation when it already is, so exported fp32
    graphs carry no casts."""
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


# EAGER: what the torch backend's runs (ScoreDecoder.unpad) do differently from an export, to take
# fewer operations for the same values. In eager torch every operation costs the host a dispatch and,
# on a GPU, a kernel launch; with short prompts (t2t, ``rank`` of text documents) a GPU's arithmetic
# is small (an H200 ``rank`` of 50 documents: 31 ms of GPU work with cuDNN's attention, 182 ms a call
# without it; benchmarks/README.md "GPU"). benchmarks/host_ops.py counts them: a layer's operations
# that are not views went from 51 to 31. Each change keeps every value bit for bit on a CPU
# (tests/test_cuda.py's eager tests):
# - RoPE's rotation without its negation: ``sin`` arrives with its first half negated, once per run
#   (-(a * b) and a * (-b) are the same float);
# - the normed hidden state cast once for both projections;
# - keys roped in place in the projection's output, and keys and values padded in one copy;
# - one prefix for every row (rank, and whole prompts' empty past): its keys and values broadcast
#   to the rows, not gathered per row before the join copies them again;
# - no keys and values gathered for the output when none are asked for (scoring runs);
# - no image rows placed in a batch without images;
# - the norms as one ``F.rms_norm`` call over fp32 (RMSNorm.fused): the same operations on a CPU, a
#   fused kernel on CUDA (aten._fused_rms_norm), whose sums may differ in the last bits.


def eager_rope(t, cos, sin_signed):
    """RoPE with ``sin_signed`` = sin with its first half negated: rotate_half(t) * sin is the
    halves of t swapped times sin_signed, exactly (one negation fewer)."""
    half = t.shape[-1] // 2
    return t * cos + torch.cat((t[..., half:], t[..., :half]), dim=-1) * sin_signed


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """HF's default RoPE frequencies, computed the same way (fp32)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def mrope_select(mrope_section, head_dim: int) -> torch.Tensor:
    """[3, head_dim / 2] one-hot: which position axis (temporal, height, width) drives each
    frequency, as HF's M-RoPE splits the frequencies by ``mrope_section``."""
    sel = torch.zeros(3, head_dim // 2)
    start = 0
    for i, n in enumerate(mrope_section):
        sel[i % 3, start:start + n] = 1.0
        start += n
    return sel


class DecoderLayer(nn.Module):
    def __init__(self, d: DecoderDims):
        super().__init__()
        q_size, kv_size = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        self.heads, self.kv_heads, self.head_dim = d.num_heads, d.num_kv_heads, d.head_dim
        self.input_norm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.q = Proj(d.hidden_size, q_size, bias=True)
        self.kv = Proj(d.hidden_size, 2 * kv_size, bias=True)
        self.o = Proj(q_size, d.hidden_size, bias=False)
        self.post_norm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.gate_up = Proj(d.hidden_size, 2 * d.intermediate_size, bias=False)
        self.down = Proj(d.intermediate_size, d.hidden_size, bias=False)
        self.scale = d.head_dim ** -0.5
        self.attn_dtype = None  # set with ScoreDecoder.fp32_stream: the dtype attention runs in
        # The torch backend sets this on a CPU for the bf16 decoder (backends.host_kernels.Kernels): in its
        # eager runs the fp32 stream's norms go to bf16 in one pass each (the second with the residual
        # addition before it) and RoPE runs in place on the bf16 queries and keys, torch's arithmetic
        # (csrc/host_kernels.hpp). Exports never do.
        self.kernels = None
        # The torch backend sets this on a CPU: its eager runs take gate_up's product this many rows at
        # a time (common.gated_mlp). Exports never do.
        self.mlp_rows = None
        # Whether sdpa is given grouped keys/values with a mask (``enable_gqa``). The CPU's flash
        # kernel takes both. On CUDA flash attention takes no mask and memory-efficient attention no
        # grouped heads, so, cuDNN's kernel being off for our runs (backends.torch.NoCudnnAttention),
        # such a call falls to the math kernel, which writes every head's scores in fp32; HF's
        # sdpa_attention.use_gqa_in_sdpa avoids it the same way. The torch backend turns this off on
        # CUDA: keys and values are then repeated per query head (one query a row: the query heads
        # are folded into queries instead), which the memory-efficient kernel takes with the mask.
        self.masked_gqa = True

    def attention(self, q, k, v, past_k, past_v, visible, sdpa: bool):
        """q [B, Sq, heads, d]; k, v [B, kv_heads, S, d]; past_k, past_v [B, kv_heads, P, d];
        visible bool [B, 1, Sq, P + S]. Returns [B, Sq, heads * d]."""
        b, sq = q.shape[0], q.shape[1]
        g = self.heads // self.kv_heads
        if sdpa:
            qt = q.transpose(1, 2)  # [B, heads, Sq, d]
            if g > 1 and not self.masked_gqa and sq > 1:
                # each key/value head repeated for its g query heads (HF's repeat_kv), joined in one copy
                keys, values = (torch.cat([t[:, :, None].expand(-1, -1, g, -1, -1) for t in pair], 3)
                                .reshape(b, self.heads, -1, self.head_dim) for pair in ((past_k, k), (past_v, v)))
                out = F.scaled_dot_product_attention(qt, keys, values, attn_mask=visible, scale=self.scale)
            else:
                keys, values = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
                if g == 1 or self.masked_gqa:
                    out = F.scaled_dot_product_attention(qt, keys, values, attn_mask=visible, scale=self.scale,
                                                         enable_gqa=g > 1)
                else:  # one query a row (the last layer): a key/value head's g query heads are g queries
                    out = F.scaled_dot_product_attention(qt.reshape(b, self.kv_heads, g, -1), keys, values,
                                                         attn_mask=visible, scale=self.scale)
                    out = out.reshape(b, self.heads, 1, -1)
            return out.transpose(1, 2).reshape(b, sq, -1)
        # query head h uses key/value head h // g (HF's repeat_kv), so group the query heads
        qg = q.reshape(b, sq, self.kv_heads, g, self.head_dim).permute(0, 2, 3, 1, 4).reshape(b, self.kv_heads, g * sq, -1)
        # The prefix's keys and values are joined to this batch's (a copy of [B, kv_heads, P + S, d]),
        # not the scores computed against each ([B, kv_heads, g x Sq, P + S]: g x Sq / d times as
        # large): one MatMul then makes the scores, which onnxruntime fuses with the scale (and
        # the transpose) into one FusedMatMul, and one makes the output. The scores tensor is
        # written by the MatMul, the mask and the softmax only.
        keys, values = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        scores = (torch.matmul(qg, keys.transpose(-1, -2)) * self.scale).reshape(b, self.kv_heads, g, sq, -1)
        scores = scores.masked_fill(~visible.unsqueeze(1), min_value(scores.dtype))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).reshape(b, self.kv_heads, g * sq, -1)
        out = torch.matmul(probs, values)
        return out.reshape(b, self.kv_heads, g, sq, -1).permute(0, 3, 1, 2, 4).reshape(b, sq, -1)

    def forward(self, x, cos, sin, past_k, past_v, visible, last=None, sdpa: bool = False, flat=None):
        """x [B, S, H]; cos/sin [B, S, d]. With ``last`` (int64 [B]) only those positions'
        outputs are computed and [B, 1, H] is returned. Also returns this layer's k, v.

        With ``flat`` (int64 [T], the real tokens' indices into B x S) x, cos and sin hold only
        the real tokens ([T, H], [T, d]) and ``last`` indexes them: every projection and the MLP
        then run on real tokens only, and queries, keys and values are laid out [B, S] for
        attention alone (padding positions are zeros there, masked as before). ``flat`` is the
        torch backend's eager run (ScoreDecoder.unpad), never an export: there ``sin`` comes with
        its first half negated (``eager_rope``) and the run takes fewer operations, each a kernel
        launch on a GPU, with the same values (EAGER)."""
        eager = flat is not None
        b, s = (visible.shape[0], visible.shape[2]) if eager else (x.shape[0], x.shape[1])
        # the bf16 decoder's fp32 stream on a CPU: norms and RoPE as host kernels (same values but for
        # the norm's summation order)
        fused = (eager and self.kernels is not None and x.dtype == torch.float32 and cos.dtype == torch.float32
                 and self.kv.compute_dtype == torch.bfloat16 and self.attn_dtype == torch.bfloat16)
        if fused:
            h = self.kernels.norm_to_bf16(x, self.input_norm.fused, self.input_norm.eps)
        else:
            h = self.input_norm(x)
            if eager:  # cast once for both projections (each Proj would cast it)
                h = _as(h, self.kv.compute_dtype)
        kv = self.kv(h).reshape(*h.shape[:-1], 2, self.kv_heads, self.head_dim)
        rope = eager_rope if eager else (lambda t, c, n: t * c + rotate_half(t) * n)
        if eager:
            # keys roped in place and keys and values padded together: the values of the path
            # below (the cast is the copy into ``kv``'s dtype)
            dtype = self.attn_dtype or torch.promote_types(kv.dtype, cos.dtype)
            if kv.dtype == torch.float32 and dtype != kv.dtype:
                # fp32 products into lower-precision attention (the torch backend's bf16-gemm and
                # bf16-vision image runs): RoPE on the fp32 keys, rounded once, as the queries are
                kv[:, 0] = rope(kv[:, 0], cos.unsqueeze(-2), sin.unsqueeze(-2))
                kv = kv.to(dtype)
            else:
                kv = _as(kv, dtype)
                if fused and kv.is_contiguous():
                    self.kernels.rope_(kv, cos, sin, self.kv_heads, self.head_dim, signed_sin=True)
                else:
                    kv[:, 0] = rope(kv[:, 0], cos.unsqueeze(-2), sin.unsqueeze(-2))
            kv = self._pad(kv, flat, b, s)
            k, v = kv[:, :, 0], kv[:, :, 1]
        else:
            k, v = kv[..., 0, :, :], kv[..., 1, :, :]
            k = _as(rope(k, cos.unsqueeze(-2), sin.unsqueeze(-2)), self.attn_dtype)
            v = _as(v, k.dtype)
        if last is not None:  # only the last real token of each row feeds the score
            rows = torch.arange(b, device=x.device)
            if eager:
                x, h, cos, sin = (t[last].unsqueeze(1) for t in (x, h, cos, sin))
            else:
                x, h = x[rows, last].unsqueeze(1), h[rows, last].unsqueeze(1)
                cos, sin = cos[rows, last].unsqueeze(1), sin[rows, last].unsqueeze(1)
            visible = visible[rows, :, (flat[last] % s) if eager else last].unsqueeze(2)
        q = self.q(h).reshape(*h.shape[:-1], self.heads, self.head_dim)
        if fused and q.is_contiguous():
            q = self.kernels.rope_(q, cos, sin, self.heads, self.head_dim, signed_sin=True)
        else:
            q = _as(rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2)), k.dtype)
        padded_q = eager and last is None
        if padded_q:
            q = self._pad(q, flat, b, s)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        out = self.attention(q, k, v, _as(past_k, k.dtype), _as(past_v, k.dtype), visible, sdpa)
        if padded_q:
            out = out.reshape(b * s, -1)[flat]
        if fused:  # x + o(out) in fp32 and its norm in bf16, one pass
            x, h = self.kernels.norm_to_bf16(x, self.post_norm.fused, self.post_norm.eps, residual=self.o(out))
        else:
            x = x + self.o(out)
            h = self.post_norm(x)
        x = x + gated_mlp(self.gate_up, self.down, h, self.mlp_rows if eager else None)
        return x, k, v

    @staticmethod
    def _pad(t, flat, b: int, s: int):
        """[T, ...] real-token rows -> [B, S, ...] with zeros at the padding."""
        return t.new_zeros(b * s, *t.shape[1:]).index_copy_(0, flat, t).reshape(b, s, *t.shape[1:])


class ScoreDecoder(nn.Module):
    def __init__(self, d: DecoderDims):
        super().__init__()
        self.dims = d
        self.embed = nn.Parameter(torch.empty(d.vocab_size, d.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(d) for _ in range(d.num_layers))
        self.norm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.score_row = nn.Parameter(torch.empty(d.hidden_size), requires_grad=False)  # fp32 W[yes] - W[no]
        self.register_buffer("inv_freq", torch.empty(d.head_dim // 2), persistent=False)
        self.register_buffer("mrope_select", torch.empty(3, d.head_dim // 2), persistent=False)
        self.sdpa = False  # the torch backend turns this on; exports use explicit attention
        self.unpad = False  # the torch backend turns this on: projections and MLPs skip the padding
        # The torch backend turns this on in bf16: the residual stream, the norms and RoPE run in
        # fp32; the projections, the MLP's activation and attention (each layer's attn_dtype) in
        # bf16. HF's bf16 rounds the residual stream to bf16 at every addition and the cos/sin
        # tables before RoPE; those are elementwise, cheap in fp32, and their errors compound over
        # layers. Measured at GMR-3B width (6 layers, 160 image-query and 64 text pairs): the mean
        # |score - fp32| on image queries falls by 28% at the same speed (benchmarks/README.md "Precision and backends").
        self.fp32_stream = False

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        """Values of the non-weight buffers (computed, not read from a checkpoint)."""
        d = self.dims
        return {"inv_freq": rope_inv_freq(d.head_dim, d.rope_theta), "mrope_select": mrope_select(d.mrope_section, d.head_dim)}

    def rotary(self, position_ids, dtype):
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # [3, B, S, d/2]
        freqs = (freqs * self.mrope_select[:, None, None, :]).sum(0)  # each frequency from its own axis
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def embed_tokens(self, input_ids, image_embeds):
        embeds = F.embedding(input_ids, self.embed)
        # a bf16 table under fp32 arithmetic (Proj.upcast) widens the rows it gathered, exactly
        embeds = _as(embeds, torch.promote_types(embeds.dtype, image_embeds.dtype))
        if self.unpad and image_embeds.shape[0] == 0:  # no image in the batch (EAGER)
            return embeds
        b, s = input_ids.shape
        # The k-th image pad (row-major) takes row k of image_embeds; row 0 of the table is a zero
        # row every other position points at.
        is_image = input_ids == self.dims.image_token_id
        order = torch.cumsum(is_image.reshape(-1).to(torch.int64), 0).reshape(b, s)
        table = torch.cat([embeds.new_zeros(1, embeds.shape[-1]), image_embeds.to(embeds.dtype)], 0)
        return torch.where(is_image.unsqueeze(-1), table[order * is_image.to(torch.int64)], embeds)

    def forward(self, input_ids, attention_mask, position_ids, image_embeds, past_kv, past_mask, past_index, kv_rows):
        b, s = input_ids.shape
        x = self.embed_tokens(input_ids, image_embeds)
        if self.fp32_stream:
            x = x.float()
        cos, sin = self.rotary(position_ids, x.dtype)
        pos = torch.arange(s, device=input_ids.device)
        real = attention_mask > 0
        # causal over real keys; every position also sees itself, so that no row of padding is
        # fully masked (those rows never feed a real token)
        self_visible = ((pos[None, :] <= pos[:, None])[None] & real[:, None, :]) | torch.eye(s, dtype=torch.bool,
                                                                                              device=input_ids.device)[None]
        past_visible = (past_mask[past_index] > 0)[:, None, :].expand(b, s, past_mask.shape[1])
        visible = torch.cat([past_visible, self_visible], -1).unsqueeze(1)  # [B, 1, S, P + S]
        last = (attention_mask.to(torch.int64) * pos[None, :]).argmax(-1)
        flat = None
        if self.unpad:  # real tokens only, in row-major order; ``last`` then indexes them
            real_flat = real.reshape(-1)
            flat = real_flat.nonzero().squeeze(1)
            x, cos, sin = (t.reshape(b * s, -1)[flat] for t in (x, cos, sin))
            last = torch.cumsum(real_flat.to(torch.int64), 0)[torch.arange(b, device=x.device) * s + last] - 1
            half = sin.shape[-1] // 2
            sin = torch.cat((-sin[:, :half], sin[:, half:]), -1)  # eager_rope's (EAGER)
        # EAGER: one prefix broadcast to every row; no keys and values gathered when none are asked for
        one_past = self.unpad and past_kv.shape[2] == 1
        presents = [] if not self.unpad or kv_rows.shape[0] > 0 else None
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            if one_past:
                past_k, past_v = (past_kv[i, j].expand(b, *past_kv.shape[3:]) for j in (0, 1))
            else:
                past_k, past_v = past_kv[i, 0][past_index], past_kv[i, 1][past_index]
            x, k, v = layer(x, cos, sin, past_k, past_v, visible,
                            last if i == n - 1 else None, self.sdpa, flat)
            if presents is not None:
                presents.append(torch.stack([k[kv_rows], v[kv_rows]]))
        if presents is None:
            present = k.new_empty(n, 2, 0, *k.shape[1:])
        else:
            present = torch.stack(presents)
        hidden = self.norm(x[:, 0])
        score = hidden.float() @ self.score_row
        return score, present

    @staticmethod
    def flops_per_token(d: DecoderDims) -> float:
        """Matrix-multiply FLOPs per token of one pass through every layer (no attention)."""
        q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        return d.num_layers * 2.0 * (d.hidden_size * (q + 2 * kv) + q * d.hidden_size + 3 * d.hidden_size * d.intermediate_size)


def attention_flops(d: DecoderDims, queries: int, keys: int) -> float:
    return d.num_layers * 4.0 * d.num_heads * d.head_dim * queries * keys

