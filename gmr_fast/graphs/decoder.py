"""The decoder graph: token ids + image embeddings -> relevance score, with the head fused.

Inputs  input_ids int64 [B, L], attention_mask int64 [B, L], position_ids int64 [3, B, L]
        (M-RoPE, HF's get_rope_index), image_embeds float32 [N, H] (the vision graph's output for
        every image of the batch, in row-major order of their pad tokens; N may be 0).
Output  score float32 [B] = final-norm hidden state of the last real token . (W[yes] - W[no]),
        computed in fp32. The vocabulary projection is never materialised.

Embedding lookup and image scatter happen inside the graph, so nothing of size B x L x H crosses
between host and device. Left and right padding both work: the last real token is found from
the attention mask.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_NAMES = ["input_ids", "attention_mask", "position_ids", "image_embeds"]
OUTPUT_NAMES = ["score"]


class DecoderWithScoreHead(nn.Module):
    def __init__(self, model, yes_id: int, no_id: int):
        super().__init__()
        self.language_model = model.model.language_model
        self.image_token_id = int(model.config.image_token_id)
        weight = model.lm_head.weight.detach()
        self.register_buffer("score_row", (weight[yes_id].float() - weight[no_id].float()).clone(), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, image_embeds):
        lm = self.language_model
        embeds = lm.embed_tokens(input_ids)
        batch, length = input_ids.shape
        # Scatter the image embeddings into the pad positions: the k-th pad (row-major) takes
        # row k; row 0 of the table is a zero row every other position points at.
        is_image = input_ids == self.image_token_id
        order = torch.cumsum(is_image.reshape(-1).to(torch.int64), 0).reshape(batch, length)
        table = torch.cat([embeds.new_zeros(1, embeds.shape[-1]), image_embeds.to(embeds.dtype)], 0)
        embeds = torch.where(is_image.unsqueeze(-1), table[order * is_image.to(torch.int64)], embeds)
        # Additive causal + padding mask [B, 1, L, L]; the dtype's minimum (not -inf) keeps rows
        # that see nothing (left padding) finite; those rows never feed a real token.
        positions = torch.arange(length, device=input_ids.device)
        visible = (positions[None, :] <= positions[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        mask = torch.zeros(visible.shape, dtype=embeds.dtype, device=embeds.device)
        mask = mask.masked_fill(~visible, torch.finfo(embeds.dtype).min)
        hidden = lm(inputs_embeds=embeds, attention_mask={"full_attention": mask}, position_ids=position_ids,
                    use_cache=False).last_hidden_state
        last = (attention_mask.to(torch.int64) * positions[None, :]).argmax(-1)
        last_hidden = hidden[torch.arange(batch, device=hidden.device), last]
        return last_hidden.float() @ self.score_row
