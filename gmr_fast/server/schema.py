"""Request bodies in the shapes rerank clients speak, parsed at the edge into plain pairs.

- Cohere rerank (``/v1/rerank``, ``/v2/rerank``): ``{model?, query, documents, top_n?,
  return_documents?, max_tokens_per_doc?, rank_fields?}``; a document (and the query) is a string, or as in
  Jina's multimodal reranker API an object ``{"text"?, "image"?}`` (v1's ``{"text": ...}``
  documents are the text-only case; a document object may carry fields of its own, which v1's
  ``rank_fields`` names to rank on).
- vLLM's ``/score``: ``{model?, text_1, text_2}``, each a string, a list of strings, or
  multimodal content ``{"content": [{"type": "text", ...}, {"type": "image_url", ...}]}``.

Images arrive as base64 or ``data:`` URLs. Nothing is ever fetched from the network; a local
file is accepted only as a ``file://`` URL inside the server's ``--allow-local-images``
directory (``file://photos/a.png`` is relative to it).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import GmrError
from ..prompt import Item


class RequestError(GmrError):
    """A request the server refuses: ``status`` and what to name (``field``, document ``index``)."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None, index: int | None = None):
        self.status, self.kind, self.field, self.index = status, kind, field, index
        super().__init__(message)


class Multimodal(BaseModel):
    """A query or document with text and/or an image (Jina's multimodal reranker shape)."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: Union[dict, str, None] = None
    image: str | None = None


class Content(BaseModel):
    """vLLM's multimodal score input: ``{"content": [parts]}``."""

    content: list[ContentPart]


class Document(Multimodal):
    """A Cohere document object: ``text`` and/or ``image``, plus any fields of the caller's own,
    which ``rank_fields`` may name and ``return_documents`` gives back as sent."""

    model_config = ConfigDict(extra="allow")


Side = Union[str, Multimodal]


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields of their own (max_chunks_per_doc, ...)
    model: str | None = None
    query: Side
    documents: list[Union[str, Document]]
    rank_fields: list[str] | None = Field(None, min_length=1)  # Cohere v1: the object fields read, in order
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    max_tokens_per_doc: int | None = Field(None, ge=1)
    raw_scores: bool = False
    instruction: str | None = None


class TEIRerankRequest(BaseModel):
    """Text Embeddings Inference's ``POST /rerank`` body: ``texts`` where Cohere has ``documents``.
    TEI refuses an input longer than the model takes unless ``truncate`` is true; here the
    document's text is what gets cut (at its end), as everywhere in gmr_fast."""
    model_config = ConfigDict(extra="ignore")
    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = False
    truncation_direction: str = "right"
    instruction: str | None = None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    text_1: Union[str, Content, list[Union[str, Content]]]
    text_2: Union[str, Content, list[Union[str, Content]]]
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # app._prompt_limit: -1 or 1..max_length
    raw_scores: bool = False
    instruction: str | None = None


class ImagePolicy:
    """How an image string becomes something the Reranker decodes."""

    def __init__(self, local_root: str | None = None):
        self.local_root = os.path.realpath(local_root) if local_root else None

    def resolve(self, value: str, field: str, index: int | None) -> bytes | str:
        if value.startswith(("http://", "https://", "ftp://")):
            raise RequestError(422, "invalid_input", "remote images are not fetched; send the image as base64 or a "
                                                     "data: URL", field, index)
        if value.startswith("data:"):
            header, sep, payload = value.partition(",")
            if not sep or ";base64" not in header:
                raise RequestError(422, "invalid_input", "a data: URL image must be base64 (data:image/png;base64,...)",
                                   field, index)
            return self._b64(payload, field, index)
        if value.startswith("file://"):
            if not self.local_root:
                raise RequestError(422, "invalid_input", "local images are not allowed on this server (start it with "
                                                         "--allow-local-images DIR)", field, index)
            path = os.path.realpath(os.path.join(self.local_root, value[len("file://"):]))
            if os.path.commonpath([path, self.local_root]) != self.local_root:
                raise RequestError(422, "invalid_input", "local image paths must stay inside the allowed directory",
                                   field, index)
            if not os.path.isfile(path):
                raise RequestError(422, "invalid_input", f"local image {value!r} not found", field, index)
            return path
        return self._b64(value, field, index, bare=True)

    def _b64(self, payload: str, field: str, index: int | None, bare: bool = False) -> bytes:
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            # A plain path is the usual mistake (base64 may start with "/" too: JPEG's is "/9j/", so
            # this is only said of a short string that failed to decode)
            if bare and len(payload) < 1024 and _PATH_LIKE.search(payload):
                where = ("as a file:// URL inside the directory this server was started with"
                         if self.local_root else "as a file:// URL on a server started with --allow-local-images DIR")
                raise RequestError(422, "invalid_input", f"image {payload[:80]!r} looks like a file path: send the image "
                                                         f"as base64 or a data: URL, or {where}", field, index) from None
            raise RequestError(422, "invalid_input", "image is neither a data: URL nor valid base64", field, index) from None
        if not data:
            raise RequestError(422, "invalid_input", "image is empty", field, index)
        return data


_PATH_LIKE = re.compile(r"^(~|\.{1,2})?[/\\]|^[A-Za-z]:\\|\.(png|jpe?g|gif|bmp|webp|tiff?)$", re.IGNORECASE)


def _query(value: Side, policy: ImagePolicy, field: str = "query") -> Item:
    """The query side of a rerank request: text and/or an image, and not blank (a relevance score
    against nothing is no answer a client can use)."""
    item = _item(value, policy, field, None)
    if item.image is None and not item.text.strip():
        raise RequestError(400, "malformed", f"{field} is empty", field)
    return item


