"""Parsing judge outputs into verdicts: every shape a real judge emits, with exact expectations."""

from __future__ import annotations

import json

import pytest

from bard_data.text.verdict import VERDICT_JSON_SCHEMA, Verdict, parse_verdict


def V(complete: bool, score: float, steps: list[str] | None = None) -> Verdict:
    return Verdict(complete=complete, score=score, missing_steps=steps or [])


CASES = [
    # (id, raw judge output, expected verdict or None, expected error or None)
    ("plain", '{"complete": true, "score": 0.9, "missing_steps": []}', V(True, 0.9), None),
    ("no_steps_field", '{"complete": false, "score": 0.25}', V(False, 0.25), None),
    (
        "fenced",
        '```json\n{"complete": false, "score": 0.4, "missing_steps": ["solve for x"]}\n```',
        V(False, 0.4, ["solve for x"]),
        None,
    ),
    ("fenced_no_lang", '```\n{"complete": true, "score": 1}\n```', V(True, 1.0), None),
    (
        "prose_around",
        'Here is my assessment.\n{"complete": true, "score": 0.8, "missing_steps": []}\nLet me know if you need more.',
        V(True, 0.8),
        None,
    ),
    (
        "after_think",
        '<think>Draft: {"complete": false, "score": 0.1}. Actually it is fine.</think>\n'
        '{"complete": true, "score": 0.95, "missing_steps": []}',
        V(True, 0.95),
        None,
    ),
    ("single_quotes", "{'complete': true, 'score': 0.7, 'missing_steps': ['check the sign']}", V(True, 0.7, ["check the sign"]), None),
    ("python_literals", "Verdict: {'complete': False, 'score': 0.3, 'missing_steps': None}", V(False, 0.3), None),
    ("trailing_comma", '{"complete": true, "score": 0.6, "missing_steps": ["a", "b",],}', V(True, 0.6, ["a", "b"]), None),
    ("yes_string", '{"complete": "yes", "score": 0.9}', V(True, 0.9), None),
    ("no_string", '{"complete": "No", "score": "0.2", "missing_steps": ["step 3"]}', V(False, 0.2, ["step 3"]), None),
    ("true_string", '{"complete": "true", "score": 1.0}', V(True, 1.0), None),
    ("score_percent", '{"complete": true, "score": "85%"}', V(True, 0.85), None),
    ("score_out_of_10", '{"complete": true, "score": 8}', V(True, 0.8), None),
    ("score_out_of_100", '{"complete": false, "score": 40}', V(False, 0.4), None),
    ("score_fraction_string", '{"complete": true, "score": "7/10"}', V(True, 0.7), None),
    ("score_clamped_low", '{"complete": false, "score": -0.5}', V(False, 0.0), None),
    ("score_clamped_high", '{"complete": true, "score": 250}', V(True, 1.0), None),
    ("steps_as_string", '{"complete": false, "score": 0.5, "missing_steps": "the case n = 0"}', V(False, 0.5, ["the case n = 0"]), None),
    (
        "nested_braces_in_step",
        '{"complete": false, "score": 0.3, "missing_steps": ["expand {(x+1)^2} first", "close the set }"]}',
        V(False, 0.3, ["expand {(x+1)^2} first", "close the set }"]),
        None,
    ),
    (
        "two_objects_first_valid",
        '{"complete": true, "score": 0.9} and later {"complete": false, "score": 0.1}',
        V(True, 0.9),
        None,
    ),
    ("two_objects_first_invalid", '{"note": "draft"}\n{"complete": false, "score": 0.35}', V(False, 0.35), None),
    ("wrapped", '{"verdict": {"complete": true, "score": 0.75}}', V(True, 0.75), None),
    ("key_case", '{"Complete": true, "Score": 0.5}', V(True, 0.5), None),
    ("multiline_string", '{"complete": false, "score": 0.5, "missing_steps": ["line one\nline two"]}', V(False, 0.5, ["line one\nline two"]), None),
    # errors
    ("missing_complete", '{"score": 0.5, "missing_steps": []}', None, "missing field: complete"),
    ("missing_score", '{"complete": true}', None, "missing field: score"),
    ("steps_wrong_type", '{"complete": true, "score": 0.5, "missing_steps": 3}', None, "invalid field: missing_steps"),
    ("complete_wrong_value", '{"complete": "maybe", "score": 0.5}', None, "invalid field: complete"),
    ("score_not_number", '{"complete": true, "score": "high"}', None, "invalid field: score"),
    ("score_null", '{"complete": true, "score": null}', None, "invalid field: score"),
    ("not_json", "The compression looks complete to me.", None, "not_json"),
    ("json_array", "[true, 0.9]", None, "not_json"),
    ("empty", "", None, "empty"),
    ("whitespace", "  \n\t ", None, "empty"),
    ("nothing_after_think", "<think>I should check step 2.</think>\n", None, "empty"),
    ("truncated", '{"complete": true, "score": 0.9, "missing_steps": ["compute the', None, "truncated_json"),
]


@pytest.mark.parametrize("raw,expected,error", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_verdict(raw, expected, error):
    verdict, err = parse_verdict(raw)
    assert err == error
    if expected is None:
        assert verdict is None
    else:
        assert verdict == expected


def test_none_is_empty():
    assert parse_verdict(None) == (None, "empty")


def test_schema_matches_verdict():
    assert VERDICT_JSON_SCHEMA["type"] == "object"
    assert set(VERDICT_JSON_SCHEMA["properties"]) == set(Verdict.model_fields)
    assert VERDICT_JSON_SCHEMA["required"] == ["complete", "score", "missing_steps"]
    sample = {"complete": True, "score": 0.5, "missing_steps": ["x"]}
    json.dumps(VERDICT_JSON_SCHEMA)  # serialisable for guided decoding
    assert Verdict.model_validate(sample) == V(True, 0.5, ["x"])
    verdict, err = parse_verdict(json.dumps(sample))
    assert err is None and verdict.model_dump() == sample
