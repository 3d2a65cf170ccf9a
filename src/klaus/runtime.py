"""Run a `.klaus` (or plain ONNX) classifier on ONNX Runtime's CPU provider."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from . import onnxwire, shapes
from .errors import KlausError, KlausFormatError, KlausModelError, first_line, naming
from .format import KlausModel, LabelRow, TensorRecord, allowed_ops, looks_like_klaus, read_model
from .images import load_image
from .labels import labels_for
from .limits import MEMORY_ENV, max_run_bytes
from .memory import release_free_heap
from .onnxwire import batches
from .preprocess import Preprocess, check_input_shape, preprocess_for_input, to_tensor

if TYPE_CHECKING:
    import onnx

DEFAULT_MODEL_NAME = "efficientnet-lite0.klaus"
RUN_ROWS = 32  # images or crops per ONNX Runtime call: bounds activation memory, costs no throughput
MEMORY_MODES = ("default", "low")  # "low": weights stay uint8 indices + palette in memory (klaus.lowmem)
ImageSource = str | os.PathLike | bytes | IO[bytes]
# A `.klaus` session's decoded weights pass through a private temporary directory (:func:`klaus_session`).
STAGED_GRAPH, STAGED_WEIGHTS = "model.onnx", "weights"
PAGE_BYTES = 4096  # each staged tensor starts on a page boundary
# Tensors smaller than this go to ONNX Runtime from memory: it keeps small tensors (biases, scales) mapped from
# the file as they are, which would keep the deleted file alive for as long as the session.
STAGED_MIN_BYTES = 64 * 1024
# Tensors decode two at a time (:func:`_decoded_in_order`), their float32 bytes in flight bounded.
DECODE_THREADS, DECODE_BUDGET_BYTES = 2, 8 * 1024 * 1024
# Staging directories are named klaus-weights-<pid>-<random>; one whose process is gone and that is older than
# this is left over from a process killed while building a session, and the next session build removes it.
STAGING_PREFIX, STALE_STAGING_SECONDS = "klaus-weights-", 600


def _is_sqlite(path: str | os.PathLike[str]) -> bool:
    """A `.klaus` file is an SQLite database; anything else is treated as ONNX."""
    # A .klaus name always goes to the reader, which explains what is wrong with it.
    return str(path).lower().endswith(".klaus") or looks_like_klaus(path)


def default_model_path() -> Path:
    """The model shipped inside the package (built by `klaus zoo build efficientnet-lite0`).

    Found beside this module rather than through ``importlib.resources`` (5 ms to import, on every
    `klaus classify`): ONNX Runtime reads the staged weights from files, so Klaus runs from a
    package installed as files, never from a zip archive."""
    return Path(__file__).resolve().parent / "data" / DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class Prediction:
    rank: int
    index: int
    wnid: str
    label: str
    probability: float
    hierarchy: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "index": self.index,
            "wnid": self.wnid,
            "label": self.label,
            "probability": self.probability,
            "hierarchy": list(self.hierarchy),
        }


@dataclass(frozen=True)
class Classification:
    path: str
    predictions: tuple[Prediction, ...]
    elapsed_ms: float

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "predictions": [p.to_dict() for p in self.predictions],
            "elapsed_ms": round(self.elapsed_ms, 3),
        }


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities; a row with NaN or infinite logits comes out NaN, for the caller to report
    (:meth:`Classifier.finite_probabilities`), without numpy's warnings on stderr."""
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = logits - logits.max(axis=-1, keepdims=True)
        e = np.exp(shifted.astype(np.float64))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def kl_divergence(reference: np.ndarray, model: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """KL(reference || model) in nats over the last axis (one value per row of probabilities);
    ``eps`` keeps a zero probability from giving infinity."""
    return np.sum(reference * (np.log(reference + eps) - np.log(model + eps)), axis=-1)


def run_batches(model: onnx.ModelProto, inputs: np.ndarray, output: str | None = None, chunk: int = 64) -> np.ndarray:
    """``model``'s first output (or the named intermediate value, batch-major) over ``inputs``, ``chunk``
    rows per call; a graph whose batch size is fixed gets exactly that many (:func:`klaus.onnxwire.batches`)."""
    from .onnxgraph import fixed_batch, with_outputs  # compression's helper: ONNX graphs in memory

    session = make_session(model if output is None else with_outputs(model, [output]))
    name = session.get_inputs()[0].name
    fetch = [output or session.get_outputs()[0].name]
    return np.concatenate(
        [session.run(fetch, {name: part})[0][:real] for part, real in batches(inputs, chunk, fixed_batch(model))]
    )


def make_session(
    model: onnx.ModelProto | bytes | Path,
    threads: int | None = None,
    arrays: dict[str, np.ndarray] | None = None,
    where: str | None = None,
    spinning: bool = True,
    capped: bool = False,
):
    """An ONNX Runtime CPU session; deterministic settings, no custom ops.

    With ``capped`` the session allocates from the process's one capped arena
    (:func:`klaus.limits.max_run_bytes`): what a model file runs cannot take unbounded memory.

    ``model`` is a graph in memory or the path of an ONNX file (whose external data, if any, lies
    beside it: :func:`klaus_session`). ``arrays`` gives the values of placeholder initializers
    (:func:`klaus.onnxwire.placeholder_tensor`);
    ``where`` (the model file) is named in the error if ONNX Runtime refuses the graph. Without
    ``spinning``, idle ONNX Runtime threads sleep between calls instead of busy-waiting, which
    leaves the cores to the threads that decode photos while a batch is being assembled.
    """
    import onnxruntime as ort

    _quiet(ort)
    options = ort.SessionOptions()
    if capped:
        _register_capped_arena(ort)
        options.add_session_config_entry("session.use_env_allocators", "1")
    if arrays:
        options.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()])
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4  # fatal only: failures arrive as exceptions, which become one line
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(model) if isinstance(model, Path) else model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise KlausModelError(
            f"{where + ': ' if where else ''}ONNX Runtime cannot load the model ({first_line(exc)})"
        ) from None


