"""The committed ImageNet/WordNet label table and its runtime API (no WordNet install needed)."""

from __future__ import annotations

import json
import runpy
from collections.abc import Callable
from importlib import resources
from itertools import pairwise
from pathlib import Path

import pytest

from klaus import labels as L
from klaus.errors import KlausFormatError

ENTITY = "n00001740"
TABBY = "n02123045"
DOG_CLASSES = range(151, 269)
CAT_CLASSES = range(281, 286)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text() -> str:
    return (resources.files("klaus") / "data" / "imagenet_wordnet.json").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def table(text: str) -> L.WordNetTable:
    return L.parse_table(text)


def covered(query: str) -> set[int]:
    return {i for wnid in L.find_concepts(query) for i in L.descendant_classes(wnid)}


def test_thousand_classes_in_sorted_wnid_order() -> None:
    labels = L.imagenet_labels()
    assert len(labels) == 1000
    assert [lb.index for lb in labels] == list(range(1000))
    wnids = [lb.wnid for lb in labels]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert labels[0].wnid == "n01440764" and labels[0].name == "tench"


def test_names_are_unique_and_duplicates_disambiguated() -> None:
    names = [lb.name for lb in L.imagenet_labels()]
    assert len({n.casefold() for n in names}) == 1000
    assert {"crane (wading bird)", "crane (lifting device)"} <= set(names)
    assert "crane" not in names and "maillot" not in names


def test_paths_are_parent_edges_from_entity(table: L.WordNetTable) -> None:
    for label in table.labels:
        assert label.path[0] == ENTITY and label.path[-1] == label.wnid
        for parent, child in pairwise(label.path):
            assert parent in table.synsets[child].parents


def test_tabby_hierarchy() -> None:
    tabby = L.imagenet_labels().by_wnid(TABBY)
    assert tabby.hierarchy[0] == "entity" and tabby.hierarchy[-1] == "tabby"
    assert {"cat", "feline"} <= set(tabby.hierarchy)
    assert L.format_path(tabby).startswith("entity/physical entity/object/")
    assert L.format_path(tabby, " > ").endswith("feline > cat > domestic cat > tabby")


def test_ancestors_include_self_and_all_parents() -> None:
    anc = L.ancestors(TABBY)
    assert {TABBY, ENTITY, "n02121620", "n02120997"} <= anc  # cat, feline
    assert set(L.imagenet_labels().by_wnid(TABBY).path) <= anc
    assert L.synset_words("n02084071")[:2] == ("dog", "domestic dog")
    with pytest.raises(KeyError):
        L.ancestors("n99999999")


def test_dog_finds_dog_breeds_not_cats() -> None:
    dogs = covered("dog")
    assert len(dogs & set(DOG_CLASSES)) >= 110
    assert not dogs & set(CAT_CLASSES)


def test_vehicle_finds_cars_boats_planes() -> None:
    names = {L.imagenet_labels()[i].name for i in covered("vehicle")}
    assert {"sports car", "convertible", "cab"} <= names
    assert {"canoe", "speedboat", "container ship"} <= names
    assert {"airliner", "warplane"} <= names
    assert "tabby" not in names


@pytest.mark.parametrize("query", ["dog", "DOG", " domestic_dog ", "domestic   dog", "n02084071"])
def test_find_concepts_normalizes(query: str) -> None:
    assert L.find_concepts(query) == ["n02084071"]


def test_find_concepts_unknown_and_ambiguous() -> None:
    assert L.find_concepts("no such thing") == []
    assert len(L.find_concepts("crane")) == 2
    assert L.find_concepts("crane (wading bird)") == ["n02012849"]


def test_rows_round_trip() -> None:
    labels = L.imagenet_labels()
    rows = labels.to_rows()
    assert rows[0][:3] == (0, "n01440764", "tench")
    assert L.LabelTable.from_rows(rows) == labels
    # As a model file would store them: words and path as JSON lists.
    stored = json.loads(json.dumps(rows))
    assert L.LabelTable.from_rows(stored) == labels


@pytest.mark.parametrize(
    "row",
    [
        (1, "n01440764", "tench", ["tench"], ["n01440764"]),  # index != position
        (0, "tench", "tench", ["tench"], ["n01440764"]),  # bad wnid
        (0, "n01440764", "", ["tench"], ["n01440764"]),  # empty name
        (0, "n01440764", "tench", "tench", ["n01440764"]),  # bare string for words
        (0, "n01440764", "tench", ["tench"], ["n00001740"]),  # path ends elsewhere
        (0, "n01440764", "tench"),  # too short
    ],
)
def test_from_rows_rejects_bad_rows(row: tuple) -> None:
    with pytest.raises(KlausFormatError):
        L.LabelTable.from_rows([row])


def _mutations() -> dict[str, Callable[[dict], None]]:
    def drop_classes(d: dict) -> None:
        del d["classes"]

    def bad_version(d: dict) -> None:
        d["version"] = 99

    def skip_index(d: dict) -> None:
        d["classes"][5]["index"] = 6

    def duplicate_name(d: dict) -> None:
        d["classes"][1]["name"] = d["classes"][0]["name"]

    def path_not_from_entity(d: dict) -> None:
        d["classes"][0]["path"] = d["classes"][0]["path"][1:]

    def path_skips_a_step(d: dict) -> None:
        path = d["classes"][0]["path"]
        del path[-2]

    def missing_parent(d: dict) -> None:
        d["synsets"][TABBY]["parents"] = ["n99999999"]

    def words_not_list(d: dict) -> None:
        d["synsets"][ENTITY]["words"] = "entity"

    return {
        f.__name__: f
        for f in (
            drop_classes,
            bad_version,
            skip_index,
            duplicate_name,
            path_not_from_entity,
            path_skips_a_step,
            missing_parent,
            words_not_list,
        )
    }


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_malformed_table_raises(text: str, name: str) -> None:
    doc = json.loads(text)
    _mutations()[name](doc)
    with pytest.raises(KlausFormatError):
        L.parse_table(json.dumps(doc))


@pytest.mark.parametrize("bad", ["", "{", "[]", '{"version": 1}', "null"])
def test_malformed_text_raises(bad: str) -> None:
    with pytest.raises(KlausFormatError):
        L.parse_table(bad)


def test_load_table_from_path(tmp_path: Path, text: str) -> None:
    good = tmp_path / "good.json"
    good.write_text(text, encoding="utf-8")
    assert L.load_table(good).labels == L.imagenet_labels()
    bad = tmp_path / "bad.json"
    bad.write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(KlausFormatError, match="not valid JSON"):
        L.load_table(bad)
    with pytest.raises(KlausFormatError, match="cannot read"):
        L.load_table(tmp_path / "missing.json")


def test_committed_table_is_in_canonical_form(text: str) -> None:
    script = runpy.run_path(str(REPO / "scripts" / "make_labels.py"), run_name="make_labels")
    assert script["render"](json.loads(text)) == text
