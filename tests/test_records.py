"""records: the one mapping between the saved files' dataclasses and their JSON."""
from dataclasses import dataclass

import pytest

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


def test_a_value_of_another_json_type_than_its_hint_is_a_type_error_naming_the_field():
    doc = {"head": "auto", "at": {"x": 1}, "thresholds": [0.5, None]}
    for edit, message in (({"head": 5}, "head: 5 is not a string"),
                          ({"at": {"x": "1"}}, 'at: x: "1" is not a number'),
                          ({"at": {"x": True}}, "at: x: true is not a number"),
                          ({"thresholds": "0.5"}, 'thresholds: "0.5" is not a list'),
                          ({"thresholds": ["a"]}, 'thresholds: "a" is not a number')):
        with pytest.raises(TypeError, match=message):
            records.from_json(Doc, {**doc, **edit})
