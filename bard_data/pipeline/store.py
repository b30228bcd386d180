"""The artifact store: a run directory of Parquet tables written one shard at a time.

Layout::

    RUN_DIR/<table>/part-00000.parquet      kept rows of shard 0
    RUN_DIR/<table>/_funnel/part-00000.json  rows in/out and dropped-by-reason of shard 0
    RUN_DIR/<table>/_SUCCESS                 every shard of the table is written
    RUN_DIR/excluded/<table>/part-00000.parquet   dropped rows with ``reason`` and ``detail``

Every file is written to a temporary name in the same folder, fsynced and renamed, so a reader
(or a resumed run) sees a whole shard or none of it. The data part is renamed last: its presence
means the shard is finished. Rewriting a shard removes its old part first, so a kill halfway
through a rewrite leaves no part (the shard is recomputed), never an old part beside a new funnel.

A shard counts as finished only when it is whole and still belongs to its input
(:meth:`ArtifactStore.shard_problem`): the part's Parquet footer reads, the funnel record parses
and its ``rows_out`` equals the part's row count, its excluded rows are there, and the funnel's
``input_hash`` (a hash of the shard's input rows) matches the input the stage now hands it. A
truncated or corrupt file is logged as a warning and recomputed; a shard whose input changed is
recomputed quietly. ``_SUCCESS`` may be *provisional* (``{"provisional": "..."}``): the table is
whole but some rows await a retry (``llm_error``) or an upstream table does; ``is_done`` is False
for it, so the next invocation runs the stage again and redoes only those shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# zstd level of every part: level 1 costs much less CPU than Polars' default (3) for somewhat
# larger files. Writing the text tables (teacher samples, gold chains, sft) is much of what
# post-processing costs, and the published files are level 1 already (export writes them with
# pyarrow, whose default it is), so the higher level only ever saved disk in the run folder.
ZSTD_LEVEL = 1


def atomic_write_parquet(path: Path, df: pl.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        df.write_parquet(tmp, compression="zstd", compression_level=ZSTD_LEVEL, statistics=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


TEMP_GLOB = ".*.tmp"
"""Names the atomic writers give their temporary files (never matched by ``part-*.parquet``)."""

RETRY_REASONS = ("llm_error",)
"""Drop reasons that are not a verdict on the row but a failed call: a new invocation retries them."""


def input_hash(df: pl.DataFrame) -> str:
    """A stable hash of a shard's input rows (schema and values, in order)."""
    h = hashlib.sha256()
    h.update(json.dumps([[c, str(t)] for c, t in df.schema.items()]).encode("utf-8"))
    h.update(df.write_ndjson().encode("utf-8"))
    return h.hexdigest()[:32]


SCRATCH = ".scratch"
"""Folder of a run directory where a stage keeps files it needs only while it runs."""


def remove_temp_files(root: Path) -> int:
    """Delete temporary files a killed writer (or a killed stage's scratch folder) left behind
    under ``root``; returns how many."""
    n = 0
    if not root.exists():
        return 0
    scratch = root / SCRATCH
    if scratch.is_dir():
        n += sum(1 for p in scratch.rglob("*") if p.is_file())
        shutil.rmtree(scratch, ignore_errors=True)
    for p in root.rglob(TEMP_GLOB):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


