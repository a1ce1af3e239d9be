"""The dashboard's files on the service's own origin, and the security headers of every response.

``/`` is the dashboard's page (``dashboard/index.html``), ``/static/…`` its scripts, style sheet and
vendored chart library (``dashboard/vendor/``, fetched by ``scripts/vendor.py``). Nothing here needs a
token: the page holds no data; everything it shows comes from ``/api/v1`` with the token the user
typed (kept in the browser's session storage). Every response of the app, the API's included,
carries a strict Content-Security-Policy (no inline script or style, nothing from another origin).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DASHBOARD = Path(__file__).resolve().parent / "dashboard"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'none'")
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
#: the only kinds of file served from the dashboard directory, with their content types
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml",
                 ".png": "image/png", ".txt": "text/plain; charset=utf-8"}


class SecurityHeaders:
    """ASGI middleware: the headers of :data:`SECURITY_HEADERS` on every HTTP response (replacing any
    the route set)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in SECURITY_HEADERS}

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = headers + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, with_headers)


def static_file(root: Path, path: str) -> Path | None:
    """The file ``path`` names under ``root``, or None when it is not one we serve (outside ``root``,
    hidden, not a file, or of a type without an entry in :data:`CONTENT_TYPES`)."""
    if any(part.startswith(".") for part in Path(path).parts):
        return None
    try:
        found = (root / path).resolve()
        found.relative_to(root.resolve())
    except (ValueError, OSError):
        return None
    if found.suffix not in CONTENT_TYPES or not found.is_file():
        return None
    return found


def mount_dashboard(app: FastAPI, root: Path = DASHBOARD) -> None:
    """Serve the dashboard at ``/`` and its assets at ``/static/{path}``; add :class:`SecurityHeaders`."""

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(root / "index.html", media_type=CONTENT_TYPES[".html"],
                            headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/static/{path:path}", include_in_schema=False)
    async def static(path: str) -> Response:
        found = static_file(root, path)
        if found is None:
            return JSONResponse({"error": f"no file /static/{path}", "status": 404}, status_code=404)
        return FileResponse(found, media_type=CONTENT_TYPES[found.suffix],
                            headers={"Cache-Control": "no-cache"})

    app.add_middleware(SecurityHeaders)
