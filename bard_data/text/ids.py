"""Content-derived ids: the same input (and producer) always gets the same id."""

from __future__ import annotations

import hashlib
import re
import unicodedata

import polars as pl

_WS = re.compile(r"\s+")


# What Python's ``\s`` and ``str.strip()`` take for whitespace among ASCII characters (\x1c-\x1f too).
_ASCII_WS = "\t\n\x0b\x0c\r \x1c\x1d\x1e\x1f"
_ASCII_WS_RUNS = r"[\t\n\x0B\x0C\r \x1C-\x1F]+"


def normalize_question(text: str) -> str:
    """Text as compared for duplicates: NFKC, lowercase, whitespace collapsed."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text or "")).strip().lower()


def normalize_questions(s: pl.Series) -> pl.Series:
    """``normalize_question`` over a Series (nulls stay null, as with ``map_elements``).

    Pure-ASCII texts (NFKC is the identity on them) are normalised with vectorised string ops
    that mean exactly what the Python version does on ASCII; the others go through
    ``normalize_question`` one by one. The result equals ``s.map_elements(normalize_question)``.
    """
    s = s.cast(pl.Utf8)
    out = (
        s.str.replace_all(_ASCII_WS_RUNS, " ")
        .str.strip_chars(_ASCII_WS)
        .str.to_lowercase()
    )
    other = ((s.str.len_bytes() != s.str.len_chars()) & s.is_not_null()).arg_true()
    if other.len():
        out = out.scatter(other, pl.Series([normalize_question(v) for v in s.gather(other).to_list()], dtype=pl.Utf8))
    return out.alias(s.name)


def normalize_question_expr(col: str | pl.Expr) -> pl.Expr:
    """Expression form of :func:`normalize_questions`."""
    e = pl.col(col) if isinstance(col, str) else col
    return e.map_batches(normalize_questions, return_dtype=pl.Utf8)


def content_id(prefix: str, *parts: object) -> str:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:16]
    return f"{prefix}-{h}"


def _content_ids(prefix: str, joined: pl.Series) -> pl.Series:
    # content_id(prefix, v) for one already-joined string v, without the per-row join and call.
    sha = hashlib.sha256
    return pl.Series(
        [f"{prefix}-{sha(str(v).encode('utf-8')).hexdigest()[:16]}" for v in joined.to_list()], dtype=pl.Utf8
    )


def hash_expr(prefix: str, *cols: str | pl.Expr) -> pl.Expr:
    """Vectorised content id over columns (sha256 of the joined values, 16 hex digits)."""
    exprs = [pl.col(c) if isinstance(c, str) else c for c in cols]
    joined = pl.concat_str([e.cast(pl.Utf8).fill_null("") for e in exprs], separator="\x1f")
    # Same digest as content_id(prefix, *values): the parts are joined the same way.
    return joined.map_batches(lambda s: _content_ids(prefix, s), return_dtype=pl.Utf8)
