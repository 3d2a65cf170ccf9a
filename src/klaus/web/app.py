"""`klaus serve`: a local web gallery over a photo index (Starlette + Jinja2, run by uvicorn).

Safe by default:

* the server binds 127.0.0.1 unless told otherwise, and only answers requests whose
  Host header names the address it serves (no DNS rebinding);
* photos and thumbnails are addressed by their id in the index, never by a path from
  the request, and a file or its thumbnail is only served while the file's size and
  mtime still match the index; thumbnails are cached beside the database under the
  photo id;
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

import io
import mimetypes
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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

from ..errors import KlausError, KlausImageError, first_line
from ..index import search as q
from ..index.db import Database, KlausIndexError, error_message, int64, thumbs_dir
from ..names import shown
from .ondevice import routes as ondevice_routes
from .pool import (
    BUSY_HEADERS,
    BUSY_MESSAGE,
    DEFAULT_JOBS,
    DEFAULT_QUEUE,
    MIN_UPLOAD_BUDGET,
    MODEL_RUN_BYTES,
    WORK_MEMORY_BUDGET,
    Busy,
    ByteBudget,
    WorkGate,
)

HERE = Path(__file__).resolve().parent
DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
THUMB_SIZES = {"small": 320, "large": 1024}
PAGE_SIZE = 60
MAX_PHOTO_ID = 2**63 - 1  # SQLite's largest INTEGER: a larger id is in no index
HOME_DEPTH = 4  # levels of the concept tree on the home page
HOME_CHILDREN = 8  # children shown per node there
TREE_TTL_SECONDS = 10.0
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


class Gallery:
    """State shared by the routes: the database path, the thumbnail cache, the model.

    A model named by ``model`` is loaded at once, so a bad one is a one-line
    KlausModelError before the server starts; the embedded default is loaded on first use
    (``klaus serve`` loads it at startup too).
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        model: str | None,
        max_upload: int,
        engine=None,
        jobs: int = DEFAULT_JOBS,
        queue: int = DEFAULT_QUEUE,
    ) -> None:
        from ..images import pixel_limit

        self.max_pixels = pixel_limit()  # $KLAUS_MAX_PIXELS: a bad value stops the server before it starts
        self.db_path = Path(db_path)
        Database(self.db_path, readonly=True).close()  # fail now, in one line, if it is not an index
        self.thumbs = thumbs_dir(self.db_path)
        self.model = model
        self.max_upload = max_upload
        self._engine = engine
        self._model_checked = False
        self._engine_lock = threading.Lock()
        self.gate = WorkGate(jobs, queue, WORK_MEMORY_BUDGET)
        self.uploads = ByteBudget(max(MIN_UPLOAD_BUDGET, 4 * max_upload))
        self._tree: tuple[float, dict] | None = None
        self._tree_lock = threading.Lock()
        if engine is None and model is not None:
            self.load_model()

    @contextmanager
    def db(self) -> Iterator[Database]:
        """The index, read-only; IndexUnavailable (a 503) if it is gone or damaged since the server started."""
        try:
            database = Database(self.db_path, readonly=True)
        except KlausIndexError as exc:
            raise IndexUnavailable(str(exc)) from None
        try:
            yield database
        except sqlite3.DatabaseError as exc:
            raise IndexUnavailable(error_message(exc, self.db_path)) from None
        finally:
            database.close()

    def engine(self):
        """The model; KlausModelError (one line, naming the file) if it cannot be loaded."""
        with self._engine_lock:
            if self._engine is None:
                from ..index.engine import Engine

                self._engine = Engine.load(self.model)
            return self._engine

    def load_model(self) -> None:
        """Load the model now and classify one blank photo with it: KlausModelError (one line,
        naming the file) if it cannot be loaded or run, so a server never starts with a bad model."""
        from PIL import Image

        from ..errors import KlausModelError
        from ..preprocess import to_tensor

        engine = self.engine()
        if self._model_checked:
            return
        side = engine.preprocess.input_size
        try:
            engine.run(to_tensor(Image.new("RGB", (side, side)), engine.preprocess))
        except Exception as exc:  # ONNX Runtime's own error types
            raise KlausModelError(
                f"{shown(engine.blob.where)}: the model cannot classify a photo ({first_line(exc)})"
            ) from None
        self._model_checked = True

    def tree(self) -> dict[str, q.Node]:
        with self._tree_lock:
            if self._tree is None or time.monotonic() - self._tree[0] > TREE_TTL_SECONDS:
                with self.db() as db:
                    self._tree = (time.monotonic(), q.tree(db.conn))
            return self._tree[1]

    # ------------------------------------------------------------ photos on disk

    def photo_row(self, photo_id: int) -> dict:
        photo_id = known_id(photo_id)
        with self.db() as db:
            row = db.conn.execute(
                "SELECT path, size, mtime_ns, sha256, format, status FROM photos WHERE id = ?", (photo_id,)
            ).fetchone()
        if row is None or row[5] != "ok":
            raise HTTPException(404, "no such photo in the index")
        return dict(zip(("path", "size", "mtime_ns", "sha256", "format", "status"), row, strict=True))

    def checked_path(self, row: dict) -> str:
        """The photo's path if the file is still the one indexed (size and mtime) and can be read.

        404 if it is gone, 409 if it changed, 403 if this server may not read it. The file
        is opened here, before any response starts: a response that had sent its headers
        could no longer say that the file cannot be read (FileResponse opens it only then).
        """
        path = row["path"]
        try:
            self._check_unchanged(os.stat(path), row)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        except FileNotFoundError:
            raise HTTPException(404, "the photo's file is gone; run 'klaus index' again") from None
        except PermissionError:
            raise HTTPException(403, "the photo's file cannot be read (permission denied)") from None
        except OSError as exc:
            raise HTTPException(404, f"the photo's file cannot be read ({exc.strerror or exc})") from None
        try:
            self._check_unchanged(os.fstat(fd), row)  # the very file opened
        finally:
            os.close(fd)
        return path

    @staticmethod
    def _check_unchanged(st: os.stat_result, row: dict) -> None:
        # The index stores an mtime beyond SQLite's integers clamped (klaus.index.db.int64).
        if not stat.S_ISREG(st.st_mode) or st.st_size != row["size"] or int64(st.st_mtime_ns) != row["mtime_ns"]:
            raise HTTPException(409, "the photo's file changed since it was indexed; run 'klaus index' again")

    def thumbnail_job(self, photo_id: int, size_name: str) -> Path | ThumbJob:
        """The cached thumbnail file, or the job that makes it (:meth:`make_thumbnail`).

        Cache entries are named by photo id, size and content hash only: never by a path.
        Like the photo itself, a thumbnail is only served while the photo's file is
        unchanged on disk (404 if it is gone, 409 if it changed), cached or not.
        """
        from ..images import decode_bytes, open_image

        side = THUMB_SIZES[size_name]
        row = self.photo_row(photo_id)
        path = self.checked_path(row)
        target = self.thumbs / f"{photo_id}-{side}-{(row['sha256'] or 'x')[:16]}.jpg"
        if target.is_file():
            return target
        try:
            with open_image(path, max_pixels=self.max_pixels) as header:
                cost = decode_bytes(header, side)
        except KlausImageError:
            raise HTTPException(404, "the photo cannot be decoded any more") from None
        return ThumbJob(path, side, target, cost)

    def make_thumbnail(self, job: ThumbJob) -> Path | bytes:
        """Decode the photo and write its thumbnail to the cache; its bytes if the cache is not writable."""
        from ..images import load_image

        try:
            image = load_image(job.path, target=job.side, max_pixels=self.max_pixels)
        except KlausImageError:
            raise HTTPException(404, "the photo cannot be decoded any more") from None
        image.thumbnail((job.side, job.side))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85, optimize=True)
        del image
        tmp = job.target.with_name(f".{job.target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.thumbs.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(buffer.getvalue())
            os.replace(tmp, job.target)
        except OSError:  # a read-only folder: serve it uncached
            return buffer.getvalue()
        return job.target

    # ------------------------------------------------------------ classify a new photo

    def classify_cost(self, data: bytes) -> int:
        """The bytes classifying ``data`` takes (decoding, from its header, and the model); the
        model's problems are a 503, the photo's a 415 (UploadError)."""
        from ..images import decode_bytes, open_image
        from ..index.pipeline import decode_target

        engine = self._engine_or_503()
        try:
            with open_image(data, max_pixels=self.max_pixels) as header:
                return decode_bytes(header, decode_target(engine.preprocess)) + MODEL_RUN_BYTES
        except KlausImageError as exc:
            raise _unreadable(exc) from None

    def _engine_or_503(self):
        try:
            return self.engine()
        except KlausError as exc:  # the model file went bad: the server's problem, not the photo's
            raise UploadError(503, f"the model cannot be loaded: {shown(first_line(exc))}") from None

    def classify(self, data: bytes) -> dict[str, Any]:
        """Top-5 of an uploaded photo, with its size, format and date (run as one job of the work pool)."""
        from ..images import load_image
        from ..index.engine import top5
        from ..index.pipeline import decode_target, header_info
        from ..preprocess import to_tensor

        engine = self._engine_or_503()
        start = time.perf_counter()
        try:
            image = load_image(data, target=decode_target(engine.preprocess), max_pixels=self.max_pixels)
        except KlausImageError as exc:
            raise _unreadable(exc) from None
        width, height, fmt, taken = header_info(data)
        probs = self._run(engine, to_tensor(image, engine.preprocess))
        elapsed = (time.perf_counter() - start) * 1000.0
        predictions = []
        for rank, (index, prob) in enumerate(top5(probs), 1):
            label = engine.labels[index] if index < len(engine.labels) else None
            predictions.append(
                {
                    "rank": rank,
                    "index": index,
                    "wnid": label.wnid if label else "",
                    "label": label.name if label else f"class {index}",
                    "probability": round(prob, 6),
                    "hierarchy": list(label.hierarchy or (label.name,)) if label else [],
                    "path": list(label.path) if label else [],
                }
            )
        return {
            "predictions": predictions,
            "elapsed_ms": round(elapsed, 2),
            "width": width,
            "height": height,
            "format": fmt,
            "taken": taken,
            "model": engine.identity,
        }

    @staticmethod
    def _run(engine, batch):
        """The model's probabilities for one photo; a failure of the model is a 503, not the photo's fault."""
        try:
            return engine.run(batch)[0]
        except MemoryError:
            raise UploadError(503, "out of memory running the model; try again later") from None
        except Exception as exc:  # ONNX Runtime's own error types: the model cannot run on this machine
            raise UploadError(503, f"the model failed ({shown(first_line(exc))})") from None


@dataclass(frozen=True)
class ThumbJob:
    """A thumbnail to make: the photo, the longer side wanted, the cache file, the decoding bytes."""

    path: str
    side: int
    target: Path
    cost: int


def _unreadable(exc: KlausImageError) -> UploadError:
    """415 with the image's problem (without the "<bytes>: " an upload has for a name)."""
    message = str(exc)
    return UploadError(415, message[len("<bytes>: ") :] if message.startswith("<bytes>: ") else message)


def known_id(photo_id: int) -> int:
    """The id if an index could hold it; 404 otherwise (SQLite cannot even compare a larger one)."""
    if not 0 <= photo_id <= MAX_PHOTO_ID:
        raise HTTPException(404, "no such photo in the index")
    return photo_id


class IndexUnavailable(Exception):
    """The index was deleted, replaced or damaged while the server runs: a 503 with the one-line reason."""


class UploadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
