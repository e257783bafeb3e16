"""The FastAPI application: routes, authentication, limits, and the one place where errors become
HTTP statuses.

Statuses: 400 malformed or empty request (JSON that does not parse or fit the schema, no
documents), 401 missing or wrong API key, 413 body or document count over the limits (and, in
TEI's shape with ``truncate`` false, a text that does not fit whole), 422 invalid
input (a corrupt or missing image, a remote image URL, a pair too long to fit even without
document text), 429 queue full, 503 not ready (the engine is still loading, or the server is
shutting down), 500 an unexpected engine failure (logged; the server keeps serving). Error
bodies are ``{"error": {"type", "message", "field"?, "index"?}}``.

A bad document fails its whole request (422 naming the field and document index), as Cohere and
vLLM reject invalid input; other requests batched with it are unaffected.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import HTTPException as BodyTooLarge  # FastAPI passes its own on from a body's reading
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..errors import GmrError, ImageError, PromptError
from .metrics import Metrics
from .queue import BatchQueue, Job, NotReady, QueueFull, Truncated
from .schema import (ImagePolicy, RequestError, RerankRequest, ScoreRequest, TEIRerankRequest, echo_document,
                     rerank_pairs, score_pairs, tei_pairs)

log = logging.getLogger("gmr_fast.server")


@dataclass
class ServerState:
    engine_dir: str
    reranker_options: object
    api_key: str | None = None
    max_documents: int = 1000
    max_queue: int = 8192
    max_body_bytes: int = 64 << 20
    local_images: str | None = None
    model_name: str = "gmr"
    reranker: object = None
    queue: BatchQueue | None = None
    load_error: str | None = None
    loaded_at: float = 0.0  # when the engine was ready (unix time)


class BodyLimit:
    """The body limit on the bytes read, for bodies that announce no length: the guard refuses
    an over-long Content-Length before reading, but a chunked body (``Transfer-Encoding:
    chunked``) has none and would otherwise be read whole into memory, however large. Raised
    inside the body's reading, as an HTTPException FastAPI passes on (a 413 in the error shape)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, received = self.state.max_body_bytes, 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(413, f"body of more than {limit} bytes; the limit is {limit}")
            return message
        await self.app(scope, limited, send)


