"""Where ONNX Runtime reads a `.klaus` model's decoded weights from.

ONNX Runtime opens a plain ONNX file's weights as external data: it maps them, re-lays them out for its
kernels and drops what it no longer needs, so they are in memory once. Klaus hands it a `.klaus` model's
decoded weights the same way: one file of float32 tensors, each on a page boundary, in file order, that
the stored graph refers to. That file lies in one of two places:

- the weights cache (:func:`cache_directory`), one file per model, named by a digest of the model's
  tensor checksums: the first start decodes the model, later starts read the file as it is;
- a private temporary directory, removed as soon as the session exists, where there is no cache.

Where neither can be written, :func:`stage` says so (None) and the caller hands ONNX Runtime the
decoded arrays from memory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from . import onnxwire
from .errors import KlausError, KlausFormatError
from .format import KlausModel, TensorRecord

if TYPE_CHECKING:
    from concurrent.futures import Future

PAGE_BYTES = 4096  # each tensor in the weights file starts on a page boundary
# Tensors smaller than this go to ONNX Runtime from memory when the file is a temporary one: it keeps small
# tensors (biases, scales) mapped from the file as they are, which would keep the deleted file alive for as
# long as the session. A cache file stays, so it holds every tensor.
STAGED_MIN_BYTES = 64 * 1024
# Tensors decode two at a time (:func:`decoded_in_order`), their float32 bytes in flight bounded.
DECODE_THREADS, DECODE_BUDGET_BYTES = 2, 8 * 1024 * 1024
# A private staging directory is named klaus-weights-<pid>-<random>; one whose process is gone and that is
# older than this is left over from a process killed while building a session, and the next build removes it.
STAGING_PREFIX, STALE_STAGING_SECONDS = "klaus-weights-", 600
STAGED_WEIGHTS = "weights"  # the file's name in a private staging directory

CACHE_ENV, NO_CACHE_ENV = "KLAUS_CACHE_DIR", "KLAUS_NO_CACHE"
# Part of every cache key: a change to how the weights file is laid out (or decoded) names new files.
CACHE_LAYOUT = "klaus-weights-1"
CACHE_SUFFIX, PART_SUFFIX = ".f32", ".part"
# The cache keeps the most recently used files within this many bytes (the embedded model's takes 18 MiB);
# a file used in the last CACHE_GRACE_SECONDS is never removed, as a session may be opening it.
CACHE_LIMIT_BYTES, CACHE_GRACE_SECONDS = 1 << 30, 60


class Placement(NamedTuple):
    """Where each of a model's tensors reaches ONNX Runtime: at a byte offset of the weights file, or from
    memory (None); the file's size, and the cache key that names it."""

    offsets: tuple[int | None, ...]
    size: int
    key: str


def placement(records: Sequence[TensorRecord], min_bytes: int) -> Placement:
    """The weights file's layout for ``records``, known before any tensor is decoded: tensors of
    ``min_bytes`` and more go to the file.

    The key digests the layout rules and each tensor's name, shape, codec and stored checksum (verified
    when the file was read), so two models share a cache file exactly when they decode to the same bytes.
    """
    offsets: list[int | None] = []
    size = 0
    for record in records:
        if 4 * record.size < min_bytes:
            offsets.append(None)
            continue
        size += -size % PAGE_BYTES
        offsets.append(size)
        size += 4 * record.size
    described = [CACHE_LAYOUT, PAGE_BYTES, min_bytes] + [
        [r.name, list(r.dims), r.codec, r.bits, r.scale_axis, r.stored_bytes, r.sha256] for r in records
    ]
    key = hashlib.sha256(json.dumps(described, separators=(",", ":")).encode("utf-8")).hexdigest()
    return Placement(tuple(offsets), size, key)


class Weights(NamedTuple):
    """What staging needs of a model file: its graph, its tensor records (checked by the reader), and its
    name for messages. A reader can hand these over before it has checked the rest of the file."""

    graph: bytes
    tensors: tuple[TensorRecord, ...]
    where: str

    @classmethod
    def of(cls, model: KlausModel | Weights) -> Weights:
        if isinstance(model, Weights):
            return model
        return cls(model.graph, model.tensors, model.source_path or model.name)


