"""Run a `.klaus` (or plain ONNX) classifier on ONNX Runtime's CPU provider."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from . import onnxwire, shapes
from .errors import KlausModelError, first_line, naming
from .format import KlausModel, LabelRow, WeightsReady, allowed_ops, looks_like_klaus, read_model
from .images import load_image
from .limits import MEMORY_ENV, max_run_bytes
from .memory import release_free_heap
from .onnxwire import batches
from .preprocess import Preprocess, check_input_shape, preprocess_for_input, to_tensor
from .staging import StagedModel, Weights, cached, decoded, fix_mmap_threshold, stage

if TYPE_CHECKING:
    from pathlib import Path

    import onnx

DEFAULT_MODEL_NAME = "efficientnet-lite0.klaus"
RUN_ROWS = 32  # images or crops per ONNX Runtime call: bounds activation memory, costs no throughput
MEMORY_MODES = ("default", "low")  # "low": weights stay uint8 indices + palette in memory (klaus.lowmem)
ImageSource = str | os.PathLike | bytes | IO[bytes]


def _is_sqlite(path: str | os.PathLike[str]) -> bool:
    """A `.klaus` file is an SQLite database; anything else is treated as ONNX."""
    # A .klaus name always goes to the reader, which explains what is wrong with it.
    return str(path).lower().endswith(".klaus") or looks_like_klaus(path)


def default_model_path() -> Path:
    """The model shipped inside the package (built by `klaus zoo build efficientnet-lite0`).

    Found beside this module rather than through ``importlib.resources`` (5 ms to import, on every
    `klaus classify`): ONNX Runtime reads the staged weights from files, so Klaus runs from a
    package installed as files, never from a zip archive."""
    from pathlib import Path  # here: the classify path itself uses default_model_file, and no pathlib

    return Path(default_model_file())


def default_model_file() -> str:
    """:func:`default_model_path` as a string."""
    return os.path.join(os.path.dirname(os.path.realpath(__file__)), "data", DEFAULT_MODEL_NAME)


@dataclass(frozen=True)
class Prediction:
    """One of a photo's top classes: its rank (1 = best), class index, WordNet id, label, probability and
    the display names of its WordNet path, root first."""

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
    """One photo's predictions; ``elapsed_ms`` is the time this photo took (decoding, preprocessing, the run),
    without any wait for the model's session to be built."""

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
    model: onnx.ModelProto | bytes | str | os.PathLike[str],
    threads: int | None = None,
    arrays: dict[str, np.ndarray] | None = None,
    where: str | None = None,
    spinning: bool = True,
    capped: bool = False,
    folder: str | os.PathLike[str] | None = None,
):
    """An ONNX Runtime CPU session; deterministic settings, no custom ops.

    With ``capped`` the session allocates from the process's one capped arena
    (:func:`klaus.limits.max_run_bytes`): what a model file runs cannot take unbounded memory.

    ``model`` is a graph in memory or the path of an ONNX file; the files its external data refers
    to lie in ``folder`` (:func:`klaus_session`), or beside the file. ``arrays`` gives the values of
    placeholder initializers (:func:`klaus.onnxwire.placeholder_tensor`);
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
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", os.fspath(folder))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4  # fatal only: failures arrive as exceptions, which become one line
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = (
        os.fspath(model)
        if isinstance(model, (str, os.PathLike))
        else model
        if isinstance(model, bytes)
        else model.SerializeToString()
    )
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


def klaus_session(model: KlausModel | Weights, threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime session for a `.klaus` model, its decoded weights read the way a plain ONNX
    file's are (:func:`klaus.staging.stage`); where no weights file can be written (no writable
    directory, a full disk), they go to ONNX Runtime from memory instead, which holds them twice
    while the session is built."""
    staged = stage(model)
    if staged is None:
        return _session_from_memory(model, threads, spinning)
    with staged:
        return staged_session(staged, threads, spinning)