class AsciiJSON(JSONResponse):
    """Every JSON body with non-ASCII characters as \\u escapes. Responses echo strings from the
    request (a document's own fields, the model name), and JSON's escapes can carry a lone
    surrogate ("\\udc80") that UTF-8 cannot: written as UTF-8, such a body was a 500. Escaped,
    it is echoed as it was sent, and clients decode both spellings alike."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def create_app(state: ServerState, load_in_background: bool = True) -> FastAPI:
    metrics = Metrics.create()
    policy = ImagePolicy(state.local_images)

    def load() -> None:
        try:
            from ..reranker import Reranker

            state.reranker = Reranker(state.engine_dir, state.reranker_options)
            state.loaded_at = time.time()
            state.queue = BatchQueue(state.reranker, metrics, max_queue_pairs=state.max_queue)  # ready from here
            log.info("engine ready: %s", state.reranker.choice)
        except Exception as e:  # noqa: BLE001 - reported by /health and every request (503)
            state.load_error = f"{type(e).__name__}: {e}"
            log.error("the engine failed to load: %s", state.load_error)

    async def lifespan(app):
        if load_in_background:
            threading.Thread(target=load, name="gmr-load", daemon=True).start()
        else:
            load()
        yield
        if state.queue is not None:  # finish what is queued, then stop the planner and engine threads
            await asyncio.to_thread(state.queue.close)

    app = FastAPI(title="gmr_fast rerank server", lifespan=lifespan, default_response_class=AsciiJSON)
    app.state.gmr = state
    app.state.metrics = metrics

    # ------------------------------------------------------------------ errors, in one place
    def error(status: int, kind: str, message: str, field: str | None = None, index: int | None = None,
              headers: dict | None = None):
        body = {"type": kind, "message": message}
        if field is not None:
            body["field"] = field
        if index is not None:
            body["index"] = index
        return AsciiJSON({"error": body}, status_code=status, headers=headers)

    def to_response(e: BaseException):
        if isinstance(e, RequestError):
            return error(e.status, e.kind, str(e), e.field, e.index)
        if isinstance(e, (ImageError, PromptError)):
            index = getattr(e, "pair_index", None)
            return error(422, "invalid_input", str(e), getattr(e, "field", None), index)
        if isinstance(e, QueueFull):
            return error(429, "queue_full", str(e))
        if isinstance(e, NotReady):
            return error(503, "not_ready", str(e))
        if isinstance(e, GmrError):
            return error(422, "invalid_input", str(e))
        log.exception("unexpected error", exc_info=e)
        return error(500, "internal", f"{type(e).__name__}: {e}")

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", [])]
        loc = loc[1:] if loc[:1] == ["body"] else loc
        if first.get("type") == "json_invalid":  # loc is ("body", character offset): name the body, not the offset
            reason = (first.get("ctx") or {}).get("error", "")
            at = f" at character {loc[0]}" if loc and loc[0].isdigit() else ""
            return error(400, "malformed", f"the body is not valid JSON{at}" + (f" ({reason})" if reason else ""),
                         "body")
        content_type = request.headers.get("content-type", "")
        if not loc and "json" not in content_type.lower():  # e.g. curl -d without -H: a form, not JSON
            return error(400, "malformed", f"the body must be JSON sent as Content-Type: application/json (got "
                                           f"{content_type or 'no Content-Type'!r})", "body")
        index = next((int(x) for x in loc[1:2] if x.isdigit()), None)
        return error(400, "malformed", first.get("msg", "malformed request"), loc[0] if loc else None, index)

    @app.exception_handler(HTTPException)
    async def on_http(request, exc: HTTPException):  # routing's own: an unknown path, a wrong method
        kind = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
        return error(exc.status_code, kind, f"{request.method} {request.url.path}: {exc.detail}", headers=exc.headers)

    @app.exception_handler(GmrError)
    async def on_gmr(request, exc: GmrError):
        return to_response(exc)

    # inside the guard (added first, so nearer the routes): the exception it raises then reaches
    # FastAPI's body reading directly, not through the guard's task group
    app.add_middleware(BodyLimit, state=state)
    routes: set[str] = set()  # filled once every route is defined, below

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Body limit, authentication and metrics for every request."""
        # metrics are labelled by route: one label per path a client sends would be a series kept
        # for good for every path a scanner tries
        endpoint = request.url.path if request.url.path in routes else "other"
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > state.max_body_bytes:
                response = error(413, "too_large", f"body of {length} bytes; the limit is {state.max_body_bytes}")
            elif (state.api_key and request.url.path not in ("/health", "/metrics")
                  and not _authorized(request, state.api_key)):
                response = error(401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY)")
            else:
                try:
                    response = await call_next(request)
                except Exception as e:  # noqa: BLE001 - never fall over: an unexpected failure is a 500
                    response = to_response(e)
        finally:
            metrics.in_flight.dec()
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    # ------------------------------------------------------------------ scoring
    def ready():
        if state.load_error:
            raise NotReady(f"the engine failed to load: {state.load_error}")
        if state.queue is None:
            raise NotReady("the engine is still loading; retry shortly")
        return state.queue

    async def run(request: Request, pairs, instruction, labels, refuse_truncation: bool = False,
                  max_length: int | None = None, query_field: str = "query") -> tuple[np.ndarray, int]:
        queue = ready()
        loop = asyncio.get_running_loop()
        job = Job(pairs, instruction, labels, loop, loop.create_future(), refuse_truncation=refuse_truncation,
                  max_length=max_length)
        queue.submit(job)
        while not job.future.done():  # free the queued work if the client goes away
            await asyncio.wait({job.future}, timeout=0.25)
            if not job.future.done() and await request.is_disconnected():
                queue.cancel(job)
                raise NotReady("client disconnected")
        try:
            return job.future.result(), job.tokens
        except (ImageError, PromptError) as e:
            raise _name(e, labels, query_field) from None
        except Truncated as e:
            raise RequestError(413, "too_large", str(e), e.label.split("[")[0], e.index) from None

    def rerank_items(body: RerankRequest):
        query, documents = rerank_pairs(body, policy, state.max_documents)
        if body.max_tokens_per_doc:
            documents = [_truncated(state, d, body.max_tokens_per_doc) for d in documents]
        return query, documents

    async def rerank(request: Request, body: RerankRequest, version: int):
        ready()
        # base64 images decoded and max_tokens_per_doc's tokenizing done off the event loop
        query, documents = await asyncio.to_thread(rerank_items, body)
        labels = [f"documents[{i}]" for i in range(len(documents))]
        scores, tokens = await run(request, [(query, d) for d in documents], body.instruction, labels)
        values = scores if body.raw_scores else _sigmoid(scores)
        order = sorted(range(len(values)), key=lambda i: (-values[i], i))[:body.top_n or len(values)]
        results = []
        for i in order:
            row = {"index": i, "relevance_score": float(values[i])}
            if body.return_documents:
                row["document"] = echo_document(body.documents[i])
            results.append(row)
        meta = {"api_version": {"version": str(version)}, "billed_units": {"search_units": math.ceil(len(documents) / 100)}}
        if version == 2:
            meta["tokens"] = {"input_tokens": tokens}
        # Cohere's body, plus the model and usage that Jina's and vLLM's rerank responses carry
        return {"id": str(uuid.uuid4()), "model": body.model or state.model_name, "results": results, "meta": meta,
                "usage": {"total_tokens": tokens}}

    @app.post("/v1/rerank")
    async def rerank_v1(request: Request, body: RerankRequest):
        return await rerank(request, body, 1)

    @app.post("/v2/rerank")
    async def rerank_v2(request: Request, body: RerankRequest):
        return await rerank(request, body, 2)

    async def rerank_tei(request: Request, body: TEIRerankRequest):
        """TEI's shape: a bare list ``[{index, score, text?}]``, best first, every text."""
        query, documents = tei_pairs(body, state.max_documents)
        labels = [f"texts[{i}]" for i in range(len(documents))]
        scores, _ = await run(request, [(query, d) for d in documents], body.instruction, labels,
                              refuse_truncation=not body.truncate)
        values = scores if body.raw_scores else _sigmoid(scores)
        order = sorted(range(len(values)), key=lambda i: (-values[i], i))
        return [{"index": i, "score": float(values[i]), **({"text": body.texts[i]} if body.return_text else {})}
                for i in order]

    @app.post("/rerank")
    async def rerank_plain(request: Request, body: dict = Body(...)):
        """Cohere's (and vLLM's, Jina's) body with ``documents``; TEI's with ``texts``."""
        if "texts" in body and "documents" not in body:
            return await rerank_tei(request, _validated(TEIRerankRequest, body))
        return await rerank(request, _validated(RerankRequest, body), 2)

    async def score(request: Request, body: ScoreRequest):
        limit = _prompt_limit(body.truncate_prompt_tokens, ready().reranker.gmr.max_length)
        pairs = await asyncio.to_thread(score_pairs, body, policy, state.max_documents)
        labels = [f"text_2[{i}]" for i in range(len(pairs))]
        scores, tokens = await run(request, pairs, body.instruction, labels, max_length=limit, query_field="text_1")
        values = scores if body.raw_scores else _sigmoid(scores)
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.model or state.model_name,
                "data": [{"index": i, "object": "score", "score": float(v)} for i, v in enumerate(values)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    app.post("/score")(score)
    app.post("/v1/score")(score)

    # ------------------------------------------------------------------ status
    @app.get("/health")
    async def health():
        if state.load_error:
            return error(503, "not_ready", f"the engine failed to load: {state.load_error}")
        if state.queue is None:
            return error(503, "not_ready", "the engine is still loading")
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        ready()
        m, r = state.reranker.manifest, state.reranker
        return {"model": state.model_name, "engine": state.engine_dir, "family": m.family, "precisions": list(m.precisions),
                "running": r.choice, "max_length": r.gmr.max_length, "min_pixels": m.preprocessing.min_pixels,
                "max_pixels": m.preprocessing.max_pixels, "hidden_size": m.decoder.hidden_size,
                "layers": m.decoder.num_layers, "validation": {p: {k: v.validation.get(k) for k in
                                                                   ("kendall_tau", "max_rel_error", "top10_overlap_mean")}
                                                               for p, v in m.variants.items()},
                "limits": {"max_documents": state.max_documents, "max_queue_pairs": state.max_queue,
                           "max_body_bytes": state.max_body_bytes,
                           "max_batch_tokens": r.options.max_batch_tokens}}

    @app.get("/v1/models")
    async def models():
        """The served model in OpenAI's list shape, as vLLM and Infinity answer it (clients such as
        LiteLLM list models before calling)."""
        r = ready().reranker
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(state.loaded_at),
                                            "owned_by": "gmr_fast", "root": state.engine_dir,
                                            "max_model_len": r.gmr.max_length}]}

    @app.get("/metrics")
    async def prometheus():
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

    routes.update(route.path for route in app.routes)
    return app


