"""GMR prompts -> token ids, with the `tokenizers` library only (no torch, no transformers).

The prompt is rendered from gmr.json's template. Each image is rendered as one
``<|image_pad|>`` and expanded to its visual-token count after tokenisation: special tokens are
split out before any text is tokenised, so this equals tokenising the processor-style text with
the pad repeated (the parity tests check it). Text is always tokenised in the whole segments
that lie between special tokens, never in pieces, because Qwen2's pre-tokenizer joins
punctuation to following letters and newlines (``:hello``, ``.\\n``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import PromptError
from .gmr_config import GmrConfig

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


@dataclass
class Item:
    """One side of a pair: text, an image, or both (the image comes first in the prompt)."""

    text: str = ""
    image: Any = None

    @property
    def has_image(self) -> bool:
        return self.image is not None


def as_item(value: Any, where: str) -> Item:
    """Accepts ``str`` or a mapping with ``"text"`` and/or ``"image"``; anything else is an error
    naming ``where`` (e.g. ``"pair 3 document"``)."""
    if isinstance(value, Item):
        return value
    if isinstance(value, str):
        return Item(text=value)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"text", "image"})
        if unknown:
            raise PromptError(f"{where}: unknown key(s) {unknown}; use 'text' and/or 'image'")
        text, image = value.get("text"), value.get("image")
        if text is None and image is None:
            raise PromptError(f"{where}: needs 'text' and/or 'image'")
        if text is not None and not isinstance(text, str):
            raise PromptError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        return Item(text=text or "", image=image)
    if value is None:
        raise PromptError(f"{where}: is None")
    raise PromptError(f"{where}: expected a string or a dict with 'text'/'image', got {type(value).__name__}")


@dataclass
class EncodedPrompt:
    ids: np.ndarray  # int64 [L]: the full prompt (or the part before the document), image pads expanded
    truncated: bool  # the document text was shortened to fit max_length
    image_spans: list[tuple[int, int]]  # [start, end) of each image's pad run, query image first


class PromptBuilder:
    """Renders and tokenises GMR prompts for one tokenizer and gmr.json."""

    def __init__(self, tokenizer_json: str | os.PathLike, config: GmrConfig, tokens=None):
        """``tokens`` (an engine manifest's ``TokenIds``) are checked against the tokenizer: the
        graphs were built for those ids."""
        from tokenizers import Tokenizer

        text = str(tokenizer_json)
        if not text.lstrip().startswith("{"):
            with open(text, encoding="utf-8") as f:
                text = f.read()
        self.tokenizer = Tokenizer.from_str(text)
        # a tokenizer.json may carry padding or truncation settings; prompts are never padded and
        # only ever shortened by encode() itself (batch calls would apply them)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.config = config
        self.image_pad_id = self._single_id(IMAGE_PAD)
        self.vision_start_id = self._single_id(VISION_START)
        self.vision_end_id = self._single_id(VISION_END)
        self.yes_id = self._single_id(config.yes_token, "yes_token")
        self.no_id = self._single_id(config.no_token, "no_token")
        if tokens is not None:
            mine = {"yes": self.yes_id, "no": self.no_id, "image_pad": self.image_pad_id}
            theirs = {k: getattr(tokens, k) for k in mine}
            if mine != theirs:
                raise PromptError(f"the tokenizer gives token ids {mine} but the engine was built for {theirs}; "
                                  "re-export the engine")
        head, _, _ = config.prompt_template.partition("{document}")
        self._prefix_template = head

    def _single_id(self, token: str, what: str | None = None) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False).ids
        if len(ids) != 1:
            raise PromptError(f"{what or token!r} = {token!r} is {len(ids)} tokens; it must be exactly one")
        return ids[0]

    def _side(self, item: Item) -> str:
        image = f"{VISION_START}{IMAGE_PAD}{VISION_END}" if item.has_image else ""
        return image + item.text

    def render(self, instruction: str, query: Item, document: Item) -> str:
        """The prompt text with one <|image_pad|> per image."""
        return self.config.fill(instruction=instruction, query=self._side(query), document=self._side(document))

    def render_prefix(self, instruction: str, query: Item) -> str:
        """The part of the prompt before the document slot: what every document of one
        (instruction, query) shares."""
        return self.config.fill(self._prefix_template, instruction=instruction, query=self._side(query))

    @property
    def prefix_has_query(self) -> bool:
        return "{query}" in self._prefix_template

    def encode_prefix(self, instruction: str, query: Item, query_image_tokens: int = 0) -> EncodedPrompt:
        """Token ids of the prompt before the document slot. A whole prompt starts with these ids
        unless its document's first characters merge with the prefix's last ones into one token
        (byte-level BPE): callers compare before reusing a prefix."""
        image_tokens = [query_image_tokens] if query.has_image and "{query}" in self._prefix_template else []
        ids, spans = self._encode_expanded(self.render_prefix(instruction, query), image_tokens)
        return EncodedPrompt(np.asarray(ids, np.int64), False, spans)

    def tokenize_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many rendered prompts in one call to the tokenizer, which runs it on its
        own native threads with the GIL released (a server plans the next requests while the
        engine runs; one ``encode`` per prompt would hold the GIL throughout)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def _encode_expanded(self, text: str, image_tokens: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        return self._expand(self.tokenizer.encode(text, add_special_tokens=False).ids, image_tokens)

    def _expand(self, ids: list[int], image_tokens: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """A rendered prompt's token ids with each image's one pad repeated to its token count."""
        pads = np.flatnonzero(np.asarray(ids, np.int64) == self.image_pad_id).tolist()
        if len(pads) != len(image_tokens):
            raise PromptError(f"prompt text holds {len(pads)} image pads for {len(image_tokens)} images "
                              "(the text itself must not contain <|image_pad|>)")
        out, spans, prev = [], [], 0
        for pos, n in zip(pads, image_tokens):
            out.extend(ids[prev:pos])
            spans.append((len(out), len(out) + n))
            out.extend([self.image_pad_id] * n)
            prev = pos + 1
        out.extend(ids[prev:])
        return out, spans

    def encode(self, instruction: str, query: Item, document: Item, query_image_tokens: int = 0,
               doc_image_tokens: int = 0, max_length: int | None = None, where: str = "pair",
               tokenized: list[int] | None = None) -> EncodedPrompt:
        """Token ids of the prompt. Only the document's text is ever shortened to fit
        ``max_length`` (default from gmr.json); a pair that does not fit even with an empty
        document text raises PromptError naming ``where``. ``tokenized``: the token ids of
        ``render(instruction, query, document)`` when already known (``tokenize_many``)."""
        max_length = max_length or self.config.max_length
        image_tokens = ([query_image_tokens] if query.has_image else []) + ([doc_image_tokens] if document.has_image else [])
        if tokenized is None:
            tokenized = self.tokenizer.encode(self.render(instruction, query, document), add_special_tokens=False).ids
        ids, spans = self._expand(tokenized, image_tokens)
        if len(ids) <= max_length:
            return EncodedPrompt(np.asarray(ids, np.int64), False, spans)
        fixed, _ = self._encode_expanded(self.render(instruction, query, Item("", document.image)), image_tokens)
        if len(fixed) > max_length:
            raise PromptError(f"{where}: {len(fixed)} tokens without any document text, over max_length {max_length} "
                              "(instruction, query and images are never truncated)")
        # Cut the document text at a token boundary, then re-tokenise the whole prompt (tokens can
        # merge across the cut's neighbours) and tighten until it fits.
        doc = self.tokenizer.encode(document.text, add_special_tokens=False)
        keep = min(len(doc.ids), max_length - len(fixed))
        while True:
            text = document.text[:doc.offsets[keep - 1][1]] if keep > 0 else ""
            ids, spans = self._encode_expanded(self.render(instruction, query, Item(text, document.image)), image_tokens)
            if len(ids) <= max_length:
                return EncodedPrompt(np.asarray(ids, np.int64), True, spans)
            keep -= max(1, len(ids) - max_length)
