"""Tests for klaus.evaluate: data set layouts, list-file errors, splits, scoring, prediction loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from klaus import evaluate as ev
from klaus.errors import KlausDataError, KlausImageError
from klaus.evaluate import Accuracy, Sample
from klaus.labels import imagenet_label_rows, plain_label_rows

LABELS = imagenet_label_rows()
TENCH, GOLDFISH, SHARK = "n01440764", "n01443537", "n01484850"  # classes 0, 1, 2


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- layouts


def test_wnid_folders(tmp_path):
    _touch(tmp_path / GOLDFISH / "b.jpg")
    _touch(tmp_path / GOLDFISH / "a.JPEG")
    _touch(tmp_path / GOLDFISH / "deeper" / "c.png")
    _touch(tmp_path / GOLDFISH / "readme.txt")  # not an image: ignored
    _touch(tmp_path / TENCH / "z.jpg")
    _touch(tmp_path / "not-a-wnid" / "y.jpg")  # unknown folder: ignored
    samples = ev.load_dataset(tmp_path, LABELS)
    assert samples == [
        Sample(str(tmp_path / TENCH / "z.jpg"), 0),
        Sample(str(tmp_path / GOLDFISH / "a.JPEG"), 1),
        Sample(str(tmp_path / GOLDFISH / "b.jpg"), 1),
        Sample(str(tmp_path / GOLDFISH / "deeper" / "c.png"), 1),
    ]


def test_wnid_prefixed_files(tmp_path):
    _touch(tmp_path / f"{SHARK}_great_white.JPEG")
    _touch(tmp_path / f"{TENCH}_tench.jpg")
    _touch(tmp_path / f"{GOLDFISH}.png")  # '.' also ends the prefix
    _touch(tmp_path / f"{GOLDFISH}-2.webp")
    _touch(tmp_path / "n99999999_unknown.jpg")  # not an ImageNet wnid
    _touch(tmp_path / "holiday.jpg")  # no prefix
    _touch(tmp_path / f"{TENCH}_notes.txt")  # not an image
    samples = ev.load_dataset(tmp_path, LABELS)
    assert [(Path(s.path).name, s.label) for s in samples] == [
        (f"{TENCH}_tench.jpg", 0),
        (f"{GOLDFISH}-2.webp", 1),
        (f"{GOLDFISH}.png", 1),
        (f"{SHARK}_great_white.JPEG", 2),
    ]
    assert len(ev.load_dataset(tmp_path, LABELS, limit=2)) == 2


def test_list_file(tmp_path):
    listing = tmp_path / "lists" / "val.txt"
    listing.parent.mkdir()
    listing.write_text(
        "# a comment line\n"
        "\n"
        "img/a.jpg 0\n"
        "img/b.jpg,1\n"
        f"img/c.jpg\t{SHARK}\n"
        f"   img/d.jpg ,  {GOLDFISH}   \n"
        "../outside.jpg 999\n"
        "# trailing comment\n",
        encoding="utf-8",
    )
    samples = ev.load_dataset(listing, LABELS)
    base = tmp_path / "lists"
    assert samples == [
        Sample(str(base / "img/a.jpg"), 0),
        Sample(str(base / "img/b.jpg"), 1),
        Sample(str(base / "img/c.jpg"), 2),
        Sample(str(base / "img/d.jpg"), 1),
        Sample(str(base / "../outside.jpg"), 999),
    ]
    assert ev.load_dataset(listing, LABELS, limit=3) == samples[:3]


def test_list_file_with_plain_labels(tmp_path):
    listing = tmp_path / "l.csv"
    listing.write_text("x.jpg,2\ny.jpg,9\n")
    labels = plain_label_rows([f"c{i}" for i in range(10)])
    assert [s.label for s in ev.load_dataset(listing, labels)] == [2, 9]
    listing.write_text("x.jpg,10\n")
    with pytest.raises(KlausDataError, match="below 10"):
        ev.load_dataset(listing, labels)


def test_list_file_tab_separated_paths_and_bom(tmp_path):
    labels = plain_label_rows([f"c{i}" for i in range(10)])
    listing = tmp_path / "list.txt"
    # A tab separates path and label, so a path may hold spaces and commas; a UTF-8 BOM
    # (as Notepad writes it) is not part of the first path.
    listing.write_bytes("\ufeffsp ace/a, b.jpg\t3\nplain.jpg 4\n".encode())
    samples = ev.load_dataset(listing, labels)
    assert [(Path(s.path).relative_to(tmp_path).as_posix(), s.label) for s in samples] == [
        ("sp ace/a, b.jpg", 3),
        ("plain.jpg", 4),
    ]


@pytest.mark.parametrize(
    "content,line,fragment",
    [
        ("a.jpg 0\nb.jpg\n", 2, "expected 'path label'"),
        ("a.jpg 0 extra\n", 1, "expected 'path label'"),
        ("# ok\na.jpg 1000\n", 2, "'1000'"),
        ("a.jpg n00000000\n", 1, "'n00000000'"),
        ("a.jpg -1\n", 1, "'-1'"),
        ("a.jpg tabby\n", 1, "'tabby'"),
    ],
)
def test_list_file_errors_name_the_line(tmp_path, content, line, fragment):
    listing = tmp_path / "bad.txt"
    listing.write_text(content)
    with pytest.raises(KlausDataError) as info:
        ev.load_dataset(listing, LABELS)
    message = str(info.value)
    assert message.startswith(f"{listing}:{line}:")
    assert fragment in message
    assert "\n" not in message


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(KlausDataError, match="no such file or folder") as info:
        ev.load_dataset(tmp_path / "nowhere", LABELS)
    assert str(tmp_path / "nowhere") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KlausDataError, match="no labelled images"):
        ev.load_dataset(tmp_path / "empty", LABELS)
    only_comments = tmp_path / "c.txt"
    only_comments.write_text("# nothing\n\n")
    with pytest.raises(KlausDataError, match="no labelled images"):
        ev.load_dataset(only_comments, LABELS)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(KlausDataError, match="cannot read list file"):
        ev.load_dataset(binary, LABELS)


def test_split_classes():
    samples = [Sample(f"{i}.jpg", label) for i, label in enumerate([0, 1, 2, 3, 999, 998])]
    assert [s.label for s in ev.split_classes(samples, "even")] == [0, 2, 998]
    assert [s.label for s in ev.split_classes(samples, "odd")] == [1, 3, 999]
    with pytest.raises(KeyError):
        ev.split_classes(samples, "all")


# ---------------------------------------------------------------- scoring


def test_score_top1_top5():
    samples = [Sample(str(i), label) for i, label in enumerate([3, 7, 1, 0])]
    top5 = np.array(
        [
            [3, 1, 2, 4, 5],  # top-1 hit
            [1, 2, 7, 4, 5],  # top-5 hit only
            [9, 8, 6, 5, 4],  # miss
            [0, 1, 2, 3, 4],  # top-1 hit
        ]
    )
    acc = ev.score(samples, top5, np.ones(4, bool))
    assert acc == Accuracy(n=4, top1=0.5, top5=0.75, agreement=None, failed=0)
    assert acc.to_dict() == {
        "n": 4,
        "top1": 0.5,
        "top5": 0.75,
        "agreement": None,
        "failed": 0,
        "reference_top1": None,
        "top1_diff_se": None,
        "kl": None,
    }


def test_score_failed_and_agreement():
    samples = [Sample(str(i), label) for i, label in enumerate([3, 7, 1, 0, 5])]
    top5 = np.array(
        [
            [3, 1, 2, 4, 5],
            [-1, -1, -1, -1, -1],  # unreadable
            [1, 8, 6, 5, 4],
            [2, 0, 1, 3, 4],
            [5, 0, 1, 3, 4],
        ]
    )
    ok = np.array([True, False, True, True, True])
    reference = np.array([3, 7, 9, 2, -1])  # the reference could not read the last one
    acc = ev.score(samples, top5, ok, reference)
    assert acc.n == 4 and acc.failed == 1
    assert acc.top1 == pytest.approx(3 / 4)  # samples 0, 2 and 4
    assert acc.top5 == pytest.approx(4 / 4)
    # Compared where both read the image: samples 0 (3 == 3), 2 (1 != 9), 3 (2 == 2).
    assert acc.agreement == pytest.approx(2 / 3)


def test_score_nothing_readable():
    samples = [Sample("a", 0), Sample("b", 1)]
    acc = ev.score(samples, np.full((2, 5), -1), np.zeros(2, bool), np.array([0, 1]))
    assert acc == Accuracy(0, 0.0, 0.0, None, 2)
    # Agreement undefined when the reference read none of the images the model read.
    acc2 = ev.score(samples, np.array([[0, 1, 2, 3, 4]] * 2), np.ones(2, bool), np.array([-1, -1]))
    assert acc2.agreement is None and acc2.top1 == 0.5


# ---------------------------------------------------------------- predict_all


def _fake_model(bad: set[str], calls: list[list[str]]):
    """Probabilities peaking at the class number in the file name; KlausImageError for `bad` names."""

    def probabilities(paths):
        calls.append(list(paths))
        rows = []
        for p in paths:
            if p in bad:
                raise KlausImageError(f"{p}: not an image (cannot identify image file)")
            probs = np.full(10, 0.01)
            probs[int(p.split(".")[0]) % 10] = 1.0
            probs[(int(p.split(".")[0]) + 1) % 10] = 0.5
            rows.append(probs)
        return np.stack(rows)

    return probabilities


def test_predict_all_continues_past_unreadable_images():
    samples = [Sample(f"{i}.jpg", i % 10) for i in range(7)]
    calls: list[list[str]] = []
    errors: list[tuple[str, str]] = []
    batches: list[int] = []
    top5, ok = ev.predict_all(
        _fake_model({"2.jpg", "5.jpg"}, calls),
        samples,
        batch=3,
        on_batch=batches.append,
        on_error=lambda path, msg: errors.append((path, msg)),
    )
    assert ok.tolist() == [True, True, False, True, True, False, True]
    assert errors == [
        ("2.jpg", "2.jpg: not an image (cannot identify image file)"),
        ("5.jpg", "5.jpg: not an image (cannot identify image file)"),
    ]
    assert batches == [3, 3, 1]
    assert np.all(top5[~ok] == -1)
    assert top5[ok, 0].tolist() == [0, 1, 3, 4, 6]
    assert top5[ok, 1].tolist() == [1, 2, 4, 5, 7]
    # Good batches go in one call; a batch with a bad image is retried one by one.
    assert calls[0] == ["0.jpg", "1.jpg", "2.jpg"]
    assert ["0.jpg"] in calls and ["2.jpg"] in calls
    acc = ev.score(samples, top5, ok)
    assert acc.n == 5 and acc.failed == 2 and acc.top1 == 1.0


def test_kl_divergence():
    p = np.array([0.5, 0.25, 0.25])
    assert ev.kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    q = np.array([0.25, 0.5, 0.25])
    assert ev.kl_divergence(p, q) == pytest.approx(0.5 * np.log(2) + 0.25 * np.log(0.5))
    assert np.isfinite(ev.kl_divergence(p, np.array([1.0, 0.0, 0.0])))  # a zero is floored, not infinite


def test_predict_paired_and_score_paired():
    """Both models on the same photos: a photo either cannot read is dropped for both;
    the paired difference, its standard error and the KL come from the remaining photos."""
    samples = [Sample(f"{i}.jpg", i % 10) for i in range(6)]
    model = _fake_model({"2.jpg"}, [])

    def reference(paths):  # right on 0..3; on 4 and 5 it ranks the model's second choice first
        probs = _fake_model({"5.jpg"}, [])(paths)
        for row, p in zip(probs, paths, strict=True):
            if int(p.split(".")[0]) == 4:
                row[[4, 5]] = row[[5, 4]]
        return probs

    batches: list[int] = []
    errors: list[str] = []
    paired = ev.predict_paired(
        model, reference, samples, batch=4, on_batch=batches.append, on_error=lambda path, msg: errors.append(path)
    )
    assert paired.ok.tolist() == [True, True, False, True, True, False]
    assert errors == ["2.jpg", "5.jpg"] and batches == [4, 2]
    assert paired.kl[[0, 1, 3]].tolist() == pytest.approx([0, 0, 0], abs=1e-12) and paired.kl[4] > 0
    acc = ev.score_paired(samples, paired)
    assert acc.n == 4 and acc.failed == 2
    assert acc.top1 == 1.0 and acc.reference_top1 == 0.75 and acc.agreement == 0.75
    diff = np.array([0, 0, 0, 1.0])
    assert acc.top1_diff_se == pytest.approx(diff.std(ddof=1) / 2)
    assert acc.kl == pytest.approx(paired.kl[4] / 4)


def test_predict_all_without_callbacks_and_non_klaus_errors():
    samples = [Sample("0.jpg", 0), Sample("1.jpg", 1)]
    _, ok = ev.predict_all(_fake_model({"1.jpg"}, []), samples)
    assert ok.tolist() == [True, False]

    def broken(paths):
        raise RuntimeError("a bug, not a bad image")

    with pytest.raises(RuntimeError):
        ev.predict_all(broken, samples)


def test_predict_all_with_real_classifier(tmp_path, tiny_klaus_path):
    """The real probability function and a real unreadable file."""
    from conftest import EXAMPLES
    from klaus.runtime import Classifier

    clf = Classifier(tiny_klaus_path)
    bad = _touch(tmp_path / "bad.jpg", b"not a jpeg at all")
    samples = [Sample(str(EXAMPLES / "cat.jpg"), 0), Sample(str(bad), 1), Sample(str(EXAMPLES / "coffee.jpg"), 2)]
    errors: list[str] = []
    top5, ok = ev.predict_all(lambda p: clf.probabilities(p), samples, on_error=lambda path, msg: errors.append(path))
    assert ok.tolist() == [True, False, True]
    assert errors == [str(bad)]
    assert np.all((top5[ok] >= 0) & (top5[ok] < 10))


@pytest.mark.parametrize(
    "label", ["\u00b2", "\u2463", "1\u00b2"]
)  # superscript two, circled four: str.isdigit() but not int()
def test_list_file_odd_digit_labels_are_data_errors(tmp_path, label):
    listing = tmp_path / "odd.txt"
    listing.write_text(f"a.jpg {label}\n", encoding="utf-8")
    with pytest.raises(KlausDataError, match=f"{listing}:1"):
        ev.load_dataset(listing, LABELS)
