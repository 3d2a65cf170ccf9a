"""`klaus serve`: a local web gallery over a photo index (Starlette + Jinja2, run by uvicorn).

Safe by default:

* the server binds 127.0.0.1 unless told otherwise, and only answers requests whose
  Host header names the address it serves (no DNS rebinding);
* photos and thumbnails are addressed by their id in the index, never by a path from
  the request, and a file or its thumbnail is only served while the file's size and
  mtime still match the index; thumbnails are cached beside the database under the
  photo id (:mod:`klaus.web.gallery`, the state behind the routes);
* an index deleted or damaged while the server runs gives 503 with its one-line reason;
* uploads ("classify a new photo") are limited in size while they stream in, decoded
  by :func:`klaus.images.load_image` (the pixel limit) and never stored;
* decoding (thumbnails, uploads) runs in a bounded pool (:mod:`klaus.web.pool`): a few jobs at
  once within a memory budget, a few more waiting, and 503 with ``Retry-After`` beyond
  that; upload bodies held in memory have a budget of their own; the heap is given back to
  the system after large work and whenever the pool falls idle;
* every SQL statement is parameterized; nothing runs a shell;
* pages carry a strict Content-Security-Policy (no inline script) and are rendered
  with Jinja2 autoescaping; the page script builds results with ``textContent``.
"""

from __future__ import annotations

import mimetypes
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..errors import KlausError, first_line
from ..index import search as q
from ..index.db import KlausIndexError
from ..names import shown
from .gallery import THUMB_SIZES, Gallery, IndexUnavailable, ThumbJob, UploadError, known_id
from .ondevice import routes as ondevice_routes
from .pool import BUSY_HEADERS, BUSY_MESSAGE, DEFAULT_JOBS, DEFAULT_QUEUE, Busy