@dataclass
class StagedModel:
    """A `.klaus` model ready for ONNX Runtime: ``graph`` is the stored graph whose initializers refer to
    the weights file in ``folder`` (ONNX Runtime's folder for external data), or, for the tensors in
    ``small``, take their values from memory. :meth:`close` removes ``folder`` when it is ``private``."""

    graph: bytes
    folder: str
    small: dict[str, np.ndarray]
    where: str
    private: bool
    cached: bool = field(default=False)  # the weights file was already in the cache

    def close(self) -> None:
        self.small = {}
        if self.private:
            _remove_staging(self.folder)

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stage(model: KlausModel | Weights) -> StagedModel | None:
    """``model``'s weights where ONNX Runtime reads them (:class:`StagedModel`): from the cache, decoded into
    the cache, or decoded into a private temporary directory; None where none of these can be written.

    Tensors are decoded two at a time within a budget of decoded bytes (:func:`decoded_in_order`), written in
    file order and each dropped once written, so the process holds at most a few MiB of decoded weights, or
    one tensor larger than that. A tensor that fails its decode checks is a :class:`KlausFormatError` naming
    the file and the tensor, and leaves no file behind.
    """
    weights = Weights.of(model)
    fix_mmap_threshold()
    slot = _cache_slot(weights)
    if slot is not None:
        staged = _from_cache(weights, slot) or _stage_into_cache(weights, slot)
        if staged is not None:
            return staged
    return _stage_privately(weights, placement(weights.tensors, STAGED_MIN_BYTES))


def cached(model: KlausModel | Weights) -> StagedModel | None:
    """``model``'s weights as the weights cache holds them, decoded by an earlier start; None when it does
    not hold them (or there is no cache). Decodes nothing and writes no weights: it only marks the file
    as recently used."""
    weights = Weights.of(model)
    fix_mmap_threshold()  # before ONNX Runtime allocates the session's buffers
    slot = _cache_slot(weights)
    return None if slot is None else _from_cache(weights, slot)


class _Slot(NamedTuple):
    """A model's place in the weights cache: the layout of its file, the cache directory, the file's name."""

    plan: Placement
    cache: str
    name: str

    @property
    def path(self) -> str:
        return os.path.join(self.cache, self.name)


def _cache_slot(weights: Weights) -> _Slot | None:
    """Where the cache keeps ``weights``; None without a cache, or for weights larger than the whole cache."""
    plan = placement(weights.tensors, 0)  # a cache file lives on: every tensor can stay mapped from it
    cache = cache_directory() if plan.size <= CACHE_LIMIT_BYTES else None
    return None if cache is None else _Slot(plan, cache, plan.key + CACHE_SUFFIX)


def _from_cache(weights: Weights, slot: _Slot) -> StagedModel | None:
    if not _usable(slot.path, slot.plan.size):
        return None
    with contextlib.suppress(OSError):
        os.utime(slot.path)  # recently used: the last file the cache would remove
    return StagedModel(_graph(weights, slot.plan, slot.name), slot.cache, {}, weights.where, private=False, cached=True)


def cache_directory() -> str | None:
    """The weights cache: ``$KLAUS_CACHE_DIR``, else ``$XDG_CACHE_HOME/klaus``, else ``~/.cache/klaus``;
    None when ``$KLAUS_NO_CACHE`` is set, or when the directory cannot be made or is not private to this
    user (a directory others may write to could hand Klaus weights it did not decode)."""
    if os.environ.get(NO_CACHE_ENV, "").strip().lower() in ("1", "yes", "true", "on"):
        return None
    directory = os.environ.get(CACHE_ENV, "").strip()
    if not directory:
        base = os.environ.get("XDG_CACHE_HOME", "").strip()
        if not os.path.isabs(base):  # unset, or relative (which the XDG specification says to ignore)
            home = os.path.expanduser("~")
            if not os.path.isabs(home):  # no home directory: no cache, rather than one under the working directory
                return None
            base = os.path.join(home, ".cache")
        directory = os.path.join(base, "klaus")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
    except OSError:
        return None
    return directory if stat.S_ISDIR(info.st_mode) and _private(info) else None


