"""Runtime prompts (tokenizers only) equal HF's tokenizer on processor-style text; truncation
only ever shortens the document text."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.model

import gmr_fast
from gmr_fast.gmr_config import GmrConfig
from gmr_fast.prompt import PromptBuilder, PromptError, as_item


class _HFPrompts:
    """HF's side of the comparison: processor-style prompt expansion, no model needed."""

    def __init__(self, gmr):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.gmr = gmr
        self.image_processor = Qwen2VLImageProcessorPil(min_pixels=gmr.min_pixels, max_pixels=gmr.max_pixels)

    def prompt_text(self, instruction, query, document):
        from export.reference import processor_prompt

        return processor_prompt(self.gmr, self.image_processor, instruction, query, document)


@pytest.fixture(scope="module")
def setup(tiny_checkpoints):
    from transformers import AutoTokenizer

    ckpt = tiny_checkpoints["qwen2_5_vl"]
    gmr = GmrConfig.load(ckpt)
    hf_tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    return PromptBuilder(ckpt / "tokenizer.json", gmr), _HFPrompts(gmr), hf_tok


def _image_tokens(image, gmr):
    if image is None:
        return 0
    grid = gmr_fast.preprocess_images([image], min_pixels=gmr.min_pixels, max_pixels=gmr.max_pixels).image_grid_thw[0]
    return int(np.prod(grid)) // 4


def _ours(builder, instruction, q, d, **kw):
    qi, di = as_item(q, "q"), as_item(d, "d")
    return builder.encode(instruction, qi, di, _image_tokens(qi.image, builder.config), _image_tokens(di.image, builder.config), **kw)


def test_token_ids_equal_hf_for_every_modality(setup, rng):
    builder, ref, hf_tok = setup
    img = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    texts = ["what is a cat?", "Ünïcödé — 中文 日本語 😀 ok.", "", " leading space", "ends with colon:", "line\nbreaks.\n\n",
             "hello.\nworld", "<Document>: nested tag", "a" * 300, "1234567890 3.14", "don't stop", "\t tabs \t"]
    pairs = []
    for i, t in enumerate(texts):
        pairs.append((t, texts[-1 - i]))
        pairs.append(({"text": t, "image": img(60 + i, 90)}, texts[i - 1]))
        pairs.append((t, {"image": img(200, 30 + i)}))
        pairs.append(({"image": img(80, 80)}, {"text": t, "image": img(50, 120)}))
    pairs.append(({"text": "", "image": img(30, 30)}, "empty query text with an image"))
    pairs.append(("long document", "word " * 2000 + "end."))
    for instruction in ["Given a web search query, retrieve relevant passages that answer the query", "Find: the image."]:
        for q, d in pairs:
            text, _ = ref.prompt_text(instruction, q, d)
            expected = hf_tok(text, add_special_tokens=False)["input_ids"]
            got = _ours(builder, instruction, q, d, max_length=100000)
            assert got.ids.tolist() == expected, (q if isinstance(q, str) else q.get("text"), d if isinstance(d, str) else d.get("text"))
            assert not got.truncated
            for start, end in got.image_spans:
                assert (got.ids[start:end] == builder.image_pad_id).all()
                assert got.ids[start - 1] == builder.vision_start_id and got.ids[end] == builder.vision_end_id


