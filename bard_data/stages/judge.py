"""Judge stage: an LLM judge checks each compression for a dropped step the answer needs."""

from __future__ import annotations

import polars as pl

from bard_data.config.stages import JudgeConfig
from bard_data.llm.base import ChatRequest, chat_messages
from bard_data.pipeline.stage import ShardedStage, ShardResult, excluded_rows
from bard_data.text.templates import render
from bard_data.text.verdict import VERDICT_JSON_SCHEMA, parse_verdict


class JudgeStage(ShardedStage):
    name = "judgments"
    reads = ("compressions", "gold_chains")
    sections = ("judge",)

    def enabled(self, recipe) -> bool:
        return recipe.judge is not None and recipe.compression is not None

    def inputs(self, ctx) -> pl.DataFrame:
        cfg: JudgeConfig = ctx.recipe.judge
        comps = ctx.store.read("compressions")
        gold = ctx.store.read("gold_chains").select("sample_id", "question", "reasoning")
        todo = comps.select("compression_id", "sample_id", "budget", "compressed_reasoning", "gold_answer", "answer_preserved")
        if cfg.only_answer_preserved:
            todo = todo.filter(pl.col("answer_preserved"))
        return todo.join(gold, on="sample_id", how="left").sort("compression_id")

    def process_shard(self, ctx, shard: pl.DataFrame, i: int) -> ShardResult:
        cfg: JudgeConfig = ctx.recipe.judge
        schema = VERDICT_JSON_SCHEMA if cfg.structured_output else None
        reqs = [
            ChatRequest.of(chat_messages(cfg.system_prompt, render(
                cfg.prompt_template, question=r["question"], reasoning=r["reasoning"],
                compressed=r["compressed_reasoning"], answer=r["gold_answer"], budget=r["budget"],
            )), 0, schema)
            for r in shard.iter_rows(named=True)
        ]
        outs = ctx.llm(cfg).generate(reqs, cfg.sampling, cfg.seed) if reqs else []  # no engine for nothing
        parsed = [parse_verdict(o.text) if o.ok else (None, None) for o in outs]
        df = shard.select("compression_id").with_columns(
            pl.lit(cfg.backend.model).alias("model"),
            pl.Series("complete", [v.complete if v else None for v, _ in parsed], dtype=pl.Boolean),
            pl.Series("score", [v.score if v else None for v, _ in parsed], dtype=pl.Float64),
            pl.Series("missing_steps", [v.missing_steps if v else None for v, _ in parsed], dtype=pl.List(pl.Utf8)),
            pl.Series("parse_error", [e for _, e in parsed], dtype=pl.Utf8),
            pl.Series("raw_output", [o.text for o in outs], dtype=pl.Utf8),
            pl.Series("error", [o.error for o in outs], dtype=pl.Utf8),
        ).with_columns(
            (pl.col("score").fill_null(-1.0) >= cfg.min_score)
            .and_(pl.col("complete").fill_null(False) | (not cfg.require_complete))
            .alias("passed"),
            pl.when(pl.col("parse_error").is_not_null()).then(pl.lit("unparsable"))
            .when(pl.col("score").fill_null(-1.0) >= cfg.min_score).then(
                pl.when(pl.col("complete").fill_null(False) | (not cfg.require_complete)).then(pl.lit("pass")).otherwise(pl.lit("incomplete")))
            .otherwise(pl.lit("low_score")).alias("verdict"),
        )
        failed = df.filter(pl.col("error").is_not_null())
        return ShardResult(
            kept=df.filter(pl.col("error").is_null()).drop("error"),
            excluded=excluded_rows(failed, "llm_error", pl.col("error")),
        )