def _private(info: os.stat_result) -> bool:
    """Owned by this user and writable by no one else (POSIX; elsewhere the directory's ACLs decide)."""
    if not hasattr(os, "getuid"):
        return True
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _usable(path: str, size: int) -> bool:
    """A cached weights file Klaus wrote: a regular file (not a link) of this user, of the expected size.

    Klaus writes a cache file under a temporary name and renames it when complete, so a file of the right
    name and size is whole; its bytes are not hashed again on every start (that would cost 10 ms for the
    embedded model's 18 MiB)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == size and _private(info)


def _graph(model: Weights, plan: Placement, weights: str) -> bytes:
    """The stored graph with an initializer per tensor: an external reference into ``weights``, or a
    placeholder for a tensor that goes from memory."""
    tensors = [
        onnxwire.placeholder_tensor(r.name, r.dims)
        if at is None
        else onnxwire.external_tensor(r.name, r.dims, weights, at)
        for r, at in zip(model.tensors, plan.offsets, strict=True)
    ]
    return onnxwire.with_initializers(model.graph, tensors)


def _stage_into_cache(weights: Weights, slot: _Slot) -> StagedModel | None:
    """Decode ``weights`` into a new cache file, written under a temporary name and renamed when whole,
    then keep the cache within its limit; None when the cache cannot take it (a full disk, a read-only
    directory)."""
    part = f"{slot.path}.{os.getpid()}-{os.urandom(4).hex()}{PART_SUFFIX}"
    small: dict[str, np.ndarray] = {}
    try:
        with _removed_on_failure(lambda: _unlink(part)):
            _write_weights(weights, slot.plan, part, small)
            os.replace(part, slot.path)
    except OSError:
        return None
    _trim_cache(slot.cache, keep=slot.name)
    return StagedModel(_graph(weights, slot.plan, slot.name), slot.cache, small, weights.where, private=False)


def _stage_privately(weights: Weights, plan: Placement) -> StagedModel | None:
    """Decode ``weights`` into a new private temporary directory (0700, under ``$TMPDIR``)."""
    import tempfile  # here, not at the top: a start that finds its weights in the cache needs neither module

    try:
        directory = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-")
    except OSError:
        return None
    _remove_stale_staging(os.path.dirname(directory))
    small: dict[str, np.ndarray] = {}
    try:
        with _removed_on_failure(lambda: _remove_staging(directory)):
            _write_weights(weights, plan, os.path.join(directory, STAGED_WEIGHTS), small)
    except OSError:  # the temporary directory is full or not writable
        return None
    return StagedModel(_graph(weights, plan, STAGED_WEIGHTS), directory, small, weights.where, private=True)


@contextlib.contextmanager
def _removed_on_failure(remove: Callable[[], None]) -> Iterator[None]:
    """Run ``remove`` when the block fails, whatever the failure (a full disk, a tensor that does not
    decode, Ctrl-C), so no partly written weights file is left behind."""
    try:
        yield
    except BaseException:
        remove()
        raise


def _write_weights(model: Weights, plan: Placement, path: str, small: dict[str, np.ndarray]) -> None:
    """Write each tensor that has an offset in ``plan`` to a new file at ``path``; put the others in ``small``."""
    offsets = dict(zip((r.name for r in model.tensors), plan.offsets, strict=True))
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with open(descriptor, "wb") as out:
        for record, array in decoded_in_order(model.tensors, model.where):
            at = offsets[record.name]
            if at is None:
                small[record.name] = array
                continue
            out.seek(at)
            out.write(array.data)
            del array
        out.truncate(plan.size)  # exactly the size :func:`_usable` expects, whatever was written last


def _trim_cache(cache: str, keep: str) -> None:
    """Keep the cache within :data:`CACHE_LIMIT_BYTES`: remove the least recently used weights files (never
    ``keep``, nor one used in the last minute), and parts that writers killed mid-way left behind."""
    now = time.time()
    files: list[tuple[float, int, str]] = []
    try:
        entries = list(os.scandir(cache))
    except OSError:
        return
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        if entry.name.endswith(PART_SUFFIX) and now - info.st_mtime > STALE_STAGING_SECONDS:
            _unlink(entry.path)
        elif entry.name.endswith(CACHE_SUFFIX):
            files.append((info.st_mtime, info.st_size, entry.path))
    total = sum(size for _, size, _ in files)
    for mtime, size, path in sorted(files):
        if total <= CACHE_LIMIT_BYTES:
            break
        if os.path.basename(path) == keep or now - mtime < CACHE_GRACE_SECONDS:
            continue
        with contextlib.suppress(OSError):
            os.unlink(path)
            total -= size


def _remove_stale_staging(root: str) -> None:
    """Remove the staging directories in ``root`` that processes of this user killed while building a
    session left behind (their process is gone and they are older than :data:`STALE_STAGING_SECONDS`).
    POSIX only: elsewhere a process id cannot be probed without side effects."""
    if os.name != "posix":
        return
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        pid = entry.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if not entry.name.startswith(STAGING_PREFIX) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or info.st_uid != os.getuid():
                continue
            if now - info.st_mtime < STALE_STAGING_SECONDS or _process_exists(int(pid)):
                continue
        except OSError:
            continue
        _remove_staging(entry.path)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_staging(directory: str) -> None:
    """Delete a private staging directory: the file Klaus writes there, then the directory itself."""
    _unlink(os.path.join(directory, STAGED_WEIGHTS))
    with contextlib.suppress(OSError):
        os.rmdir(directory)


def _unlink(path: str) -> None:
    """Remove a file Klaus wrote, if it is still there (cleaning up never raises)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 128 * 1024  # glibc's mallopt parameter and its default value