def staged_session(staged: StagedModel, threads: int | None = None, spinning: bool = True):
    """The session of a staged model: its graph from memory, its weights from the staged file."""
    return make_session(
        staged.graph, threads, staged.small, where=staged.where, spinning=spinning, capped=True, folder=staged.folder
    )


def _session_from_memory(model: KlausModel | Weights, threads: int | None, spinning: bool):
    """:func:`klaus_session` without a weights file: the decoded arrays go to ONNX Runtime as
    external initializers, which it copies."""
    weights = Weights.of(model)
    fix_mmap_threshold()
    arrays = {t.name: decoded(t, weights.where) for t in weights.tensors}
    placeholders = [onnxwire.placeholder_tensor(t.name, t.dims) for t in weights.tensors]
    blob = onnxwire.with_initializers(weights.graph, placeholders)
    return make_session(blob, threads, arrays, where=weights.where, spinning=spinning, capped=True)


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
        spinning: bool = True,
        background: bool = False,
    ) -> None:
        """``spinning``: ONNX Runtime's idle threads busy-wait for the next run, which makes back-to-back runs
        faster (batch-1 about 25 %) but takes a core from whatever else the process does meanwhile (building
        the session while the first photo decodes, decoding photos between runs); without it they sleep.

        ``background``: a `.klaus` model's session may still be building when the classifier is returned
        (the caller decodes its first photos meanwhile); it is waited for where it is first needed
        (:attr:`session`), and a model ONNX Runtime cannot load is refused there. Otherwise the
        classifier is returned ready, or not at all."""
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        if model is None:
            model = default_model_file()
        self._session: Any = None
        self._early: _EarlySession | None = None
        self._waited = 0.0  # seconds spent waiting for the session (not part of any photo's time)
        if isinstance(model, KlausModel) or _is_sqlite(model):
            early = _EarlySession(threads, spinning) if memory == "default" else None
            try:
                loaded = model if isinstance(model, KlausModel) else read_model(model, _handing_to(early, str(model)))
            except BaseException:
                if early is not None:
                    early.abandon()
                raise
            self.where = loaded.source_path or loaded.name  # the file, for messages
            self.name = loaded.name
            self.output = loaded.meta["output"]
            self.preprocess = preprocess or loaded.preprocess
            self.labels = tuple(labels or loaded.labels)
            if early is None:
                self._adopt(self._low_memory_session(loaded, threads))
                del loaded  # ONNX Runtime holds its own copy of the weights now
                release_free_heap()
            else:
                early.build(loaded)  # unless it is building already
                del loaded  # the compressed weights are in the staged file, or on their way to ONNX Runtime
                self._early = early
                if not background:
                    self.ready()
        else:
            from .labels import labels_for  # a .klaus file carries its labels
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
            session = make_session(blob, threads, where=self.where, spinning=spinning, capped=True)
            del blob
            self.name = os.path.splitext(os.path.basename(os.fspath(model)))[0]
            self.output = "logits"
            self.preprocess = preprocess or preprocess_for_input(session.get_inputs()[0].shape, self.where)
            self.labels = tuple(labels or labels_for(output_classes(session), where=self.where))
            self._adopt(session)

    @property
    def session(self) -> Any:
        """The ONNX Runtime session. A `.klaus` model's is built on a thread of its own while the reader checks
        the labels (and, with ``background``, while the caller decodes its first photos) and waited for here;
        a model ONNX Runtime cannot load raises its :class:`KlausModelError` here, each time it is asked."""
        if self._session is None:
            if self._early is None:
                raise RuntimeError("the classifier has no session")  # cannot happen: one is built or building
            start = time.perf_counter()
            self._adopt(self._early.result())
            self._early = None
            release_free_heap()
            self._waited += time.perf_counter() - start
        return self._session

    @property
    def input_name(self) -> str:
        return self.ready()._input_name

    def ready(self) -> Classifier:
        """This classifier once its session exists (:attr:`session`): for callers that want a model that
        cannot run reported before they do anything else."""
        if self.session is None:
            raise RuntimeError("the classifier has no session")
        return self

    def _adopt(self, session: Any) -> None:
        """Take ``session`` once its input fits the preprocessing."""
        first = session.get_inputs()[0]
        check_input_shape(first.shape, self.preprocess, self.where, first.name)
        self._input_name = str(first.name)
        self._fixed_batch = fixed_batch_of(session)
        self._session = session

    def _low_memory_session(self, loaded: KlausModel, threads: int | None):
        from . import lowmem

        try:
            return lowmem.session(loaded, threads)
        except KlausModelError as exc:
            raise KlausModelError(naming(str(exc), self.where)) from None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a preprocessed batch (N, ...)."""
        session = self.session  # a model that cannot load says so here, not as a failed run
        try:
            raw = run_session(session, self._input_name, batch, self._fixed_batch)
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
        start, waited = time.perf_counter(), self._waited
        probs = self.probabilities([image], crops)[0]
        elapsed = (time.perf_counter() - start - (self._waited - waited)) * 1000.0  # the photo's time, not the model's
        path = str(image) if isinstance(image, (str, os.PathLike)) else "<image>"
        if not np.all(np.isfinite(probs)):
            raise self._not_finite(image)
        return Classification(path, self.top(probs, top), elapsed)


def _handing_to(early: _EarlySession | None, where: str) -> WeightsReady | None:
    """The reader's ``on_weights`` that starts ``early`` (None: no early session, in low-memory mode)."""
    if early is None:
        return None
    return lambda graph, tensors: early.offer(Weights(graph, tensors, where))