_ARENA_BYTES: list[int] = []  # the cap of the arena registered in this process, once


def _register_capped_arena(ort) -> None:
    if _ARENA_BYTES:
        return
    cap = max_run_bytes()
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"max_mem": cap, "arena_extend_strategy": 1}))
    _ARENA_BYTES.append(cap)


def _quiet(ort) -> None:
    """ONNX Runtime's own log lines (coloured, multi-line) never reach the user's stderr: its
    failures arrive as exceptions, which Klaus turns into one line."""
    ort.set_default_logger_severity(4)


def run_failure(where: str, exc: BaseException) -> KlausModelError:
    """One line for an ONNX Runtime run that failed, saying so plainly when it hit the memory cap."""
    text = str(exc)
    if "bfc_arena" in text or "Failed to allocate memory" in text or "Available memory of" in text:
        cap = (_ARENA_BYTES or [max_run_bytes()])[0] >> 20
        return KlausModelError(
            f"{where}: the model needs more than the {cap} MiB Klaus lets a model use while it runs "
            f"(set {MEMORY_ENV} to raise it)"
        )
    return KlausModelError(f"{where}: ONNX Runtime failed ({first_line(exc)})")


def klaus_session(model: KlausModel, threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime session for a `.klaus` model, built from the stored graph bytes.

    The decoded weights reach ONNX Runtime the way a plain ONNX file's weights do (:func:`stage`);
    where no temporary file can be written (no writable directory, a full disk), they go to ONNX
    Runtime from memory instead, which holds them twice while the session is built.
    """
    staged = stage(model)
    if staged is None:
        return _session_from_memory(model, threads, spinning)
    with staged:
        return staged.session(threads, spinning)


class StagedModel:
    """A `.klaus` model's graph and decoded weights in a private temporary directory, for ONNX Runtime
    to read as an ONNX file with external data; deleted on :meth:`close` (or leaving a ``with`` block).

    ONNX Runtime then holds the only copy of each weight in memory, and frees it as it re-lays the
    weights out for its kernels, while the caller may drop the compressed model before the session
    is built: the weights are never in memory twice, and the peak stays at or below that of ONNX
    Runtime opening the fp32 `.onnx` file.
    """

    def __init__(self, directory: Path, graph: Path, small: dict[str, np.ndarray], where: str) -> None:
        self.directory = directory
        self.graph = graph
        self.small = small  # the tensors under STAGED_MIN_BYTES, handed over from memory
        self.where = where

    def session(self, threads: int | None = None, spinning: bool = True):
        return make_session(self.graph, threads, self.small, where=self.where, spinning=spinning, capped=True)

    def close(self) -> None:
        self.small = {}
        _remove_staging(self.directory)

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stage(model: KlausModel) -> StagedModel | None:
    """``model`` written for ONNX Runtime (:class:`StagedModel`), or None where no temporary file can be
    written. Tensors are decoded two at a time, within a budget of decoded bytes (:func:`_decoded_in_order`),
    written in file order and each dropped once written, so the process holds at most a few MiB of decoded
    weights, or one tensor larger than that; no `onnx` import, no protobuf copy of any weight.
    A tensor that fails its decode checks is a :class:`KlausFormatError` naming the file and the tensor.
    """
    where = model.source_path or model.name
    _fix_mmap_threshold()
    try:
        directory = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
    except OSError:
        return None
    _remove_stale_staging(directory.parent)
    small: dict[str, np.ndarray] = {}
    try:
        graph = _write_staged(model, directory, small, where)
    except OSError:  # the temporary directory is full or not writable
        _remove_staging(directory)
        return None
    except BaseException:
        _remove_staging(directory)
        raise
    return StagedModel(directory, graph, small, where)


def _remove_stale_staging(root: Path) -> None:
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
        _remove_staging(Path(entry.path))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_staging(directory: Path) -> None:
    """Delete a staging directory: the two files Klaus writes there, then the directory itself."""
    with contextlib.suppress(OSError):
        for name in (STAGED_GRAPH, STAGED_WEIGHTS):
            (directory / name).unlink(missing_ok=True)
        directory.rmdir()


M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 128 * 1024  # glibc's mallopt parameter and its default value


@functools.cache
def _fix_mmap_threshold() -> None:
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


def _decoded(tensor: TensorRecord, where: str) -> np.ndarray:
    """A stored tensor as the contiguous little-endian float32 array ONNX Runtime reads."""
    try:
        return np.ascontiguousarray(tensor.decode(), dtype="<f4").reshape(tensor.dims)
    except KlausError as exc:
        raise KlausFormatError(f"{where}: tensor {tensor.name!r}: {exc}") from None


def _decoded_in_order(records: Sequence[TensorRecord], where: str) -> Iterator[tuple[TensorRecord, np.ndarray]]:
    """Each record with its decoded array, in file order, decoded :data:`DECODE_THREADS` at a time.

    zlib, Pillow and numpy release the GIL, so two threads decode a model in about two thirds of the
    time one takes. The float32 bytes of the tensors decoded but not yet handed back stay within
    :data:`DECODE_BUDGET_BYTES`, except that a larger tensor is decoded alone: the peak is that of
    decoding one tensor at a time for any model whose large tensors exceed the budget (an AlexNet-shaped
    fully connected layer), and a few MiB above it otherwise.
    """
    pending: deque[tuple[TensorRecord, int, Future[np.ndarray]]] = deque()
    upcoming = iter(records)
    following = next(upcoming, None)
    in_flight = 0
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="klaus-decode") as workers:
        try:
            while following is not None or pending:
                while following is not None and (not pending or in_flight + 4 * following.size <= DECODE_BUDGET_BYTES):
                    pending.append((following, 4 * following.size, workers.submit(_decoded, following, where)))
                    in_flight += 4 * following.size
                    following = next(upcoming, None)
                record, nbytes, job = pending.popleft()
                yield record, job.result()
                del job
                in_flight -= nbytes
        finally:  # a failed or abandoned decode: the tensors not started are dropped
            workers.shutdown(wait=True, cancel_futures=True)


def _write_staged(model: KlausModel, directory: Path, small: dict[str, np.ndarray], where: str) -> Path:
    """Write ``model``'s graph and decoded weights (each tensor page-aligned) into ``directory``; the
    graph's path. Tensors under :data:`STAGED_MIN_BYTES` go into ``small`` instead."""
    tensors = []
    with open(directory / STAGED_WEIGHTS, "xb") as out:
        offset = 0
        for record, array in _decoded_in_order(model.tensors, where):
            if array.nbytes < STAGED_MIN_BYTES:
                small[record.name] = array
                tensors.append(onnxwire.placeholder_tensor(record.name, record.dims))
                continue
            offset += -offset % PAGE_BYTES
            out.seek(offset)
            out.write(array.data)
            tensors.append(onnxwire.external_tensor(record.name, record.dims, STAGED_WEIGHTS, offset))
            offset += array.nbytes
            del array
    graph = directory / STAGED_GRAPH
    with open(graph, "xb") as out:
        out.write(onnxwire.with_initializers(model.graph, tensors))
    return graph


def _session_from_memory(model: KlausModel, threads: int | None, spinning: bool):
    """:func:`klaus_session` without a temporary directory: the decoded arrays go to ONNX Runtime
    as external initializers, which it copies."""
    where = model.source_path or model.name
    _fix_mmap_threshold()
    arrays = {t.name: _decoded(t, where) for t in model.tensors}
    blob = onnxwire.with_initializers(model.graph, [onnxwire.placeholder_tensor(t.name, t.dims) for t in model.tensors])
    return make_session(blob, threads, arrays, where=where, spinning=spinning, capped=True)


def run_session(session, input_name: str, batch: np.ndarray, fixed: int | None, rows: int = RUN_ROWS) -> np.ndarray:
    """The first output for ``batch``, at most ``rows`` rows a call so activations stay small
    whatever the caller's batch; a graph whose batch size is ``fixed`` is fed exactly that many
    rows a call, the last group padded (:func:`klaus.onnxwire.batches`)."""
    if len(batch) == fixed or (not fixed and len(batch) <= rows):  # one call, no padding
        return session.run(None, {input_name: batch})[0]
    parts = batches(batch, rows, fixed)
    return np.concatenate([session.run(None, {input_name: p})[0][:real] for p, real in parts])


def fixed_batch_of(session) -> int | None:
    """The batch size a session's first input fixes, if any."""
    dim = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    return dim if isinstance(dim, int) and dim > 0 else None


def output_classes(session) -> int | None:
    """The width of a session's first output when it is (batch, classes)."""
    shape = session.get_outputs()[0].shape
    last = shape[-1] if len(shape) == 2 else None
    return last if isinstance(last, int) and last > 0 else None


class Classifier:
    """Top-k ImageNet-style classification with a `.klaus` model or an ONNX file."""

    def __init__(
        self,
        model: str | os.PathLike[str] | KlausModel | None = None,
        *,
        preprocess: Preprocess | None = None,
        labels: Sequence[LabelRow] | None = None,
        threads: int | None = None,
        memory: str = "default",
    ) -> None:
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        if model is None:
            model = default_model_path()
        if isinstance(model, KlausModel):
            loaded: KlausModel | None = model
        elif not _is_sqlite(model):
            loaded = None
        else:
            loaded = read_model(model)
        if loaded is not None:
            self.where = loaded.source_path or loaded.name  # the file, for messages
            self.name = loaded.name
            self.output = loaded.meta["output"]
            self.preprocess = preprocess or loaded.preprocess
            self.labels = tuple(labels or loaded.labels)
            staged = stage(loaded) if memory == "default" else None
            if staged is None:
                self.session = self._klaus_session(loaded, threads, memory)
                del loaded  # ONNX Runtime holds its own copy of the weights now
                release_free_heap()
            else:
                del loaded  # the decoded weights are in the staged file: the compressed ones are not needed
                release_free_heap()
                with staged:
                    self.session = staged.session(threads)
                release_free_heap()
        else:
            from .onnxgraph import load_onnx  # a plain ONNX file: parsed (and checked) by the onnx package

            self.where = str(model)
            if memory != "default":
                raise KlausModelError(
                    f"{model}: low-memory mode needs a .klaus model (an ONNX file's weights are not palettized)"
                )
            blob = load_onnx(str(model)).SerializeToString()
            skeleton = onnxwire.read_skeleton(blob, self.where, allowed_ops())  # the policy a .klaus graph obeys
            feed = skeleton.data_inputs[0].shape if skeleton.data_inputs else None
            fitted = preprocess or preprocess_for_input(feed, self.where)  # a too-large input: that line first
            shapes.check(blob, self.where, input_size=fitted.input_size, layout=fitted.layout)
            self.session = make_session(blob, threads, where=self.where, capped=True)
            del blob
            self.name = Path(str(model)).stem
            self.output = "logits"
            shape = self.session.get_inputs()[0].shape
            self.preprocess = preprocess or preprocess_for_input(shape, self.where)
            self.labels = tuple(labels or labels_for(output_classes(self.session), where=self.where))
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        check_input_shape(first.shape, self.preprocess, self.where, first.name)
        self._fixed_batch = fixed_batch_of(self.session)

    def _klaus_session(self, loaded: KlausModel, threads: int | None, memory: str):
        if memory == "default":  # staging has already failed: the weights go from memory
            return _session_from_memory(loaded, threads, spinning=True)
        from . import lowmem

        try:
            return lowmem.session(loaded, threads)
        except KlausModelError as exc:
            raise KlausModelError(naming(str(exc), self.where)) from None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a preprocessed batch (N, ...)."""
        try:
            raw = run_session(self.session, self.input_name, batch, self._fixed_batch)
        except Exception as exc:  # onnxruntime's Fail/InvalidArgument/RuntimeException types
            raise run_failure(self.where, exc) from None
        raw = raw.reshape(raw.shape[0], -1)
        return raw.astype(np.float32) if self.output == "probabilities" else softmax(raw)

    def probabilities(self, images: Sequence[ImageSource], crops: int = 1) -> np.ndarray:
        """(len(images), classes) probabilities; with crops=10 the crops are averaged."""
        tensors = [to_tensor(self.load(img), self.preprocess, crops) for img in images]
        probs = self.run(np.concatenate(tensors, axis=0))
        return probs.reshape(len(images), crops, -1).mean(axis=1)

    def finite_probabilities(self, images: Sequence[ImageSource], crops: int = 1) -> np.ndarray:
        """:meth:`probabilities`, but NaN or infinite scores are a :class:`KlausModelError` naming the (first such) image."""
        probs = self.probabilities(images, crops)
        bad = ~np.isfinite(probs).all(axis=-1)
        if bad.any():
            raise self._not_finite(images[int(np.argmax(bad))])
        return probs

    def _not_finite(self, image: ImageSource) -> KlausModelError:
        path = str(image) if isinstance(image, (str, os.PathLike)) else "<image>"
        return KlausModelError(f"{path}: the model {self.where} gives NaN or infinite scores for this image")

    def load(self, image: ImageSource):
        return load_image(image, target=self.preprocess.resize_side)

    def top(self, probs: np.ndarray, top: int = 5) -> tuple[Prediction, ...]:
        _check_top(top)
        top = min(top, probs.shape[-1])
        order = np.argsort(-probs, kind="stable")[:top]
        return tuple(self._prediction(rank, int(i), float(probs[i])) for rank, i in enumerate(order, 1))

    def _prediction(self, rank: int, index: int, probability: float) -> Prediction:
        if index < len(self.labels):
            row = self.labels[index]
            return Prediction(rank, index, row.wnid, row.name, probability, row.hierarchy)
        return Prediction(rank, index, "", f"class {index}", probability, ())

    def classify(self, image: ImageSource, top: int = 5, crops: int = 1) -> Classification:
        """Top-``top`` predictions for one image; a model output that is not a number is an error for it."""
        _check_top(top)
        start = time.perf_counter()
        probs = self.probabilities([image], crops)[0]
        elapsed = (time.perf_counter() - start) * 1000.0
        path = str(image) if isinstance(image, (str, os.PathLike)) else "<image>"
        if not np.all(np.isfinite(probs)):
            raise self._not_finite(image)
        return Classification(path, self.top(probs, top), elapsed)


def _check_top(top: int) -> None:
    if top < 1:
        raise ValueError("top must be >= 1")
