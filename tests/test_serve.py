"""``python -m gmr_fast.serve`` over real HTTP on a free loopback port: every endpoint, every error
class, authentication, image documents, batching across concurrent requests (scores identical to
``Reranker.score``), existing client libraries, and a graceful shutdown."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.e2e
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from gmr_fast import Reranker  # noqa: E402
from gmr_fast.reranker import RerankerOptions  # noqa: E402
from gmr_fast.serve import ServerOptions, build_app  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn on a free loopback port in a thread. Entering waits until /health says ready (200),
    or, with ``ready=False`` (an engine that cannot load), until the server answers at all."""

    def __init__(self, app, ready: bool = True):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.ready = ready

    def __enter__(self):
        self.thread.start()
        url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200 or not self.ready:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def png(rng, h=60, w=80) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine(exported_engines):
    return str(exported_engines["qwen2_5_vl"][1])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("served_images")
    rng = np.random.default_rng(5)
    (root / "a.png").write_bytes(png(rng))
    return root


@pytest.fixture(scope="module")
def server(engine, images):
    app = build_app(ServerOptions(engine=engine, api_key=KEY, max_documents=50, allow_local_images=str(images),
                                  max_body_mb=1), RerankerOptions(max_batch_tokens=2048, max_length=400))
    with ThreadServer(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def reference(engine):
    return Reranker(engine, max_batch_tokens=2048, max_length=400)


def post(url, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=60, **kw)


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def test_rerank_v1_v2_and_documents(server, reference):
    url, _ = server
    docs = ["cats are small", "the stock market fell", "a cat sat on a mat", "quantum physics"]
    expected = reference.score([("what is a cat?", d) for d in docs])
    for version in (1, 2):
        r = post(url, f"/v{version}/rerank", {"model": "gmr", "query": "what is a cat?", "documents": docs, "top_n": 3,
                                              "return_documents": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["index"] for x in body["results"]] == list(np.argsort(-expected, kind="stable")[:3])
        for x in body["results"]:
            assert x["relevance_score"] == pytest.approx(sigmoid(expected[x["index"]]), abs=1e-6)
            assert x["document"] == {"text": docs[x["index"]]}
        assert body["meta"]["api_version"]["version"] == str(version) and body["id"]
    raw = post(url, "/v2/rerank", {"query": "what is a cat?", "documents": docs, "raw_scores": True}).json()
    assert {x["index"]: x["relevance_score"] for x in raw["results"]} == pytest.approx(dict(enumerate(expected.tolist())),
                                                                                        abs=1e-5)
    assert raw["meta"]["tokens"]["input_tokens"] > 0
    assert raw["usage"]["total_tokens"] == raw["meta"]["tokens"]["input_tokens"]
    assert raw["model"] == "gmr"  # Jina's and vLLM's response fields, beside Cohere's


def test_document_objects_with_fields_of_their_own(server, reference):
    """Cohere v1 document objects: fields besides text are kept and given back as sent; without
    ``rank_fields`` the text is ranked, with one field that field's value, with several their
    ``name: value`` lines in the order given. A document with none of them fails its request."""
    url, _ = server
    q = "what is a cat?"
    docs = [{"title": "Cats", "text": "cats are small", "id": 7}, {"title": "Markets", "text": "the stock market fell"},
            "plain string"]
    for fields, texts in [(None, ["cats are small", "the stock market fell"]), (["title"], ["Cats", "Markets"]),
                          (["title", "text"], ["title: Cats\ntext: cats are small",
                                               "title: Markets\ntext: the stock market fell"])]:
        body = {"query": q, "documents": docs, "return_documents": True, "raw_scores": True}
        r = post(url, "/v1/rerank", body if fields is None else {**body, "rank_fields": fields})
        assert r.status_code == 200, r.text
        got = {x["index"]: x for x in r.json()["results"]}
        expected = reference.score([(q, t) for t in texts + ["plain string"]])
        assert np.abs(np.array([got[i]["relevance_score"] for i in range(3)]) - expected).max() <= 1e-5, fields
        assert [got[i]["document"] for i in range(3)] == docs[:2] + [{"text": "plain string"}]
    for bad, index in [({"query": q, "documents": ["ok", {"title": "x"}], "rank_fields": ["author"]}, 1),
                       ({"query": q, "documents": [{"title": {"nested": 1}}], "rank_fields": ["title"]}, 0)]:
        r = post(url, "/v1/rerank", bad)
        assert r.status_code == 400 and r.json()["error"]["index"] == index, r.text


def images_counted(app) -> dict:
    return {s.labels["source"]: s.value for s in app.state.metrics.images.collect()[0].samples
            if s.name == "gmr_images_total"}


def test_image_documents_and_queries(server, reference, images, rng):
    url, app = server
    before = images_counted(app)
    data = png(rng)
    b64 = base64.b64encode(data).decode()
    docs = [{"image": b64}, {"text": "a caption", "image": "data:image/png;base64," + b64}, "plain text",
            {"image": "file://a.png"}]
    query = {"text": "find the photo", "image": b64}
    r = post(url, "/v2/rerank", {"query": query, "documents": docs, "raw_scores": True})
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    expected = reference.score([({"text": "find the photo", "image": data},
                                 d) for d in [{"image": data}, {"text": "a caption", "image": data}, "plain text",
                                              {"image": str(images / "a.png")}]])
    assert np.abs(np.array([got[i] for i in range(4)]) - expected).max() <= 1e-5
    counted = images_counted(app)  # one image sent three times and one file: each encoded once, no cache here
    assert 1 <= counted["encoded"] - before.get("encoded", 0) <= 2 and counted.get("cache", 0) == 0
    assert "gmr_images_total{source=" in httpx.get(url + "/metrics").text


def test_score_endpoint_in_vllm_shape(server, reference, rng):
    url, _ = server
    one = post(url, "/score", {"model": "gmr", "text_1": "cats", "text_2": ["a cat", "a dog"]})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    expected = reference.score([("cats", "a cat"), ("cats", "a dog")])
    assert [d["score"] for d in body["data"]] == pytest.approx(sigmoid(expected).tolist(), abs=1e-6)
    pairwise = post(url, "/score", {"text_1": ["q1", "q2"], "text_2": ["d1", "d2"], "raw_scores": True}).json()
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(reference.score([("q1", "d1"), ("q2", "d2")]).tolist(),
                                                                  abs=1e-5)
    image = "data:image/png;base64," + base64.b64encode(png(rng)).decode()
    mm = post(url, "/score", {"text_1": "photo", "text_2": [{"content": [{"type": "text", "text": "a caption"},
                                                                         {"type": "image_url", "image_url": {"url": image}}]}]})
    assert mm.status_code == 200 and len(mm.json()["data"]) == 1
    bad = post(url, "/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "text_1"


def test_rerank_in_tei_shape(server, reference):
    """``POST /rerank`` with ``texts`` (Text Embeddings Inference) answers TEI's bare list, best
    first; with ``documents`` the same path keeps Cohere's shape. TEI refuses a text that does
    not fit unless ``truncate`` is true (413 naming it)."""
    url, _ = server
    texts = ["cats are small", "the stock market fell", "a cat sat on a mat"]
    expected = reference.score([("what is a cat?", t) for t in texts])
    r = post(url, "/rerank", {"query": "what is a cat?", "texts": texts, "return_text": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["index"] for x in body] == list(np.argsort(-expected, kind="stable"))
    for x in body:
        assert x["score"] == pytest.approx(sigmoid(expected[x["index"]]), abs=1e-6) and x["text"] == texts[x["index"]]
    raw = post(url, "/rerank", {"query": "what is a cat?", "texts": texts, "raw_scores": True}).json()
    assert {x["index"]: x["score"] for x in raw} == pytest.approx(dict(enumerate(expected.tolist())), abs=1e-5)
    assert all("text" not in x for x in raw)
    cohere_shape = post(url, "/rerank", {"query": "what is a cat?", "documents": texts}).json()
    assert len(cohere_shape["results"]) == 3 and "relevance_score" in cohere_shape["results"][0]

    long = ["short", "word " * 600]  # the server's max_length is 400 tokens
    refused = post(url, "/rerank", {"query": "q", "texts": long})
    assert refused.status_code == 413, refused.text
    assert refused.json()["error"]["field"] == "texts" and refused.json()["error"]["index"] == 1
    cut = post(url, "/rerank", {"query": "q", "texts": long, "truncate": True, "raw_scores": True})
    assert cut.status_code == 200, cut.text
    assert {x["index"]: x["score"] for x in cut.json()} == pytest.approx(
        dict(enumerate(reference.score([("q", t) for t in long]).tolist())), abs=1e-5)
    for bad, status, field in [({"query": "q", "texts": []}, 400, "texts"),
                               ({"query": "q", "texts": ["a", 3]}, 400, "texts"),
                               ({"query": "q", "texts": ["a"], "truncation_direction": "left"}, 422,
                                "truncation_direction"),
                               ({"query": "q", "texts": ["a"], "truncation_direction": "up"}, 400,
                                "truncation_direction")]:
        r = post(url, "/rerank", bad)
        assert r.status_code == status and r.json()["error"]["field"] == field, r.text


def test_per_request_truncation(server, reference, engine, images):
    """Cohere's ``max_tokens_per_doc`` keeps each document's first N text tokens (an image stays);
    vLLM's ``truncate_prompt_tokens`` caps every whole prompt at k tokens by cutting the document's
    text at its end, as ``Reranker(max_length=k)`` does; -1 is the engine's own limit, a k above it
    or below 1 is refused (400), and a k the query alone overflows names text_1 (422). Raw scores
    within 1e-5: the same fp32 graphs over batches of different composition."""
    url, _ = server
    long = "the quick brown fox jumps over the lazy dog " * 20  # 180 tokens, one per word
    cut = " ".join(long.split()[:6])
    docs = [long, "short doc", {"text": long, "image": "file://a.png"}]
    r = post(url, "/v2/rerank", {"query": "a fox", "documents": docs, "max_tokens_per_doc": 6, "raw_scores": True})
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    expected = reference.score([("a fox", cut), ("a fox", "short doc"),
                                ("a fox", {"text": cut, "image": str(images / "a.png")})])
    assert np.abs(np.array([got[i] for i in range(3)]) - expected).max() <= 1e-5
    whole = post(url, "/v2/rerank", {"query": "a fox", "documents": docs}).json()
    assert whole["meta"]["tokens"]["input_tokens"] - r.json()["meta"]["tokens"]["input_tokens"] >= 2 * (180 - 6) - 4

    k, pairs = 120, [("a fox", long), ("a fox", "short doc")]
    capped = Reranker(engine, max_batch_tokens=2048, max_length=k)
    r = post(url, "/score", {"text_1": "a fox", "text_2": [long, "short doc"], "truncate_prompt_tokens": k,
                             "raw_scores": True})
    assert r.status_code == 200, r.text
    assert [d["score"] for d in r.json()["data"]] == pytest.approx(capped.score(pairs).tolist(), abs=1e-5)
    one = post(url, "/score", {"text_1": "a fox", "text_2": long, "truncate_prompt_tokens": k}).json()
    assert k - 4 <= one["usage"]["prompt_tokens"] <= k
    same = post(url, "/score", {"text_1": "a fox", "text_2": [long, "short doc"], "truncate_prompt_tokens": -1,
                                "raw_scores": True}).json()
    assert [d["score"] for d in same["data"]] == pytest.approx(reference.score(pairs).tolist(), abs=1e-5)
    for value in (0, 401, -2):
        bad = post(url, "/score", {"text_1": "a fox", "text_2": long, "truncate_prompt_tokens": value})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "truncate_prompt_tokens", bad.text
    over = post(url, "/score", {"text_1": "a fox", "text_2": ["d", "e"], "truncate_prompt_tokens": 5})
    assert over.status_code == 422 and over.json()["error"]["field"] == "text_1", over.text


@pytest.mark.parametrize("body,status,field,index", [
    ({"query": "q"}, 400, "documents", None),
    ({"query": "q", "documents": []}, 400, "documents", None),
    ({"query": "q", "documents": [{"txt": "x"}]}, 400, "documents", 0),
    ({"query": "q", "documents": ["x"] * 51}, 413, "documents", None),
    ({"query": "q", "documents": ["ok", {"image": "bm90IGFuIGltYWdl"}]}, 422, "documents", 1),
    ({"query": "q", "documents": ["ok", {"image": "https://example.com/a.png"}]}, 422, "documents", 1),
    ({"query": "q", "documents": [{"image": "file://../../etc/passwd"}]}, 422, "documents", 0),
    ({"query": "q", "documents": [{"image": "%%%"}]}, 422, "documents", 0),
    ({"query": "word " * 600, "documents": ["d"]}, 422, "query", None),
    ({"query": "", "documents": ["d"]}, 400, "query", None),
    ({"query": {"text": " \n"}, "documents": ["d"]}, 400, "query", None),
    ({"query": "q", "documents": ["ok", {"image": "/data/photos/cat.png"}]}, 422, "documents", 1),
])
def test_errors_name_the_field_and_index(server, body, status, field, index):
    url, _ = server
    r = post(url, "/v2/rerank", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err.get("field") == field and err.get("index") == index, err
    assert err["message"]


def test_common_client_mistakes_get_messages_that_say_what_to_do(server):
    url, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    # curl -d without -H sends a form; the body is JSON all the same, and the message says which header
    r = httpx.post(url + "/v1/rerank", content=b'{"query": "q", "documents": ["d"]}',
                   headers={**auth, "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "body", r.text
    assert "application/json" in r.json()["error"]["message"]
    # a path where the image belongs: named as a path, with the two ways to send it
    for path in ("/data/photos/cat.png", "cat.JPG", "C:\\photos\\cat"):
        r = post(url, "/v2/rerank", {"query": "q", "documents": [{"image": path}]})
        assert r.status_code == 422 and "looks like a file path" in r.json()["error"]["message"], r.text
        assert "file://" in r.json()["error"]["message"]  # this server allows a directory: the way in is named
    # valid base64 that starts with "/" (a JPEG's does) is decoded, not taken for a path
    r = post(url, "/v2/rerank", {"query": "q", "documents": [{"image": "/9j/" + "A" * 40}]})
    assert r.status_code == 422 and "looks like a file path" not in r.json()["error"]["message"], r.text
    # a blank query is refused in TEI's shape too
    r = post(url, "/rerank", {"query": " ", "texts": ["d"]})
    assert r.status_code == 400 and r.json()["error"]["field"] == "query", r.text


def test_a_path_sent_to_a_server_without_local_images_names_the_flag():
    from gmr_fast.server.schema import ImagePolicy, RequestError

    with pytest.raises(RequestError, match="--allow-local-images") as e:
        ImagePolicy().resolve("./photos/cat.png", "documents", 2)
    assert (e.value.status, e.value.field, e.value.index) == (422, "documents", 2)


def test_the_key_check_takes_both_headers_and_any_bytes():
    """Authorization: Bearer KEY or X-API-Key, compared in constant time on bytes: a header with
    bytes beyond ASCII (Starlette decodes headers as latin-1) is a wrong key, not a 500."""
    from types import SimpleNamespace

    from starlette.datastructures import Headers

    from gmr_fast.server.app import _authorized

    def ask(key, **headers):
        raw = [(k.replace("_", "-").encode(), v.encode("latin-1")) for k, v in headers.items()]
        return _authorized(SimpleNamespace(headers=Headers(raw=raw)), key)
    assert ask("k1", authorization="Bearer k1") and ask("k1", authorization="bearer  k1 ") and ask("k1", x_api_key="k1")
    assert not ask("k1", authorization="Bearer k2") and not ask("k1", authorization="Basic k1") and not ask("k1")
    assert not ask("k1", authorization="Bearer k\u00e9") and not ask("k1", x_api_key="\u00ff")
    assert ask("cl\u00e9", x_api_key="cl\u00c3\u00a9")  # a UTF-8 key, sent as UTF-8 bytes
    assert ask("k1", authorization="Bearer nope", x_api_key="k1")


def test_malformed_body_auth_and_size_limits(server):
    url, _ = server
    r = httpx.post(url + "/v2/rerank", content=b"{not json", headers={"Authorization": f"Bearer {KEY}",
                                                                      "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "malformed"
    assert r.json()["error"]["field"] == "body" and "at character 1" in r.json()["error"]["message"], r.text
    assert post(url, "/v2/rerank", {"query": "q", "documents": ["d"]}, key=None).status_code == 401
    assert post(url, "/v2/rerank", {"query": "q", "documents": ["d"]}, key="wrong").status_code == 401
    assert httpx.post(url + "/v2/rerank", json={"query": "q", "documents": ["d"]}, headers={"X-API-Key": KEY}).status_code == 200
    big = post(url, "/v2/rerank", {"query": "q", "documents": ["x" * (2 << 20)]})
    assert big.status_code == 413

    def chunked(body: dict):  # a generator: httpx sends it chunked, with no Content-Length to refuse it by
        data = json.dumps(body).encode()
        yield from (data[i:i + (1 << 16)] for i in range(0, len(data), 1 << 16))
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(url + "/v2/rerank", content=chunked({"query": "q", "documents": ["x" * (2 << 20)]}), headers=headers)
    assert r.status_code == 413 and r.json()["error"]["type"] == "too_large", r.text
    r = httpx.post(url + "/v2/rerank", content=chunked({"query": "q", "documents": ["d"]}), headers=headers)
    assert r.status_code == 200 and len(r.json()["results"]) == 1, r.text
    assert httpx.get(url + "/health").status_code == 200  # open, like /metrics
    assert httpx.get(url + "/info").status_code == 401
    info = httpx.get(url + "/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["family"] == "qwen2_5_vl" and info["running"]["precision"] and info["limits"]["max_documents"] == 50
    assert httpx.get(url + "/v1/models").status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path, status, kind in (("GET", "/v1/rerank", 405, "method_not_allowed"), ("POST", "/v3/rerank", 404,
                                                                                           "not_found")):
        r = httpx.request(method, url + path, headers=auth, json={})  # routing's errors in the same JSON shape
        assert r.status_code == status and r.json()["error"]["type"] == kind and path in r.json()["error"]["message"]
        assert status != 405 or r.headers["allow"] == "POST"
    for i in range(3):  # paths no route serves share one metrics label: a scanner adds no series
        httpx.get(url + f"/scan-{i}", headers=auth)
    exposed = httpx.get(url + "/metrics").text
    assert "scan-" not in exposed and 'gmr_requests_total{endpoint="other",status="404"}' in exposed
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["gmr"]
    assert models["data"][0]["max_model_len"] == 400 and models["data"][0]["created"] <= time.time()


def test_text_no_tokenizer_can_take_is_a_422_naming_it(server, reference):
    """JSON may carry a lone surrogate ("\\udc80"), which no UTF-8 tokenizer takes: a 422 naming
    the field and the document in every shape, not a 500 (nor a failed round for other clients)."""
    url, _ = server

    def raw(path, body: str):
        return httpx.post(url + path, content=body.encode(), headers={"Authorization": f"Bearer {KEY}",
                                                                      "content-type": "application/json"})
    bad = "bad \\udc80 text"
    cases = [("/v2/rerank", '{"query": "q", "documents": ["ok", "%s"]}' % bad, "documents", 1),
             ("/v1/rerank", '{"query": "q", "documents": ["ok", "%s"], "max_tokens_per_doc": 2}' % bad, "documents", 1),
             ("/v2/rerank", '{"query": "%s", "documents": ["ok"]}' % bad, "query", None),
             ("/v2/rerank", '{"query": "q", "documents": ["ok"], "instruction": "%s"}' % bad, "instruction", None),
             ("/score", '{"text_1": "q", "text_2": ["ok", {"content": [{"type": "text", "text": "%s"}]}]}' % bad, "text_2", 1),
             ("/rerank", '{"query": "q", "texts": ["%s", "ok"]}' % bad, "texts", 0)]
    for path, body, field, index in cases:
        r = raw(path, body)
        assert r.status_code == 422, (path, r.text)
        err = r.json()["error"]
        assert (err.get("field"), err.get("index")) == (field, index), (path, err)
        assert "not valid Unicode" in err["message"]
    r = raw("/v2/rerank", '{"query": "q", "documents": ["ok", "\\u00e9t\\u00e9"]}')  # escaped, valid: scored
    assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
    # where such a string is only echoed (a document's own field, the model name), it comes back as sent
    r = raw("/v2/rerank", '{"model": "m\\udc80", "query": "q", "documents": [{"text": "ok", "title": "%s \\u732b"}], '
                          '"return_documents": true}' % bad)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "m\udc80" and r.json()["results"][0]["document"]["title"] == "bad \udc80 text \u732b"


def test_concurrent_requests_share_batches_and_equal_reranker_scores(server, reference, rng):
    url, app = server
    requests = []
    for k in range(12):
        docs = [" ".join(rng.choice(["cat", "dog", "the", "market", "red"], int(rng.integers(3, 40)))) for _ in range(20)]
        requests.append((f"query {k % 4}", docs))
    before = app.state.metrics.round_pairs.collect()[0].samples
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda q: post(url, "/v2/rerank", {"query": q[0], "documents": q[1], "raw_scores": True}),
                                requests))
    for (query, docs), r in zip(requests, replies):
        assert r.status_code == 200, r.text
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        expected = reference.score([(query, d) for d in docs])
        assert np.abs(np.array([got[i] for i in range(len(docs))]) - expected).max() <= 1e-4
    metrics = httpx.get(url + "/metrics").text
    assert 'gmr_requests_total{endpoint="/v2/rerank",status="200"}' in metrics and "gmr_queue_pairs" in metrics
    rounds = {s.name: s.value for s in app.state.metrics.round_pairs.collect()[0].samples}
    old = {s.name: s.value for s in before}
    n_rounds = rounds["gmr_round_pairs_count"] - old.get("gmr_round_pairs_count", 0)
    n_pairs = rounds["gmr_round_pairs_sum"] - old.get("gmr_round_pairs_sum", 0)
    assert n_pairs == 240 and n_rounds < 12  # rounds took several requests' pairs together


def test_existing_client_libraries(server):
    cohere = pytest.importorskip("cohere")
    url, _ = server
    v2 = cohere.ClientV2(api_key=KEY, base_url=url)
    out = v2.rerank(model="gmr", query="what is a cat?", documents=["cats", "stocks", "a cat"], top_n=2)
    assert len(out.results) == 2 and 0 < out.results[0].relevance_score < 1
    v1 = cohere.Client(api_key=KEY, base_url=url)
    out = v1.rerank(model="gmr", query="what is a cat?", documents=["cats", "stocks"], return_documents=True)
    assert {r.index for r in out.results} == {0, 1} and out.results[0].document.text in ("cats", "stocks")


def test_the_command_refuses_a_directory_that_is_not_an_engine(tmp_path, capsys):
    from gmr_fast.serve import main

    assert main(["--engine", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "is not an engine directory (no manifest.json)" in capsys.readouterr().err
    # flags that would start a server other than the one asked for end the command too, named
    for flags, message in ((["--api-key", ""], "--api-key is empty (an unset variable?)"),
                           (["--api-key", " "], "--api-key is empty"),
                           (["--port", "70000"], "--port 70000: expected 0 (any free port) to 65535"),
                           (["--allow-local-images", str(tmp_path / "none")], "not a directory")):
        assert main(["--engine", str(tmp_path / "missing"), *flags]) == 2
        assert message in capsys.readouterr().err


def test_not_ready_and_failed_engine(tmp_path):
    app = build_app(ServerOptions(engine=str(tmp_path / "missing")), RerankerOptions())
    with ThreadServer(app, ready=False) as url:
        for _ in range(100):  # "still loading" until the load has failed: a few ms here
            r = httpx.get(url + "/health")
            if "failed to load" in r.json()["error"]["message"]:
                break
            time.sleep(0.1)
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
        assert httpx.post(url + "/v2/rerank", json={"query": "q", "documents": ["d"]}).status_code == 503


def test_queue_full_and_cancelled_work_is_skipped(engine):
    """The queue in isolation, with an engine that blocks: the next round is planned while the
    engine runs, deterministic 429 and cancellation."""
    from gmr_fast.prompt import Item
    from gmr_fast.server.metrics import Metrics
    from gmr_fast.server.queue import BatchQueue, Job, QueueFull

    reranker = Reranker(engine)
    gate = threading.Event()
    ran = []
    real_run = reranker.run

    def slow_run(plan, skip=None):
        gate.wait(30)
        for rows, scores, padded in real_run(plan, skip=skip):
            ran.append(len(rows))
            yield rows, scores, padded
    reranker.run = slow_run
    planned = []
    real_plan = reranker.plan

    def counting_plan(pairs, **kw):
        planned.append(len(pairs))
        return real_plan(pairs, **kw)
    reranker.plan = counting_plan
    queue = BatchQueue(reranker, Metrics.create(), max_queue_pairs=6, round_pairs=4)
    loop = asyncio.new_event_loop()
    jobs = [Job([(Item("q"), Item(f"d{i}")) for i in range(4)], None, [f"d[{i}]" for i in range(4)], loop,
                loop.create_future()) for _ in range(3)]
    queue.submit(jobs[0])  # planned, then taken by the engine thread, which blocks
    time.sleep(0.3)
    queue.submit(jobs[1])
    for _ in range(100):  # the next round is planned while the engine still runs the first
        if len(planned) == 2:
            break
        time.sleep(0.05)
    assert planned == [4, 4] and not gate.is_set()
    # a planned round still waits for the engine: it counts against the queue limit
    with pytest.raises(QueueFull, match="limit of 6"):
        queue.submit(jobs[2])
    queue.cancel(jobs[1])
    gate.set()
    loop.run_until_complete(asyncio.wait_for(jobs[0].future, 30))
    queue.close()
    assert sum(ran) == 4  # the cancelled job's pairs never ran
    loop.close()


def test_a_round_that_fails_to_plan_fails_only_the_request_at_fault(engine, reference):
    """Requests that arrive while the engine runs are planned as one round. Should planning raise
    (here: a planner that refuses one document, standing for a fault it has no per-pair check
    for), only that request fails; the others of its round get the scores Reranker.score gives."""
    from gmr_fast.prompt import Item
    from gmr_fast.server.metrics import Metrics
    from gmr_fast.server.queue import BatchQueue, Job

    reranker = Reranker(engine)
    gate = threading.Event()
    real_run, real_plan, rounds = reranker.run, reranker.plan, []

    def slow_run(plan, skip=None):
        gate.wait(30)
        yield from real_run(plan, skip=skip)

    def picky_plan(pairs, **kw):
        rounds.append(len(pairs))
        if any(d.text == "boom" for _, d in pairs):
            raise RuntimeError("the planner fell over on 'boom'")
        return real_plan(pairs, **kw)
    reranker.run, reranker.plan = slow_run, picky_plan
    queue = BatchQueue(reranker, Metrics.create(), round_pairs=64)
    loop = asyncio.new_event_loop()

    def job(query, docs):
        return Job([(Item(query), Item(d)) for d in docs], None, [f"documents[{i}]" for i in range(len(docs))],
                   loop, loop.create_future())
    first, waiting = job("q0", ["d0"]), job("q1", ["d1"])
    good, bad, other = job("cats", ["a cat", "a dog"]), job("cats", ["fine", "boom"]), job("stocks", ["bonds"])
    queue.submit(first)  # taken by the engine, which blocks
    time.sleep(0.3)
    queue.submit(waiting)  # planned, waits for the engine; the planner now waits for its slot
    time.sleep(0.3)
    for j in (good, bad, other):  # all three are taken as one round once the engine moves on
        queue.submit(j)
    gate.set()
    done = loop.run_until_complete(asyncio.wait_for(
        asyncio.gather(*(j.future for j in (first, waiting, good, bad, other)), return_exceptions=True), 60))
    queue.close()
    loop.close()
    assert rounds[:3] == [1, 1, 5], rounds  # the three were one round, which failed to plan
    assert isinstance(done[3], RuntimeError) and "boom" in str(done[3])
    for j, got in ((good, done[2]), (other, done[4]), (first, done[0])):
        assert isinstance(got, np.ndarray), got
        pairs = [(q.text, d.text) for q, d in j.pairs]
        assert np.abs(got - reference.score(pairs)).max() <= 1e-4
    assert queue.queued_pairs == 0


def test_lanes_run_rounds_side_by_side(engine, reference):
    """With --lanes 2 two runners take planned rounds: two rounds' decoder runs are in flight at
    once (they meet at a barrier, which a single runner could never pass), and every request
    still gets the scores Reranker.score gives."""
    from gmr_fast.prompt import Item
    from gmr_fast.server.metrics import Metrics
    from gmr_fast.server.queue import BatchQueue, Job

    from suite_helpers import first_two_runs_meet

    reranker = Reranker(engine, max_batch_tokens=2048, max_length=400, num_threads=2, lanes=2)
    barrier = first_two_runs_meet(reranker.backend)
    queue = BatchQueue(reranker, Metrics.create())
    loop = asyncio.new_event_loop()
    docs = [[f"document {k} about item {i}" for i in range(3 + k)] for k in range(4)]
    jobs = [Job([(Item(f"query {k}"), Item(d)) for d in docs[k]], None, [f"documents[{i}]" for i in range(len(docs[k]))],
                loop, loop.create_future()) for k in range(4)]
    queue.submit(jobs[0])
    time.sleep(0.3)  # the first round is taken and waits at the barrier for a second run
    for job in jobs[1:]:
        queue.submit(job)
    got = loop.run_until_complete(asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 60))
    queue.close()
    loop.close()
    assert len(queue._runners) == 2 and not barrier.broken
    for k, scores in enumerate(got):
        assert np.abs(scores - reference.score([(f"query {k}", d) for d in docs[k]])).max() <= 1e-4


def test_graceful_shutdown_finishes_requests_in_flight(engine):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gmr_fast.serve", "--engine", engine, "--port", str(port),
                             "--log-level", "warning", "--max-batch-size", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        docs = [f"document number {i} " + "word " * 200 for i in range(200)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/v2/rerank", json={"query": "q", "documents": docs}, timeout=120)
            time.sleep(1.0)  # the request is being scored
            proc.send_signal(signal.SIGTERM)
            reply = pending.result()
        assert reply.status_code == 200 and len(reply.json()["results"]) == 200
        # uvicorn finishes the request, then re-raises SIGTERM as the process's own end
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
