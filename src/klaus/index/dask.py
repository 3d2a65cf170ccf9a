"""`klaus index --dask ADDRESS`: decode and classify on a Dask cluster; the client writes the database.

The client reads the model file once and broadcasts its bytes to every worker; each
worker builds its :class:`~klaus.index.engine.Engine` on first use and keeps it (one
per worker and model SHA-256). Tasks are batches of photo paths, so every worker must
see the photos at the same paths as the client (a shared or identically mounted
folder). Results come back in submission order, a few batches per worker in flight,
and the client commits each batch in its own transaction as in a local run.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence

from .db import KlausIndexError
from .engine import Engine, ModelBlob
from .pipeline import Result, Task, classify_batch, decode

_ENGINES: dict[tuple[str, str], Engine] = {}
_LOCK = threading.Lock()


def worker_engine(blob: ModelBlob) -> tuple[Engine, bool]:
    """This worker's engine for the model (built once); returns (engine, built_now)."""
    try:
        from distributed import get_worker

        worker = get_worker()
        key = (str(worker.address), blob.sha256)
        nthreads = max(1, int(getattr(worker, "nthreads", 1) or 1))
    except (ImportError, ValueError):  # not on a Dask worker (tests, direct calls)
        key, nthreads = (f"pid-{os.getpid()}", blob.sha256), 1
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is not None:
            return engine, False
        threads = max(1, (os.cpu_count() or 1) // nthreads)
        engine = _ENGINES[key] = Engine(blob, threads=threads)
        return engine, True


def classify_on_worker(
    blob: ModelBlob, tasks: Sequence[Task], max_pixels: int | None = None
) -> tuple[list[Result], dict]:
    """One batch on one worker: decode each photo, one batched model call."""
    engine, built = worker_engine(blob)
    results = [decode(t, engine.preprocess, max_pixels) for t in tasks]
    classify_batch(engine, results)
    try:
        from distributed import get_worker

        where = str(get_worker().address)
    except (ImportError, ValueError):
        where = f"pid-{os.getpid()}"
    return results, {"worker": where, "pid": os.getpid(), "model_loaded": built}


def connect(address: str):
    """A client of the scheduler at ``address``; a one-line KlausIndexError if there is none."""
    try:
        from distributed import Client
    except ImportError:
        raise KlausIndexError("--dask needs the 'dask' extra: pip install 'klaus-classifier[dask]'") from None
    _probe(address)
    try:
        return Client(address, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise KlausIndexError(f"cannot reach the Dask scheduler at {address} ({text})") from None


def _probe(address: str) -> None:
    """Fail at once on a refused TCP connection (Dask itself retries until its timeout)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or not parts.port:
        return
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=10).close()
    except OSError as exc:
        raise KlausIndexError(f"cannot reach the Dask scheduler at {address} ({exc.strerror or exc})") from None


def classify_dask(
    tasks: Iterable[Task],
    blob: ModelBlob,
    client,
    *,
    batch: int = 16,
    max_pixels: int | None = None,
    reports: list | None = None,
) -> Generator[list[Result], None, None]:
    """Yield result batches in task order while the cluster (a connected Client) works ahead.

    ``tasks`` is consumed lazily (:meth:`klaus.index.claims.WorkQueue.claimed` claims them as they are taken).
    """
    it = _chunks(iter(tasks), batch)
    first = next(it, None)
    if first is None:
        return
    workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    model = client.scatter(blob, broadcast=True, hash=False)
    window = 3 * workers
    pending: deque = deque([client.submit(classify_on_worker, model, first, max_pixels, pure=False)])

    def refill() -> None:
        while len(pending) < window:
            chunk = next(it, None)
            if chunk is None:
                return
            pending.append(client.submit(classify_on_worker, model, chunk, max_pixels, pure=False))

    try:
        refill()
        while pending:
            future = pending.popleft()
            try:
                results, report = future.result()
            except Exception as exc:
                text = " ".join(str(exc).split()) or type(exc).__name__
                raise KlausIndexError(f"a Dask worker failed ({type(exc).__name__}: {text})") from None
            refill()
            if reports is not None:
                reports.append(report)
            yield results
    finally:
        if pending:
            client.cancel(list(pending))


def _chunks(tasks: Iterator[Task], size: int) -> Iterator[list[Task]]:
    """``tasks`` in lists of ``size`` (the last may be shorter), taken only as they are needed."""
    while True:
        chunk = list(itertools.islice(tasks, size))
        if not chunk:
            return
        yield chunk
