"""Imported teacher traces: reuse published or earlier chains instead of sampling a teacher.

A trace source (``traces[]``: a file, its column mapping or a ``preset`` of a published layout,
its think-tag convention) is read by ``stages.trace_files``, matched to the recipe's problems by
normalized question text, then judged by exactly the rules sampled traces get (split, extract,
verify against the problem's gold answer, count student tokens). The split uses the source's own
convention; the reasoning and response columns then mean the same as for sampled traces, and the
SFT rows are written in the recipe's convention. A source's own correctness flag is recorded, never
trusted: ``flag_disagrees`` marks the rows where it and our verifier differ.

This stage runs right after ``problems`` (before the teacher samples), so a trace file that does
not match its mapping stops the build before any LLM call.
"""

from __future__ import annotations

import polars as pl

from bard_data.pipeline.stage import ShardResult, Stage, concat_excluded, excluded_rows
from bard_data.stages.teacher import SAMPLE_COLUMNS, verify_samples
from bard_data.stages.trace_files import load_traces, polars_errors
from bard_data.text.ids import content_id, normalize_question


class TracesStage(Stage):
    name = "imported_samples"
    reads = ("problems",)
    sections = ("traces", "student")

    def enabled(self, recipe) -> bool:
        return bool(recipe.traces)

    def run(self, ctx):
        problems = ctx.store.read("problems").select("problem_id", "source", "question", "answer")
        problems = problems.with_columns(pl.col("question").map_elements(normalize_question, return_dtype=pl.Utf8).alias("_q"))
        recipe_tags = ctx.recipe.student.think_tags
        kept_frames, excluded_frames, rows_in = [], [], 0
        for src in ctx.recipe.traces:
            tags = src.think_tags or [recipe_tags]
            traces = load_traces(ctx.recipe, src, tags[0])
            with polars_errors(f"{ctx.recipe.source_file}: traces[{src.name}]"):
                rows_in += traces.height
                df, unknown, empty = self._match(traces, problems)
                df = verify_samples(ctx, df, src.untagged, tags)
                df = df.with_columns(
                    (pl.col("source_flag").is_not_null() & (pl.col("source_flag") != pl.col("is_correct"))).alias("flag_disagrees")
                )
            kept_frames.append(df.select(SAMPLE_COLUMNS + ["source_flag", "flag_disagrees", "source_row"]))
            excluded_frames += [
                excluded_rows(unknown.drop("_q"), "unknown_problem", "question not among the recipe's problems"),
                excluded_rows(empty.drop("_q"), "empty_trace", ""),
            ]
        kept = pl.concat(kept_frames, how="diagonal_relaxed")
        disagree = int(kept["flag_disagrees"].sum())
        yield ShardResult(kept=kept, excluded=concat_excluded(*excluded_frames), rows_in=rows_in,
                          counters={"source_flag_disagrees": disagree})

    @staticmethod
    def _match(traces: pl.DataFrame, problems: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        """(traces of known problems with their ids and gold, traces of unknown problems, empty traces)."""
        traces = traces.with_columns(pl.col("question").map_elements(normalize_question, return_dtype=pl.Utf8).alias("_q"))
        joined = traces.join(problems.drop("question"), on="_q", how="left")
        unknown = joined.filter(pl.col("problem_id").is_null())
        joined = joined.filter(pl.col("problem_id").is_not_null())
        blank = pl.col("completion").fill_null("").str.strip_chars() == ""
        empty, joined = joined.filter(blank), joined.filter(~blank)
        df = joined.with_columns(
            pl.struct("origin", "problem_id", "sample_index", "completion")
            .map_elements(lambda r: content_id("s", r["origin"], r["problem_id"], r["sample_index"], r["completion"]),
                          return_dtype=pl.Utf8)
            .alias("sample_id"),
            pl.col("answer").alias("gold_answer"),
            pl.lit(None, pl.Utf8).alias("prompt"),
            pl.lit(None, pl.Int64).alias("completion_tokens"),
            pl.lit("imported").alias("finish_reason"),
        )
        return df, unknown, empty