def _validated(model, body: dict):
    """``body`` as ``model``; a mismatch is the same 400 as a route's own validation."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def _authorized(request, key: str) -> bool:
    """The key in ``Authorization: Bearer KEY`` or ``X-API-Key``, compared in constant time (a
    plain ``==`` returns sooner the earlier a guess goes wrong, which times the key out), as bytes:
    the header's own (Starlette decodes headers as latin-1) against the key's in UTF-8."""
    def same(value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode("latin-1", "replace"),
                                                         key.encode("utf-8", "surrogateescape"))
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (scheme.lower() == "bearer" and same(token.strip())) | same(request.headers.get("x-api-key"))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _truncated(state: ServerState, item, max_tokens: int):
    """The document with its text cut to ``max_tokens`` tokens (Cohere's max_tokens_per_doc)."""
    from ..prompt import Item, text_problem

    if not item.text:
        return item
    if text_problem(item.text) is not None:  # not tokenizable: planning fails this document by name
        return item
    tok = state.reranker.prompts.tokenizer.encode(item.text, add_special_tokens=False)
    if len(tok.ids) <= max_tokens:
        return item
    return Item(text=item.text[:tok.offsets[max_tokens - 1][1]], image=item.image)


def _prompt_limit(value: int | None, max_length: int) -> int | None:
    """vLLM's ``truncate_prompt_tokens`` as a cap on each prompt's tokens: k keeps every prompt
    within k tokens by cutting its document's text at the end (gmr_fast never cuts the
    instruction, the query or an image, and the yes/no position is the prompt's last), -1 or
    absent the engine's own limit. As vLLM, a k above the engine's limit is refused (400)."""
    if value is None or value == -1:
        return None
    if not 1 <= value <= max_length:
        raise RequestError(400, "malformed", f"truncate_prompt_tokens {value}: expected -1 or 1 to the engine's "
                                             f"max_length {max_length}", "truncate_prompt_tokens")
    return value


def _name(e: GmrError, labels: list[str], query_field: str = "query") -> RequestError:
    """A pair's error as a 422 naming the request field and index ("documents[3] ..." labels);
    ``query_field`` is the field that holds the query (``text_1`` in vLLM's shape)."""
    message = str(e)
    if "without any document text" in message:  # the query (and instruction, images) alone do not fit
        return RequestError(422, "invalid_input", f"{query_field}: " + message.split(": ", 1)[-1], query_field)
    for i, label in enumerate(labels):
        if message.startswith(label + " instruction"):  # one instruction per request
            return RequestError(422, "invalid_input", "instruction" + message[len(label) + len(" instruction"):],
                                "instruction")
        if message.startswith(label + " query"):
            return RequestError(422, "invalid_input", query_field + message[len(label) + len(" query"):], query_field)
        if message.startswith(label + " ") or message.startswith(label + ":"):
            field = label.split("[")[0]
            return RequestError(422, "invalid_input", message, field, i)
    return RequestError(422, "invalid_input", message)
