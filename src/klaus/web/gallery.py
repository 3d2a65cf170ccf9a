"""What the web gallery knows, apart from HTTP: the index, the photos' files, thumbnails, the model.

:class:`Gallery` is the state `klaus serve`'s routes share (:mod:`klaus.web.app`): the index
opened read-only for each request (:class:`IndexUnavailable`, a 503, if it went away), a photo's
file served only while it is the one indexed, thumbnails made in the work pool
(:mod:`klaus.web.pool`) and cached beside the database under the photo id, and an uploaded
photo classified without being stored (:class:`UploadError` with the status it deserves).
"""

from __future__ import annotations

import io
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

from starlette.exceptions import HTTPException

from ..errors import KlausError, KlausImageError, first_line
from ..index import search as q
from ..index.db import Database, KlausIndexError, error_message, int64, thumbs_dir
from ..names import shown
from .pool import (
    DEFAULT_JOBS,
    DEFAULT_QUEUE,
    MIN_UPLOAD_BUDGET,
    MODEL_RUN_BYTES,
    WORK_MEMORY_BUDGET,
    ByteBudget,
    WorkGate,
)

THUMB_SIZES = {"small": 320, "large": 1024}
MAX_PHOTO_ID = 2**63 - 1  # SQLite's largest INTEGER: a larger id is in no index
TREE_TTL_SECONDS = 10.0


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