HERE = Path(__file__).resolve().parent
DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
PAGE_SIZE = 60
HOME_DEPTH = 4  # levels of the concept tree on the home page
HOME_CHILDREN = 8  # children shown per node there
FORMAT_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "HEIF": "image/heif",
}
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class SecurityHeaders:
    """Pure ASGI middleware: add :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                names = {k.lower() for k, _ in message["headers"]}
                message["headers"] = list(message["headers"]) + [(k, v) for k, v in SECURITY_HEADERS if k not in names]
            await send(message)

        await self.app(scope, receive, send_with_headers)


#: Multipart headers and boundaries around an uploaded photo.
UPLOAD_SLACK = 64 * 1024


class TooLarge(Exception):
    pass


class LimitedReceive:
    """Wrap ASGI ``receive`` so a request body larger than ``limit`` stops while streaming."""

    def __init__(self, receive, limit: int) -> None:
        self.receive, self.limit, self.total = receive, limit, 0

    async def __call__(self):
        message = await self.receive()
        if message["type"] == "http.request":
            self.total += len(message.get("body", b""))
            if self.total > self.limit:
                raise TooLarge()
        return message


def create_app(
    db_path: str | os.PathLike[str],
    *,
    model: str | None = None,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    host: str = "127.0.0.1",
    allowed_hosts: list[str] | None = None,
    engine=None,
    jobs: int = DEFAULT_JOBS,
    queue: int = DEFAULT_QUEUE,
) -> Starlette:
    """The ASGI app for ``db_path``; raises KlausIndexError at once if it is not a photo index,
    KlausModelError if ``model`` is given and cannot be loaded (``engine``: one already loaded).
    ``jobs`` and ``queue``: the decoding jobs that run at once and that may wait (:class:`WorkGate`)."""
    quiet_multipart()
    gallery = Gallery(db_path, model, max_upload, engine, jobs=jobs, queue=queue)
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True)
    templates = Jinja2Templates(env=env)
    templates.env.filters["pct"] = lambda p: f"{(p or 0) * 100:.1f}%"
    templates.env.filters["ms"] = lambda v: "—" if v is None else f"{v:.1f} ms"

    def render(request: Request, template: str, status: int = 200, **context: Any) -> Response:
        context.setdefault("max_upload_mb", max_upload // (1024 * 1024))
        return templates.TemplateResponse(request, template, context, status_code=status)

    def sync_home(request: Request) -> Response:
        with gallery.db() as db:
            counts = db.counts()
        nodes = gallery.tree()
        tops = [
            _expand(nodes, _chain(nodes, c), HOME_DEPTH)
            for r in q.roots(nodes)
            for c in nodes[r].children
            if nodes[c].count > 0
        ]
        return render(request, "home.html", counts=counts, roots=tops, db=shown(gallery.db_path))

    def sync_browse(request: Request) -> Response:
        wnid = request.path_params["wnid"]
        nodes = gallery.tree()
        node = nodes.get(wnid)
        if node is None:
            raise HTTPException(404, "no such concept in this index's tree")
        page = _page(request)
        with gallery.db() as db:
            photos, total = q.photos_under(db.conn, wnid, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        children = [_chain(nodes, c) for c in node.children if nodes[c].count > 0]
        empty = sum(1 for c in node.children if nodes[c].count == 0)
        return render(
            request,
            "browse.html",
            node=node,
            crumbs=_crumbs(nodes, wnid),
            children=children,
            empty_children=empty,
            photos=photos,
            total=total,
            page=page,
            pages=_pages(total),
            link=lambda p: f"/browse/{wnid}?page={p}",
        )

    def sync_search(request: Request) -> Response:
        text = request.query_params.get("q", "").strip()
        min_prob = min(1.0, max(0.0, _float(request.query_params.get("min"), q.DEFAULT_MIN_PROB)))
        page = _page(request)
        context: dict[str, Any] = {
            "q": text,
            "min": min_prob,
            "hits": [],
            "total": 0,
            "concepts": [],
            "error": None,
            "page": page,
            "pages": 0,
        }
        if text:
            try:
                with gallery.db() as db:
                    result = q.search(db.conn, text, min_prob=min_prob, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
                context.update(
                    hits=result.hits, total=result.total, concepts=result.concepts, pages=_pages(result.total)
                )
            except KlausIndexError as exc:
                context["error"] = str(exc)
        context["link"] = lambda p: "/search?" + urlencode({"q": text, "min": min_prob, "page": p})
        return render(request, "search.html", status=404 if context["error"] else 200, **context)

    def sync_photo(request: Request) -> Response:
        photo_id = known_id(request.path_params["photo_id"])
        with gallery.db() as db:
            info = q.photo(db.conn, photo_id)
        if info is None:
            raise HTTPException(404, "no such photo in the index")
        return render(request, "photo.html", photo=info, name=Path(info["path"]).name)

    async def thumb(request: Request) -> Response:
        """A photo's thumbnail: from the cache, or made as one job of the work pool (Busy: 503)."""
        size = request.query_params.get("size", "small")
        if size not in THUMB_SIZES:
            raise HTTPException(400, "size must be small or large")
        thumb = await run_in_threadpool(gallery.thumbnail_job, request.path_params["photo_id"], size)
        if isinstance(thumb, ThumbJob):
            thumb = await gallery.gate.run(thumb.cost, gallery.make_thumbnail, thumb)
        headers = {"Cache-Control": "private, max-age=86400"}
        if isinstance(thumb, bytes):
            return Response(thumb, media_type="image/jpeg", headers=headers)
        return FileResponse(thumb, media_type="image/jpeg", headers=headers)

    def sync_file(request: Request) -> Response:
        row = gallery.photo_row(request.path_params["photo_id"])
        path = gallery.checked_path(row)
        media = FORMAT_TYPES.get(row["format"] or "", mimetypes.guess_type(path)[0] or "application/octet-stream")
        if not media.startswith("image/"):
            media = "application/octet-stream"
        return FileResponse(
            path, media_type=media, headers={"Cache-Control": "private, max-age=3600", "Content-Disposition": "inline"}
        )

    def sync_api_search(request: Request) -> Response:
        text = request.query_params.get("q", "").strip()
        min_prob = min(1.0, max(0.0, _float(request.query_params.get("min"), q.DEFAULT_MIN_PROB)))
        limit = int(_float(request.query_params.get("limit"), q.DEFAULT_LIMIT))
        try:
            with gallery.db() as db:
                result = q.search(db.conn, text, min_prob=min_prob, limit=max(1, min(limit, 1000)))
        except KlausIndexError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return JSONResponse(
            {
                "query": text,
                "total": result.total,
                "concepts": [{"wnid": c.wnid, "name": c.name, "classes": c.classes} for c in result.concepts],
                "results": [h.to_dict(i) for i, h in enumerate(result.hits, 1)],
            }
        )

    def sync_api_photo(request: Request) -> Response:
        photo_id = known_id(request.path_params["photo_id"])
        with gallery.db() as db:
            info = q.photo(db.conn, photo_id)
        if info is None:
            return JSONResponse({"error": "no such photo in the index"}, status_code=404)
        return JSONResponse(info)

    async def read_upload(request: Request) -> bytes:
        """The uploaded photo's bytes: a multipart field 'photo', or the raw body; size-limited while streaming."""
        declared = request.headers.get("content-length")
        slack = UPLOAD_SLACK
        if declared and declared.isdigit() and int(declared) > max_upload + slack:
            raise UploadError(413, f"photo too large (limit {max_upload // (1024 * 1024)} MB)")
        limited = Request(request.scope, LimitedReceive(request.receive, max_upload + slack))
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await limited.form(max_files=1, max_fields=4)
                upload = form.get("photo")
                if not isinstance(upload, UploadFile):
                    raise UploadError(400, "no file in form field 'photo'")
                data = await upload.read(max_upload + 1)
                await form.close()
            else:
                data = await limited.body()
        except TooLarge:
            raise UploadError(413, f"photo too large (limit {max_upload // (1024 * 1024)} MB)") from None
        if len(data) > max_upload:
            raise UploadError(413, f"photo too large (limit {max_upload // (1024 * 1024)} MB)")
        if not data:
            raise UploadError(400, "empty upload")
        return data

    async def classify_upload(request: Request) -> dict[str, Any]:
        """Read the upload, its bytes held within the upload budget, and classify it in the work pool.

        Busy (503) before a byte is read if the budget is spent; UploadError for the photo's problems."""
        declared = request.headers.get("content-length")
        expected = int(declared) if declared and declared.isdigit() else max_upload
        with gallery.uploads.hold(min(expected, max_upload + UPLOAD_SLACK)):
            data = await read_upload(request)
            cost = await run_in_threadpool(gallery.classify_cost, data)
            return await gallery.gate.run(cost, gallery.classify, data)

    async def api_classify(request: Request) -> Response:
        try:
            result = await classify_upload(request)
        except Busy:
            return JSONResponse({"error": BUSY_MESSAGE}, status_code=503, headers=BUSY_HEADERS)
        except UploadError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except KlausError as exc:
            return JSONResponse({"error": shown(first_line(exc))}, status_code=500)
        return JSONResponse(result)

    async def classify_page(request: Request) -> Response:
        """The same without JavaScript: the form posts here and gets a page back."""
        if request.method in ("GET", "HEAD"):
            return RedirectResponse("/#classify", status_code=303)
        try:
            result = await classify_upload(request)
        except Busy:
            busy = render(request, "classified.html", status=503, error=BUSY_MESSAGE, result=None)
            busy.headers.update(BUSY_HEADERS)
            return busy
        except UploadError as exc:
            return render(request, "classified.html", status=exc.status, error=str(exc), result=None)
        except KlausError as exc:
            return render(request, "classified.html", status=500, error=shown(first_line(exc)), result=None)
        return render(request, "classified.html", error=None, result=result)

    def threaded(fn):
        async def endpoint(request: Request) -> Response:
            return await run_in_threadpool(fn, request)

        return endpoint

    routes = [
        Route("/", threaded(sync_home)),
        Route("/browse/{wnid:str}", threaded(sync_browse)),
        Route("/search", threaded(sync_search)),
        Route("/photo/{photo_id:int}", threaded(sync_photo)),
        Route("/thumb/{photo_id:int}", thumb),
        Route("/file/{photo_id:int}", threaded(sync_file)),
        Route("/classify", classify_page, methods=["GET", "POST"]),
        Route("/api/search", threaded(sync_api_search)),
        Route("/api/photo/{photo_id:int}", threaded(sync_api_photo)),
        Route("/api/classify", api_classify, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        *ondevice_routes(model),  # /app/: the on-device app (the browser runs the model)
    ]

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        if exc.status_code in (400, 403, 404, 405, 409):
            return render(
                request, "error.html", status=exc.status_code, status_code=exc.status_code, message=exc.detail
            )
        return Response(str(exc.detail), status_code=exc.status_code, media_type="text/plain")

    async def busy(request: Request, exc: Busy) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": BUSY_MESSAGE}, status_code=503, headers=BUSY_HEADERS)
        return Response(BUSY_MESSAGE, status_code=503, media_type="text/plain", headers=BUSY_HEADERS)

    async def unavailable(request: Request, exc: IndexUnavailable) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, status_code=503)
        return render(request, "error.html", status=503, status_code=503, message=str(exc))

    hosts = allowed_hosts if allowed_hosts is not None else _allowed_hosts(host)
    middleware = [Middleware(SecurityHeaders), Middleware(TrustedHostMiddleware, allowed_hosts=hosts)]
    handlers: dict[Any, Any] = {HTTPException: http_error, IndexUnavailable: unavailable, Busy: busy}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
    app.state.gallery = gallery
    return app