class ArtifactStore:
    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)

    # -- paths ---------------------------------------------------------------------------
    def table_dir(self, table: str) -> Path:
        return self.root / table

    def part_path(self, table: str, shard: int) -> Path:
        return self.table_dir(table) / f"part-{shard:05d}.parquet"

    def excluded_path(self, table: str, shard: int) -> Path:
        return self.root / "excluded" / table / f"part-{shard:05d}.parquet"

    def funnel_path(self, table: str, shard: int) -> Path:
        return self.table_dir(table) / "_funnel" / f"part-{shard:05d}.json"

    def scratch_dir(self, table: str) -> Path:
        """Where the stage writing ``table`` keeps its temporary files (removed when it ends)."""
        return self.root / SCRATCH / table

    # -- shards --------------------------------------------------------------------------
    def read_shard_funnel(self, table: str, shard: int) -> dict[str, Any] | None:
        try:
            rec = json.loads(self.funnel_path(table, shard).read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def shard_problem(self, table: str, shard: int, expected_hash: str | None = None,
                      retry_errors: bool = False, fingerprint: str | None = None) -> str | None:
        """Why shard ``shard`` of ``table`` is not finished, or None when it is.

        Damage (an unreadable part, a funnel that does not parse or does not match its part,
        missing excluded rows) is logged as a warning and the damaged files are removed.
        """
        p = self.part_path(table, shard)
        if not p.exists():
            return "missing"
        damage = None
        rec = self.read_shard_funnel(table, shard)
        try:
            rows = pq.read_metadata(p).num_rows
        except Exception as exc:  # a truncated or corrupt part
            damage = f"part {p} is unreadable ({type(exc).__name__}: {exc})"
        if damage is None and rec is None:
            damage = f"funnel record {self.funnel_path(table, shard)} is missing or unreadable"
        if damage is None and "rows_out" in rec and int(rec["rows_out"]) != rows:
            damage = f"part {p} has {rows} rows, its funnel record says {rec['rows_out']}"
        if damage is None:
            n_dropped = sum(int(v) for v in (rec.get("dropped") or {}).values())
            ex = self.excluded_path(table, shard)
            if n_dropped:
                try:
                    n_ex = pq.read_metadata(ex).num_rows
                except Exception as exc:
                    damage = f"excluded rows {ex} are missing or unreadable ({type(exc).__name__})"
                else:
                    if n_ex != n_dropped:
                        damage = f"excluded rows {ex} has {n_ex} rows, its funnel record says {n_dropped}"
        if damage is not None:
            log.warning("shard %d of '%s' is damaged: %s; it will be recomputed", shard, table, damage)
            p.unlink(missing_ok=True)
            return "damaged"
        if expected_hash is not None and rec.get("input_hash") != expected_hash:
            return "stale"  # its input changed (or it predates input hashes): recompute, quietly
        if fingerprint is not None and rec.get("fingerprint") != fingerprint:
            return "stale"  # built under other settings (an edited recipe): recompute, quietly
        if retry_errors and any(int((rec.get("dropped") or {}).get(r, 0)) for r in RETRY_REASONS):
            return "llm_error"
        return None

    def shard_indices(self, table: str) -> list[int]:
        """Shard numbers that have any file (part, funnel record or excluded rows)."""
        out = set()
        for d, pat in ((self.table_dir(table), "part-*.parquet"), (self.table_dir(table) / "_funnel", "part-*.json"),
                       (self.root / "excluded" / table, "part-*.parquet")):
            for p in d.glob(pat):
                try:
                    out.add(int(p.name.split("-", 1)[1].split(".", 1)[0]))
                except ValueError:
                    continue
        return sorted(out)

    def remove_shard(self, table: str, shard: int) -> None:
        """Part first (the marker), then its funnel record and excluded rows."""
        self.part_path(table, shard).unlink(missing_ok=True)
        self.funnel_path(table, shard).unlink(missing_ok=True)
        self.excluded_path(table, shard).unlink(missing_ok=True)

    def planned_shards(self, table: str) -> int | None:
        lp = self.layout_path(table)
        if lp.exists():
            try:
                return int(json.loads(lp.read_text())["shards"])
            except (ValueError, KeyError, TypeError, OSError):
                return None
        return 1 if (self.table_dir(table) / "_SUCCESS").exists() else None

    def verify_table(self, table: str) -> list[str]:
        """Problems of a table marked done: missing or damaged shards (warned and removed)."""
        n = self.planned_shards(table)
        if n is None:
            return ["no layout"]
        out = []
        for i in range(n):
            why = self.shard_problem(table, i)
            if why is not None:
                out.append(f"shard {i} {why}")
        return out

    def write_shard(
        self,
        table: str,
        shard: int,
        kept: pl.DataFrame,
        excluded: pl.DataFrame | None = None,
        funnel: dict[str, Any] | None = None,
    ) -> None:
        """Write one finished shard: the old part goes first, then excluded rows and the funnel
        record, and the kept rows last (the marker)."""
        self.part_path(table, shard).unlink(missing_ok=True)
        if excluded is not None and excluded.height:
            atomic_write_parquet(self.excluded_path(table, shard), excluded)
        else:
            self.excluded_path(table, shard).unlink(missing_ok=True)
        atomic_write_json(self.funnel_path(table, shard), funnel or {})
        atomic_write_parquet(self.part_path(table, shard), kept)

    def layout_path(self, table: str) -> Path:
        return self.table_dir(table) / "_layout.json"

    def clear_table(self, table: str) -> None:
        """Remove every shard, the layout and the done marker (the table is about to be rebuilt whole)."""
        self.unmark_done(table)
        for i in self.shard_indices(table):
            self.remove_shard(table, i)
        self.layout_path(table).unlink(missing_ok=True)

    def start_table(self, table: str, layout: dict[str, Any]) -> None:
        """Record the table's layout (``shards``: how many) and remove shards beyond it."""
        for i in self.shard_indices(table):
            if i >= int(layout["shards"]):
                self.remove_shard(table, i)
        atomic_write_json(self.layout_path(table), layout)

    def finish_table(self, table: str, layout: dict[str, Any], info: dict[str, Any] | None = None) -> None:
        """Layout written, shards beyond it removed, then the done marker (with ``info``: the
        stage's fingerprint and what it was computed from)."""
        self.start_table(table, layout)
        self.mark_done(table, {**layout, **(info or {})})

    def is_built(self, table: str) -> bool:
        """Whole, finished or provisional (see ``is_done``)."""
        return (self.table_dir(table) / "_SUCCESS").exists()

    def mark_done(self, table: str, info: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.table_dir(table) / "_SUCCESS", info or {})

    def mark_provisional(self, table: str, why: str) -> None:
        """Keep ``_SUCCESS`` (and its info) but make ``is_done`` False until a rerun clears it."""
        atomic_write_json(self.table_dir(table) / "_SUCCESS", {**self.done_info(table), "provisional": why})

    def unmark_done(self, table: str) -> None:
        (self.table_dir(table) / "_SUCCESS").unlink(missing_ok=True)

    def is_done(self, table: str, fingerprint: str | None = None) -> bool:
        """Finished (not provisional) and, when ``fingerprint`` is given, built under it."""
        p = self.table_dir(table) / "_SUCCESS"
        if not p.exists():
            return False
        info = self.done_info(table)
        return not info.get("provisional") and (fingerprint is None or info.get("fingerprint") == fingerprint)

    def done_info(self, table: str) -> dict[str, Any]:
        p = self.table_dir(table) / "_SUCCESS"
        try:
            info = json.loads(p.read_text()) if p.exists() else {}
        except (OSError, ValueError):
            log.warning("%s is unreadable; the stage will run again", p)
            return {"provisional": "unreadable _SUCCESS"}
        return info if isinstance(info, dict) else {}

    def llm_errors(self, table: str) -> int:
        """Rows of ``table`` dropped because an LLM call failed (retried by the next invocation)."""
        return sum(int((rec.get("dropped") or {}).get(r, 0)) for rec in self.shard_funnels(table) for r in RETRY_REASONS)

    def parts(self, table: str) -> list[Path]:
        return sorted(self.table_dir(table).glob("part-*.parquet"))

    def shard_funnels(self, table: str) -> list[dict[str, Any]]:
        """Funnel records of the shards that have a part (a record without one is a leftover)."""
        out = []
        for p in sorted((self.table_dir(table) / "_funnel").glob("part-*.json")):
            if not (self.table_dir(table) / (p.stem + ".parquet")).exists():
                continue
            out.append(json.loads(p.read_text()))
        return out

    # -- tables --------------------------------------------------------------------------
    def exists(self, table: str) -> bool:
        return bool(self.parts(table))

    def columns(self, table: str) -> list[str]:
        """The table's column names (the union over its parts, in order of appearance)."""
        out: dict[str, None] = {}
        for p in self.parts(table):
            out.update(dict.fromkeys(pq.read_schema(p).names))
        return list(out)

    def read(self, table: str, columns: list[str] | None = None, locators: str | None = None) -> pl.DataFrame:
        """The whole table (parts concatenated diagonally); ``columns``: only these (the ones
        a part lacks are null), without reading the others (e.g. the text). ``locators``: a
        prefix P; each row then also says where it lies, ``P_file`` (its part's path) and
        ``P_row`` (its row number there), for ``pipeline.gather`` to fetch its text later."""
        parts = self.parts(table)
        if not parts:
            raise FileNotFoundError(f"{self.table_dir(table)}: no table '{table}' in this run")
        if columns is None:
            if locators:
                raise ValueError("read: locators need the columns to read")
            frames = [pl.read_parquet(p) for p in parts]
            frames = [f for f in frames if f.width] or frames[:1]
            return pl.concat(frames, how="diagonal_relaxed")
        extra = [f"{locators}_file", f"{locators}_row"] if locators else []
        frames = []
        for p in parts:
            names = pq.read_schema(p).names
            if names:
                df = pl.read_parquet(p, columns=[c for c in columns if c in names])
                if locators:
                    df = df.with_columns(pl.lit(str(p)).alias(extra[0]),
                                         pl.int_range(pl.len(), dtype=pl.Int64).alias(extra[1]))
                frames.append(df)
        if not frames:
            return pl.DataFrame(schema={**{c: pl.Null for c in columns}, **dict(zip(extra, (pl.Utf8, pl.Int64)))})
        df = pl.concat(frames, how="diagonal_relaxed")
        return df.with_columns(*(pl.lit(None).alias(c) for c in columns if c not in df.columns)).select(*columns, *extra)

    def read_excluded(self, table: str) -> pl.DataFrame | None:
        parts = sorted((self.root / "excluded" / table).glob("part-*.parquet"))
        if not parts:
            return None
        return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed")

    def write_table(self, table: str, df: pl.DataFrame) -> None:
        """A table that is no stage's output (the funnel, a stage's report): one part, done."""
        self.clear_table(table)
        self.write_shard(table, 0, df, None, {"rows_out": df.height})
        self.mark_done(table)
