"""The artifact store: a run directory of Parquet tables written one shard at a time.

Layout::

    RUN_DIR/<table>/part-00000.parquet      kept rows of shard 0
    RUN_DIR/<table>/_funnel/part-00000.json  rows in/out and dropped-by-reason of shard 0
    RUN_DIR/<table>/_SUCCESS                 every shard of the table is written
    RUN_DIR/excluded/<table>/part-00000.parquet   dropped rows with ``reason`` and ``detail``

Every file is written to a temporary name in the same folder, fsynced and renamed, so a reader
(or a resumed run) sees a whole shard or none of it. The data part is renamed last: its presence
means the shard is finished.
"""

from __future__ import annotations

import json
import logging
import os
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


def atomic_write_parquet(path: Path, df: pl.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        df.write_parquet(tmp, compression="zstd", statistics=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


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

    # -- shards --------------------------------------------------------------------------
    def has_shard(self, table: str, shard: int) -> bool:
        p = self.part_path(table, shard)
        if not p.exists():
            return False
        try:
            pq.read_metadata(p)
            return self.funnel_path(table, shard).exists()
        except Exception as exc:  # a truncated or corrupt part: recompute it
            log.warning("shard %s is unreadable (%s); it will be recomputed", p, exc)
            p.unlink(missing_ok=True)
            return False

    def write_shard(
        self,
        table: str,
        shard: int,
        kept: pl.DataFrame,
        excluded: pl.DataFrame | None = None,
        funnel: dict[str, Any] | None = None,
    ) -> None:
        """Write one finished shard: excluded rows and funnel first, kept rows last (the marker)."""
        if excluded is not None and excluded.height:
            atomic_write_parquet(self.excluded_path(table, shard), excluded)
        atomic_write_json(self.funnel_path(table, shard), funnel or {})
        atomic_write_parquet(self.part_path(table, shard), kept)

    def mark_done(self, table: str, info: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.table_dir(table) / "_SUCCESS", info or {})

    def is_done(self, table: str) -> bool:
        return (self.table_dir(table) / "_SUCCESS").exists()

    def done_info(self, table: str) -> dict[str, Any]:
        p = self.table_dir(table) / "_SUCCESS"
        return json.loads(p.read_text()) if p.exists() else {}

    def parts(self, table: str) -> list[Path]:
        return sorted(self.table_dir(table).glob("part-*.parquet"))

    def shard_funnels(self, table: str) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.table_dir(table) / "_funnel").glob("part-*.json"))]

    # -- tables --------------------------------------------------------------------------
    def exists(self, table: str) -> bool:
        return bool(self.parts(table))

    def scan(self, table: str) -> pl.LazyFrame:
        parts = self.parts(table)
        if not parts:
            raise FileNotFoundError(f"{self.table_dir(table)}: no table '{table}' in this run")
        return pl.scan_parquet([str(p) for p in parts])

    def read(self, table: str) -> pl.DataFrame:
        parts = self.parts(table)
        if not parts:
            raise FileNotFoundError(f"{self.table_dir(table)}: no table '{table}' in this run")
        frames = [pl.read_parquet(p) for p in parts]
        frames = [f for f in frames if f.width] or frames[:1]
        return pl.concat(frames, how="diagonal_relaxed")

    def read_excluded(self, table: str) -> pl.DataFrame | None:
        parts = sorted((self.root / "excluded" / table).glob("part-*.parquet"))
        if not parts:
            return None
        return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed")

    def write_table(self, table: str, df: pl.DataFrame, excluded=None, funnel=None, info=None) -> None:
        """A whole (non-sharded) table: one shard, then the done marker."""
        self.write_shard(table, 0, df, excluded, funnel)
        self.mark_done(table, info)
