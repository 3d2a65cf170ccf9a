"""The classifier the indexer runs: a model, its identity, and a tuned ONNX Runtime session.

Unlike :class:`klaus.runtime.Classifier`, an :class:`Engine` is built from the model
file's *bytes*, so its identity (model name + SHA-256 of the file) is exactly what it
runs, and a Dask client can ship the same bytes to every worker. Its session does not
spin idle threads, so decode threads get the cores while a batch is being assembled.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KlausError, KlausModelError, first_line
from ..format import LabelRow
from ..preprocess import Preprocess

MAX_MODEL_BYTES = 2 << 30


@dataclass(frozen=True)
class ModelBlob:
    """A model file's content, as read once by the client: what every worker loads."""

    data: bytes
    kind: str  # "klaus" or "onnx"
    where: str  # the path it came from, for messages
    sha256: str

    @classmethod
    def read(cls, model: str | os.PathLike[str] | None = None) -> ModelBlob:
        from ..runtime import default_model_path

        path = Path(default_model_path() if model is None else model)
        try:
            size = path.stat().st_size
            if size > MAX_MODEL_BYTES:
                raise KlausModelError(f"{path}: model file is larger than 2 GiB")
            data = path.read_bytes()
        except FileNotFoundError:
            raise KlausModelError(f"{path}: no such model file") from None
        except IsADirectoryError:
            raise KlausModelError(f"{path}: is a directory, not a model file") from None
        except OSError as exc:
            raise KlausModelError(f"{path}: cannot read model ({exc.strerror or exc})") from None
        kind = "onnx" if path.suffix.lower() == ".onnx" else "klaus"
        return cls(data, kind, str(path), hashlib.sha256(data).hexdigest())


def session_options(threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    # Idle ORT threads otherwise busy-wait between batches, stealing the cores that
    # decode threads need; the pipeline keeps ORT fed, so spinning buys nothing.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@dataclass(frozen=True)
class BlobSpec:
    preprocess: Preprocess
    labels: tuple[LabelRow, ...]
    output: str
    name: str
    graph: Callable[[], object]  # the full ONNX model, decoded on demand


def parse_blob(blob: ModelBlob) -> BlobSpec:
    """Metadata of a model file; the weights are decoded only when ``graph()`` is called."""
    import onnx

    from ..compress import default_labels, to_onnx
    from ..format import parse_model

    if blob.kind == "onnx":
        try:
            graph = onnx.load_from_string(blob.data)
        except Exception as exc:  # protobuf DecodeError and friends
            raise KlausModelError(f"{blob.where}: not a readable ONNX model ({exc})") from None
        try:
            labels = tuple(default_labels(graph))
        except KlausError as exc:  # e.g. not 1000 outputs and no label table: name the file
            raise KlausModelError(f"{blob.where}: {exc}") from None
        return BlobSpec(Preprocess(), labels, "logits", Path(blob.where).stem, lambda: graph)
    model = parse_model(blob.data, blob.where)
    return BlobSpec(model.preprocess, tuple(model.labels), model.meta["output"], model.name, lambda: to_onnx(model))


def describe_blob(blob: ModelBlob) -> tuple[tuple[LabelRow, ...], str]:
    spec = parse_blob(blob)
    return spec.labels, spec.name


def labels_sha256(labels) -> str:
    """Identifies a label table, so a model with other classes rebuilds the search tables."""
    h = hashlib.sha256()
    for row in labels:
        h.update(f"{row.index}\t{row.wnid}\t{row.name}\t{'/'.join(row.path)}\n".encode())
    return h.hexdigest()


class Engine:
    """Batch classification for the indexer; ``sha256`` identifies the model file."""

    def __init__(self, blob: ModelBlob, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.blob = blob
        self.sha256 = blob.sha256
        self.threads = threads  # ONNX Runtime intra-op threads per call; None: all cores
        spec = parse_blob(blob)
        self.preprocess, self.labels, self.output, self.name = spec.preprocess, spec.labels, spec.output, spec.name
        graph = spec.graph()
        try:
            self.session = ort.InferenceSession(
                graph.SerializeToString(), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's own exception types
            raise KlausModelError(f"ONNX Runtime cannot load {blob.where} ({first_line(exc)})") from None
        self.input_name = self.session.get_inputs()[0].name
        dim = self.session.get_inputs()[0].shape[0]
        self._fixed_batch = dim if isinstance(dim, int) else None

    @classmethod
    def load(cls, model: str | os.PathLike[str] | None = None, threads: int | None = None) -> Engine:
        return cls(ModelBlob.read(model), threads)

    @property
    def identity(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"

    @property
    def labels_sha256(self) -> str:
        return labels_sha256(self.labels)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, classes) probabilities for a preprocessed batch."""
        from ..runtime import softmax

        if self._fixed_batch and batch.shape[0] != self._fixed_batch:
            raw = np.concatenate([self.session.run(None, {self.input_name: batch[i : i + 1]})[0] for i in range(len(batch))])
        else:
            raw = self.session.run(None, {self.input_name: batch})[0]
        raw = raw.reshape(raw.shape[0], -1)
        return raw.astype(np.float32) if self.output == "probabilities" else softmax(raw)


def top5(probs: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """[(class, probability)] best first; ties broken by class index (stable)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in order]
