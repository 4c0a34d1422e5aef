"""The one JSON parser and field checks both routers use (``chatforge.io.parse_json``, ``serve.fields``)."""

from __future__ import annotations

import json

import pytest

from chatforge.io import MAX_JSON_DEPTH, JSONTooDeep, json_nesting, parse_json
from chatforge.serve.fields import FieldError, get_float, get_int, get_str, parse_object


@pytest.mark.parametrize("text,depth", [
    ("1", 0), ('"[[["', 0), ("[]", 1), ('{"a": [1, {"b": []}]}', 4), ('["]]]]", "[[[["]', 1),
    ('["a\\"[[[[", "\\\\", "[\\"["]', 1), ('{"k": "\\\\\\"[[[", "v": [[]]}', 3),
])
def test_nesting_ignores_brackets_inside_strings(text, depth):
    json.loads(text)  # the function is for valid JSON only
    assert json_nesting(text) == depth


def test_parse_json_limits_depth_without_recursion_errors():
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    for depth in (MAX_JSON_DEPTH + 1, 100_000):
        with pytest.raises(JSONTooDeep, match=f"more than {MAX_JSON_DEPTH} levels"):
            parse_json("[" * depth + "]" * depth)
    # many brackets inside strings are text, not nesting
    assert parse_json(json.dumps({"text": "[" * 1000})) == {"text": "[" * 1000}
    with pytest.raises(UnicodeDecodeError):
        parse_json(b'{"a": "\xff"}')
    with pytest.raises(json.JSONDecodeError):
        parse_json("{not json")


def test_parse_object_statuses():
    assert parse_object(b"", empty_ok=True) == {}
    for raw, message in ((b"", "not valid JSON"), (b"[1]", "must be a JSON object, got list"),
                         (b'{"a": "\xff"}', "not UTF-8 at byte"),
                         (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nested more than 32 levels deep")):
        with pytest.raises(FieldError, match=message) as e:
            parse_object(raw)
        assert e.value.status == 400 and e.value.field is None


def test_field_checks_name_the_field_and_cut_long_values():
    body = {"n": 7, "flag": True, "s": "x" * 10_000, "t": 2.5, "empty": " "}
    assert get_int(body, "n", lo=1, hi=10) == 7 and get_int(body, "missing", required=False, default=3) == 3
    with pytest.raises(FieldError) as e:
        get_int(body, "flag")  # a bool is not an integer
    assert e.value.field == "flag" and e.value.status == 422 and "must be an integer" in e.value.message
    with pytest.raises(FieldError) as e:
        get_int(body, "s", lo=0)
    assert len(e.value.message) < 120  # the 10,000-character value is cut short
    with pytest.raises(FieldError, match=r"field 't' must be a number in \(2.5, 3\]"):
        get_float(body, "t", lo=2.5, hi=3, lo_open=True)
    with pytest.raises(FieldError, match="must not be empty"):
        get_str(body, "empty")
    with pytest.raises(FieldError, match="is required"):
        get_str(body, "missing")
