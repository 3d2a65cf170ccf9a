#!/usr/bin/env python3
"""Generate ``src/klaus/data/imagenet_wordnet.json`` from the ImageNet class list and WordNet 3.0.

Usage::

    python scripts/make_labels.py [CLASSES_TSV] [--wordnet DATA_NOUN] [--output JSON] [--check]

Inputs
    CLASSES_TSV  ``index<TAB>wnid<TAB>words`` with a header row, 1000 rows, index equal to
                 the position in sorted-wnid order (default: ``../shared/data/imagenet-classes.tsv``
                 relative to the repository root).
    DATA_NOUN    WordNet 3.0 noun database, as shipped by Debian's ``wordnet-base``
                 (default: ``/usr/share/wordnet/data.noun``). Parsed here directly, no nltk.

A wnid is ``n`` + the 8-digit byte offset of the synset's line in ``data.noun``. The script
checks that every offset points at the start of a line, and that the TSV's words equal the
synset's words; any mismatch is reported and makes the script exit non-zero.

Rules (the runtime module ``klaus.labels`` relies on them):

* ``words``: the synset's words in ``data.noun`` order, underscores shown as spaces.
* ``name`` (unique display name): the first word of the synset. When that word equals,
  ignoring case, the first word of another class (ImageNet has "crane" the bird and the
  machine, two "maillot", "Cardigan" corgi and "cardigan" sweater), the first word of the
  class's primary hypernym is appended in parentheses: "crane (wading bird)",
  "crane (lifting device)". Should that still collide, the next ancestor on the path
  is tried, then the class's wnid.
* ``path``: one root-to-leaf list of wnids, following at every step the *first* hypernym
  pointer (``@`` or ``@i``) listed for the synset in ``data.noun``, WordNet's primary one.
* ``synsets``: every synset in the closure of *all* hypernyms of every class (the classes
  included), with its words and all of its ``@``/``@i`` parents in ``data.noun`` order.

The output is deterministic: sorted keys, compact separators, one class and one synset per
line (so diffs stay readable), a trailing newline.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TSV = REPO_ROOT / ".." / "shared" / "data" / "imagenet-classes.tsv"
DEFAULT_WORDNET = Path("/usr/share/wordnet/data.noun")
DEFAULT_OUTPUT = REPO_ROOT / "src" / "klaus" / "data" / "imagenet_wordnet.json"

VERSION = 1
SOURCE = "WordNet 3.0 (Debian wordnet-base) + ILSVRC2012 class list"
ROOT_WNID = "n00001740"  # entity
HYPERNYM_POINTERS = ("@", "@i")
WNID_RE = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class Synset:
    wnid: str
    words: tuple[str, ...]
    parents: tuple[str, ...]  # all @ / @i hypernyms, in data.noun order


@dataclass(frozen=True)
class ClassRow:
    index: int
    wnid: str
    words: tuple[str, ...]


def parse_data_noun(path: Path) -> dict[str, Synset]:
    """Read every synset; also prove that each offset is the line's byte offset (the wnid)."""
    synsets: dict[str, Synset] = {}
    offset = 0
    with path.open("rb") as f:
        for raw in f:
            line_offset, offset = offset, offset + len(raw)
            if raw.startswith(b"  "):  # license header
                continue
            synset = _parse_data_line(raw.decode("utf-8"))
            if int(synset.wnid[1:]) != line_offset:
                raise SystemExit(f"{path}: synset {synset.wnid} is at byte offset {line_offset}")
            synsets[synset.wnid] = synset
    return synsets


def _parse_data_line(line: str) -> Synset:
    fields = line.split(" | ", 1)[0].split()
    offset, _lex_filenum, ss_type, w_cnt = fields[:4]
    if ss_type != "n":
        raise SystemExit(f"data.noun line {offset}: unexpected synset type {ss_type!r}")
    n_words = int(w_cnt, 16)
    words = tuple(w.replace("_", " ") for w in fields[4 : 4 + 2 * n_words : 2])
    pos = 4 + 2 * n_words
    n_pointers = int(fields[pos])
    pointers = [fields[pos + 1 + 4 * i : pos + 5 + 4 * i] for i in range(n_pointers)]
    parents = tuple(
        f"n{target}" for symbol, target, pos_, _st in pointers if symbol in HYPERNYM_POINTERS and pos_ == "n"
    )
    return Synset(f"n{offset}", _unique(words), _unique(parents))


