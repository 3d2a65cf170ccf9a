"""Accuracy on labelled photos: top-1, top-5, and top-1 agreement with a reference model.

DATA may be a folder of ``<wnid>/`` subfolders, a folder of ``<wnid>_*.ext``
files, or a list file of ``path label`` lines (label = class index or wnid,
whitespace or comma separated, paths relative to the list file).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import KlausDataError, KlausError
from .format import LabelRow
from .images import IMAGE_SUFFIXES
from .labels import WNID_PREFIX
from .runtime import Classifier, kl_divergence


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclass(frozen=True)
class Accuracy:
    n: int
    top1: float
    top5: float
    agreement: float | None = None
    failed: int = 0
    # Against a reference model on the same photos (None without one): its top-1, the
    # standard error of the paired top-1 difference (is a gap more than noise?), and the
    # mean KL(reference || model), steadier than top-1 on a few hundred photos.
    reference_top1: float | None = None
    top1_diff_se: float | None = None
    kl: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "top1": self.top1,
            "top5": self.top5,
            "agreement": self.agreement,
            "failed": self.failed,
            "reference_top1": self.reference_top1,
            "top1_diff_se": self.top1_diff_se,
            "kl": self.kl,
        }


@dataclass(frozen=True)
class PairedPredictions:
    """A model and a reference run on the same photos; rows either could not read are not ``ok`` (top-5 rows -1)."""

    top5: np.ndarray
    reference_top5: np.ndarray
    ok: np.ndarray
    kl: np.ndarray  # KL(reference || model) per photo, 0 where not ok


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def load_dataset(data: str | os.PathLike[str], labels: Sequence[LabelRow], limit: int | None = None) -> list[Sample]:
    """Samples in a deterministic (sorted) order; see the module docstring for layouts."""
    root = Path(data)
    by_wnid = {row.wnid: row.index for row in labels if row.wnid}
    if root.is_file():
        samples = _from_list(root, by_wnid, len(labels))
    elif root.is_dir():
        samples = _from_folder(root, by_wnid)
    else:
        raise KlausDataError(f"{data}: no such file or folder")
    if not samples:
        raise KlausDataError(
            f"{data}: no labelled images found (expected <wnid>/ folders, <wnid>_*.jpg files or a list file)"
        )
    return samples[:limit] if limit else samples


def _from_folder(root: Path, by_wnid: dict[str, int]) -> list[Sample]:
    samples = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and entry.name in by_wnid:
            samples += [Sample(str(p), by_wnid[entry.name]) for p in sorted(entry.rglob("*")) if _is_image(p)]
        elif _is_image(entry):
            m = WNID_PREFIX.match(entry.name)
            if m and m.group(1) in by_wnid:
                samples.append(Sample(str(entry), by_wnid[m.group(1)]))
    return samples


def _from_list(path: Path, by_wnid: dict[str, int], classes: int) -> list[Sample]:
    samples = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: as Windows editors write it
    except (OSError, UnicodeDecodeError) as exc:
        raise KlausDataError(f"{path}: cannot read list file ({exc})") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = _fields(line)
        if len(parts) != 2:
            raise KlausDataError(f"{path}:{number}: expected 'path label', got {line!r}")
        image, label = parts
        samples.append(Sample(str(path.parent / image), _parse_label(label, by_wnid, classes, f"{path}:{number}")))
    return samples


def _fields(line: str) -> list[str]:
    """``path label``: split at a tab if there is one (so a path may hold spaces and
    commas), else at spaces or commas."""
    if "\t" in line:
        image, _, label = line.rpartition("\t")
        return [p for p in (image.strip(), label.strip()) if p]
    return [p for p in re.split(r"[,\s]+", line) if p]


def _parse_label(text: str, by_wnid: dict[str, int], classes: int, where: str) -> int:
    if text.isascii() and text.isdecimal() and int(text) < classes:
        return int(text)
    if text in by_wnid:
        return by_wnid[text]
    raise KlausDataError(f"{where}: label {text!r} is neither a class index below {classes} nor a known wnid")


def split_classes(samples: Iterable[Sample], parity: str) -> list[Sample]:
    """The project's fixed split: even class indices calibrate, odd ones evaluate."""
    want = {"even": 0, "odd": 1}[parity]
    return [s for s in samples if s.label % 2 == want]


ProbabilityFn = Callable[[Sequence[str]], np.ndarray]


