"""A photo library index: `klaus index`, `klaus search` and the data behind `klaus serve`.

* :mod:`.db` — the SQLite schema (WAL, versioned, migrations) and writes
* :mod:`.walker` — which files are photos
* :mod:`.pipeline` — read, hash and decode in a worker pool; batched inference
* :mod:`.engine` — the model, its identity and a tuned ONNX Runtime session
* :mod:`.indexer` — incremental planning and the per-batch transactions
* :mod:`.search` — concept search, the WordNet tree with counts, photo details
* :mod:`.dask` — the same work on a Dask cluster

The `klaus index/search/serve` commands are :mod:`klaus.cli.library`.

Imports are lazy so that `klaus --help` stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Database": ".db",
    "KlausIndexError": ".db",
    "default_db_path": ".db",
    "Summary": ".indexer",
    "index_paths": ".indexer",
    "search": ".search",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
