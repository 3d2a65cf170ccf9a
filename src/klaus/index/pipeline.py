"""Decode photos in a pool of workers while ONNX Runtime classifies the previous batch.

One photo is read once: its bytes are hashed (SHA-256), their header gives the size,
format and EXIF date, and Pillow decodes them at reduced size (JPEG DCT scaling via
:func:`klaus.images.load_image`'s ``target``) and resamples the model's window
(:func:`klaus.preprocess.to_pixels`, uint8). The model thread normalizes a few photos'
pixels at a time into one float batch, just before each ONNX Runtime call, exactly as
:func:`klaus.preprocess.to_tensor` would. Pillow, hashlib, numpy and ONNX Runtime all
release the GIL in their heavy parts, so threads overlap decoding with inference
without copying arrays between processes (``bench/index_throughput.py --decode
processes`` measures the alternative).

Every failure of one photo becomes that photo's ``error``; nothing here raises for a
bad file.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from collections import deque
from collections.abc import Generator, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import KlausImageError, KlausModelError, first_line
from ..images import load_image, open_image
from ..preprocess import Preprocess, normalize, to_pixels

#: Larger files are recorded as errors without being read.
MAX_FILE_BYTES = 1 << 30
#: Photos per ONNX Runtime call. A batch of ``--batch`` photos is one database
#: transaction, but with two single-threaded calls at once (one per core), calls of 16
#: photos ran 5-9 % slower per photo than calls of 4 (whose activations stay in cache)
#: when measured alone; within a whole `klaus index` run the difference is in the noise.
MODEL_BATCH = 4
_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 0x9003
_DATETIME = 0x0132
_ORIENTATION = 0x0112
_EXIF_DATE = re.compile(r"^(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")


@dataclass(frozen=True)
class Task:
    """A photo to (re)classify; with ``expect_sha256`` only if its content changed."""

    path: str
    size: int
    mtime_ns: int
    expect_sha256: str | None = None


@dataclass
class Result:
    """What a worker made of one task, then what the model said about it."""

    path: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    taken: str | None = None
    error: str | None = None
    unchanged: bool = False  # the content hash matched: only the mtime is new
    decode_ms: float = 0.0
    infer_ms: float = 0.0
    predictions: list[tuple[int, float]] = field(default_factory=list)
    pixels: np.ndarray | None = field(default=None, repr=False)  # uint8 model input, until classified

    @property
    def status(self) -> str:
        return "error" if self.error else "ok"

    @property
    def elapsed_ms(self) -> float:
        return self.decode_ms + self.infer_ms


def decode_target(spec: Preprocess) -> int:
    """Smallest side the decoded image needs so that the resize never upsamples."""
    return spec.input_size if spec.resize == "stretch" else spec.resize_side


def read_photo(path: str) -> tuple[bytes, os.stat_result]:
    """The file's bytes and the stat of the very file read; KlausImageError on failure.

    Anything but a regular file (a named pipe, a device, a socket) is refused before it
    is opened, and again on the opened descriptor (it may have been swapped in between):
    a pipe would block forever and ``/dev/zero`` never ends.
    """
    try:
        check_regular(os.stat(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            check_regular(st)
            if st.st_size > MAX_FILE_BYTES:
                raise KlausImageError(f"file too large ({st.st_size} bytes > {MAX_FILE_BYTES} limit)")
            return f.read(MAX_FILE_BYTES + 1), st
    except FileNotFoundError:
        raise KlausImageError("no such file (deleted during the run?)") from None
    except IsADirectoryError:
        raise KlausImageError("is a directory") from None
    except PermissionError:
        raise KlausImageError("permission denied") from None
    except OSError as exc:
        raise KlausImageError(f"cannot read ({exc.strerror or exc})") from None


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular(st: os.stat_result) -> None:
    """KlausImageError unless ``st`` is a regular file's."""
    if stat.S_ISREG(st.st_mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "of an unknown kind")
    raise KlausImageError(f"not a regular file ({kind})")


def decode(task: Task, spec: Preprocess, max_pixels: int | None = None) -> Result:
    """Read, hash and decode one photo into its model input; never raises for a bad photo."""
    start = time.perf_counter()
    result = Result(task.path, task.size, task.mtime_ns)
    try:
        data, st = read_photo(task.path)
        result.size, result.mtime_ns = st.st_size, st.st_mtime_ns
        result.sha256 = hashlib.sha256(data).hexdigest()
        if task.expect_sha256 is not None and task.expect_sha256 == result.sha256:
            result.unchanged = True
        else:
            image = load_image(data, target=decode_target(spec), max_pixels=max_pixels)
            result.width, result.height, result.format, result.taken = header_info(data)
            result.pixels = to_pixels(image, spec)
    except KlausImageError as exc:
        result.error = _strip_label(str(exc))
    except MemoryError:
        result.error = "out of memory while decoding"
    except Exception as exc:  # a Pillow plugin bug must not stop a run over 100k photos
        result.error = f"cannot decode ({type(exc).__name__}: {' '.join(str(exc).split())})"
    result.decode_ms = (time.perf_counter() - start) * 1000.0
    return result


