"""Problems stage: load every source (and every trace file with ``problems_from``), normalize gold
answers, assign content ids, deduplicate, decontaminate against held-out benchmarks."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from bard_data.errors import DataError
from bard_data.pipeline.io import as_text, meta_json, read_table, require_columns
from bard_data.pipeline.stage import ShardResult, Stage, concat_excluded, excluded_rows
from bard_data.stages.trace_files import trace_problems
from bard_data.text.answers import normalize_gold
from bard_data.text.decontam import decontaminate, load_references
from bard_data.text.ids import hash_expr, normalize_question_expr

PROBLEM_COLUMNS = ["problem_id", "source", "question", "answer", "raw_answer", "domain", "split", "meta"]
MAX_QUESTION_CHARS = 100_000


def load_source(recipe, src) -> pl.DataFrame:
    """One source as rows of (source, source_row, question, raw_answer, domain, split, meta)."""
    path = recipe.resolve(src.path, force=src.format in ("jsonl", "parquet", "datasets"))
    where = f"{recipe.source_file}: sources[{src.name}] {path}"
    df = read_table(path, src.format, src.limit, src.hub_config, src.hub_split)
    if df.height == 0:
        raise DataError(f"{where}: the source has no rows")
    cols = src.columns
    require_columns(df, cols.model_dump(), where)
    mapped = set(v for v in cols.model_dump().values() if v)
    meta = meta_json([c for c in df.columns if c not in mapped])
    return df.with_row_index("source_row").select(
        pl.lit(src.name).alias("source"),
        pl.col("source_row").cast(pl.Int64),
        pl.col(cols.question).cast(pl.Utf8).alias("question"),
        as_text(df, cols.answer).alias("raw_answer"),
        (pl.col(cols.domain).cast(pl.Utf8) if cols.domain else pl.lit(src.domain)).alias("domain"),
        (pl.col(cols.split).cast(pl.Utf8) if cols.split else pl.lit(src.split)).alias("split"),
        (pl.col(cols.id).cast(pl.Utf8) if cols.id else pl.lit(None, pl.Utf8)).alias("source_id"),
        meta.alias("meta"),
        pl.lit(src.answer_format).alias("answer_format"),
    )


def normalize_answers(df: pl.DataFrame) -> pl.DataFrame:
    # normalize_gold parses with math-verify (~1.5 ms a call); sources repeat answers a lot, so
    # each distinct (raw answer, format) is normalized once.
    memo: dict[tuple, str | None] = {}
    norm = []
    for key in zip(df["raw_answer"].to_list(), df["answer_format"].to_list()):
        if key not in memo:
            memo[key] = normalize_gold(key[0], key[1]) if key[0] is not None else None
        norm.append(memo[key])
    return df.with_columns(pl.Series("answer", norm, dtype=pl.Utf8))


def build_problems(recipe) -> ShardResult:
    frames = [load_source(recipe, s) for s in recipe.sources]
    # A trace file with problems_from defines problems too, read by the traces' own loader.
    frames += [trace_problems(recipe, t) for t in recipe.traces if t.problems_from]
    df = pl.concat(frames, how="vertical_relaxed")
    rows_in = df.height
    df = df.with_columns(
        pl.col("question").fill_null("").str.replace_all("\x00", "").alias("question"),
        pl.col("raw_answer").str.replace_all("\x00", "").alias("raw_answer"),
    ).with_columns(
        normalize_question_expr("question").alias("_norm_q")
    )
    bad_q = df.filter((pl.col("_norm_q") == "") | (pl.col("question").str.len_chars() > MAX_QUESTION_CHARS))
    df = df.filter((pl.col("_norm_q") != "") & (pl.col("question").str.len_chars() <= MAX_QUESTION_CHARS))
    ex_q = excluded_rows(
        bad_q,
        pl.when(pl.col("_norm_q") == "").then(pl.lit("empty_question")).otherwise(pl.lit("question_too_long")),
        pl.format("{} row {}", "source", "source_row"),
    )

    df = normalize_answers(df)
    bad_a = df.filter(pl.col("answer").is_null())
    df = df.filter(pl.col("answer").is_not_null())
    ex_a = excluded_rows(bad_a, "gold_unparsable", pl.format("raw answer: {}", pl.col("raw_answer").str.slice(0, 200)))

    # The id hashes the normalized question and gold answer: the same problem from two sources
    # (or twice in one) gets one id, so exact and whitespace/case duplicates collapse here.
    df = df.with_columns(hash_expr("p", "_norm_q", "answer").alias("problem_id"))
    first = pl.int_range(pl.len()).over("problem_id") == 0
    dups = df.filter(~first)
    df = df.filter(first)
    ex_d = excluded_rows(dups, "duplicate", pl.format("same question as an earlier row ({})", "problem_id"))

    excluded = concat_excluded(ex_q, ex_a, ex_d)
    kept = df.select(PROBLEM_COLUMNS + ["source_row", "source_id"])
    return ShardResult(kept=kept, excluded=excluded.drop("_norm_q", strict=False) if excluded is not None else None, rows_in=rows_in)


class ProblemsStage(Stage):
    name = "problems"
    sections = ("sources", "decontamination", "traces")

    def sections_for(self, recipe) -> tuple[str, ...]:
        # Only the trace sources that define problems (problems_from) shape this table.
        return ("sources", "decontamination", *(f"traces.{i}" for i, t in enumerate(recipe.traces) if t.problems_from))

    def run(self, ctx):
        recipe = ctx.recipe
        res = build_problems(recipe)
        dec = recipe.decontamination
        if dec is not None and dec.enabled and dec.references:
            # Reference paths as the recipe resolves them (relative to its folder, or ${recipe_dir}).
            dec = dec.model_copy(update={"references": [
                r.model_copy(update={"path": recipe.resolve(r.path, force=True)}) for r in dec.references]})
            refs = load_references(dec, Path(recipe.base_dir))
            kept, contaminated, report = decontaminate(res.kept, refs, dec.ngram)
            res = ShardResult(kept=kept, excluded=concat_excluded(res.excluded, contaminated), rows_in=res.rows_in,
                              reports={"decontamination": report})
        if res.kept.height == 0:
            raise DataError(f"{recipe.source_file}: no problems left after loading and filtering the sources")
        yield res