class _EarlySession(threading.Thread):
    """A `.klaus` model's session, built on a thread of its own while the caller goes on: ONNX Runtime
    releases the GIL while it builds a session.

    When the weights cache holds the model's weights (:func:`klaus.staging.cached`), the build starts as
    soon as the reader hands the weights over (:func:`klaus.format.read_model`'s ``on_weights``,
    :meth:`offer`), beside the reader checking the labels and synsets and the caller decoding its first
    photo; if the reader then refuses the file, the session is discarded. Weights that must be decoded
    are decoded once the reader has returned (:meth:`build`), when its copies of the file are gone, so
    the decoded weights never share the peak with them.
    """

    def __init__(self, threads: int | None, spinning: bool = True) -> None:
        import onnxruntime  # noqa: F401  # here: an import on the building thread would hold the GIL the reader needs

        super().__init__(name="klaus-session")
        self.threads = threads
        self.spinning = spinning
        self.building = False
        self._weights: Weights | None = None
        self._staged: StagedModel | None = None
        self._session = None
        self._error: BaseException | None = None

    def offer(self, weights: Weights) -> None:
        """Start building now if the weights cache holds ``weights``; otherwise keep them for :meth:`build`."""
        self._staged = cached(weights)
        if self._staged is None:
            self._weights = weights
        else:
            self._begin()

    def build(self, model: KlausModel) -> None:
        """Start building, if :meth:`offer` has not: stage the weights on the caller's thread (Python work,
        which the building thread would only contend for the GIL with), then build on this one."""
        if self.building:
            return
        weights = self._weights or Weights.of(model)
        self._weights = None
        self._staged = stage(weights)
        if self._staged is None:  # no weights file can be written: the arrays go from memory
            self._weights = weights
        self._begin()

    def _begin(self) -> None:
        self.building = True
        self.start()

    def run(self) -> None:
        staged, weights = self._staged, self._weights
        self._staged = self._weights = None  # the compressed weights are not kept
        try:
            if staged is None:
                assert weights is not None
                self._session = _session_from_memory(weights, self.threads, self.spinning)
            else:
                with staged:
                    self._session = staged_session(staged, self.threads, self.spinning)
        except BaseException as exc:  # handed to the caller's thread by result()
            self._error = exc

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._session

    def abandon(self) -> None:
        """Wait for a build that has started (so its temporary files are gone) and drop it."""
        if self.is_alive():
            self.join()
        self._session = self._weights = None
        if self._staged is not None:
            self._staged.close()
            self._staged = None


def _check_top(top: int) -> None:
    if top < 1:
        raise ValueError("top must be >= 1")
