"""`python -m serve`: run the retrieval service with uvicorn (settings from DUET_* env and flags).

DUET_ARTIFACT_DIR=runs/demo/artifact DUET_INDEX_DIR=runs/demo/index python -m serve --port 8000
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import pydantic
import uvicorn

from serve.app import create_app
from serve.errors import validation_message
from serve.http import ConnectionLimits, guarded_protocol
from serve.settings import Settings

log = logging.getLogger(__name__)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="interface to bind (default: DUET_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: DUET_PORT or 8000)")
    parser.add_argument("--artifact-dir", help="model artifact (default: DUET_ARTIFACT_DIR)")
    parser.add_argument("--index-dir", help="index directory (default: DUET_INDEX_DIR)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    try:
        settings = Settings(**overrides)
    except pydantic.ValidationError as exc:
        print(f"error: invalid settings: {validation_message(exc.errors())}", file=sys.stderr)
        print(
            "set DUET_ARTIFACT_DIR and DUET_INDEX_DIR or DUET_INDICES "
            "(or pass --artifact-dir/--index-dir), or DUET_VECTOR_STORE=qdrant with "
            "DUET_QDRANT_URL (or DUET_QDRANT_PATH) and DUET_QDRANT_COLLECTIONS",
            file=sys.stderr,
        )
        return 2
    paths = {"artifact_dir": settings.artifact_dir}
    paths.update({f"index {name!r}": path for name, path in settings.index_paths.items()})
    for name, path in paths.items():
        if not path.is_dir():
            print(f"error: {name} {str(path)!r} is not a directory", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log.info("API docs at http://%s:%d/docs", settings.host, settings.port)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=not settings.access_log,  # the service logs each request itself, with latency
        http=guarded_protocol(ConnectionLimits.from_settings(settings)),  # slowloris deadlines
        # SIGTERM cancels what still runs after this, instead of waiting for it
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
