"""Find the photos under the folders (or files) a user names, in a deterministic order."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .db import KlausIndexError

PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp"})
HEIF_SUFFIXES = frozenset({".heic", ".heif"})


def heif_available() -> bool:
    """Register pillow-heif's opener if it is installed (HEIC photos from phones)."""
    try:
        from pillow_heif import register_heif_opener  # type: ignore[import-not-found]
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


@dataclass
class Walk:
    """What a walk found: photos, plus folders it could not list (nothing under them is 'gone')."""

    roots: list[str]
    entries: list[Entry] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def absolute(path: str | os.PathLike[str]) -> str:
    """Absolute and normalized, symlinks kept: the path the user sees."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def walk(paths: list[str], *, exclude: list[str] | None = None, suffixes: frozenset[str] | None = None) -> Walk:
    """Every photo file (by suffix) under ``paths``, sorted by path, hidden files and folders skipped.

    Folder symlinks are not followed (no loops); file symlinks are. A named path that does
    not exist is an error before anything is changed.
    """
    suffixes = suffixes or photo_suffixes()
    excluded = {absolute(e) for e in exclude or ()}
    roots = []
    for p in paths:
        root = absolute(p)
        if not os.path.exists(root):
            raise KlausIndexError(f"{p}: no such file or folder")
        roots.append(root)
    result = Walk(roots=_outermost(roots))
    seen: set[str] = set()
    for root in result.roots:
        if os.path.isfile(root):
            _add(result, seen, root)
            continue

        def on_error(exc: OSError) -> None:
            result.unreadable.append(absolute(exc.filename or root))

        for folder, dirs, files in os.walk(root, onerror=on_error):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(folder, d) not in excluded)
            for name in files:
                if name.startswith(".") or Path(name).suffix.lower() not in suffixes:
                    continue
                _add(result, seen, os.path.join(folder, name))
    result.entries.sort(key=lambda e: e.path)
    return result


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
