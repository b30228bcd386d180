"""The DuckDB views over a run directory or a dataset directory (see ``report.sql`` for what each
holds): Parquet parts read lazily, the manifest's small tables copied in, every file a view reads
recorded (``connect`` then confines DuckDB to those files)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import duckdb
import polars as pl
import pyarrow.parquet as pq

from bard_data.budget.balance import BALANCE_SCHEMA, balance_table
from bard_data.errors import BardError
from bard_data.pipeline import manifest as mf
from bard_data.report.published import EXPORT_MARKER

# Tables of a run that get a view of their own (teacher_samples also takes in imported_samples).
RUN_TABLES = [
    "problems", "teacher_samples", "gold_chains", "compressions", "judgments", "filtered_compressions", "sft", "rl",
    "funnel", "decontamination", "balance",
]
SAMPLE_TABLES = ("teacher_samples", "imported_samples")


class SQLError(BardError):
    """A query that DuckDB rejected (the first line of its message)."""


class UnknownTableError(SQLError):
    """The query names a table that is not one of the views."""


class SQLSyntaxError(SQLError):
    """The query does not parse."""


class NotADatasetError(BardError):
    """The path is missing, or is neither a run directory nor a dataset directory."""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_literal(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _files_sql(files: Iterable[Path]) -> str:
    return "[" + ", ".join(sql_literal(str(f)) for f in files) + "]"


def _part_rows(files: Iterable[Path]) -> dict[Path, int]:
    """Rows of each Parquet part that has columns (a stage may write a zero-column part for an
    empty shard), from one footer read per file: at paper scale a run has thousands of parts."""
    out = {}
    for f in files:
        try:
            md = pq.read_metadata(f)
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file is a one-line error
            raise BardError(f"{f}: unreadable Parquet part ({type(exc).__name__})") from None
        if md.num_columns > 0:
            out[f] = md.num_rows
    return out


class ViewBuilder:
    """Collects views on one connection and remembers what each is made of."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con
        self.rows: dict[str, int] = {}
        self.sources: dict[str, str] = {}
        self.files: set[Path] = set()  # every file a view reads: all DuckDB may open once confined

    def parquet_view(self, name: str, files: list[Path], extra_select: str = "") -> bool:
        rows = _part_rows(files)
        files = list(rows)
        if not files:
            return False
        sel = f"SELECT {extra_select}* FROM read_parquet({_files_sql(files)}, union_by_name = true)"
        self.con.execute(f"CREATE OR REPLACE VIEW {_q(name)} AS {sel}")
        self.files.update(files)
        self.rows[name] = sum(rows.values())
        self.sources[name] = str(files[0].parent)
        return True

    def arrow_view(self, name: str, table, source: str) -> None:
        reg = f"__arrow_{name}"
        self.con.register(reg, table)
        self.con.execute(f"CREATE OR REPLACE VIEW {_q(name)} AS SELECT * FROM {_q(reg)}")
        self.rows[name] = table.num_rows
        self.sources[name] = source

    def frame_view(self, name: str, df: pl.DataFrame, source: str) -> None:
        """A small in-memory table (manifest, tokens, balance, tables): copied into DuckDB."""
        reg = f"__frame_{name}"
        self.con.register(reg, df.to_arrow())
        self.con.execute(f"CREATE OR REPLACE TABLE {_q(name)} AS SELECT * FROM {_q(reg)}")
        self.con.unregister(reg)
        self.rows[name] = df.height
        self.sources[name] = source

    def finish(self) -> None:
        names = sorted(self.rows)
        tables = pl.DataFrame(
            {"name": names, "rows": [self.rows[n] for n in names], "source": [self.sources[n] for n in names]},
            schema={"name": pl.Utf8, "rows": pl.Int64, "source": pl.Utf8},
        )
        self.frame_view("tables", tables, "")
        self.rows.pop("tables", None)


