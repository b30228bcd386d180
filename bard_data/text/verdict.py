"""Parsing the logical-completeness judge's output into a Verdict (the LLM call lives elsewhere).

The judge is asked for one JSON object ``{"complete": bool, "score": 0..1, "missing_steps": [...]}``
(``VERDICT_JSON_SCHEMA`` is that shape, for guided decoding). Real judges wrap it in prose, code
fences or a ``<think>`` block, use single quotes or trailing commas, write ``"yes"`` for true and
``"85%"`` or ``8`` (out of 10) for the score. :func:`parse_verdict` accepts those and returns a
short error string for everything else, so the caller can count rejections by cause.

Error strings: ``empty``, ``not_json``, ``truncated_json``, ``missing field: <name>``,
``invalid field: <name>``.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Verdict", "VERDICT_JSON_SCHEMA", "parse_verdict", "coerce_verdict"]


class Verdict(BaseModel):
    """The judge's verdict on one compressed chain."""

    model_config = ConfigDict(extra="ignore")

    complete: bool = Field(description="True when no step the answer depends on was dropped.")
    score: float = Field(ge=0.0, le=1.0, description="Completeness score in [0, 1].")
    missing_steps: list[str] = Field(default_factory=list, description="Steps the compression dropped, if any.")


# Written out rather than Verdict.model_json_schema(): no minimum/maximum (not every guided-decoding
# backend supports numeric bounds; parse_verdict clamps instead) and every field required, so a
# constrained judge always states its missing steps.
VERDICT_JSON_SCHEMA: dict = {
    "title": "Verdict",
    "type": "object",
    "properties": {
        "complete": {"type": "boolean"},
        "score": {"type": "number"},
        "missing_steps": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["complete", "score", "missing_steps"],
    "additionalProperties": False,
}

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript|js)?[ \t]*\n?(.*?)```", re.DOTALL)
_TRUE = {"true", "yes", "y", "1", "complete", "pass", "passed", "correct"}
_FALSE = {"false", "no", "n", "0", "incomplete", "fail", "failed", "incorrect"}


class _FieldError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# Finding and repairing JSON objects
# --------------------------------------------------------------------------------------------


# Each object left open costs a scan to the end of the text: after this many, stop looking (a
# degenerate output of thousands of '{' would otherwise take time quadratic in its length).
MAX_OPEN_OBJECTS = 16


def _objects(text: str) -> tuple[list[str], bool]:
    """Balanced ``{...}`` substrings in order (strings, both quote styles, are skipped when
    matching braces), and whether an object was left open at the end (truncation)."""
    found: list[str] = []
    truncated = False
    left_open = 0
    i, n = 0, len(text)
    while i < n and left_open < MAX_OPEN_OBJECTS:
        start = text.find("{", i)
        if start < 0:
            break
        depth, j, quote, end = 0, start, None, -1
        while j < n:
            ch = text[j]
            if quote:
                if ch == "\\":
                    j += 2
                    continue
                if ch == quote:
                    quote = None
            elif ch in "\"'":
                # An apostrophe inside a word (don't) is not a string delimiter.
                if ch == "'" and j > 0 and text[j - 1].isalnum() and j + 1 < n and text[j + 1].isalnum():
                    pass
                else:
                    quote = ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    end = j
                    break
            j += 1
        if end >= 0:
            found.append(text[start : end + 1])
            i = end + 1
        else:
            truncated = True
            left_open += 1
            i = start + 1
    return found, truncated


def _pythonish(s: str) -> str:
    """JSON literals outside strings -> Python ones (true -> True ...), for ast.literal_eval."""
    out, i, n, quote = [], 0, len(s), None
    while i < n:
        ch = s[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(s[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = None
            i += 1
            continue
        if ch in "\"'":
            quote = ch
            out.append(ch)
            i += 1
            continue
        m = re.match(r"(true|false|null)\b", s[i:])
        if m and (i == 0 or not (s[i - 1].isalnum() or s[i - 1] == "_")):
            out.append({"true": "True", "false": "False", "null": "None"}[m.group(1)])
            i += len(m.group(1))
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _load(candidate: str) -> Any:
    """json.loads, then a careful repair (single quotes, trailing commas, Python literals)."""
    try:
        return json.loads(candidate, strict=False)
    except (json.JSONDecodeError, ValueError):
        pass
    no_trailing = re.sub(r",\s*([}\]])", r"\1", candidate)
    try:
        return json.loads(no_trailing, strict=False)
    except (json.JSONDecodeError, ValueError):
        pass
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = ast.literal_eval(_pythonish(candidate))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return value


# --------------------------------------------------------------------------------------------
# Field coercion
# --------------------------------------------------------------------------------------------


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        t = v.strip().strip(".!").lower()
        if t in _TRUE:
            return True
        if t in _FALSE:
            return False
    raise _FieldError("invalid field: complete")


def _as_score(v: Any) -> float:
    if isinstance(v, bool) or v is None:
        raise _FieldError("invalid field: score")
    percent = False
    if isinstance(v, str):
        t = v.strip()
        m = re.fullmatch(r"([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*/\s*(\d+(?:\.\d*)?)", t)
        if m:
            den = float(m.group(2))
            if den <= 0:
                raise _FieldError("invalid field: score")
            return min(max(float(m.group(1)) / den, 0.0), 1.0)
        if t.endswith("%"):
            percent, t = True, t[:-1].strip()
        try:
            x = float(t)
        except ValueError:
            raise _FieldError("invalid field: score") from None
    elif isinstance(v, (int, float)):
        x = float(v)
    else:
        raise _FieldError("invalid field: score")
    if not math.isfinite(x):
        raise _FieldError("invalid field: score")
    if percent:
        x /= 100.0
    elif x > 10.0:
        x /= 100.0  # a 0..100 scale
    elif x > 1.0:
        x /= 10.0  # a 0..10 scale
    return min(max(x, 0.0), 1.0)


def _as_steps(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v.strip()] if v.strip() else []
    if isinstance(v, (list, tuple)):
        out = []
        for item in v:
            if isinstance(item, str):
                if item.strip():
                    out.append(item.strip())
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                out.append(str(item))
            else:
                raise _FieldError("invalid field: missing_steps")
        return out
    raise _FieldError("invalid field: missing_steps")


def coerce_verdict(obj: Any) -> Verdict:
    """A parsed JSON value -> Verdict, or raise ValueError("missing field: ..."/"invalid field: ...")."""
    if not isinstance(obj, dict):
        raise _FieldError("not_json")
    d = {str(k).strip().lower(): v for k, v in obj.items()}
    if "complete" not in d:
        # One level of wrapping: {"verdict": {"complete": ...}}.
        inner = [v for v in d.values() if isinstance(v, dict) and any(str(k).lower() == "complete" for k in v)]
        if len(inner) == 1:
            return coerce_verdict(inner[0])
        raise _FieldError("missing field: complete")
    if "score" not in d:
        raise _FieldError("missing field: score")
    complete = _as_bool(d["complete"])
    score = _as_score(d["score"])
    steps = _as_steps(d.get("missing_steps"))
    return Verdict(complete=complete, score=score, missing_steps=steps)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def parse_verdict(text: str | None) -> tuple[Verdict | None, str | None]:
    """Parse a judge's raw output: ``(verdict, None)`` or ``(None, short_error)``.

    Looks after the last ``</think>`` when there is one, prefers code-fenced blocks, and takes the
    first ``{...}`` object that yields a valid verdict; if none does, the error is that of the
    first object that parsed as JSON (e.g. ``missing field: complete``), else ``truncated_json``
    when an object was left open, else ``not_json``.
    """
    if text is None or not str(text).strip():
        return None, "empty"
    body = str(text)
    if "</think>" in body:
        body = body.rsplit("</think>", 1)[1]
        if not body.strip():
            return None, "empty"
    regions = [m.group(1) for m in _FENCE.finditer(body)] + [body]
    first_error: str | None = None
    truncated_any = False
    seen: set[str] = set()
    for region in regions:
        objects, truncated = _objects(region)
        truncated_any = truncated_any or truncated
        for cand in objects:
            if cand in seen:
                continue
            seen.add(cand)
            value = _load(cand)
            if not isinstance(value, dict):
                continue
            try:
                return coerce_verdict(value), None
            except _FieldError as exc:
                first_error = first_error or str(exc)
    if first_error:
        return None, first_error
    if truncated_any:
        return None, "truncated_json"
    return None, "not_json"
