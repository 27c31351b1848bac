"""The browser demo page: `GET /` and its assets under `/static/`, shipped as package data
(serving/static/) and served by the app itself, so the page needs no build step and no other host.

Plain routes rather than a StaticFiles mount, so the page's requests get the app's metrics labels and
error bodies like every other path; only the files in serving/static/ are served, by name.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from serving.handlers import ServingError

STATIC = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
ASSETS = {path.name: MEDIA_TYPES[path.suffix] for path in STATIC.iterdir() if path.suffix in MEDIA_TYPES}
# Everything the page loads or calls is this server's; images are data: URIs (the upload, the outputs).
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    return FileResponse(
        STATIC / name,
        media_type=ASSETS[name],
        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
    )


@router.api_route("/", methods=["GET", "HEAD"])
async def page() -> FileResponse:
    """The demo page: pick an image and a task, watch the answer stream in."""
    return _file("index.html")


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def asset(name: str) -> FileResponse:
    """One of the page's files (index.html, app.js, style.css)."""
    if name not in ASSETS:
        raise ServingError(404, f"no such file: /static/{name}", type="not_found")
    return _file(name)
