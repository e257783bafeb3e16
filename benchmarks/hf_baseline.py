"""The HuggingFace baseline every benchmark measures against, in its strongest plain form:
transformers' own model and processor, sdpa attention, ``logits_to_keep=1`` (no vocabulary-sized
logits), pairs sorted by length and batched under a token budget, each pair's images encoded with
the pair (as HF's processor does it). fp32 or bf16, on the CPU or ``device`` (e.g. cuda).

``keep_heap`` gives HF, once its weights are loaded, the allocator setting gmr_fast's torch backend
makes on the CPU (gmr_fast.memory: freed memory kept in the process). By default glibc unmaps every
large intermediate when it is freed, and on the development VMs the pages it gives back are reported
to the host (virtio-balloon free page reporting) within about two seconds: touching such memory
again cost 5-6 ms per MiB there, 30x a plain page fault (256 MiB: 1.3-1.6 s after 5-10 s idle, 47 ms
at once; AMX Xeon, 5 Dec). HF bf16 on it2it's 8 sampled pairs ran at 0.11-0.12 pairs/s with
glibc's default (12 million page faults, 45-50 s of system time) against 0.22-0.23 with the kept
heap, alternated in one session; earlier runs' default measured 0.17-0.23, so that baseline moves
with the host. Benchmarks time HF both ways where asked (``--hf-kept-heap``) and compare against
the faster."""

from __future__ import annotations

import numpy as np


class HFStrong:
    def __init__(self, checkpoint, dtype: str = "fp32", max_batch_tokens: int = 8192, max_batch_size: int = 32,
                 threads: int | None = None, device: str = "cpu", keep_heap: bool = False):
        import torch

        from export.reference import ReferenceScorer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.ref = ReferenceScorer(checkpoint, device=device, attn_implementation="sdpa", dtype=dtype)
        if dtype == "bf16":  # loaded as bf16; the buffers (RoPE's inv_freq) cast as well, as plain HF bf16 has them
            self.ref.model = self.ref.model.to(torch.bfloat16)
        self.dtype = dtype
        self.heap = "default"
        if keep_heap and device == "cpu":
            from gmr_fast.memory import keep_freed_memory

            self.heap = keep_freed_memory()
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size

    def lengths(self, pairs, instruction: str) -> list[int]:
        return [len(self.ref.tokenizer(self.ref.prompt_text(instruction, q, d)[0], add_special_tokens=False)["input_ids"])
                for q, d in pairs]

    def score(self, pairs, instruction: str | None = None) -> tuple[np.ndarray, int]:
        """Scores in input order, and the padded tokens it ran."""
        torch = self.torch
        instruction = instruction or self.ref.gmr.default_instruction
        lengths = self.lengths(pairs, instruction)
        order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
        out = np.zeros(len(pairs), np.float32)
        padded, start = 0, 0
        while start < len(order):
            width = lengths[order[start]]
            end = start + 1
            while end < len(order) and end - start < self.max_batch_size and (end - start + 1) * width <= self.max_batch_tokens:
                end += 1
            rows = order[start:end]
            batch = self.ref.encode([pairs[i] for i in rows], instruction)
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(self.ref.model.dtype)
            with torch.inference_mode():
                logits = self.ref.model(**batch, logits_to_keep=1).logits[:, -1, :].float()
            out[rows] = (logits[:, self.ref.yes_id] - logits[:, self.ref.no_id]).cpu().numpy()
            padded += int(batch["input_ids"].numel())
            start = end
        return out, padded
