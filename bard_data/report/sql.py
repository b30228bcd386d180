"""DuckDB SQL over a run directory or a published/exported dataset directory.

``connect(path)`` returns a DuckDB connection with one view per table:

- a run (``RUN_DIR/<table>/part-*.parquet``, ``RUN_DIR/manifest.json``): ``problems``,
  ``teacher_samples`` (sampled and imported traces together), ``gold_chains``, ``compressions``,
  ``judgments``, ``sft``, ``rl``, ``funnel``, ``decontamination`` (each when the run has it),
  ``excluded`` (every dropped row of every stage, with ``stage``, ``reason`` and ``detail``),
  ``manifest`` (one row: name, recipe_hash, complete, license, ...), ``tokens`` (LLM usage per
  model), ``llm_usage`` (per stage and model: requests, cache hits, tokens, generation seconds,
  cost where priced), ``balance`` (the SFT budget histogram before/after balancing, one row per bin) and
  ``tables`` (every view with its row count);
- an exported or downloaded dataset (``<config>/<split>-*.parquet``, ``data/<config>/...``, or
  folders written by ``datasets``' ``save_to_disk``): one view per config (all splits; a table
  with a ``split`` column keeps it), plus ``manifest``/``tokens``/``llm_usage``/``balance`` when the export's
  ``bard_run.json`` is there, and ``tables``.

Views over Parquet read the files lazily; ``save_to_disk`` folders are loaded with
``datasets.load_from_disk`` (memory-mapped Arrow) and registered.

Once the views stand, the connection is confined: DuckDB may open only the files the views read
(``allowed_paths``, ``enable_external_access = false``, then ``lock_configuration``), so a query
(one copied from a dataset card, say) cannot read other files (``read_csv('~/.netrc')``), write
any (``COPY ... TO``), attach a database, or install or load an extension.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional

import duckdb
import polars as pl

from bard_data.errors import BardError
from bard_data.report.catalog import load_query
from bard_data.report.views import (
    RUN_TABLES,
    NotADatasetError,
    SQLError,
    SQLSyntaxError,
    UnknownTableError,
    ViewBuilder,
    add_dataset_views,
    add_run_views,
    is_run_dir,
    sql_literal,
    view_name,
)

__all__ = [
    "RUN_TABLES", "SQLError", "UnknownTableError", "SQLSyntaxError", "NotADatasetError",
    "connect", "execute", "query", "views", "run_sql_cli",
]


def _confine(con: duckdb.DuckDBPyConnection, files: Iterable[Path]) -> None:
    """From now on DuckDB opens only ``files`` (each as named and, for a symlink such as a Hub
    cache snapshot's, where it leads) and no setting can be changed back."""
    allowed = sorted({str(p) for f in files for p in (Path(f), Path(f).resolve())})
    con.execute(f"SET allowed_paths = [{', '.join(sql_literal(a) for a in allowed)}]")
    con.execute("SET allowed_directories = []")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def connect(path: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table of a run or dataset directory."""
    root = Path(path).expanduser()
    if not root.exists():
        raise NotADatasetError(f"{root}: no such run or dataset directory")
    if not root.is_dir() and root.suffix != ".parquet":
        raise NotADatasetError(f"{root}: not a directory or a .parquet file")
    root = root.resolve()
    con = duckdb.connect(":memory:")
    b = ViewBuilder(con)
    try:
        if root.is_file():  # one Parquet file: one view named after it
            if not b.parquet_view(view_name(root.stem), [root]):
                raise NotADatasetError(f"{root}: a Parquet file without columns")
        elif is_run_dir(root):
            add_run_views(b, root)
        else:
            add_dataset_views(b, root)
        b.finish()
        _confine(con, b.files)
    except BaseException:
        con.close()
        raise
    return con


def views(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The names a query can use (views and the small tables), without internal registrations."""
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY table_name").fetchall()
    return [r[0] for r in rows if not r[0].startswith(("__arrow_", "__frame_"))]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


_MISSING_TABLE = re.compile(r"Table with name (\S+?) does not exist", re.IGNORECASE)


def execute(con: duckdb.DuckDBPyConnection, sql: str) -> pl.DataFrame:
    """Run ``sql`` on ``con``; DuckDB's errors come back as one-line :class:`SQLError`."""
    if not sql or not sql.strip():
        raise SQLError("empty query")
    try:
        rel = con.sql(sql)
        if rel is None:  # a statement without a result (CREATE VIEW ...)
            return pl.DataFrame()
        out = pl.from_arrow(rel.to_arrow_table())
        return out if isinstance(out, pl.DataFrame) else out.to_frame()
    except duckdb.CatalogException as exc:
        m = _MISSING_TABLE.search(str(exc))
        if m:
            name = m.group(1).strip('"')
            raise UnknownTableError(f"unknown table '{name}'; the views are: {', '.join(views(con))}") from None
        raise SQLError(_first_line(exc)) from None
    except duckdb.ParserException as exc:
        raise SQLSyntaxError(_first_line(exc)) from None
    except duckdb.Error as exc:
        raise SQLError(_first_line(exc)) from None


def query(path: str | Path, sql: str) -> pl.DataFrame:
    """Run one SQL query over a run or dataset directory and return the result as a DataFrame."""
    con = connect(path)
    try:
        return execute(con, sql)
    finally:
        con.close()


# -- CLI -------------------------------------------------------------------------------------


def _nested_to_json(df: pl.DataFrame) -> pl.DataFrame:
    nested = [c for c, t in df.schema.items() if t.is_nested()]
    if not nested:
        return df
    return df.with_columns([
        pl.col(c).map_elements(lambda v: json.dumps(v, ensure_ascii=False, default=str), return_dtype=pl.Utf8)
        for c in nested
    ])


def write_result(df: pl.DataFrame, out: str | Path) -> Path:
    out = Path(out)
    suffix = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        _nested_to_json(df).write_csv(out)
    elif suffix == ".parquet":
        df.write_parquet(out)
    elif suffix == ".json":
        out.write_text(json.dumps(df.to_dicts(), ensure_ascii=False, indent=1, default=str) + "\n", encoding="utf-8")
    elif suffix in (".jsonl", ".ndjson"):
        df.write_ndjson(out)
    else:
        raise BardError(f"{out}: unsupported output format '{suffix or '(none)'}'; use .csv, .parquet, .json or .jsonl")
    return out


def resolve_query_text(text: str) -> str:
    """The query itself, a path to a .sql file, or ``@name`` for a shipped query (bard_data/queries)."""
    if text.startswith("@"):
        return load_query(text[1:]).sql
    if text.strip().lower().endswith(".sql") and "\n" not in text and Path(text.strip()).is_file():
        return Path(text.strip()).read_text(encoding="utf-8")
    return text


def print_frame(df: pl.DataFrame, max_rows: int = 50) -> None:
    with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200,
                   tbl_hide_dataframe_shape=True):
        print(df)
    if df.height > max_rows:
        print(f"({df.height} rows, {max_rows} shown; --max-rows N or --out FILE for all)")
    else:
        print(f"({df.height} row{'s' if df.height != 1 else ''})")


def run_sql_cli(args) -> int:
    sql = resolve_query_text(args.query)
    df = query(args.run_dir, sql)
    out: Optional[str] = getattr(args, "out", None)
    if out:
        p = write_result(df, out)
        print(f"wrote {df.height} rows to {p}")
        return 0
    print_frame(df, max(1, int(getattr(args, "max_rows", 50) or 50)))
    return 0
