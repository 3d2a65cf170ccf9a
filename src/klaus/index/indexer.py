"""`klaus index`: walk, decide what changed, classify it, and commit one batch at a time."""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, closing, suppress
from dataclasses import asdict, dataclass, field

from ..images import pixel_limit
from ..names import printable
from .claims import WorkQueue
from .db import Database, KlausIndexError, now_iso, sqlite_errors, thumbs_dir
from .engine import Engine, ModelBlob
from .pipeline import Result, Task, classify_local, default_lanes
from .walker import Skipped, Walk, walk

MAX_REPORTED = 1000


@dataclass
class Summary:
    photos: int = 0  # photos found under the given paths
    indexed: int = 0  # classified and stored this run
    skipped: int = 0  # unchanged (path, size, mtime; or same content hash)
    failed: int = 0  # recorded with an error this run
    gone: int = 0  # marked gone this run
    unreadable_folders: int = 0  # folders that could not be listed (nothing under them is marked gone)
    unstorable: int = 0  # files and folders left out: their names are not valid UTF-8
    seconds: float = 0.0
    images_per_second: float = 0.0
    model: str = ""
    db: str = ""
    errors: list[dict] = field(default_factory=list)  # this run's failures (the first MAX_REPORTED)
    unreadable_folder_errors: list[dict] = field(default_factory=list)  # {"path","error"} per unreadable folder
    unstorable_errors: list[dict] = field(default_factory=list)  # {"path","error"}, undecodable bytes as \xNN

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Plan:
    tasks: list[Task]
    skipped: int
    gone_ids: list[int]


def concept_rows(labels: Sequence) -> list[tuple[str, int]]:
    """(wnid, class) for every WordNet ancestor of every class (all parents), class wnid included."""
    from ..labels import ancestors

    rows: list[tuple[str, int]] = []
    for row in labels:
        if not row.wnid:
            continue
        try:
            closure = ancestors(row.wnid)
        except KeyError:  # not an ImageNet synset: findable by itself (and its display path)
            closure = frozenset({row.wnid, *row.path})
        rows.extend((wnid, row.index) for wnid in sorted(closure))
    return rows


def _lazy_concept_rows(labels: Sequence) -> Iterator[tuple[str, int]]:
    yield from concept_rows(labels)


def plan(db: Database, found: Walk, model_id: int) -> Plan:
    """Which photos to classify: new, changed, failed before, gone before, or classified by another model.

    Same path, size and mtime: skipped. Same size but another mtime: in doubt, so the
    worker hashes it and only classifies it if the content changed.
    """
    existing: dict[str, tuple] = {}
    for root in found.roots:
        existing.update(db.rows_under(root))
    tasks, skipped, seen = [], 0, set()
    for e in found.entries:
        seen.add(e.path)
        row = existing.get(e.path)
        if row is None:
            tasks.append(Task(e.path, e.size, e.mtime_ns))
            continue
        _id, size, mtime_ns, sha256, status, row_model = row
        if status != "ok" or row_model != model_id or size != e.size or not sha256:
            tasks.append(Task(e.path, e.size, e.mtime_ns))
        elif mtime_ns != e.mtime_ns:
            tasks.append(Task(e.path, e.size, e.mtime_ns, expect_sha256=sha256))
        else:
            skipped += 1
    unreadable = [u.path.rstrip(os.sep) + os.sep for u in found.unreadable]
    gone = [
        row[0]
        for path, row in existing.items()
        if path not in seen and row[4] != "gone" and not any(path.startswith(u) for u in unreadable)
    ]
    return Plan(tasks, skipped, sorted(gone))


