"""Reading source tables: JSONL, Parquet, a local ``datasets`` folder, or a Hub dataset id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import polars as pl

from bard_data.errors import DataError


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "datasets"
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if p.suffix == ".parquet":
        return "parquet"
    if p.exists():
        raise DataError(f"{path}: cannot tell the format from the file name; set format: jsonl|parquet")
    return "hub"


def _read_jsonl(path: str, limit: Optional[int]) -> pl.DataFrame:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(obj)
    if not rows:
        return pl.DataFrame()
    # Sources mix types within a column (AMC answers are floats, GSM8K's strings): keep what
    # each row has and let the mapping step cast; infer over all rows, not the first 100.
    try:
        return pl.from_dicts(rows, infer_schema_length=None, strict=False)
    except pl.exceptions.PolarsError:
        mixed = _mixed_kinds(rows)
        if mixed is None:
            raise
        raise DataError(f"{path}: {mixed}") from None


def _kind(v) -> str:
    return "list" if isinstance(v, list) else "object" if isinstance(v, dict) else "scalar"


def _mixed_kinds(rows: list[dict]) -> Optional[str]:
    """Where a field is a list (or an object) in one line and something else in another."""
    first: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows):
        for k, v in row.items():
            if v is None:
                continue
            kind = _kind(v)
            seen = first.setdefault(k, (kind, i))
            if seen[0] != kind:
                return (f"column '{k}' row {i}: a {kind} where row {seen[1]} has a {seen[0]} "
                        "(one kind of value per column)")
    return None


def as_text(df: pl.DataFrame, col: str) -> pl.Expr:
    """A source column as text; floats like AMC's 27.0 read "27", not "27.0" (``normalize_gold``
    handles the rest)."""
    dt = df.schema[col]
    if dt.is_float():
        return pl.col(col).map_elements(lambda v: repr(int(v)) if float(v).is_integer() else repr(v), return_dtype=pl.Utf8)
    return pl.col(col).cast(pl.Utf8)


def meta_json(columns: list[str]) -> pl.Expr:
    """The ``meta`` column of a problem: its source's other columns as a JSON object."""
    if not columns:
        return pl.lit("{}")
    return pl.struct(columns).map_elements(lambda r: json.dumps(r, default=str, ensure_ascii=False), return_dtype=pl.Utf8)


def read_table(path: str, fmt: str = "auto", limit: Optional[int] = None,
               hub_config: Optional[str] = None, hub_split: str = "train") -> pl.DataFrame:
    kind = detect_format(path, fmt)
    try:
        if kind == "jsonl":
            df = _read_jsonl(path, limit)
        elif kind == "parquet":
            df = pl.read_parquet(path, n_rows=limit)
        elif kind in ("datasets", "hub"):
            df = _read_datasets(path, kind, hub_config, hub_split, limit)
        else:
            raise DataError(f"{path}: unknown format {kind!r}")
    except DataError:
        raise
    except FileNotFoundError as exc:
        if not Path(path).exists():
            raise DataError(f"{path}: file not found") from None
        # The path is there; something the reader expected inside it is not (e.g. a folder
        # without a saved dataset).
        raise DataError(f"{path}: cannot read as {kind}: FileNotFoundError: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot read as {kind}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return df


def _read_datasets(path: str, kind: str, config: Optional[str], split: str, limit: Optional[int]) -> pl.DataFrame:
    import datasets

    if kind == "datasets":
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r} (has {sorted(ds)})")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(path, config, split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return pl.from_arrow(ds.data.table)


def require_columns(df: pl.DataFrame, columns: dict[str, Optional[str]], where: str) -> None:
    """``columns`` maps recipe key -> source column; a missing source column, or a binary one
    (Parquet/Arrow bytes) that is not UTF-8 text, is a one-line error."""
    for key, col in columns.items():
        if col is not None and col not in df.columns:
            have = ", ".join(df.columns[:12])
            raise DataError(f"{where}: column '{col}' (columns.{key}) not in the source; it has: {have}")
        if col is not None and df.schema[col] == pl.Binary:
            for i, b in enumerate(df[col].to_list()):
                try:
                    if b is not None:
                        b.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{where}: column '{col}' (columns.{key}) row {i}: not UTF-8 (byte {exc.start})") from None
