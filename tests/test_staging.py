"""Where ONNX Runtime reads a `.klaus` model's decoded weights from: the weights cache, a private
temporary directory, or memory (:mod:`klaus.staging`)."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLES, TINY_CLASSES, TINY_PREPROCESS, tiny_klaus
from klaus import compression, onnxwire, runtime, staging
from klaus.errors import KlausFormatError
from klaus.labels import plain_label_rows
from klaus.runtime import Classifier


def _tiny_batch() -> np.ndarray:
    side = TINY_PREPROCESS.input_size
    return np.random.default_rng(0).standard_normal((2, 3, side, side)).astype(np.float32)


def _external_data(model_fields: bytes) -> dict[str, tuple[str, int, int]]:
    """name -> (location, offset, length) of each initializer in serialized ModelProto fields."""
    out = {}
    for _, _, graph in onnxwire.fields(model_fields):
        assert isinstance(graph, memoryview)
        for n, _, tensor in onnxwire.fields(graph):
            assert n == onnxwire.GRAPH_INITIALIZER and isinstance(tensor, memoryview)
            name, entries = "", {}
            for tn, _, value in onnxwire.fields(tensor):
                if tn == onnxwire.TENSOR_NAME:
                    name = bytes(value).decode()
                elif tn == onnxwire.TENSOR_EXTERNAL_DATA:
                    assert isinstance(value, memoryview)
                    key, val = (bytes(v).decode() for _, _, v in onnxwire.fields(value))
                    entries[key] = val
            out[name] = (entries["location"], int(entries["offset"]), int(entries["length"]))
    return out


def _assert_weights_file(graph: bytes, model, weights: bytes, location: str) -> None:
    """Every tensor of ``model`` lies in ``weights`` exactly as decoded, at a page boundary."""
    assert graph.startswith(model.graph)
    placements = _external_data(graph[len(model.graph) :])
    assert sorted(placements) == sorted(t.name for t in model.tensors)
    for t in model.tensors:
        at, offset, length = placements[t.name]
        expected = np.ascontiguousarray(t.decode(), dtype="<f4").reshape(t.dims)
        assert (at, offset % staging.PAGE_BYTES, length) == (location, 0, expected.nbytes)
        stored = np.frombuffer(weights, "<f4", count=expected.size, offset=offset).reshape(t.dims)
        np.testing.assert_array_equal(stored, expected)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv(staging.CACHE_ENV, str(directory))
    return directory


@pytest.fixture
def no_cache(monkeypatch) -> None:
    monkeypatch.setenv(staging.NO_CACHE_ENV, "1")


# ---------------------------------------------------------------- the weights cache


def test_the_first_start_decodes_into_the_cache_and_later_starts_read_it_as_it_is(cache):
    model = tiny_klaus()
    first = staging.stage(model)
    assert first is not None and not first.cached and not first.private and first.small == {}
    (name,) = [p.name for p in cache.iterdir()]
    assert re.fullmatch(r"[0-9a-f]{64}\.f32", name)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE((cache / name).stat().st_mode) == 0o600
    _assert_weights_file(first.graph, model, (cache / name).read_bytes(), name)
    inode = (cache / name).stat().st_ino
    again = staging.stage(model)
    assert again is not None and again.cached and again.graph == first.graph
    assert (cache / name).stat().st_ino == inode  # read, not written again
    again.close()
    assert [p.name for p in cache.iterdir()] == [name]  # closing keeps the cache file


def test_cached_uncached_and_in_memory_weights_give_the_same_outputs(cache, monkeypatch):
    model = tiny_klaus()
    x = _tiny_batch()
    name = "input"
    writing = runtime.klaus_session(model).run(None, {name: x})[0]
    reading = runtime.klaus_session(model).run(None, {name: x})[0]
    from_memory = runtime._session_from_memory(model, None, True).run(None, {name: x})[0]
    monkeypatch.setenv(staging.NO_CACHE_ENV, "1")
    private = runtime.klaus_session(model).run(None, {name: x})[0]
    for outputs in (reading, from_memory, private):
        np.testing.assert_array_equal(outputs, writing)


def test_the_cache_key_follows_the_stored_tensors():
    model = tiny_klaus()
    key = staging.placement(model.tensors, 0).key
    assert staging.placement(tiny_klaus().tensors, 0).key == key  # the same model, built again
    assert staging.placement(model.tensors, staging.STAGED_MIN_BYTES).key != key  # another layout
    bad = next(t for t in model.tensors if t.palette is not None)
    changed = dataclasses.replace(bad, palette=bad.palette[::-1], sha256="")
    tensors = tuple(changed if t is bad else t for t in model.tensors)
    assert staging.placement(tensors, 0).key != key


def test_a_cache_file_of_the_wrong_size_is_written_again(cache):
    model = tiny_klaus()
    staging.stage(model)
    (path,) = cache.iterdir()
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # as if cut short
    staged = staging.stage(model)
    assert staged is not None and not staged.cached
    assert path.read_bytes() == whole


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777])
def test_a_shared_cache_directory_falls_back_to_private_staging(cache, tmp_path, monkeypatch, mode):
    """A directory writable by the group or by others could hand Klaus weights it did not decode."""
    cache.mkdir(mode=0o700)
    cache.chmod(mode)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    staged = staging.stage(tiny_klaus())
    assert staged is not None and staged.private and Path(staged.folder).parent == tmp_path / "tmp"
    assert list(cache.iterdir()) == []
    staged.close()


def test_with_no_cache_or_an_unusable_one_the_weights_are_staged_privately(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "a-file").write_bytes(b"")
    for env in (
        {staging.NO_CACHE_ENV: "1", staging.CACHE_ENV: str(tmp_path / "c")},
        {staging.CACHE_ENV: str(tmp_path / "a-file")},
    ):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        staged = staging.stage(tiny_klaus())
        assert staged is not None and staged.private
        staged.close()
        monkeypatch.delenv(staging.NO_CACHE_ENV, raising=False)
    assert not (tmp_path / "c").exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_the_cache_lies_in_the_xdg_cache_home_or_the_home_directory_and_nowhere_else(tmp_path, monkeypatch):
    monkeypatch.delenv(staging.CACHE_ENV, raising=False)
    monkeypatch.delenv(staging.NO_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert staging.cache_directory() == str(tmp_path / "xdg" / "klaus")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG specification says to ignore it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert staging.cache_directory() == str(tmp_path / "home" / ".cache" / "klaus")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # no home directory to be found
    assert staging.cache_directory() is None
    assert not (tmp_path / "relative").exists() and not (tmp_path / "~").exists()


def test_the_cache_keeps_the_most_recently_used_files_within_its_limit(cache, monkeypatch):
    model = tiny_klaus()
    staging.stage(model)
    (kept,) = cache.iterdir()
    size = kept.stat().st_size
    old = time.time() - 3600
    olds = []
    for i in range(3):
        path = cache / f"{i:064x}{staging.CACHE_SUFFIX}"
        path.write_bytes(b"\0" * size)
        os.utime(path, (old + i, old + i))
        olds.append(path)
    recent = cache / f"{9:064x}{staging.CACHE_SUFFIX}"
    recent.write_bytes(b"\0" * size)  # used a moment ago: a session may be opening it
    killed = cache / f"{kept.name}.123-abcd{staging.PART_SUFFIX}"
    killed.write_bytes(b"\0")
    os.utime(killed, (old, old))
    kept.unlink()
    monkeypatch.setattr(staging, "CACHE_LIMIT_BYTES", 3 * size)
    staging.stage(model)  # writes `kept` again, then trims
    assert sorted(cache.iterdir()) == sorted([olds[2], recent, kept])


def test_classify_gives_the_same_bytes_from_the_cache_and_reads_it_without_writing(tmp_path):
    env = {**os.environ, staging.CACHE_ENV: str(tmp_path / "cache")}
    env.pop(staging.NO_CACHE_ENV, None)
    cmd = [sys.executable, "-m", "klaus.cli", "classify", "--json", str(EXAMPLES / "cat.jpg")]

    def run() -> str:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        return re.sub(r'"elapsed_ms": [0-9.]+', "", out)

    first = run()
    (path,) = (tmp_path / "cache").iterdir()
    inode = path.stat().st_ino
    assert run() == first
    assert path.stat().st_ino == inode
    env[staging.NO_CACHE_ENV] = "1"
    assert run() == first


# ---------------------------------------------------------------- private staging


def test_staged_weights_are_the_decoded_tensors_page_aligned_in_a_private_directory(tmp_path, monkeypatch, no_cache):
    """Without a cache, ONNX Runtime reads the weights from a file in a directory only the user can
    read, deleted on close."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(staging, "STAGED_MIN_BYTES", 0)  # every tensor of the tiny model goes to the file
    model = tiny_klaus()
    staged = staging.stage(model)
    assert staged is not None and staged.private and staged.small == {}
    folder = Path(staged.folder)
    assert folder.parent == tmp_path
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    _assert_weights_file(staged.graph, model, (folder / staging.STAGED_WEIGHTS).read_bytes(), staging.STAGED_WEIGHTS)
    staged.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("min_bytes", [0, staging.STAGED_MIN_BYTES, 1 << 40])
