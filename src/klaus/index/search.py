"""Queries over a photo index: concept search, the WordNet tree with counts, one photo's details.

A query is a class name, any WordNet synonym or ancestor of a class ("dog", "vehicle"),
or a wnid. It becomes a set of class indices through the ``concepts`` table (the
hypernym closure, primary key ``(wnid, class)``), joined to ``predictions`` through its
``(class, photo_id, probability)`` index. A photo's score is the probability mass of
its top-5 that falls under the concept.
"""

from __future__ import annotations

import difflib
import json
import sqlite3
from dataclasses import dataclass, field
from functools import cache

from .db import KlausIndexError

DEFAULT_MIN_PROB = 0.2
DEFAULT_LIMIT = 50


@dataclass(frozen=True)
class Concept:
    wnid: str
    name: str
    words: tuple[str, ...]
    classes: int  # how many classes of the model fall under it


@dataclass
class Hit:
    id: int
    path: str
    score: float
    label: str  # top-1 label
    probability: float  # top-1 probability
    matches: list[dict] = field(default_factory=list)  # top-5 entries under the concept

    def to_dict(self, rank: int | None = None) -> dict[str, object]:
        out: dict[str, object] = {} if rank is None else {"rank": rank}
        out.update(
            id=self.id,
            path=self.path,
            score=round(self.score, 6),
            label=self.label,
            probability=round(self.probability, 6),
            matches=self.matches,
        )
        return out


@dataclass
class SearchResult:
    query: str
    concepts: list[Concept]
    hits: list[Hit]
    total: int  # all photos at or above min_prob, not only this page


SEARCH_SQL = """
WITH wanted (class) AS (
    SELECT class FROM concepts WHERE wnid IN ({wnids})
    UNION SELECT value FROM json_each(?)
)
SELECT p.photo_id, sum(p.probability) AS score
FROM wanted
JOIN predictions AS p ON p.class = wanted.class
JOIN photos AS ph ON ph.id = p.photo_id AND ph.status = 'ok'
GROUP BY p.photo_id
HAVING score >= ?
ORDER BY score DESC, p.photo_id
"""


def search_sql(n_wnids: int) -> str:
    return SEARCH_SQL.format(wnids=",".join("?" * max(1, n_wnids)))


@cache
def _all_words() -> dict[str, str]:
    """{word (casefolded): wnid} for every synset above an ImageNet class (for suggestions)."""
    from ..labels import ancestors, imagenet_labels, synset_words

    out: dict[str, str] = {}
    for label in imagenet_labels():
        for wnid in ancestors(label.wnid):
            for word in synset_words(wnid):
                out.setdefault(word.replace("_", " ").casefold(), wnid)
        out.setdefault(label.name.casefold(), label.wnid)
    return out


def resolve(conn: sqlite3.Connection, query: str) -> tuple[list[str], list[int]]:
    """(wnids, plain class indices) a query means: WordNet concepts and class names of the index's model."""
    from ..labels import find_concepts

    text = " ".join(query.replace("_", " ").split())
    if not text:
        raise KlausIndexError("empty query")
    wnids = set(find_concepts(text))
    plain: set[int] = set()
    for idx, wnid in conn.execute(
        "SELECT idx, wnid FROM classes WHERE name = ? COLLATE NOCASE OR wnid = ?", (text, text.lower())
    ):
        if wnid:
            wnids.add(wnid)
        else:
            plain.add(int(idx))
    return sorted(wnids), sorted(plain)


def suggestions(query: str, n: int = 3) -> list[str]:
    words = _all_words()
    return difflib.get_close_matches(" ".join(query.split()).casefold(), list(words), n=n, cutoff=0.75)


def concept_info(conn: sqlite3.Connection, wnids: list[str]) -> list[Concept]:
    from ..labels import synset_words

    out = []
    for wnid in wnids:
        try:
            words = synset_words(wnid)
        except KeyError:
            row = conn.execute("SELECT name FROM classes WHERE wnid = ?", (wnid,)).fetchone()
            words = (row[0],) if row else (wnid,)
        n = conn.execute("SELECT count(*) FROM concepts WHERE wnid = ?", (wnid,)).fetchone()[0]
        out.append(Concept(wnid, words[0], tuple(words), int(n)))
    return out


def class_names(conn: sqlite3.Connection) -> dict[int, str]:
    return {int(i): n for i, n in conn.execute("SELECT idx, name FROM classes")}


def search(
    conn: sqlite3.Connection,
    query: str,
    *,
    min_prob: float = DEFAULT_MIN_PROB,
    limit: int | None = DEFAULT_LIMIT,
    offset: int = 0,
) -> SearchResult:
    """Photos ranked by their probability mass under the concept(s) the query names."""
    wnids, plain = resolve(conn, query)
    if not wnids and not plain:
        close = suggestions(query)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise KlausIndexError(f"no class or WordNet concept called {query.strip()!r}{hint}")
    sql = search_sql(len(wnids))
    params = [*(wnids or [""]), json.dumps(plain), float(min_prob)]
    rows = conn.execute(sql, params).fetchall()
    page = rows[offset:] if limit is None else rows[offset : offset + limit]
    hits = _hits(conn, page, wnids, plain)
    return SearchResult(query, concept_info(conn, wnids), hits, len(rows))