def _unique(items: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def read_classes(path: Path) -> list[ClassRow]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header != ["index", "wnid", "words"]:
            raise SystemExit(f"{path}: unexpected header {header}")
        rows = [ClassRow(int(i), w, tuple(s.strip() for s in words.split(","))) for i, w, words in reader]
    wnids = [r.wnid for r in rows]
    if [r.index for r in rows] != list(range(len(rows))) or wnids != sorted(wnids):
        raise SystemExit(f"{path}: indices are not 0..n-1 in sorted-wnid order")
    if len(set(wnids)) != len(wnids) or not all(WNID_RE.match(w) for w in wnids):
        raise SystemExit(f"{path}: wnids are not unique n######## identifiers")
    return rows


def check_words(rows: list[ClassRow], synsets: dict[str, Synset]) -> list[str]:
    """Differences between the TSV's words and WordNet's, one message each."""
    problems = []
    for row in rows:
        synset = synsets.get(row.wnid)
        if synset is None:
            problems.append(f"{row.index} {row.wnid}: not a synset in data.noun")
        elif synset.words != row.words:
            problems.append(f"{row.index} {row.wnid}: TSV {list(row.words)} != WordNet {list(synset.words)}")
    return problems


def primary_path(wnid: str, synsets: dict[str, Synset]) -> list[str]:
    """Root-to-leaf path following the first listed hypernym at every step."""
    path = [wnid]
    while synsets[path[-1]].parents:
        parent = synsets[path[-1]].parents[0]
        if parent in path:
            raise SystemExit(f"hypernym cycle through {parent}")
        path.append(parent)
    path.reverse()
    if path[0] != ROOT_WNID:
        raise SystemExit(f"{wnid}: primary path ends at {path[0]}, not entity")
    return path


def closure(wnids: list[str], synsets: dict[str, Synset]) -> set[str]:
    """Every synset reachable through any hypernym, the starting ones included."""
    seen: set[str] = set()
    stack = list(wnids)
    while stack:
        wnid = stack.pop()
        if wnid not in seen:
            seen.add(wnid)
            stack.extend(synsets[wnid].parents)
    return seen


def display_names(paths: dict[str, list[str]], synsets: dict[str, Synset]) -> dict[str, str]:
    """First word; on a case-insensitive clash, qualify it with the nearest ancestor that separates."""
    first = {wnid: synsets[wnid].words[0] for wnid in paths}
    counts: dict[str, int] = {}
    for word in first.values():
        counts[word.casefold()] = counts.get(word.casefold(), 0) + 1
    names = {w: word for w, word in first.items() if counts[word.casefold()] == 1}
    taken = {n.casefold() for n in names.values()}
    for wnid in sorted(w for w in first if w not in names):
        candidates = [f"{first[wnid]} ({synsets[a].words[0]})" for a in reversed(paths[wnid][:-1])]
        candidates.append(f"{first[wnid]} ({wnid})")
        name = next(c for c in candidates if c.casefold() not in taken)
        names[wnid] = name
        taken.add(name.casefold())
    return names


def build_table(rows: list[ClassRow], synsets: dict[str, Synset]) -> tuple[dict, int]:
    """The JSON document, and how many names needed disambiguation."""
    wnids = [r.wnid for r in rows]
    paths = {w: primary_path(w, synsets) for w in wnids}
    names = display_names(paths, synsets)
    classes = [
        {
            "index": r.index,
            "wnid": r.wnid,
            "name": names[r.wnid],
            "words": list(synsets[r.wnid].words),
            "path": paths[r.wnid],
        }
        for r in rows
    ]
    table = {
        "version": VERSION,
        "source": SOURCE,
        "classes": classes,
        "synsets": {
            w: {"words": list(synsets[w].words), "parents": list(synsets[w].parents)}
            for w in sorted(closure(wnids, synsets))
        },
    }
    collisions = sum(1 for w in wnids if names[w] != synsets[w].words[0])
    return table, collisions


def render(table: dict) -> str:
    """Compact, key-sorted JSON with one class / synset per line."""

    def dump(value: object) -> str:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    classes = ",\n".join(dump(c) for c in table["classes"])
    synsets = ",\n".join(f"{dump(k)}:{dump(v)}" for k, v in sorted(table["synsets"].items()))
    head = {k: v for k, v in table.items() if k not in ("classes", "synsets")}
    assert set(head) == {"source", "version"}, "keep the top-level keys sorted by hand below"
    text = (
        f'{{"classes":[\n{classes}\n],\n'
        f'"source":{dump(head["source"])},\n'
        f'"synsets":{{\n{synsets}\n}},\n'
        f'"version":{dump(head["version"])}}}\n'
    )
    assert json.loads(text) == table
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("classes", nargs="?", type=Path, default=DEFAULT_TSV)
    parser.add_argument("--wordnet", type=Path, default=DEFAULT_WORDNET, help="WordNet 3.0 data.noun")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true", help="fail if OUTPUT is not up to date")
    args = parser.parse_args(argv)

    synsets = parse_data_noun(args.wordnet)
    rows = read_classes(args.classes)
    problems = check_words(rows, synsets)
    for problem in problems:
        print(f"mismatch: {problem}", file=sys.stderr)
    if problems:
        return 1
    table, collisions = build_table(rows, synsets)
    text = render(table)
    print(
        f"{len(rows)} classes, {len(table['synsets'])} synsets, "
        f"{collisions} names disambiguated, {len(text.encode())} bytes",
        file=sys.stderr,
    )
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != text:
            print(f"{args.output} is out of date", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