def predict_all(
    probabilities: ProbabilityFn,
    samples: Sequence[Sample],
    batch: int = 16,
    on_batch: Callable[[int], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-5 class indices for every sample that could be read; returns (top5, ok-mask)."""
    top5 = np.full((len(samples), 5), -1, dtype=np.int64)
    ok = np.zeros(len(samples), dtype=bool)
    for i, p in _readable_rows(probabilities, samples, batch, on_batch, on_error):
        top5[i] = _top5(p)
        ok[i] = True
    return top5, ok


def predict_paired(
    probabilities: ProbabilityFn,
    reference: ProbabilityFn,
    samples: Sequence[Sample],
    batch: int = 16,
    on_batch: Callable[[int], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> PairedPredictions:
    """Both models batch by batch, so the KL needs no stored probability matrix."""

    def both(paths: Sequence[str]) -> np.ndarray:
        return np.stack([probabilities(paths), reference(paths)], axis=1)

    top5 = np.full((len(samples), 5), -1, dtype=np.int64)
    reference_top5 = top5.copy()
    ok = np.zeros(len(samples), dtype=bool)
    kl = np.zeros(len(samples))
    for i, (p, r) in _readable_rows(both, samples, batch, on_batch, on_error):
        top5[i], reference_top5[i], ok[i] = _top5(p), _top5(r), True
        kl[i] = kl_divergence(r, p)
    return PairedPredictions(top5, reference_top5, ok, kl)


def _top5(p: np.ndarray) -> np.ndarray:
    return np.argsort(-p, kind="stable")[:5]


def _readable_rows(probabilities: ProbabilityFn, samples: Sequence[Sample], batch: int, on_batch, on_error):
    """(sample index, probabilities) for every sample that could be read, in order."""
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        probs: Iterable[np.ndarray]
        rows: Iterable[int]
        try:
            probs = probabilities([s.path for s in chunk])
            rows = range(len(chunk))
        except KlausError:
            probs, rows = _one_by_one(probabilities, chunk, on_error)
        for row, p in zip(rows, probs, strict=True):
            yield start + row, p
        if on_batch:
            on_batch(len(chunk))


def _one_by_one(probabilities: ProbabilityFn, chunk: Sequence[Sample], on_error) -> tuple[list[np.ndarray], list[int]]:
    probs, rows = [], []
    for i, s in enumerate(chunk):
        try:
            probs.append(probabilities([s.path])[0])
            rows.append(i)
        except KlausError as exc:
            if on_error:
                on_error(s.path, str(exc))
    return probs, rows


def score(
    samples: Sequence[Sample], top5: np.ndarray, ok: np.ndarray, reference_top1: np.ndarray | None = None
) -> Accuracy:
    labels = np.array([s.label for s in samples])
    n = int(ok.sum())
    if n == 0:
        return Accuracy(0, 0.0, 0.0, None, len(samples))
    top1 = float((top5[ok, 0] == labels[ok]).mean())
    top5_acc = float((top5[ok] == labels[ok, None]).any(axis=1).mean())
    agreement = None
    if reference_top1 is not None:
        both = ok & (reference_top1 >= 0)
        agreement = float((top5[both, 0] == reference_top1[both]).mean()) if both.any() else None
    return Accuracy(n, top1, top5_acc, agreement, len(samples) - n)


def score_paired(samples: Sequence[Sample], paired: PairedPredictions) -> Accuracy:
    """:func:`score` on the photos both models read, plus the paired comparison with the reference."""
    acc = score(samples, paired.top5, paired.ok, paired.reference_top5[:, 0])
    if acc.n == 0:
        return acc
    labels = np.array([s.label for s in samples])[paired.ok]
    hit = (paired.top5[paired.ok, 0] == labels).astype(float)
    reference_hit = (paired.reference_top5[paired.ok, 0] == labels).astype(float)
    diff = hit - reference_hit
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None
    return replace(
        acc, reference_top1=float(reference_hit.mean()), top1_diff_se=se, kl=float(paired.kl[paired.ok].mean())
    )


# ---------------------------------------------------------------- a classifier on a data set, as `klaus eval` runs it


def select_samples(data: str, labels: Sequence[LabelRow], split: str = "all", limit: int | None = None) -> list[Sample]:
    """DATA's labelled photos (:func:`load_dataset`), only odd or even classes for a ``split``, the first ``limit``."""
    samples = load_dataset(data, labels)
    if split != "all":
        samples = split_classes(samples, split)
        if not samples:
            raise KlausDataError(f"{data}: no images in split {split}")
    return samples[:limit] if limit else samples


def evaluate(
    classifier: Classifier,
    samples: Sequence[Sample],
    crops: int = 1,
    *,
    reference: Classifier | None = None,
    reference_where: str = "",
    where: str = "",
    on_batch: Callable[[int], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> Accuracy:
    """``classifier``'s accuracy on ``samples`` (``crops`` per photo averaged), and with a ``reference``
    the paired comparison on the same photos (:func:`score_paired`).

    A photo either model cannot read, or gives NaN or infinite scores for, counts as failed and goes
    to ``on_error``. A reference whose labels differ is refused: top-1 agreement would mean nothing
    (the error names ``reference_where`` and ``where``).
    """
    if reference is None:
        return score(
            samples,
            *predict_all(
                lambda paths: classifier.finite_probabilities(paths, crops),
                samples,
                on_batch=on_batch,
                on_error=on_error,
            ),
        )
    if [r.name for r in reference.labels] != [r.name for r in classifier.labels]:
        raise KlausDataError(f"{reference_where}: its labels differ from {where}'s, so top-1 agreement means nothing")
    paired = predict_paired(
        lambda paths: classifier.finite_probabilities(paths, crops),
        lambda paths: reference.finite_probabilities(paths, crops),
        samples,
        on_batch=on_batch,
        on_error=on_error,
    )
    return score_paired(samples, paired)
