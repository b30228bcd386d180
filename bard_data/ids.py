"""Content-derived ids: the same input (and producer) always gets the same id."""

from __future__ import annotations

import hashlib
import re
import unicodedata

import polars as pl

_WS = re.compile(r"\s+")


def normalize_question(text: str) -> str:
    """Text as compared for duplicates: NFKC, lowercase, whitespace collapsed."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text or "")).strip().lower()


def content_id(prefix: str, *parts: object) -> str:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:16]
    return f"{prefix}-{h}"


def hash_expr(prefix: str, *cols: str | pl.Expr) -> pl.Expr:
    """Vectorised content id over columns (sha256 of the joined values, 16 hex digits)."""
    exprs = [pl.col(c) if isinstance(c, str) else c for c in cols]
    joined = pl.concat_str([e.cast(pl.Utf8).fill_null("") for e in exprs], separator="\x1f")
    return joined.map_batches(
        # Same digest as content_id(prefix, *values): the parts are joined the same way.
        lambda s: pl.Series([content_id(prefix, v) for v in s.to_list()], dtype=pl.Utf8),
        return_dtype=pl.Utf8,
    )