def _hits(conn: sqlite3.Connection, page: list[tuple], wnids: list[str], plain: list[int]) -> list[Hit]:
    if not page:
        return []
    names = class_names(conn)
    wanted = set(plain)
    if wnids:
        marks = ",".join("?" * len(wnids))
        wanted |= {int(c) for (c,) in conn.execute(f"SELECT class FROM concepts WHERE wnid IN ({marks})", wnids)}
    ids = [int(r[0]) for r in page]
    marks = ",".join("?" * len(ids))
    paths = dict(conn.execute(f"SELECT id, path FROM photos WHERE id IN ({marks})", ids).fetchall())
    preds: dict[int, list[tuple[int, int, float]]] = {}
    for pid, rank, cls, prob in conn.execute(
        f"SELECT photo_id, rank, class, probability FROM predictions WHERE photo_id IN ({marks}) ORDER BY photo_id, rank",
        ids,
    ):
        preds.setdefault(int(pid), []).append((int(rank), int(cls), float(prob)))
    hits = []
    for pid, score in page:
        top = preds.get(int(pid), [])
        first = top[0] if top else (1, -1, 0.0)
        matches = [
            {"rank": r, "index": c, "label": names.get(c, f"class {c}"), "probability": round(p, 6)}
            for r, c, p in top
            if c in wanted
        ]
        hits.append(Hit(int(pid), paths.get(pid, ""), float(score), names.get(first[1], ""), first[2], matches))
    return hits


# ------------------------------------------------------------------ browsing


@dataclass
class Node:
    wnid: str
    name: str
    parent: str
    count: int = 0  # photos whose top-1 class falls under this node
    children: list[str] = field(default_factory=list)


def tree(conn: sqlite3.Connection) -> dict[str, Node]:
    """The display tree of the model's classes (each class's root-to-leaf path), with top-1 counts."""
    nodes: dict[str, Node] = {}
    for _wnid, _name, path_json, hierarchy_json in conn.execute(
        "SELECT wnid, name, path, hierarchy FROM classes ORDER BY idx"
    ):
        path, names = json.loads(path_json), json.loads(hierarchy_json)
        if not path or len(path) != len(names):  # a class outside WordNet: not in the tree, only searchable by name
            continue
        parent = ""
        for step, step_name in zip(path, names, strict=True):
            node = nodes.get(step)
            if node is None:
                node = nodes[step] = Node(step, step_name, parent)
                if parent in nodes and step not in nodes[parent].children:
                    nodes[parent].children.append(step)
            parent = step
    counts = dict(
        conn.execute(
            """SELECT c.wnid, count(*) FROM predictions AS p
               JOIN photos AS ph ON ph.id = p.photo_id AND ph.status = 'ok'
               JOIN concepts AS c ON c.class = p.class
               WHERE p.rank = 1 GROUP BY c.wnid"""
        ).fetchall()
    )
    for wnid, node in nodes.items():
        node.count = int(counts.get(wnid, 0))
    for node in nodes.values():
        node.children.sort(key=lambda w: (-nodes[w].count, nodes[w].name.casefold()))
    return nodes


def roots(nodes: dict[str, Node]) -> list[str]:
    return [w for w, n in nodes.items() if not n.parent]


def photos_under(conn: sqlite3.Connection, wnid: str, *, limit: int = 60, offset: int = 0) -> tuple[list[dict], int]:
    """Photos whose top-1 class falls under ``wnid``, most confident first; and how many there are."""
    base = """FROM concepts AS c
              JOIN predictions AS p ON p.class = c.class AND p.rank = 1
              JOIN photos AS ph ON ph.id = p.photo_id AND ph.status = 'ok'
              WHERE c.wnid = ?"""
    total = conn.execute(f"SELECT count(*) {base}", (wnid,)).fetchone()[0]
    names = class_names(conn)
    rows = conn.execute(
        f"SELECT ph.id, ph.path, p.class, p.probability {base} ORDER BY p.probability DESC, ph.id LIMIT ? OFFSET ?",
        (wnid, limit, offset),
    ).fetchall()
    return [
        {"id": int(i), "path": path, "label": names.get(int(c), ""), "probability": float(prob)}
        for i, path, c, prob in rows
    ], int(total)


def photo(conn: sqlite3.Connection, photo_id: int) -> dict | None:
    """Everything stored about one photo, with its top-5 labels and their hierarchy paths."""
    row = conn.execute(
        """SELECT ph.id, ph.path, ph.size, ph.mtime_ns, ph.sha256, ph.width, ph.height, ph.format, ph.taken,
                  ph.status, ph.error, ph.decode_ms, ph.infer_ms, ph.elapsed_ms, ph.indexed_at, m.name, m.sha256
           FROM photos AS ph LEFT JOIN models AS m ON m.id = ph.model_id WHERE ph.id = ?""",
        (photo_id,),
    ).fetchone()
    if row is None:
        return None
    keys = (
        "id",
        "path",
        "size",
        "mtime_ns",
        "sha256",
        "width",
        "height",
        "format",
        "taken",
        "status",
        "error",
        "decode_ms",
        "infer_ms",
        "elapsed_ms",
        "indexed_at",
        "model",
        "model_sha256",
    )
    out = dict(zip(keys, row, strict=True))
    out["predictions"] = [
        {
            "rank": r,
            "index": c,
            "wnid": w,
            "label": n,
            "probability": p,
            "hierarchy": json.loads(h),
            "path": json.loads(pa),
        }
        for r, c, p, w, n, h, pa in conn.execute(
            """SELECT p.rank, p.class, p.probability, cl.wnid, cl.name, cl.hierarchy, cl.path
               FROM predictions AS p JOIN classes AS cl ON cl.idx = p.class
               WHERE p.photo_id = ? ORDER BY p.rank""",
            (photo_id,),
        )
    ]
    return out