def _item(value: Side, policy: ImagePolicy, field: str, index: int | None, rank_fields: list[str] | None = None
          ) -> Item:
    if isinstance(value, str):
        return Item(text=value)
    text = value.text if rank_fields is None else _ranked_text(value, rank_fields, field, index)
    if text is None and value.image is None:
        raise RequestError(400, "malformed", "needs 'text' and/or 'image'" if rank_fields is None else
                           f"has none of rank_fields {rank_fields} and no 'image'", field, index)
    image = policy.resolve(value.image, field, index) if value.image is not None else None
    return Item(text=text or "", image=image)


def _ranked_text(value: Document, rank_fields: list[str], field: str, index: int | None) -> str | None:
    """The text a document object is ranked on under Cohere v1's ``rank_fields``: one field's
    value as it is; several as ``name: value`` lines in the order given (the YAML-like form Cohere
    recommends for structured documents), fields the object lacks left out. Values must be
    strings or numbers."""
    fields = {"text": value.text, **(value.model_extra or {})}
    present = [(name, fields[name]) for name in rank_fields if fields.get(name) is not None]
    for name, v in present:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise RequestError(400, "malformed", f"rank field {name!r} must be a string or a number, got "
                                                 f"{type(v).__name__}", field, index)
    if not present:
        return None
    if len(rank_fields) == 1:
        return str(present[0][1])
    return "\n".join(f"{name}: {v}" for name, v in present)


def _content_item(value: Union[str, Content], policy: ImagePolicy, field: str, index: int | None) -> Item:
    if isinstance(value, str):
        return Item(text=value)
    texts, images = [], []
    for part in value.content:
        if part.type == "text":
            texts.append(part.text or "")
        elif part.type in ("image_url", "image"):
            url = part.image_url.get("url") if isinstance(part.image_url, dict) else (part.image_url or part.image)
            if not url:
                raise RequestError(400, "malformed", f"content part of type {part.type!r} has no image", field, index)
            images.append(policy.resolve(url, field, index))
        else:
            raise RequestError(422, "invalid_input", f"content parts of type {part.type!r} are not supported "
                                                     "(text, image_url)", field, index)
    if len(images) > 1:
        raise RequestError(422, "invalid_input", "GMR reads at most one image per query or document", field, index)
    if not texts and not images:
        raise RequestError(400, "malformed", "empty content", field, index)
    return Item(text="".join(texts), image=images[0] if images else None)


def rerank_pairs(req: RerankRequest, policy: ImagePolicy, max_documents: int) -> tuple[Item, list[Item]]:
    if not req.documents:
        raise RequestError(400, "malformed", "documents is empty", "documents")
    if len(req.documents) > max_documents:
        raise RequestError(413, "too_large", f"{len(req.documents)} documents; this server takes at most {max_documents} "
                                             "per request", "documents")
    query = _query(req.query, policy)
    return query, [_item(d, policy, "documents", i, req.rank_fields) for i, d in enumerate(req.documents)]


def tei_pairs(req: TEIRerankRequest, max_documents: int) -> tuple[Item, list[Item]]:
    if not req.texts:
        raise RequestError(400, "malformed", "texts is empty", "texts")
    if len(req.texts) > max_documents:
        raise RequestError(413, "too_large", f"{len(req.texts)} texts; this server takes at most {max_documents} per "
                                             "request", "texts")
    direction = req.truncation_direction.lower()
    if direction not in ("left", "right"):
        raise RequestError(400, "malformed", "truncation_direction must be 'right' or 'left', got "
                                             f"{req.truncation_direction!r}", "truncation_direction")
    if direction == "left":
        raise RequestError(422, "invalid_input", "truncation_direction 'left' is not supported: a document's text "
                                                 "is cut at its end", "truncation_direction")
    return _query(req.query, ImagePolicy()), [Item(text=t) for t in req.texts]


def score_pairs(req: ScoreRequest, policy: ImagePolicy, max_documents: int) -> list[tuple[Item, Item]]:
    """vLLM's pairing: one text_1 against every text_2, or two equal-length lists pairwise."""
    one = isinstance(req.text_1, (str, Content))
    firsts = [req.text_1] if one else list(req.text_1)
    seconds = [req.text_2] if isinstance(req.text_2, (str, Content)) else list(req.text_2)
    if not firsts or not seconds:
        raise RequestError(400, "malformed", "text_1 and text_2 must not be empty", "text_1" if not firsts else "text_2")
    if len(firsts) != 1 and len(firsts) != len(seconds):
        raise RequestError(400, "malformed", f"text_1 has {len(firsts)} items and text_2 {len(seconds)}: give one text_1, "
                                             "or lists of equal length", "text_1")
    if len(seconds) > max_documents:
        raise RequestError(413, "too_large", f"{len(seconds)} pairs; this server takes at most {max_documents} per request",
                           "text_2")
    lefts = [_content_item(x, policy, "text_1", i if len(firsts) > 1 else None) for i, x in enumerate(firsts)]
    rights = [_content_item(x, policy, "text_2", i) for i, x in enumerate(seconds)]
    return [(lefts[0] if len(lefts) == 1 else lefts[i], r) for i, r in enumerate(rights)]


def echo_document(value: Side) -> Any:
    """What ``return_documents`` gives back: Cohere's ``{"text": ...}``; an object as sent, its
    own fields and images included."""
    if isinstance(value, str):
        return {"text": value}
    own = {k: v for k, v in (("text", value.text), ("image", value.image)) if v is not None}
    return {**own, **(value.model_extra or {})}  # the caller's own fields exactly as sent, nulls included
