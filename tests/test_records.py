"""records: the one mapping between the saved files' dataclasses and their JSON."""
from dataclasses import dataclass

from exitwise import records
from exitwise.records import NEVER, Thresholds


@dataclass(frozen=True)
class Point:
    x: float


@dataclass(frozen=True)
class Doc:
    head: str | tuple[str | None, ...]
    at: Point | tuple[Point, ...]
    thresholds: Thresholds
    note: str | None = records.optional()


def test_a_union_reads_the_member_its_json_value_is_and_an_optional_key_is_absent_while_none():
    doc = {"head": ["pool", None], "at": {"x": 1}, "thresholds": [0.5, None]}
    read = records.from_json(Doc, doc)
    assert read == Doc(("pool", None), Point(1.0), (0.5, NEVER))
    assert records.to_json(read) == doc  # no "note" key written for None
    assert records.from_json(Doc, {**doc, "head": "auto", "at": [{"x": 2}]}).at == (Point(2.0),)
    assert records.to_json(Doc("auto", Point(0.0), (), note="n"))["note"] == "n"
