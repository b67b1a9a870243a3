"""GET /: the web page (static HTML, JS and CSS from serve/static; no build step, no CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)

INDEX_HTML = Path(__file__).resolve().parents[1] / "static" / "index.html"


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(INDEX_HTML, media_type="text/html")