def test_a_klaus_session_leaves_no_temporary_files_and_matches_the_in_memory_one(
    tmp_path, monkeypatch, min_bytes, no_cache
):
    """The same outputs whether the weights reach ONNX Runtime from the staged file, from memory, or both."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(staging, "STAGED_MIN_BYTES", min_bytes)
    model = tiny_klaus()
    staged = runtime.klaus_session(model)
    from_memory = runtime._session_from_memory(model, None, True)
    assert list(tmp_path.iterdir()) == []
    x = _tiny_batch()
    name = staged.get_inputs()[0].name
    np.testing.assert_array_equal(staged.run(None, {name: x})[0], from_memory.run(None, {name: x})[0])
    classifier = Classifier(model)
    assert list(tmp_path.iterdir()) == []
    np.testing.assert_array_equal(classifier.session.run(None, {name: x})[0], staged.run(None, {name: x})[0])


def test_without_a_writable_directory_the_weights_go_from_memory(tmp_path, monkeypatch, no_cache):
    model = tiny_klaus()
    x = _tiny_batch()
    expected = runtime.klaus_session(model).run(None, {"input": x})[0]

    def no_directory(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(tempfile, "mkdtemp", no_directory)
    assert staging.stage(model) is None
    np.testing.assert_array_equal(runtime.klaus_session(model).run(None, {"input": x})[0], expected)
    monkeypatch.undo()
    monkeypatch.setenv(staging.CACHE_ENV, str(tmp_path / "cache"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(staging, "_write_weights", disk_full)
    assert staging.stage(model) is None  # neither the cache nor the temporary directory takes the weights
    assert list((tmp_path / "tmp").iterdir()) == [] and list((tmp_path / "cache").iterdir()) == []
    np.testing.assert_array_equal(Classifier(model).session.run(None, {"input": x})[0], expected)


@pytest.mark.parametrize("cached", [True, False])
def test_a_tensor_that_fails_to_decode_names_the_file_and_leaves_no_files(tmp_path, monkeypatch, cached):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv(staging.CACHE_ENV, str(tmp_path / "cache"))
    if not cached:
        monkeypatch.setenv(staging.NO_CACHE_ENV, "1")
    model = tiny_klaus()
    bad = next(t for t in model.tensors if t.palette is not None)
    broken = dataclasses.replace(bad, palette=bad.palette[:2], sha256="")  # a one-entry palette: indices point past it
    tensors = tuple(broken if t is bad else t for t in model.tensors)
    model = dataclasses.replace(model, tensors=tensors, source_path="broken.klaus")
    with pytest.raises(KlausFormatError, match=rf"^broken.klaus: tensor {re.escape(repr(bad.name))}: "):
        runtime.klaus_session(model)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_no_part_of_a_temporary_weights_file_outlives_the_session_build(tmp_path, monkeypatch, no_cache):
    """ONNX Runtime maps the weights it uses as stored; none may stay mapped from the deleted file,
    which would keep all of it (on a tmpfs, in memory) for as long as the session."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sessions = [runtime.klaus_session(tiny_klaus()), Classifier().session]
    assert all(sessions)
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(tmp_path) in line]
    assert mapped == []


