"""``python -m gmr_fast.serve``: a rerank server in the shapes clients already speak.

    python -m gmr_fast.serve --engine DIR [--host 127.0.0.1] [--port 8080] [--api-key KEY]
        [--max-batch-tokens N] [--max-documents N] [--max-queue N] [--allow-local-images DIR]

Endpoints: POST /v1/rerank and /v2/rerank (Cohere; documents may be {"text", "image"} as in
Jina's API), POST /rerank (the same, or TEI's body with ``texts``), POST /score (vLLM), GET
/health, /info, /metrics (Prometheus). The engine loads in the background (503 until ready);
SIGINT / SIGTERM stop taking connections and finish the requests in flight. Needs the ``serve``
extra (FastAPI, uvicorn, prometheus-client).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from .errors import ConfigError, GmrError
from .manifest import load_manifest
from .options import add_arguments, from_args, option
from .reranker import RerankerOptions


@dataclass
class ServerOptions:
    engine: str = option(None, "engine directory written by python -m export", metavar="DIR")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8080, "port to listen on (0: any free port)")
    api_key: str | None = option(None, "require Authorization: Bearer KEY (or X-API-Key) on every endpoint but "
                                       "/health and /metrics")
    max_documents: int = option(1000, "documents (or pairs) per request; more is a 413")
    max_queue: int = option(8192, "pairs waiting for the engine; more is a 429")
    max_body_mb: int = option(64, "request body limit in MiB; more is a 413")
    allow_local_images: str | None = option(None, "accept file:// images inside this directory", metavar="DIR")
    model_name: str = option("gmr", "model name reported in responses")
    graceful_timeout: int = option(30, "seconds to finish in-flight requests on shutdown")
    log_level: str = option("info", "uvicorn log level")


def build_app(options: ServerOptions, reranker_options: RerankerOptions, load_in_background: bool = True):
    from .server.app import ServerState, create_app

    state = ServerState(options.engine, reranker_options, api_key=options.api_key, max_documents=options.max_documents,
                        max_queue=options.max_queue, max_body_bytes=options.max_body_mb << 20,
                        local_images=options.allow_local_images, model_name=options.model_name)
    return create_app(state, load_in_background)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmr_fast.serve", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    add_arguments(parser, ServerOptions)
    add_arguments(parser, RerankerOptions, exclude=("instruction",))
    args = parser.parse_args(argv)
    if not args.engine:
        parser.error("--engine is required")
    try:
        import uvicorn
    except ImportError:
        print("gmr_fast.serve: the server needs its extra: pip install 'gmr_fast[serve]'", file=sys.stderr)
        return 2
    try:
        options = from_args(ServerOptions, args)
        reranker_options = from_args(RerankerOptions, args)
        reranker_options.validate()
        if options.max_documents < 1 or options.max_queue < 1 or options.max_body_mb < 1:
            raise ConfigError("--max-documents, --max-queue and --max-body-mb must be >= 1")
        if not 0 <= options.port <= 65535:
            raise ConfigError(f"--port {options.port}: expected 0 (any free port) to 65535")
        if options.api_key is not None and not options.api_key.strip():
            # an unset variable (--api-key "$KEY") would otherwise serve every caller, unasked
            raise ConfigError("--api-key is empty (an unset variable?); leave the flag out to serve without a key")
        if options.allow_local_images is not None and not os.path.isdir(options.allow_local_images):
            raise ConfigError(f"--allow-local-images {options.allow_local_images}: not a directory")
        # what can be told at once (no engine there, a manifest this runtime refuses) ends the command
        # now, not as a server that answers 503 forever; the weights still load in the background
        load_manifest(options.engine)
        app = build_app(options, reranker_options)
    except GmrError as e:
        print(f"gmr_fast.serve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level,
                timeout_graceful_shutdown=options.graceful_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
