"""Write webapp/src/concepts.json: the WordNet data the on-device app's search box needs.

The browser resolves a query ("dog", "vehicle", a wnid) to class indices with the same rules
as ``klaus search`` (klaus.labels.find_concepts + klaus.index.search.resolve): every synonym
of every synset above an ImageNet class, and every class name, through *all* hypernym
parents. It needs the hypernym graph and the words, not the display paths (the model
container carries those), so this asset is a compact copy of
``src/klaus/data/imagenet_wordnet.json``: synsets sorted by wnid as ``[wnid, words,
parent positions]`` and the ImageNet classes as ``[synset position, name]``.

Deterministic (same table, same bytes). Run ``python webapp/make_concepts.py`` after
``scripts/make_labels.py`` changes the table; ``node build.mjs`` copies the result into the
package, and tests/test_ondevice_app.py checks both copies are current.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import resources
from pathlib import Path

CONCEPTS_VERSION = 1
OUT = Path(__file__).resolve().parent / "src" / "concepts.json"


def concepts_document(table_bytes: bytes) -> dict[str, object]:
    """The asset's JSON document for one label table (its bytes, as shipped in the package)."""
    from klaus.labels import parse_table

    table = parse_table(table_bytes)
    wnids = sorted(table.synsets)
    position = {wnid: i for i, wnid in enumerate(wnids)}
    synsets = [
        [wnid, list(table.synsets[wnid].words), sorted(position[p] for p in table.synsets[wnid].parents)]
        for wnid in wnids
    ]
    classes = [[position[label.wnid], label.name] for label in table.labels]
    return {
        "version": CONCEPTS_VERSION,
        "source": "klaus/data/imagenet_wordnet.json",
        "source_sha256": hashlib.sha256(table_bytes).hexdigest(),
        "synsets": synsets,
        "classes": classes,
    }


def concepts_bytes() -> bytes:
    """The asset as written: compact UTF-8 JSON with a final newline."""
    table_bytes = (resources.files("klaus") / "data" / "imagenet_wordnet.json").read_bytes()
    text = json.dumps(concepts_document(table_bytes), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


def main() -> int:
    data = concepts_bytes()
    OUT.write_bytes(data)
    print(f"{OUT}: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