# -- run directories -------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    if mf.exists(path):
        return True
    return any((path / t).is_dir() and any((path / t).glob("part-*.parquet")) for t in (*RUN_TABLES, "imported_samples"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BardError(f"{path}: not valid JSON") from None
    return data if isinstance(data, dict) else {}


def manifest_frame(manifest: dict[str, Any]) -> pl.DataFrame:
    """One row: the manifest's scalar fields (name, recipe_hash, complete, ...) and the license."""
    row: dict[str, Any] = {}
    for key in ("name", "recipe_hash", "complete"):
        row[key] = manifest.get(key)
    for key, value in manifest.items():
        if key not in row and (value is None or isinstance(value, (str, int, float, bool))):
            row[key] = value
    recipe = manifest.get("recipe") or {}
    if "license" not in row:
        row["license"] = recipe.get("license", manifest.get("license"))
    if "description" not in row and recipe.get("description"):
        row["description"] = recipe.get("description")
    schema = {k: (pl.Boolean if isinstance(v, bool) else pl.Int64 if isinstance(v, int) else
                  pl.Float64 if isinstance(v, float) else pl.Utf8) for k, v in row.items()}
    schema["complete"] = pl.Boolean
    return pl.DataFrame([row], schema=schema)


def tokens_frame(tokens: dict[str, Any]) -> pl.DataFrame:
    cols = ["prompt_tokens", "completion_tokens", "requests_sent", "cache_hits"]
    rows = [{"model": m, **{c: int((t or {}).get(c, 0) or 0) for c in cols}} for m, t in (tokens or {}).items()]
    return pl.DataFrame(rows, schema={"model": pl.Utf8, **{c: pl.Int64 for c in cols}})


USAGE_COLUMNS = {"stage": pl.Utf8, "model": pl.Utf8, "backend": pl.Utf8, "requests_sent": pl.Int64,
                 "cache_hits": pl.Int64, "errors": pl.Int64, "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64,
                 "generate_seconds": pl.Float64, "cost_usd": pl.Float64}


def usage_frame(llm_stages: dict[str, Any]) -> pl.DataFrame:
    """The manifest's ``llm_stages`` (per stage, per model: requests, cache hits, tokens, generation
    seconds, cost where priced) as rows; ``cost_usd`` is null for a stage whose backend has no price."""
    rows = []
    for stage, per_model in (llm_stages or {}).items():
        for model, s in (per_model or {}).items():
            s = s or {}
            rows.append({"stage": stage, "model": model, "backend": s.get("backend"),
                         **{c: s.get(c, None if c == "cost_usd" else 0) for c in list(USAGE_COLUMNS)[3:]}})
    return pl.DataFrame(rows, schema=USAGE_COLUMNS)


def balance_frame(balance: Any) -> pl.DataFrame:
    """An export's balance report (``bard_run.json``): a list of bin rows, or the report dict
    older exports stored."""
    if isinstance(balance, list):
        return pl.DataFrame(balance, schema=BALANCE_SCHEMA) if balance else pl.DataFrame(schema=BALANCE_SCHEMA)
    return balance_table(balance or {})


def _excluded_view(b: ViewBuilder, root: Path) -> None:
    base = root / "excluded"
    per_stage = []
    total = 0
    if base.is_dir():
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            rows = _part_rows(sorted(d.glob("part-*.parquet")))
            if rows:
                per_stage.append((d.name, list(rows)))
                total += sum(rows.values())
                b.files.update(rows)
    empty = "SELECT NULL::VARCHAR AS stage, NULL::VARCHAR AS reason, NULL::VARCHAR AS detail WHERE false"
    if not per_stage:
        b.con.execute(f"CREATE OR REPLACE VIEW excluded AS {empty}")
    else:
        parts = [f"SELECT {sql_literal(stage)} AS stage, * FROM read_parquet({_files_sql(files)}, union_by_name = true)"
                 for stage, files in per_stage]
        try:
            b.con.execute("CREATE OR REPLACE VIEW excluded AS " + " UNION ALL BY NAME ".join(parts))
            b.con.execute("SELECT * FROM excluded LIMIT 0").fetchall()
        except duckdb.Error:
            # Columns of one name but clashing types across stages: keep the columns every
            # excluded row can be read by (ids, reason, detail) rather than fail the whole view.
            keep = ["reason", "detail", "problem_id", "sample_id", "compression_id", "source"]
            sels = []
            for stage, files in per_stage:
                names = set().union(*(pq.read_schema(f).names for f in files))
                cols = ", ".join(f"CAST({_q(c)} AS VARCHAR) AS {_q(c)}" if c in names else f"NULL::VARCHAR AS {_q(c)}"
                                 for c in keep)
                sels.append(f"SELECT {sql_literal(stage)} AS stage, {cols} FROM read_parquet({_files_sql(files)}, union_by_name = true)")
            b.con.execute("CREATE OR REPLACE VIEW excluded AS " + " UNION ALL ".join(sels))
    b.rows["excluded"] = total
    b.sources["excluded"] = str(base)


def add_run_views(b: ViewBuilder, root: Path) -> None:
    for table in RUN_TABLES:
        if table == "teacher_samples":
            files = [f for t in SAMPLE_TABLES for f in sorted((root / t).glob("part-*.parquet"))]
        else:
            files = sorted((root / table).glob("part-*.parquet"))
        b.parquet_view(table, files)
    _excluded_view(b, root)
    manifest = mf.read_manifest(root)
    b.frame_view("manifest", manifest_frame(manifest), str(mf.path(root)))
    b.frame_view("tokens", tokens_frame(manifest.get("tokens") or {}), str(mf.path(root)))
    b.frame_view("llm_usage", usage_frame(manifest.get("llm_stages") or {}), str(mf.path(root)))
    if "balance" not in b.rows:  # a run without compressions: the report's bins are empty
        b.frame_view("balance", pl.DataFrame(schema=BALANCE_SCHEMA), str(root / "balance"))


# -- dataset directories ---------------------------------------------------------------------

_IDENT = re.compile(r"[^0-9A-Za-z_]+")


def view_name(name: str) -> str:
    s = _IDENT.sub("_", name).strip("_") or "data"
    return s if not s[0].isdigit() else f"t_{s}"


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _register_saved(b: ViewBuilder, name: str, path: Path, root_level: bool) -> None:
    try:
        import datasets
        import pyarrow as pa

        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise BardError(f"{path}: cannot load the saved dataset ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(ds, datasets.DatasetDict):
        tables = {split: d.data.table for split, d in ds.items()}
        if root_level:
            # A bare DatasetDict: one view per split.
            for split, t in tables.items():
                b.arrow_view(view_name(split), t, str(path / split))
            return
        parts = []
        for split, t in tables.items():
            if "split" not in t.column_names:
                t = t.append_column("split", pa.array([split] * t.num_rows, pa.string()))
            parts.append(t)
        table = pa.concat_tables(parts, promote_options="permissive") if parts else pa.table({})
        b.arrow_view(name, table, str(path))
    else:
        b.arrow_view(name, ds.data.table, str(path))


def _config_dirs(root: Path) -> list[tuple[str, Path]]:
    out = []
    for base in (root, root / "data"):
        if not base.is_dir():
            continue
        for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            if d.name in ("assets", "data") and base == root:
                continue
            out.append((d.name, d))
    return out


def add_dataset_views(b: ViewBuilder, root: Path) -> None:
    if _is_saved_dataset(root):
        _register_saved(b, "data", root, root_level=True)
    # Files straight under data/ (push_to_hub's default config): view "data".
    direct = sorted((root / "data").glob("*.parquet")) if (root / "data").is_dir() else []
    if direct:
        b.parquet_view("data", direct)
    # Loose Parquet files (e.g. an eval folder's eval.parquet, samples.parquet): a view per file.
    for f in sorted(root.glob("*.parquet")):
        if view_name(f.stem) not in b.rows:
            b.parquet_view(view_name(f.stem), [f])
    for name, d in _config_dirs(root):
        view = view_name(name)
        if view in b.rows:
            continue
        if _is_saved_dataset(d):
            _register_saved(b, view, d, root_level=False)
            continue
        files = sorted(d.rglob("*.parquet"))
        if files:
            b.parquet_view(view, files)
    info = _read_json(root / EXPORT_MARKER)
    if info:
        b.frame_view("manifest", manifest_frame(info), str(root / EXPORT_MARKER))
        b.frame_view("tokens", tokens_frame(info.get("tokens") or {}), str(root / EXPORT_MARKER))
        b.frame_view("llm_usage", usage_frame(info.get("llm_stages") or {}), str(root / EXPORT_MARKER))
        b.frame_view("balance", balance_frame(info.get("balance") or {}), str(root / EXPORT_MARKER))
    if not b.rows:
        raise NotADatasetError(
            f"{root}: neither a run directory (no manifest.json or <table>/part-*.parquet) nor a dataset "
            "directory (no <config>/*.parquet, data/<config>/*.parquet or save_to_disk folder)")