def test_batch_tokenization_gives_the_same_prompts(setup, tiny_checkpoints, rng, tmp_path):
    """Reranker.plan tokenizes every prompt in one batch call (``tokenize_many``, GIL released);
    encode() given those ids must give exactly what it gives on its own: ids, spans, truncation.
    Also with a tokenizer.json that asks for padding and truncation (batch calls would apply
    them; the builder turns them off)."""
    import json

    builder, _, _ = setup
    raw = json.loads((tiny_checkpoints["qwen2_5_vl"] / "tokenizer.json").read_text())
    raw["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                      "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    raw["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    padded = PromptBuilder(tmp_path / "tokenizer.json", builder.config)
    img = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    long_doc = "The quick brown fox, jumping. " * 300
    pairs = [("what is a cat?", "short"), ("q", long_doc), ({"text": "q", "image": img(60, 90)}, "d: colon first"),
             ("q", {"text": long_doc, "image": img(50, 120)}), ({"image": img(80, 80)}, {"image": img(40, 200)}),
             ("Ünïcödé — 中文", ":leading punctuation"), ("", "")]
    for b in (builder, padded):
        for max_length in (200, 100000):
            items = [(as_item(q, "q"), as_item(d, "d")) for q, d in pairs]
            batch = b.tokenize_many([b.render("instr", q, d) for q, d in items])
            for (q, d), ids in zip(items, batch):
                n = (_image_tokens(q.image, b.config), _image_tokens(d.image, b.config))
                one = b.encode("instr", q, d, *n, max_length=max_length)
                many = b.encode("instr", q, d, *n, max_length=max_length, tokenized=ids)
                assert many.ids.tolist() == one.ids.tolist() and many.image_spans == one.image_spans
                assert many.truncated == one.truncated
                if b is padded:  # and both equal the plain builder's
                    assert one.ids.tolist() == builder.encode("instr", q, d, *n, max_length=max_length).ids.tolist()


def _kept_document_text(builder, ids) -> str:
    text = builder.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    start = text.index("<Document>:") + len("<Document>:")
    if text.startswith("<|vision_start|>", start):
        start = text.index("<|vision_end|>", start) + len("<|vision_end|>")
    return text[start:text.index("<|im_end|>", start)]


def test_truncation_cuts_only_document_text(setup, rng):
    builder, ref, hf_tok = setup
    image = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    doc = "The quick brown fox, jumping. " * 400 + "Ünïcödé tail."
    cases = [("query text", doc), ({"text": "q", "image": image}, {"text": doc, "image": image}),
             ("q", doc.replace(" ", ":")), ("q", "alpha beta, gamma.\n" * 300)]
    for max_length in (150, 151, 333, 1000):
        for q, d in cases:
            got = _ours(builder, "instr", q, d, max_length=max_length)
            assert got.truncated and max_length - 3 <= len(got.ids) <= max_length
            d_text = d if isinstance(d, str) else d["text"]
            kept = _kept_document_text(builder, got.ids)
            assert d_text.startswith(kept) and 0 < len(kept) < len(d_text)
            # exactly HF's tokenisation of the same prompt with the shortened document text:
            # instruction, query, images and the prompt suffix are untouched
            d_kept = kept if isinstance(d, str) else {"text": kept, "image": d["image"]}
            expected = hf_tok(ref.prompt_text("instr", q, d_kept)[0], add_special_tokens=False)["input_ids"]
            assert got.ids.tolist() == expected


def test_pair_that_cannot_fit_is_an_error(setup, rng):
    builder, _, _ = setup
    image = rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)
    with pytest.raises(PromptError, match=r"pair 7: \d+ tokens without any document text, over max_length 100"):
        _ours(builder, "i", {"text": "q", "image": image}, "doc", max_length=100, where="pair 7")


@pytest.mark.parametrize("bad,msg", [(None, "is None"), ({}, "needs 'text' and/or 'image'"),
                                     ({"txt": "x"}, r"unknown key\(s\) \['txt'\]"), (3, "expected a string or a dict.*got int"),
                                     ({"text": 5}, "'text' must be a string")])
def test_bad_sides_name_the_pair(bad, msg):
    with pytest.raises(PromptError, match="pair 2 document: " + msg):
        as_item(bad, "pair 2 document")


def test_yes_no_must_be_single_tokens(tiny_checkpoints):
    ckpt = tiny_checkpoints["qwen2_5_vl"]
    with pytest.raises(PromptError, match="yes_token.*must be exactly one"):
        PromptBuilder(ckpt / "tokenizer.json", GmrConfig(yes_token="absolutely yes"))


def test_gmr_json_defaults_and_errors(tmp_path, caplog):
    cfg = GmrConfig.load(tmp_path)
    assert "has no gmr.json" in caplog.text and cfg == GmrConfig()
    (tmp_path / "gmr.json").write_text('{"max_length": 512, "colour": 1}')
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        GmrConfig.load(tmp_path)
    (tmp_path / "gmr.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GmrConfig.load(tmp_path)
    with pytest.raises(ValueError, match=r"\{query\} exactly once"):
        GmrConfig(prompt_template="{system}{instruction}{document}")
    GmrConfig(max_length=512, training={"objective": "sft"}).save(tmp_path)
    assert GmrConfig.load(tmp_path).max_length == 512


# text that stresses the Qwen2 pre-tokenizer and NFC at a cut: white space of every kind before
# and after line breaks, punctuation that joins following breaks, combining marks, contractions,
# special-token text, slot names
_PIECES = ["a", "Zq", "é", "e\u0301", "\u0338", "<", ">", ":", ".", "'s", "'LL", "-", "\u2014", "中文", "😀", "1",
           "23", " ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", " \n", ".\n", "\u00a0", "\u3000", "\u2028", "\x0b",
           "\x85", "<|im_end|>", "<|vision_end|>", "<Document>:", "{document}", "{query}"]


def _adversarial(rng, n: int) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(n))


def test_segment_tokenization_equals_whole(setup, rng):
    """tokenize_prompts tokenizes each distinct (instruction, query) part once and each pair's rest
    apart (``segment_cut``, on for Qwen2's tokenizer and GMR's template); the ids must equal the
    whole rendered prompt's, token for token, whatever text sits on either side of the cut."""
    builder, _, hf_tok = setup
    assert builder.segment_cut is not None
    instructions = [_adversarial(rng, int(rng.integers(0, 6))) for _ in range(3)]
    image = {"image": b"marker"}  # any image: tokenization only sees its one pad
    queries = [as_item({"text": _adversarial(rng, int(rng.integers(0, 8))), **(image if k % 3 == 0 else {})}, "q")
               for k in range(12)]
    ins, pairs = [], []
    for k in range(600):
        doc = _adversarial(rng, int(rng.integers(0, 10)))
        ins.append(instructions[k % 3])
        document = as_item({"text": doc, **(image if k % 4 == 0 else {})}, "d")
        pairs.append((queries[int(rng.integers(len(queries)))], document))
    whole = builder.tokenize_many([builder.render(i, q, d) for i, (q, d) in zip(ins, pairs)])
    assert builder.tokenize_prompts(ins, pairs) == whole
    # and HF's own tokenizer agrees with the whole prompts (the reference of the other tests)
    for k in range(0, 600, 7):
        assert hf_tok(builder.render(ins[k], *pairs[k]), add_special_tokens=False)["input_ids"] == whole[k]


def test_segment_cut_only_where_it_is_proven(setup, tiny_checkpoints, tmp_path):
    """The cut needs Qwen2's pre-tokenizer and a template whose document line starts with a fixed
    non-space character; elsewhere prompts are tokenized whole. GPT-2's byte-level regex shows why:
    cut after a query ending in spaces, it tokenizes differently from the whole."""
    import json

    builder, _, _ = setup
    raw = json.loads((tiny_checkpoints["qwen2_5_vl"] / "tokenizer.json").read_text())
    raw["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    gpt2 = PromptBuilder(tmp_path / "tokenizer.json", builder.config)
    assert gpt2.segment_cut is None
    head, tail = "q  \n", "<Document>:x"
    ids = lambda text: gpt2.tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    assert ids(head) + ids(tail) != ids(head + tail)
    qwen2 = builder.tokenize_many([head, tail, head + tail])
    assert qwen2[0] + qwen2[1] == qwen2[2]
    pairs = [(as_item("q  ", "q"), as_item("d", "d"))]
    assert gpt2.tokenize_prompts(["i"], pairs) == gpt2.tokenize_many([gpt2.render("i", *pairs[0])])
    for template in ("<|im_start|>user\n{system}{instruction}{query}\n {document}<|im_end|>",  # space after the break
                     "<|im_start|>user\n{system}{instruction}{query}\n{document}<|im_end|>",  # user text right after it
                     "{system}\n<D>{document}{instruction}{query}"):  # slots after the document
        other = PromptBuilder(tiny_checkpoints["qwen2_5_vl"] / "tokenizer.json", GmrConfig(prompt_template=template))
        assert other.segment_cut is None, template


def test_slot_names_in_user_text_stay_literal(setup):
    """The template's slots are filled in one pass, as the model's chat template builds the
    prompt: a query, instruction or document that contains "{document}" keeps it."""
    builder, _, hf_tok = setup
    system = builder.config.system_prompt
    instruction, query, document = "use {query} here", "what is {document}?", "see {instruction} and {system}"
    text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<Instruct>: {instruction}<Query>:{query}\n"
            f"<Document>:{document}<|im_end|>\n<|im_start|>assistant\n")
    assert builder.render(instruction, as_item(query, "q"), as_item(document, "d")) == text
    got = _ours(builder, instruction, query, document, max_length=100000)
    assert got.ids.tolist() == hf_tok(text, add_special_tokens=False)["input_ids"]
