"""Gold chains: the verified-correct teacher traces kept for compression, and pass rates.

Reads sampled (``teacher_samples``) and imported (``imported_samples``) traces alike. The pass
rate of a problem (correct / samples) is the RL stage's difficulty signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import polars as pl

from bard_data.pipeline.readahead import read_ahead
from bard_data.pipeline.stage import ShardResult, Stage, concat_excluded, excluded_rows

GOLD_COLUMNS = [
    "sample_id", "problem_id", "source", "origin", "model", "question", "gold_answer",
    "reasoning", "response", "predicted_answer", "reasoning_tokens", "n_samples", "n_correct", "pass_rate",
]
SAMPLE_TABLES = ("teacher_samples", "imported_samples")
# Text columns left out of the excluded rows: every excluded sample stays whole in its own table
# (teacher_samples or imported_samples, joined by sample_id), and copying its text would rewrite
# the whole sample table (~2 GiB at 1.3M compressions with text at 1/32 of real length).
EXCLUDED_TEXT = ("prompt", "completion", "reasoning", "response")


# Samples are selected on their key columns, then streamed a part at a time; the output gets one
# shard per this many bytes of samples (uncompressed, as Parquet reports it), so the rows held in
# memory stay bounded at any scale (all_samples of a 1.3M-compression build at real text lengths
# is ~100 GB). A part is built while the one before is written: both count in memory.
CHUNK_BYTES = 128 << 20
# Text decoded at once: a part whose columns hold more is read a slice of its rows at a time
# (at real lengths a 2048-row part of samples is ~64 MB of reasoning).
READ_BYTES = 32 << 20


def all_samples(store, columns: Optional[list[str]] = None) -> pl.DataFrame:
    """Sampled and imported traces in one frame; ``columns``: read only these (e.g. for pass
    rates), which skips the text columns."""
    frames = [store.read(t, columns) for t in SAMPLE_TABLES if store.exists(t)]
    if not frames:
        raise FileNotFoundError("no teacher samples: enable the teacher or list traces in the recipe")
    return pl.concat(frames, how="diagonal_relaxed")


def _compact(df: pl.DataFrame) -> pl.DataFrame:
    """A copy that owns only its own rows' bytes. A filtered string column still points into the
    whole column it came from, so keeping a fifth of each part's rows would keep all of every
    part's text alive (~3 GiB at 1.3M compressions); the Arrow round trip copies the strings."""
    return pl.from_arrow(df.to_arrow())


def _read_columns(path: Path, columns: list[str]) -> pl.DataFrame:
    """The ``columns`` one part has (an empty shard's part may have none)."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if not names:
        return pl.DataFrame(schema={c: pl.Null for c in columns})
    return pl.read_parquet(path, columns=[c for c in columns if c in names])


def pass_rates(samples: pl.DataFrame) -> pl.DataFrame:
    return samples.group_by("problem_id").agg(
        pl.len().alias("n_samples"),
        pl.col("is_correct").sum().cast(pl.Int64).alias("n_correct"),
    ).with_columns((pl.col("n_correct") / pl.col("n_samples")).alias("pass_rate"))


def select_gold(samples: pl.DataFrame, problems: pl.DataFrame, policy: str,
                min_tokens: int = 1, max_tokens: int | None = None) -> ShardResult:
    """Gold chains (sorted by problem_id) and the excluded samples, in one pass over ``samples``
    (every column). ``GoldStage`` makes the same choice on the key columns only
    (``_decide``) and attaches the other columns a part at a time."""
    chosen, excluded = _decide(samples.join(problems.select("problem_id", "question"), on="problem_id", how="left"),
                               policy, min_tokens, max_tokens)
    if excluded is not None:
        excluded = excluded.drop([c for c in EXCLUDED_TEXT if c in excluded.columns])
    return ShardResult(kept=chosen.select(GOLD_COLUMNS), excluded=excluded, rows_in=samples.height)


def _decide(samples: pl.DataFrame, policy: str, min_tokens: int = 1,
            max_tokens: int | None = None) -> tuple[pl.DataFrame, Optional[pl.DataFrame]]:
    """The selection itself: ``(chosen, excluded)``, chosen sorted by problem_id (then the
    policy's order), excluded in the order wrong, too short, too long, not selected (each sorted
    the same way), both with every column of ``samples`` plus n_samples, n_correct, pass_rate
    (and reason, detail for the excluded)."""
    rates = pass_rates(samples)
    df = samples.join(rates, on="problem_id", how="left").sort("problem_id", "origin", "sample_index", "sample_id")
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
    return chosen, excluded


# What the selection looks at (the rest, text above all, is attached afterwards a part at a time).
KEY_COLUMNS = ["sample_id", "problem_id", "origin", "sample_index", "is_correct", "reasoning_tokens",
               "predicted_answer", "gold_answer"]


@dataclass
class _Part:
    table: str
    path: Path
    rows: int
    bytes: int
    column_bytes: dict  # uncompressed bytes per column


def _parts_info(store) -> list[_Part]:
    """The non-empty parts of the sample tables, in the order ``all_samples`` reads them."""
    import pyarrow.parquet as pq

    out = []
    for t in SAMPLE_TABLES:
        for p in store.parts(t):
            md = pq.read_metadata(p)
            if md.num_columns == 0:
                continue
            nbytes = sum(md.row_group(g).total_byte_size for g in range(md.num_row_groups))
            cols: dict = {}
            for g in range(md.num_row_groups):
                for c in range(md.num_columns):
                    col = md.row_group(g).column(c)
                    name = col.path_in_schema.split(".")[0]
                    cols[name] = cols.get(name, 0) + col.total_uncompressed_size
            out.append(_Part(t, p, md.num_rows, nbytes, cols))
    return out


def _attach(df: pl.DataFrame, d: pl.DataFrame, template: pl.DataFrame, questions: pl.Series,
            extra: list[str], ex_cols: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Rows of one part (or a slice of one) with their decisions attached: the gold chains
    (``GOLD_COLUMNS`` and ``_rank``) and the excluded rows (``ex_cols`` and ``_xrank``), each
    cut to its columns before it is filtered (the excluded rows are most rows, without text)."""
    df = pl.concat([template, df], how="diagonal_relaxed")
    df = df.with_columns(questions.gather(d["_q"]).alias("question"), *(d[c] for c in extra),
                         d["reason"], d["detail"], d["_rank"], d["_xrank"])
    is_kept = pl.col("_rank").is_not_null()
    return (df.select(*GOLD_COLUMNS, "_rank").filter(is_kept),
            df.select(*ex_cols, "_xrank", is_kept.alias("_kept")).filter(~pl.col("_kept")).drop("_kept"))


