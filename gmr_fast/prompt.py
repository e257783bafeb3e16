"""GMR prompts -> token ids, with the `tokenizers` library only (no torch, no transformers).

The prompt is rendered from gmr.json's template. Each image is rendered as one
``<|image_pad|>`` and expanded to its visual-token count after tokenisation: special tokens are
split out before any text is tokenised, so this equals tokenising the processor-style text with
the pad repeated (the parity tests check it). Text is tokenised in the whole segments that lie
between special tokens, never cut at an arbitrary point, because Qwen2's pre-tokenizer joins
punctuation to following letters and newlines (``:hello``, ``.\\n``). The one cut made is at the
template's last line break before the document (``segment_cut``), where that tokenizer provably
always splits: the part before it, shared by a query's documents, is tokenised once per query.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import PromptError
from .gmr_config import GmrConfig

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
# Qwen2's pre-tokenizer (tokenizer.json): this split regex, then byte-level mapping without its own regex
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}


@dataclass
class Item:
    """One side of a pair: text, an image, or both (the image comes first in the prompt)."""

    text: str = ""
    image: Any = None

    @property
    def has_image(self) -> bool:
        return self.image is not None


def text_problem(text: str) -> str | None:
    """Why UTF-8 cannot encode ``text``, or None: neither the tokenizer nor a UTF-8 output file
    takes such a ``str``, which Python allows: lone surrogates (JSON's ``"\\ud800"``, text cut
    inside a UTF-16 pair, bytes decoded with ``surrogateescape``). The tokenizer refuses a whole
    batch over one of them (a TypeError naming no input), so callers fail the one item, by name."""
    if not isinstance(text, str) or text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode text ({e.reason}: {text[e.start]!r} at character {e.start})"
    return None


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
        self.segment_cut = self._segment_cut()

    def _segment_cut(self) -> int | None:
        r"""Where the template may be cut so that any prompt tokenises as its two parts do apart:
        right after the template's last line break before ``{document}``, when the template's own
        next character is ASCII and not white space ("\n<Document>:"), the later part holds no
        slot but ``{document}``, and the tokenizer is Qwen2's; None otherwise (prompts are then
        tokenised whole). Why the ids agree there, whatever the user's text:
        - special tokens are split out first (leftmost-longest over the raw text); none holds a
          line break, so none can match across the cut, and none strips white space around it;
        - NFC leaves a line break, and a following ASCII non-space character, as they are (neither
          is a combining mark nor composes with the other), so it normalises each part alone;
        - every alternative of the split regex that can take a line break ends at it (``[\r\n]*``
          and ``[\r\n]+`` end a match; ``\p{L}``, ``\p{N}`` and the optional lead character of a
          word exclude it), so a piece ends at the cut and the next starts there; a white-space run
          ending in the break is taken whole by ``\s*[\r\n]+`` before ``\s+(?!\S)`` looks past it.
        GPT-2's byte-level regex lacks the last property (``\s+(?!\S)`` stops one short of a
        non-space character), hence the exact match on Qwen2's.
        BPE merges within a piece, so the ids agree. ``test_segment_tokenization_equals_whole``
        checks it on adversarial text."""
        template = self.config.prompt_template
        slot = template.index("{document}")
        cut = template.rfind("\n", 0, slot) + 1
        rest = template[cut:]
        if (cut == 0 or cut == slot or not rest[0].isascii() or rest[0].isspace()
                or any(s in rest for s in ("{system}", "{instruction}", "{query}"))):
            return None
        state = lambda part: None if part is None else json.loads(part.__getstate__())  # noqa: E731
        if (state(self.tokenizer.pre_tokenizer) != QWEN2_PRE_TOKENIZER
                or state(self.tokenizer.normalizer) not in (None, {"type": "NFC"})):
            return None
        for t in self.tokenizer.get_added_tokens_decoder().values():
            if "\n" in t.content or "\r" in t.content or t.lstrip or t.rstrip or t.single_word:
                return None
        return cut

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

    def tokenize_prompts(self, instructions: list[str], pairs: list[tuple[Item, Item]]) -> list[list[int]]:
        """Token ids of each pair's ``render(instruction, query, document)``, as ``tokenize_many``
        gives them. Where the template has a ``segment_cut``, the part before it (system,
        instruction, query) is tokenised once per distinct instruction and query, and each pair
        adds the ids of its own rest (document and closing turn): a query's documents share
        about half of a short pair's tokens."""
        if self.segment_cut is None:
            return self.tokenize_many([self.render(i, q, d) for i, (q, d) in zip(instructions, pairs)])
        head, tail = self.config.prompt_template[:self.segment_cut], self.config.prompt_template[self.segment_cut:]
        keys = [(i, self._side(q)) for i, (q, _) in zip(instructions, pairs)]
        distinct = list(dict.fromkeys(keys))
        heads = dict(zip(distinct, self.tokenize_many([self.config.fill(head, instruction=i, query=q)
                                                       for i, q in distinct])))
        tails = self.tokenize_many([self.config.fill(tail, document=self._side(d)) for _, d in pairs])
        return [heads[k] + t for k, t in zip(keys, tails)]

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