@pytest.mark.skipif(os.name != "posix", reason="process ids are probed on POSIX only")
def test_staging_left_by_a_killed_process_is_removed_by_the_next_session_build(tmp_path, monkeypatch, no_cache):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    old = time.time() - staging.STALE_STAGING_SECONDS - 60

    def leftover(pid: int, age: float) -> Path:
        directory = tmp_path / f"{staging.STAGING_PREFIX}{pid}-x{len(list(tmp_path.iterdir()))}"
        directory.mkdir()
        (directory / staging.STAGED_WEIGHTS).write_bytes(b"\0" * 16)
        os.utime(directory, (age, age))
        return directory

    stale = leftover(dead_pid, old)
    recent = leftover(dead_pid, time.time())  # its process may still be about to use it
    alive = leftover(os.getppid(), old)  # a live process's staging is never touched
    other = tmp_path / "klaus-weights-notes"
    other.mkdir()
    runtime.klaus_session(tiny_klaus())
    assert not stale.exists()
    assert sorted(tmp_path.iterdir()) == sorted([recent, alive, other])


# ---------------------------------------------------------------- the session built beside the reader


def test_a_classifier_reads_its_weights_from_the_cache_once_they_are_there(cache, tmp_path):
    path = tmp_path / "tiny.klaus"
    compression.write(tiny_klaus(), path)
    first = Classifier(str(path)).probabilities([EXAMPLES / "cat.jpg"])
    (weights,) = cache.iterdir()
    inode = weights.stat().st_ino
    again = Classifier(str(path), background=True)
    np.testing.assert_array_equal(again.probabilities([EXAMPLES / "cat.jpg"]), first)
    assert weights.stat().st_ino == inode


@pytest.mark.parametrize("cached", [True, False])
def test_a_file_refused_after_its_weights_were_handed_over_leaves_nothing_behind(tmp_path, monkeypatch, cached):
    """The reader hands the graph and tensors over before it checks the labels; a file whose labels it then
    refuses is refused as before, and the session begun for it leaves no temporary file."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv(staging.CACHE_ENV, str(tmp_path / "cache"))
    model = tiny_klaus()
    if cached:
        staging.stage(model)  # the weights cache holds these weights: the session starts at the handover
    else:
        monkeypatch.setenv(staging.NO_CACHE_ENV, "1")
    path = tmp_path / "same.klaus"
    compression.write(dataclasses.replace(model, labels=plain_label_rows(["same"] * TINY_CLASSES)), path)
    with pytest.raises(KlausFormatError, match=r"label name 'same' is used twice"):
        Classifier(str(path), background=True)
    assert list((tmp_path / "tmp").iterdir()) == []