def quiet_multipart() -> None:
    """python-multipart logs odd request bodies (data after the last boundary, a missing
    Content-Type) as warnings; with no logging set up, Python would print them on stderr."""
    import logging

    for name in ("python_multipart", "multipart"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())
        logger.propagate = False


def _allowed_hosts(host: str) -> list[str]:
    if host in ("0.0.0.0", "::", ""):
        return ["*"]  # the user asked for every interface
    return sorted({host, "127.0.0.1", "localhost", "::1", "[::1]"})


def _chain(nodes: dict[str, q.Node], wnid: str) -> dict[str, Any]:
    """A child link that skips single-child chains with the same count ("object › whole › living thing")."""
    names = [nodes[wnid].name]
    current = wnid
    while True:
        kids = [c for c in nodes[current].children if nodes[c].count > 0]
        if len(kids) != 1 or nodes[kids[0]].count != nodes[current].count or not nodes[kids[0]].children:
            break
        current = kids[0]
        names.append(nodes[current].name)
    return {"wnid": current, "names": names, "count": nodes[current].count, "leaf": not nodes[current].children}


def _expand(nodes: dict[str, q.Node], chain: dict[str, Any], depth: int) -> dict[str, Any]:
    """A chain link with its children (chains too) down to ``depth`` levels, the largest first."""
    kids = [c for c in nodes[chain["wnid"]].children if nodes[c].count > 0]
    chain["more"] = max(0, len(kids) - HOME_CHILDREN)
    chain["children"] = [_expand(nodes, _chain(nodes, c), depth - 1) for c in kids[:HOME_CHILDREN]] if depth > 1 else []
    if depth <= 1:
        chain["more"] = len(kids)
    return chain


def _crumbs(nodes: dict[str, q.Node], wnid: str) -> list[q.Node]:
    out = []
    current = wnid
    while current in nodes:
        out.append(nodes[current])
        current = nodes[current].parent
    return out[::-1]


def _page(request: Request) -> int:
    return max(1, min(int(_float(request.query_params.get("page"), 1)), 100_000))


def _pages(total: int) -> int:
    return (total + PAGE_SIZE - 1) // PAGE_SIZE


def _float(text: str | None, default: float) -> float:
    try:
        value = float(text) if text not in (None, "") else default
    except ValueError:
        return default
    return value if value == value and abs(value) != float("inf") else default
