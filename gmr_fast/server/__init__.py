"""The rerank server behind ``python -m gmr_fast.serve``: a thin HTTP shell over one Reranker.

    schema.py   requests in the shapes clients speak (Cohere rerank v1/v2, Jina's multimodal
                documents, vLLM's /score) parsed at the edge into plain (query, document) pairs
    queue.py    the one batching queue in front of the engine: concurrent requests share
                token-budget batches; the next round is planned while the engine thread runs
                this one; cancelled work is skipped
    metrics.py  Prometheus counters, gauges and histograms
    app.py      the FastAPI application: routes, authentication, body limits, and the one place
                where errors become HTTP statuses
"""
