"""Find the photos under the folders (or files) a user names, in a deterministic order."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..names import shown, storable
from .db import KlausIndexError

PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp"})
HEIF_SUFFIXES = frozenset({".heic", ".heif"})


def heif_available() -> bool:
    """Register pillow-heif's opener if it is installed (HEIC photos from phones)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def photo_suffixes() -> frozenset[str]:
    return PHOTO_SUFFIXES | HEIF_SUFFIXES if heif_available() else PHOTO_SUFFIXES


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    """A path the walk could not take in, and why (one line)."""

    path: str  # as the file system gave it (may hold undecodable bytes as surrogates)
    error: str


#: Why a file or folder whose name is not valid UTF-8 is left out.
UNSTORABLE = "its name is not valid UTF-8, so the index cannot store it; rename it to index it"


@dataclass
class Walk:
    """What a walk found: photos, folders it could not list (nothing under them is 'gone'),
    and files and folders left out because their names cannot be stored."""

    roots: list[str]
    entries: list[Entry] = field(default_factory=list)
    unreadable: list[Skipped] = field(default_factory=list)
    unstorable: list[Skipped] = field(default_factory=list)


def absolute(path: str | os.PathLike[str]) -> str:
    """Absolute and normalized, symlinks kept: the path the user sees."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def check_roots(paths: list[str]) -> list[str]:
    """The named paths made absolute; a one-line KlausIndexError for one that cannot be indexed."""
    roots = []
    for p in paths:
        if not os.fspath(p):
            raise KlausIndexError("PATH is empty (''); name a folder or a file ('.' for the current folder)")
        root = absolute(p)
        if not os.path.exists(root):
            raise KlausIndexError(f"{shown(p)}: no such file or folder")
        if not storable(root):
            raise KlausIndexError(f"{shown(root)}: {UNSTORABLE}")
        roots.append(root)
    return roots


def walk(paths: list[str], *, exclude: list[str] | None = None, suffixes: frozenset[str] | None = None) -> Walk:
    """Every photo file (by suffix) under ``paths``, sorted by path, hidden files and folders skipped.

    Folder symlinks are not followed (no loops); file symlinks are. A named path that does
    not exist (or is empty, or whose name is not valid UTF-8) is an error before anything
    is changed. Files and folders below it whose names are not valid UTF-8 are left out
    and listed in ``unstorable``; folders that cannot be listed are in ``unreadable``.
    """
    suffixes = suffixes or photo_suffixes()
    excluded = {absolute(e) for e in exclude or ()}
    result = Walk(roots=_outermost(check_roots(paths)))
    seen: set[str] = set()
    for root in result.roots:
        if not os.path.isdir(root):  # a file, or anything else named on purpose: its read says what it is
            _add(result, seen, root)
            continue
        _walk_folder(result, seen, root, excluded, suffixes)
    result.entries.sort(key=lambda e: e.path)
    return result


def _walk_folder(result: Walk, seen: set[str], root: str, excluded: set[str], suffixes: frozenset[str]) -> None:
    def on_error(exc: OSError) -> None:
        folder = absolute(exc.filename or root)
        result.unreadable.append(Skipped(folder, f"folder cannot be read ({exc.strerror or exc})"))

    for folder, dirs, files in os.walk(root, onerror=on_error):
        kept = []
        for d in sorted(dirs):
            path = os.path.join(folder, d)
            if d.startswith(".") or path in excluded:
                continue
            if storable(d):
                kept.append(d)
            else:
                result.unstorable.append(Skipped(path, UNSTORABLE))
        dirs[:] = kept
        for name in sorted(files):
            if name.startswith(".") or Path(name).suffix.lower() not in suffixes:
                continue
            if storable(name):
                _add(result, seen, os.path.join(folder, name))
            else:
                result.unstorable.append(Skipped(os.path.join(folder, name), UNSTORABLE))


def _add(result: Walk, seen: set[str], path: str) -> None:
    if path in seen:
        return
    seen.add(path)
    try:
        st = os.stat(path)
    except OSError:
        try:  # a dangling symlink: record it, its read will fail with a clear error
            st = os.lstat(path)
        except OSError:
            return
    result.entries.append(Entry(path, st.st_size, st.st_mtime_ns))


def _outermost(roots: list[str]) -> list[str]:
    """Drop roots inside other roots, so nothing is walked twice."""
    out: list[str] = []
    for root in sorted(set(roots)):
        if not any(root == o or root.startswith(o.rstrip(os.sep) + os.sep) for o in out):
            out.append(root)
    return out