class GoldStage(Stage):
    name = "gold_chains"
    reads = ("problems", "teacher_samples", "imported_samples")
    sections = ("teacher.gold_policy", "teacher.min_reasoning_tokens", "teacher.max_reasoning_tokens")

    def run(self, ctx) -> Iterator[ShardResult]:
        t = ctx.recipe.teacher
        policy = t.gold_policy if t else "shortest"
        args = (policy, t.min_reasoning_tokens if t else 1, t.max_reasoning_tokens if t else None)
        return select_gold_parts(ctx.store, _parts_info(ctx.store), args)


def select_gold_parts(store, parts: list[_Part], args) -> Iterator[ShardResult]:
    """``select_gold`` over all samples, with bounded memory and one read of each part.

    The choice is made on the key columns of every sample (``_decide``). Then each part is read
    once (a slice of rows at a time when its text passes ``READ_BYTES``; the next one is read
    while this one is split), and its rows split into gold chains and excluded rows. The parts are cut into
    ``ceil(sample bytes / CHUNK_BYTES)`` groups of consecutive parts (about equal bytes); each
    group gives one output part: its gold chains in the order of one ``select_gold`` and its
    excluded rows. With one group the table and the excluded rows are exactly one
    ``select_gold``'s.
    """
    if not parts:
        raise FileNotFoundError("no teacher samples: enable the teacher or list traces in the recipe")
    # Global schema of the samples (columns and types of the diagonal concat of all parts).
    template = pl.concat([pl.DataFrame(schema=pl.read_parquet_schema(p.path)) for p in parts],
                         how="diagonal_relaxed")
    keys = pl.concat(
        [_read_columns(p.path, KEY_COLUMNS).with_columns(pl.lit(i, pl.UInt32).alias("_part"))
         .with_row_index("_row") for i, p in enumerate(parts)],
        how="diagonal_relaxed",
    )
    missing = [c for c in KEY_COLUMNS if c not in keys.columns]
    if missing:
        keys = keys.with_columns(*(pl.lit(None, template.schema.get(c, pl.Utf8)).alias(c) for c in missing))
    keys = keys.with_columns(*(pl.col(c).cast(template.schema[c]) for c in KEY_COLUMNS if c in template.columns))
    problems = store.read("problems", ["problem_id", "question"])
    problems = problems.unique("problem_id", keep="first", maintain_order=True) \
        if problems["problem_id"].is_duplicated().any() else problems
    qidx = problems.select("problem_id").with_row_index("_q")
    chosen, excluded = _decide(keys, *args)
    # Per sample row: where it goes (_rank among the gold chains, or _xrank among the excluded).
    extra = ["n_samples", "n_correct", "pass_rate"]
    dec = pl.concat([
        chosen.select("_part", "_row", *extra, pl.int_range(pl.len(), dtype=pl.Int64).alias("_rank"),
                      pl.lit(None, pl.Utf8).alias("reason"), pl.lit(None, pl.Utf8).alias("detail"),
                      pl.lit(None, pl.Int64).alias("_xrank"), "problem_id"),
        (excluded if excluded is not None else chosen.clear().with_columns(
            pl.lit(None, pl.Utf8).alias("reason"), pl.lit(None, pl.Utf8).alias("detail")))
        .select("_part", "_row", *extra, pl.lit(None, pl.Int64).alias("_rank"), "reason", "detail",
                pl.int_range(pl.len(), dtype=pl.Int64).alias("_xrank"), "problem_id"),
    ], how="vertical_relaxed")
    dec = dec.join(qidx, on="problem_id", how="left").drop("problem_id").sort("_part", "_row")
    del chosen, excluded, keys
    by_part = dec.partition_by("_part", as_dict=True, include_key=False)
    del dec
    questions = problems["question"]

    total_bytes = sum(p.bytes for p in parts)
    n = min(max(1, math.ceil(total_bytes / CHUNK_BYTES)), max(1, len(parts)))
    groups: list[list[int]] = [[] for _ in range(n)]  # consecutive parts, ~equal bytes
    cum = 0
    for i, p in enumerate(parts):
        groups[min(n - 1, int(cum * n // max(total_bytes, 1)))].append(i)
        cum += p.bytes
    ex_cols = [c for c in template.columns if c not in EXCLUDED_TEXT] + ["question", *extra, "reason", "detail"]
    empty = template.with_columns(pl.lit(None, pl.Utf8).alias("question"), pl.lit(None, pl.UInt32).alias("n_samples"),
                                  pl.lit(None, pl.Int64).alias("n_correct"), pl.lit(None, pl.Float64).alias("pass_rate"),
                                  pl.lit(None, pl.Int64).alias("_rank")).select(*GOLD_COLUMNS, "_rank")
    def columns(i: int) -> list[str]:  # what the gold chains and the excluded rows keep (not prompt/completion)
        names = parts[i].column_bytes
        return [c for c in template.columns if c in names and (c in GOLD_COLUMNS or c not in EXCLUDED_TEXT)]

    def slices(i: int) -> list[tuple[int, int, int]]:  # (part, first row, rows): ~READ_BYTES each
        cols = columns(i)
        n = max(1, math.ceil(sum(parts[i].column_bytes.get(c, 0) for c in cols) / READ_BYTES))
        step = max(1, math.ceil(parts[i].rows / n))
        return [(i, o, min(step, parts[i].rows - o)) for o in range(0, parts[i].rows, step)] or [(i, 0, 0)]

    def read(item: tuple[int, int, int]) -> pl.DataFrame:
        i, first, n = item
        if n == parts[i].rows:
            return pl.read_parquet(parts[i].path, columns=columns(i))
        return pl.scan_parquet(parts[i].path).select(columns(i)).slice(first, n).collect()

    # Groups are consecutive parts, each read in order, a slice of rows at a time.
    part_slices = [slices(i) for i in range(len(parts))]
    items = [s for sl in part_slices for s in sl]
    frames = read_ahead(read, items)
    for group in groups:
        kept_buf: list[pl.DataFrame] = [empty]
        ex_buf: list[pl.DataFrame] = []
        rows_in = 0
        for i in group:
            p, d = parts[i], by_part.pop((i,), None)
            if p.rows == 0:
                next(frames)
                continue
            if d is None or d.height != p.rows:  # every row has exactly one decision
                raise RuntimeError(f"gold selection: decisions do not cover {p.path}")
            for _, first, n in part_slices[i]:
                df = next(frames)
                if df.height != n:
                    raise RuntimeError(f"gold selection: {p.path} changed while it was read")
                kept, ex = _attach(df, d.slice(first, n), template, questions, extra, ex_cols)
                rows_in += n
                if kept.height:
                    kept_buf.append(_compact(kept))
                if ex.height:
                    ex_buf.append(ex)
                del df, kept, ex
        kept = pl.concat(kept_buf, how="vertical_relaxed").sort("_rank").drop("_rank")
        ex = pl.concat(ex_buf, how="vertical_relaxed").sort("_xrank").drop("_xrank") if ex_buf else None
        out = ShardResult(kept=kept, excluded=ex, rows_in=rows_in)
        kept = ex = kept_buf = ex_buf = d = None  # the runner owns a part once yielded: hold no reference
        yield out
        del out
