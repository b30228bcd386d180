"""Gold chains: the verified-correct teacher traces kept for compression, and pass rates.

Reads sampled (``teacher_samples``) and imported (``imported_samples``) traces alike. The pass
rate of a problem (correct / samples) is the RL stage's difficulty signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import polars as pl

from bard_data.stages.base import ShardResult, Stage, concat_excluded, excluded_rows

GOLD_COLUMNS = [
    "sample_id", "problem_id", "source", "origin", "model", "question", "gold_answer",
    "reasoning", "response", "predicted_answer", "reasoning_tokens", "n_samples", "n_correct", "pass_rate",
]
SAMPLE_TABLES = ("teacher_samples", "imported_samples")


# Samples larger than this (uncompressed, as Parquet reports it) are selected a range of problems
# at a time, so the stage's memory stays bounded at any scale (all_samples of a 1.3M-compression
# build at real text lengths is ~100 GB).
CHUNK_BYTES = 256 << 20


def all_samples(store, columns: Optional[list[str]] = None) -> pl.DataFrame:
    """Sampled and imported traces in one frame; ``columns``: read only these (e.g. for pass
    rates), which skips the text columns."""
    frames = [store.read(t) if columns is None else _read_columns(store.parts(t), columns)
              for t in SAMPLE_TABLES if store.exists(t)]
    if not frames:
        raise FileNotFoundError("no teacher samples: enable the teacher or list traces in the recipe")
    return pl.concat(frames, how="diagonal_relaxed")


def _read_parts(paths: list[Path], columns: Optional[list[str]] = None) -> pl.DataFrame:
    """``ArtifactStore.read`` over some of a table's parts (zero-column parts of empty shards
    are skipped, the rest concatenated diagonally)."""
    frames = [pl.read_parquet(p, columns=columns) for p in paths]
    frames = [f for f in frames if f.width] or frames[:1]
    return pl.concat(frames, how="diagonal_relaxed")


def _read_columns(paths: list[Path], columns: list[str]) -> pl.DataFrame:
    import pyarrow.parquet as pq

    keep = []
    for p in paths:
        names = pq.read_schema(p).names
        if names:
            keep.append((p, [c for c in columns if c in names]))
    if not keep:
        return pl.DataFrame(schema={c: pl.Null for c in columns})
    return pl.concat([pl.read_parquet(p, columns=cols) for p, cols in keep], how="diagonal_relaxed")


def pass_rates(samples: pl.DataFrame) -> pl.DataFrame:
    return samples.group_by("problem_id").agg(
        pl.len().alias("n_samples"),
        pl.col("is_correct").sum().cast(pl.Int64).alias("n_correct"),
    ).with_columns((pl.col("n_correct") / pl.col("n_samples")).alias("pass_rate"))


def select_gold(samples: pl.DataFrame, problems: pl.DataFrame, policy: str,
                min_tokens: int = 1, max_tokens: int | None = None) -> ShardResult:
    rates = pass_rates(samples)
    df = (
        samples.join(problems.select("problem_id", "question"), on="problem_id", how="left")
        .join(rates, on="problem_id", how="left")
        .sort("problem_id", "origin", "sample_index", "sample_id")
    )
    wrong = df.filter(~pl.col("is_correct"))
    ok = df.filter(pl.col("is_correct"))
    too_short = ok.filter(pl.col("reasoning_tokens") < max(min_tokens, 1))
    ok = ok.filter(pl.col("reasoning_tokens") >= max(min_tokens, 1))
    too_long = ok.filter(pl.col("reasoning_tokens") > max_tokens) if max_tokens else ok.clear()
    if max_tokens:
        ok = ok.filter(pl.col("reasoning_tokens") <= max_tokens)
    if policy == "all":
        chosen, rest = ok, ok.clear()
    else:
        order = ["reasoning_tokens", "sample_id"] if policy == "shortest" else ["origin", "sample_index", "sample_id"]
        ok = ok.sort(["problem_id", *order])
        first = pl.int_range(pl.len()).over("problem_id") == 0
        chosen, rest = ok.filter(first), ok.filter(~first)
    excluded = concat_excluded(
        excluded_rows(wrong, "teacher_wrong", pl.format("predicted {} gold {}", "predicted_answer", "gold_answer")),
        excluded_rows(too_short, "too_short", pl.format("{} reasoning tokens", "reasoning_tokens")),
        excluded_rows(too_long, "too_long", pl.format("{} reasoning tokens", "reasoning_tokens")),
        excluded_rows(rest, "not_selected", f"gold policy {policy}"),
    )
    return ShardResult(kept=chosen.select(GOLD_COLUMNS), excluded=excluded, rows_in=samples.height)


@dataclass
class _Part:
    table: str
    path: Path
    rows: int
    bytes: int
    lo: Optional[str]  # problem_id range from the Parquet statistics (None: unknown)
    hi: Optional[str]


def _parts_info(store) -> list[_Part]:
    import pyarrow.parquet as pq

    out = []
    for t in SAMPLE_TABLES:
        for p in store.parts(t):
            md = pq.read_metadata(p)
            if md.num_columns == 0:
                continue
            names = md.schema.names
            lo = hi = None
            if "problem_id" in names and md.num_row_groups:
                j = names.index("problem_id")
                stats = [md.row_group(g).column(j).statistics for g in range(md.num_row_groups)]
                if all(st is not None and st.has_min_max for st in stats):
                    lo, hi = min(st.min for st in stats), max(st.max for st in stats)
                    if isinstance(lo, bytes):
                        lo, hi = lo.decode("utf-8", "replace"), hi.decode("utf-8", "replace")
            nbytes = sum(md.row_group(g).total_byte_size for g in range(md.num_row_groups))
            out.append(_Part(t, p, md.num_rows, nbytes, lo, hi))
    return out


def _chunks(parts: list[_Part], chunk_bytes: int) -> list[tuple[Optional[str], Optional[str]]]:
    """Contiguous problem_id ranges ``[lo, hi]`` holding about ``chunk_bytes`` of samples each
    (all samples of a problem in one range)."""
    keys = pl.concat([_read_columns([p.path], ["problem_id"]) for p in parts], how="vertical_relaxed")
    counts = keys.group_by("problem_id").len().sort("problem_id", nulls_last=False)
    rows = sum(p.rows for p in parts)
    per_row = max(1.0, sum(p.bytes for p in parts) / max(rows, 1))
    rows_per_chunk = max(1, int(chunk_bytes / per_row))
    counts = counts.with_columns(((pl.col("len").cum_sum() - pl.col("len")) // rows_per_chunk).alias("_chunk"))
    ranges = counts.group_by("_chunk", maintain_order=True).agg(
        pl.col("problem_id").first().alias("lo"), pl.col("problem_id").last().alias("hi"))
    return list(zip(ranges["lo"].to_list(), ranges["hi"].to_list()))


def _in_range(lo: Optional[str], hi: Optional[str], first: bool) -> pl.Expr:
    pid = pl.col("problem_id")
    inside = pid.is_not_null()
    if lo is not None:
        inside = inside & (pid >= lo)
    if hi is not None:
        inside = inside & (pid <= hi)
    return inside | pid.is_null() if first else inside


def _overlaps(p: _Part, lo: Optional[str], hi: Optional[str]) -> bool:
    if p.lo is None or p.hi is None:
        return True
    return not ((hi is not None and p.lo > hi) or (lo is not None and p.hi < lo))


class GoldStage(Stage):
    table = "gold_chains"
    requires = ("problems",)

    def run(self, ctx) -> None:
        t = ctx.recipe.teacher
        policy = t.gold_policy if t else "shortest"
        args = (policy, t.min_reasoning_tokens if t else 1, t.max_reasoning_tokens if t else None)
        store = ctx.store
        parts = _parts_info(store)
        if sum(p.bytes for p in parts) <= CHUNK_BYTES:
            res = select_gold(all_samples(store), store.read("problems"), *args)
            _remove_shards_from(store, self.table, 1)
            (store.table_dir(self.table) / "_layout.json").unlink(missing_ok=True)
            store.write_table(self.table, res.kept, res.excluded, res.funnel(self.table, 0, res.rows_in))
            return
        self._run_chunked(store, parts, args)

    def _run_chunked(self, store, parts: list[_Part], args) -> None:
        """The same selection a range of problems at a time, one part per range. Gold chains come
        out in the same order as from one ``select_gold`` over everything (it sorts by problem_id
        first); the excluded rows are grouped by range."""
        from bard_data.store import atomic_write_json

        problems = _read_columns(store.parts("problems"), ["problem_id", "question"])
        ranges = _chunks(parts, CHUNK_BYTES)
        rows_total = 0
        for i, (lo, hi) in enumerate(ranges):
            inside = _in_range(lo, hi, first=i == 0)
            frames = []
            for table in SAMPLE_TABLES:
                paths = [p.path for p in parts if p.table == table and _overlaps(p, lo, hi)]
                if paths:
                    frames.append(_read_parts(paths).filter(inside))
            samples = pl.concat(frames, how="diagonal_relaxed")
            rows_total += samples.height
            res = select_gold(samples, problems.filter(inside), *args)
            store.write_shard(self.table, i, res.kept, res.excluded, res.funnel(self.table, i, res.rows_in))
        _remove_shards_from(store, self.table, len(ranges))
        layout = {"shards": len(ranges), "rows": rows_total, "unit": "problem_id ranges", "chunk_bytes": CHUNK_BYTES}
        atomic_write_json(store.table_dir(self.table) / "_layout.json", layout)
        store.mark_done(self.table)


def _remove_shards_from(store, table: str, n: int) -> None:
    """Parts, funnel records and excluded rows of shards >= n (left by an earlier, larger run)."""
    import re

    found = set()
    for d in (store.table_dir(table), store.table_dir(table) / "_funnel", store.root / "excluded" / table):
        for p in d.glob("part-*"):
            m = re.fullmatch(r"part-(\d+)\.(parquet|json)", p.name)
            if m and int(m.group(1)) >= n:
                found.add(int(m.group(1)))
    for i in sorted(found):
        store.part_path(table, i).unlink(missing_ok=True)
        store.funnel_path(table, i).unlink(missing_ok=True)
        store.excluded_path(table, i).unlink(missing_ok=True)
