"""``GET /playground``: the steering playground, one page of plain HTML, CSS and JavaScript shipped with the
package (``server/playground/``) and served by the server itself: no build step, nothing from elsewhere.

The page and its two assets need no key (they hold no data; the page asks for the key and sends it with
every API call it makes). They are not API operations, so they are left out of the OpenAPI schema.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

__all__ = ["ASSETS", "router"]

router = APIRouter(include_in_schema=False)

#: file name -> media type: the only files served (no path from the request reaches the file system)
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> Response:
    data = resources.files("server").joinpath("playground", name).read_bytes()
    return Response(data, media_type=ASSETS[name], headers=_HEADERS)


@router.get("/playground")
async def playground() -> Response:
    """The playground page."""
    return _asset("index.html")


@router.get("/playground/{name}")
async def playground_asset(name: str) -> Response:
    """The page's script and style sheet (404 for anything else)."""
    if name not in ASSETS or name == "index.html":
        return Response("not found", status_code=404, media_type="text/plain")
    return _asset(name)