def index_paths(
    paths: Sequence[str],
    db_path: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    workers: int = 2,
    batch: int = 16,
    dask: str | None = None,
    threads: int | None = None,
    lanes: int | None = None,
    decode_mode: str = "threads",
    max_pixels: int | None = None,
    progress: bool | None = None,
    on_plan: Callable[[Summary, Plan], None] | None = None,
    engine: Engine | None = None,
    dask_reports: list | None = None,
) -> Summary:
    """Index ``paths`` into the database at ``db_path``; see the module docstring."""
    if not paths:
        raise KlausIndexError("no PATH given")
    if workers < 1 or batch < 1:
        raise KlausIndexError("--workers and --batch must be at least 1")
    if max_pixels is None:
        max_pixels = pixel_limit()  # $KLAUS_MAX_PIXELS, read here (a bad value is one error), then passed on
    start = time.perf_counter()
    blob = engine.blob if engine is not None else ModelBlob.read(model)
    if engine is None and dask is None:  # a bad model fails here, before the database is created
        engine = Engine(blob, threads or 1)
    labels, name = _labels_and_name(engine, blob)
    found = walk(list(paths), exclude=[str(thumbs_dir(db_path))])
    with ExitStack() as stack:
        client = None
        if dask:
            from .dask import connect

            client = connect(dask)
            stack.callback(client.close)
        db = stack.enter_context(Database(db_path))
        stack.enter_context(sqlite_errors(db_path))  # a lock held too long, a full disk: one line, not a traceback
        from .engine import labels_sha256

        labels_id = labels_sha256(labels)
        with db.transaction():
            db.set_labels(labels, labels_id, _lazy_concept_rows(labels))  # computed only if the table changes
            model_id = db.model_id(name, blob.sha256, labels_id)
            work = plan(db, found, model_id)
            db.mark_gone(work.gone_ids)
            queue = WorkQueue(db, work.tasks, model_id, batch)
            queue.register()
        stack.callback(_release, queue)  # on any exit: claims this run did not finish are free again
        summary = Summary(
            photos=len(found.entries),
            skipped=work.skipped,
            gone=len(work.gone_ids),
            unreadable_folders=len(found.unreadable),
            unstorable=len(found.unstorable),
            model=f"{name}@{blob.sha256[:12]}",
            db=str(db_path),
            unreadable_folder_errors=_reported(found.unreadable),
            unstorable_errors=_reported(found.unstorable),
        )
        if on_plan:
            on_plan(summary, work)
        work_start = time.perf_counter()
        from tqdm import tqdm

        with tqdm(
            total=len(work.tasks),
            unit="photo",
            desc="index",
            file=sys.stderr,
            disable=_disable(progress),
            dynamic_ncols=True,
        ) as bar:
            while True:  # one round per stretch of claimable work; then wait for what other runs hold
                if dask:
                    from .dask import classify_dask

                    batches: Generator[list[Result], None, None] = classify_dask(
                        queue.claimed(), blob, client, batch=batch, max_pixels=max_pixels, reports=dask_reports
                    )
                else:
                    assert engine is not None
                    batches = classify_local(
                        queue.claimed(),
                        engine,
                        workers=workers,
                        batch=batch,
                        lanes=lanes or default_lanes(engine.threads),
                        mode=decode_mode,
                        max_pixels=max_pixels,
                    )
                with closing(batches):  # stops the decode pool (or Dask futures) on any exit
                    for chunk in batches:
                        _save(db, queue, chunk, model_id, summary)
                        bar.update(len(chunk))
                queue.wait_for_others()
                if not queue.pending:
                    break
            summary.skipped += queue.done_elsewhere
            bar.update(queue.done_elsewhere)
        work_seconds = time.perf_counter() - work_start
    summary.seconds = round(time.perf_counter() - start, 3)
    done = summary.indexed + summary.failed
    summary.images_per_second = round(done / work_seconds, 2) if done and work_seconds > 0 else 0.0
    return summary


def _save(db: Database, queue: WorkQueue, chunk: list[Result], model_id: int, summary: Summary) -> None:
    """Commit one batch of results and mark their claims done, in one transaction."""
    stamp = now_iso()
    with db.transaction():
        for r in chunk:
            if r.unchanged:
                db.touch(r.path, r.size, r.mtime_ns)
                summary.skipped += 1
                continue
            db.save(r, model_id, stamp, photo_id=queue.photo_ids.get(r.path))
            if r.error:
                summary.failed += 1
                if len(summary.errors) < MAX_REPORTED:
                    summary.errors.append({"path": r.path, "error": r.error})
            else:
                summary.indexed += 1
        queue.finish(chunk)


def _release(queue: WorkQueue) -> None:
    """Free this run's unfinished claims; if the database cannot be written now, the next run
    takes them over anyway (this process will be gone)."""
    with suppress(sqlite3.Error):
        queue.release()


def _reported(skipped: Sequence[Skipped]) -> list[dict]:
    """{"path","error"} for the first MAX_REPORTED, paths as valid UTF-8 text."""
    return [{"path": printable(s.path), "error": s.error} for s in skipped[:MAX_REPORTED]]


def _labels_and_name(engine: Engine | None, blob: ModelBlob) -> tuple[tuple, str]:
    """The label table and name, from the local engine or (Dask) from the model file alone."""
    if engine is not None:
        return engine.labels, engine.name
    from .engine import describe_blob

    return describe_blob(blob)


def _disable(progress: bool | None) -> bool | None:
    if progress is None:
        return None  # tqdm: off when stderr is not a terminal
    return not progress