def _strip_label(message: str) -> str:
    for prefix in ("<bytes>: ",):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def header_info(data: bytes) -> tuple[int | None, int | None, str | None, str | None]:
    """Upright width and height, Pillow format name and EXIF date (ISO 8601) from the header.

    Opened like every image (:func:`klaus.images.open_image`): Pillow's warnings about
    large images or corrupt EXIF blocks never reach stderr.
    """
    try:
        with open_image(data) as img:
            width, height = img.size
            fmt = img.format
            try:
                exif = img.getexif()
                if exif.get(_ORIENTATION) in (5, 6, 7, 8):
                    width, height = height, width
                raw = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
            except Exception:  # corrupt EXIF: the photo is still fine
                raw = None
    except Exception:
        return None, None, None, None
    return width, height, fmt, exif_date(raw)


def exif_date(raw: object) -> str | None:
    """'2023:07:14 18:02:11' -> '2023-07-14T18:02:11'; None unless it is a plausible date."""
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        return None
    m = _EXIF_DATE.match(raw.strip().strip("\x00"))
    if not m:
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.groups())
    if not (1800 <= y <= 2200 and 1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and s < 61):
        return None
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}"


def classify_batch(engine, results: list[Result], model_batch: int | None = None) -> None:
    """Run the model on every decoded result of the batch, in place, ``model_batch`` photos
    (default :data:`MODEL_BATCH`) per call.

    Each call's input is normalized from the photos' uint8 pixels just before the call,
    so it is still in cache when ONNX Runtime reads it.
    """
    todo = [r for r in results if r.pixels is not None]
    if not todo:
        return
    step = model_batch or MODEL_BATCH
    start = time.perf_counter()
    probs = []
    try:
        for i in range(0, len(todo), step):
            pixels = np.concatenate([r.pixels for r in todo[i : i + step]])
            probs.extend(engine.run(normalize(pixels, engine.preprocess)))
    except MemoryError:
        raise KlausModelError(f"out of memory running the model on {len(todo)} photos; try a smaller --batch") from None
    except Exception as exc:  # ONNX Runtime's own error types
        raise KlausModelError(f"the model failed on a batch ({first_line(exc)})") from None
    per_photo = (time.perf_counter() - start) * 1000.0 / len(todo)
    from .engine import top5

    for r, p in zip(todo, probs, strict=False):
        r.predictions = top5(p)
        r.infer_ms = per_photo
        r.pixels = None


def make_pool(workers: int, mode: str = "threads") -> Executor:
    if mode == "processes":
        return ProcessPoolExecutor(workers)
    if mode == "threads":
        return ThreadPoolExecutor(workers, thread_name_prefix="klaus-decode")
    raise ValueError(f"decode mode must be 'threads' or 'processes', got {mode!r}")


def default_lanes(threads: int | None) -> int:
    """Concurrent model calls: one per core for single-threaded sessions, fewer for multi-threaded ones.

    ``threads=None`` is ONNX Runtime's default (all cores): one lane.
    """
    if not threads:
        return 1
    return max(1, (os.cpu_count() or 1) // threads)


def classify_local(
    tasks: Iterable[Task],
    engine,
    *,
    workers: int = 2,
    batch: int = 16,
    lanes: int = 1,
    mode: str = "threads",
    max_pixels: int | None = None,
) -> Generator[list[Result], None, None]:
    """Yield results in task order, a batch at a time.

    ``workers`` decode ahead while up to ``lanes`` model calls run at once (ONNX
    Runtime sessions may be run from several threads; a single-threaded call per core
    wastes no time synchronizing intra-op threads). Each :data:`MODEL_BATCH` decoded
    photos go to the model as soon as they are ready, so the model starts after the
    first few photos rather than a whole batch, and the calls of one batch spread over
    every lane (the last batch of a run does not leave a core idle); up to ``lanes``
    batches are in the model at once.
    """
    it = iter(tasks)
    window = (lanes + 1) * batch + workers
    step = max(1, min(MODEL_BATCH, batch))
    pending: deque = deque()
    inflight: deque = deque()
    pool = make_pool(workers, mode)
    infer = ThreadPoolExecutor(lanes, thread_name_prefix="klaus-infer")

    def refill() -> None:
        while len(pending) < window:
            task = next(it, None)
            if task is None:
                return
            pending.append(pool.submit(decode, task, engine.preprocess, max_pixels))

    def next_chunk() -> tuple[list[Result], list]:
        chunk: list[Result] = []
        calls, group = [], []
        decoded = 0
        while pending and decoded < batch and len(chunk) < 4 * batch:  # failures/unchanged need no model
            result = pending.popleft().result()
            refill()
            chunk.append(result)
            if result.pixels is not None:
                decoded += 1
                group.append(result)
                if len(group) == step:
                    calls.append(infer.submit(classify_batch, engine, group, step))
                    group = []
        if group:
            calls.append(infer.submit(classify_batch, engine, group, step))
        return chunk, calls

    try:
        refill()
        while pending or inflight:
            if pending and len(inflight) < lanes:
                inflight.append(next_chunk())
                continue
            chunk, calls = inflight.popleft()
            for call in calls:
                call.result()
            yield chunk
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        infer.shutdown(wait=True, cancel_futures=True)
