"""The floor under bench/serve_load.py's HTTP overhead: /search as one bare ASGI function.

    DUET_ARTIFACT_DIR=... DUET_INDEX_DIR=... DUET_PORT=... python bench/bare_search.py

The same `Encoder` and `SearchIndex` as the service and, like the service, encode + search on
one worker thread off the event loop, behind uvicorn with uvloop and httptools. Nothing else:
no FastAPI, no middleware, no validation beyond `json.loads`, no metrics, no limits. What HTTP
adds over in-process time here is the cost of uvicorn, loopback and one thread hand-off on
this machine, which the service's own overhead cannot go below. Not a server to deploy: it
answers POST /search {"text", "k"} and GET /ready, and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from serve.encoder import Encoder  # noqa: E402
from serve.indexing.index import SearchIndex  # noqa: E402
from serve.runtime import load_encoder  # noqa: E402
from serve.settings import Settings  # noqa: E402

Scope = dict[str, Any]


def make_app(artifact: Path, index_dir: Path) -> Any:
    """The ASGI function; the model and index load on the worker thread, which then encodes:
    torch gives each thread that runs ops its own OpenMP team, and an idle one slows the other."""
    worker = ThreadPoolExecutor(1, thread_name_prefix="bare-encoder")

    def load() -> tuple[Encoder, SearchIndex]:
        settings = Settings(artifact_dir=artifact, index_dir=index_dir)  # DUET_RUNTIME from env
        encoder, _ = load_encoder(settings)
        threads = Settings.model_fields["search_threads"].default
        return encoder, SearchIndex.load(index_dir, expected_dim=encoder.embed_dim, threads=threads)

    encoder, index = worker.submit(load).result()

    def answer(text: str, k: int) -> bytes:
        (hits,) = index.search(encoder.encode_texts([text]), k)
        results = [
            {"id": h.id, "key": h.key, "score": h.score, "caption": h.caption, "metadata": h.meta}
            for h in hits
        ]
        return json.dumps({"results": results, "k": k}).encode()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["path"] == "/search":
            query = json.loads(body)
            out = await asyncio.wrap_future(worker.submit(answer, query["text"], query["k"]))
        else:
            out = b'{"ready": true}'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(out))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    return app


def main() -> None:
    app = make_app(Path(os.environ["DUET_ARTIFACT_DIR"]), Path(os.environ["DUET_INDEX_DIR"]))
    port = int(os.environ["DUET_PORT"])
    uvicorn.run(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")


if __name__ == "__main__":
    main()
