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
from typing import Any

import numpy as np

from ..errors import KlausError, KlausModelError
from ..format import LabelRow
from ..labels import labels_for
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


@dataclass(frozen=True)
class BlobSpec:
    preprocess: Preprocess
    labels: tuple[LabelRow, ...]
    output: str
    name: str
    session: Callable[[int | None], Any]  # an ONNX Runtime session (threads), built on demand


def parse_blob(blob: ModelBlob) -> BlobSpec:
    """Metadata of a model file; the weights are decoded only when ``session()`` is called.

    A `.klaus` file needs no `onnx` import (:func:`klaus.runtime.klaus_session`); a plain ONNX
    file is parsed by the onnx package, which refuses external data.
    """
    from ..format import parse_model
    from ..runtime import klaus_session, make_session, output_classes

    if blob.kind == "onnx":
        import onnx

        try:
            graph = onnx.load_from_string(blob.data)
        except Exception as exc:  # protobuf DecodeError and friends
            raise KlausModelError(f"{blob.where}: not a readable ONNX model ({exc})") from None
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer):
            raise KlausModelError(f"{blob.where}: external-data ONNX models are not supported; merge the weights first")
        session = make_session(blob.data, None, where=blob.where)
        try:
            labels = labels_for(output_classes(session))
        except KlausError as exc:  # e.g. not 1000 outputs and no label table: name the file
            raise KlausModelError(f"{blob.where}: {exc}") from None
        return BlobSpec(
            Preprocess(),
            labels,
            "logits",
            Path(blob.where).stem,
            lambda threads: make_session(blob.data, threads, where=blob.where, spinning=False, capped=True),
        )
    model = parse_model(blob.data, blob.where)
    return BlobSpec(
        model.preprocess,
        tuple(model.labels),
        model.meta["output"],
        model.name,
        lambda threads: klaus_session(model, threads, spinning=False),
    )


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
        from ..runtime import fixed_batch_of

        self.blob = blob
        self.sha256 = blob.sha256
        self.threads = threads  # ONNX Runtime intra-op threads per call; None: all cores
        spec = parse_blob(blob)
        self.preprocess, self.labels, self.output, self.name = spec.preprocess, spec.labels, spec.output, spec.name
        self.session = spec.session(threads)
        self.input_name = self.session.get_inputs()[0].name
        self._fixed_batch = fixed_batch_of(self.session)

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
        from ..runtime import run_failure, run_session, softmax

        try:
            raw = run_session(self.session, self.input_name, batch, self._fixed_batch)
        except Exception as exc:  # onnxruntime's own exception types
            raise run_failure(self.blob.where, exc) from None
        raw = raw.reshape(raw.shape[0], -1)
        return raw.astype(np.float32) if self.output == "probabilities" else softmax(raw)


def top5(probs: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """[(class, probability)] best first; ties broken by class index (stable)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in order]
