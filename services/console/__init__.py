"""The web console: pages served by the platform's HTTP gateway on its own port, beside the REST API.

`install(app)` adds the console's routes to the gateway's aiohttp application:

- pages: `/` (to `/jobs`), `/sign-in`, `/jobs`, `/jobs/{job}`, `/datasets`, `/datasets/{dataset}`, `/plan`.
  Each is a small server-rendered shell (header, navigation, an empty `<main>`) that loads one ES module
  from `static/js/pages/`; the module calls the `/v1` REST routes with `fetch()` and the caller's API key
  (kept in the tab's sessionStorage, sent as `Authorization: Bearer`), so the console holds no session and
  sees exactly what the key may see. There is no build step: the modules are served as written.
- `/console/static/...`: the files under `static/` (our modules and styles, and uPlot, vendored), read
  once at install and served from memory with an ETag, so nothing at run time needs npm or the internet.

Every response carries a strict Content-Security-Policy: scripts, styles and fetches from this origin
only, no inline script or style, no frames, and Trusted Types required, so the browser itself refuses any
`innerHTML`-style sink: the modules build the DOM with `textContent` and `createElement` only.
"""

from __future__ import annotations

import hashlib
import html
import mimetypes
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from aiohttp import web

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
STATIC_PREFIX: Final = "/console/static/"

CONTENT_SECURITY_POLICY: Final = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "manifest-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
    "require-trusted-types-for 'script'",
    "trusted-types 'none'",
])
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
_TYPES: Final = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}
# Served as files; the vendored licence and its notes are served as text (they are the licence's notice).
_SERVED_SUFFIXES: Final = frozenset(_TYPES)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Page:
    """One console page: its title, the module that renders it, and the path parameter it reads."""

    def __init__(self, name: str, title: str, *, param: str = "", charts: bool = False) -> None:
        self.name, self.title, self.param, self.charts = name, title, param, charts

    def render(self, value: str = "") -> str:
        e = html.escape
        data = f' data-{self.param}="{e(value, quote=True)}"' if self.param else ""
        vendor = STATIC_PREFIX + "vendor/uplot/"
        uplot = (f'<link rel="stylesheet" href="{vendor}uPlot.min.css">\n'
                 f'<script src="{vendor}uPlot.iife.min.js" defer></script>\n') if self.charts else ""
        nav = "".join(
            f'<a href="{href}"{" aria-current=page" if section == self.section else ""}>{label}</a>'
            for href, label, section in (("/jobs", "Jobs", "jobs"), ("/datasets", "Datasets", "datasets"),
                                         ("/plan", "Plan a job", "plan"))
        )
        return (
            "<!doctype html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            '<meta name="referrer" content="no-referrer">\n'
            f"<title>{e(self.title)} · TuneForge</title>\n"
            f'<link rel="icon" href="{STATIC_PREFIX}img/favicon.svg" type="image/svg+xml">\n'
            f'<link rel="stylesheet" href="{STATIC_PREFIX}css/console.css">\n'
            f"{uplot}"
            f'<script type="module" src="{STATIC_PREFIX}js/pages/{self.name}.js"></script>\n'
            "</head>\n"
            f'<body data-page="{self.name}"{data}>\n'
            '<header class="top">\n'
            f'<a class="brand" href="/jobs"><img src="{STATIC_PREFIX}img/favicon.svg" alt="" width="22" '
            'height="22">TuneForge</a>\n'
            f'<nav class="sections">{nav}</nav>\n'
            '<div class="who" id="who" hidden><span id="caller"></span>'
            '<button type="button" id="sign-out" class="link">Sign out</button></div>\n'
            "</header>\n"
            '<main id="main" aria-live="polite"><p class="muted" id="loading">Loading…</p>'
            "<noscript><p>The console needs JavaScript.</p></noscript></main>\n"
            "</body>\n</html>\n"
        )

    @property
    def section(self) -> str:
        return {"job": "jobs", "dataset": "datasets"}.get(self.name, self.name)


PAGES: Final = {
    "sign-in": _Page("sign-in", "Sign in"),
    "jobs": _Page("jobs", "Jobs"),
    "job": _Page("job", "Job", param="job", charts=True),
    "datasets": _Page("datasets", "Datasets"),
    "dataset": _Page("dataset", "Dataset", param="dataset"),
    "plan": _Page("plan", "Plan a job"),
}


class _StaticFiles:
    """The files under static/, read once: served from memory by exact path, never from the disk by a
    path the request names (so no traversal, and nothing else on the disk is reachable)."""

    def __init__(self, root: Path) -> None:
        self.files: dict[str, tuple[bytes, str, str]] = {}
        for path in sorted(root.rglob("*")):
            if path.is_file() and (path.suffix in _SERVED_SUFFIXES or path.name == "LICENSE"):
                body = path.read_bytes()
                ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "text/plain"
                if path.name == "LICENSE":
                    ctype = "text/plain; charset=utf-8"
                etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
                self.files[path.relative_to(root).as_posix()] = (body, ctype, etag)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        found = self.files.get(request.match_info["path"])
        if found is None:
            return _not_found()
        body, ctype, etag = found
        # Revalidated on every load (cheap: a 304), so a new release is picked up without a hard reload.
        headers = {**SECURITY_HEADERS, "ETag": etag, "Cache-Control": "no-cache"}
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers={**headers, "Content-Type": ctype})


def _page_handler(page: _Page) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        value = request.match_info.get(page.param, "") if page.param else ""
        return web.Response(text=page.render(value), content_type="text/html", charset="utf-8",
                            headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    return handle


async def _index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/jobs", headers=SECURITY_HEADERS)


def _not_found() -> web.Response:
    return web.Response(status=404, text="not found\n", headers=SECURITY_HEADERS)


def install(app: web.Application) -> None:
    """Adds the console's pages and static files to `app` (the gateway's aiohttp application).

    The API lives under `/v1/`; the console takes `/`, the page paths above and `/console/static/`.
    """
    files = _StaticFiles(STATIC_DIR)
    router = app.router
    router.add_get("/", _index)
    router.add_get("/sign-in", _page_handler(PAGES["sign-in"]))
    router.add_get("/jobs", _page_handler(PAGES["jobs"]))
    router.add_get("/jobs/{job}", _page_handler(PAGES["job"]))
    router.add_get("/datasets", _page_handler(PAGES["datasets"]))
    router.add_get("/datasets/{dataset}", _page_handler(PAGES["dataset"]))
    router.add_get("/plan", _page_handler(PAGES["plan"]))
    router.add_get(STATIC_PREFIX + "{path:.+}", files.handle)
