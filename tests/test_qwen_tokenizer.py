"""The Qwen2 tokenizer rebuilt from qwen.tiktoken encodes exactly as tiktoken does."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest

pytest.importorskip("tiktoken")
from tokenizers import Tokenizer

from export import qwen_tokenizer as qt


@pytest.fixture(scope="module")
def converted():
    return qt.build_tokenizer_json()


def test_vocabulary_and_merges(converted):
    model = json.loads(converted)["model"]
    assert len(model["vocab"]) == 151643
    assert len(model["merges"]) == 151387
    tok = Tokenizer.from_str(converted)
    assert tok.token_to_id("yes") == 9693 and tok.token_to_id("no") == 2152
    assert tok.token_to_id("<|image_pad|>") == 151655 and tok.token_to_id("<|vision_start|>") == 151652
    assert tok.get_vocab_size() == 151643 + len(qt.SPECIAL_TOKENS) <= qt.MODEL_VOCAB_SIZE


def test_encodings_equal_tiktoken(converted):
    import tiktoken

    enc = tiktoken.Encoding(
        "qwen2", pat_str=qt.QWEN2_PATTERN, mergeable_ranks=qt.load_ranks(qt.tiktoken_file()),
        special_tokens={t: qt.FIRST_SPECIAL_ID + i for i, t in enumerate(qt.SPECIAL_TOKENS)},
    )
    tok = Tokenizer.from_str(converted)
    rng = random.Random(1234)
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`\n\t\r")
    chars += list("éèàüößçñøåæœ中文日本語한국어Привет мирمرحبا😀🚀✓→∑") + ["e\u0301", "\u00a0"]
    words = ["the", "The", " quick", "brown", "fox's", "don't", "  ", "\n\n", "1234567", "3.14159", "<Query>:",
             "<|im_start|>", "<|image_pad|>", "hello.\n", "URL: https://x.y/z?a=1", "<Document>:"]
    for _ in range(2000):
        if rng.random() < 0.5:
            text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 200)))
        else:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        expected = enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert tok.encode(text).ids == expected, repr(text)