@functools.cache
def fix_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at its default (glibc only; a no-op elsewhere), once per process.

    glibc raises the threshold to the size of each large block freed (up to 32 MiB), and blocks under
    it then come from the heap. Decoding frees many multi-MiB arrays, after which the session's own
    buffers land in the heap, where freed space is not returned and the peak grows by several MiB
    (by chance: it depends on the order of frees). Setting the threshold fixes it, so blocks of
    128 KiB and more are mapped and unmapped on their own and memory freed goes back at once.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def decoded(tensor: TensorRecord, where: str) -> np.ndarray:
    """A stored tensor as the contiguous little-endian float32 array ONNX Runtime reads."""
    try:
        return np.ascontiguousarray(tensor.decode(), dtype="<f4").reshape(tensor.dims)
    except KlausError as exc:
        raise KlausFormatError(f"{where}: tensor {tensor.name!r}: {exc}") from None


def decoded_in_order(records: Sequence[TensorRecord], where: str) -> Iterator[tuple[TensorRecord, np.ndarray]]:
    """Each record with its decoded array, in file order, decoded :data:`DECODE_THREADS` at a time.

    zlib, Pillow and numpy release the GIL, so two threads decode a model in about two thirds of the
    time one takes. The float32 bytes of the tensors decoded but not yet handed back stay within
    :data:`DECODE_BUDGET_BYTES`, except that a larger tensor is decoded alone: the peak is that of
    decoding one tensor at a time for any model whose large tensors exceed the budget (an AlexNet-shaped
    fully connected layer), and a few MiB above it otherwise.
    """
    from concurrent.futures import ThreadPoolExecutor  # only a start that decodes pays for the import

    pending: deque[tuple[TensorRecord, int, Future[np.ndarray]]] = deque()
    upcoming = iter(records)
    following = next(upcoming, None)
    in_flight = 0
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="klaus-decode") as workers:
        try:
            while following is not None or pending:
                while following is not None and (not pending or in_flight + 4 * following.size <= DECODE_BUDGET_BYTES):
                    pending.append((following, 4 * following.size, workers.submit(decoded, following, where)))
                    in_flight += 4 * following.size
                    following = next(upcoming, None)
                record, nbytes, job = pending.popleft()
                yield record, job.result()
                del job
                in_flight -= nbytes
        finally:  # a failed or abandoned decode: the tensors not started are dropped
            workers.shutdown(wait=True, cancel_futures=True)
