"""Teacher stage: k samples per problem from the teacher LLM, split, answer-checked, counted."""

from __future__ import annotations

import json

import polars as pl

from bard_data.config.think_tags import THINK
from bard_data.llm.base import ChatRequest, chat_messages, request_key
from bard_data.pipeline.stage import ShardedStage, ShardResult, excluded_rows
from bard_data.text.answers import extract_answer, verify
from bard_data.text.reasoning import split_trace
from bard_data.text.templates import render

SAMPLE_COLUMNS = [
    "sample_id", "problem_id", "source", "origin", "model", "sample_index", "prompt", "completion",
    "reasoning", "response", "think_closed", "predicted_answer", "gold_answer", "is_correct",
    "reasoning_tokens", "completion_tokens", "finish_reason",
]


def verify_samples(ctx, df: pl.DataFrame, untagged: str = "last_paragraph", tags=None) -> pl.DataFrame:
    """Split reasoning from response, extract and verify the answer, count reasoning tokens.

    Shared by sampled and imported traces so both are judged by the same rules. Needs columns
    ``completion`` and ``gold_answer``; an unparsable gold (null) never verifies. ``tags``: the
    think-tag convention(s) the completions are written in (``text.reasoning.split_trace``).
    """
    splits = [split_trace(t or "", untagged, tags) for t in df["completion"].to_list()]
    reasoning = [s[0] for s in splits]
    response = [s[1] for s in splits]
    # R1-style models that never close </think> leave no response: look for the answer in
    # the reasoning then, as a reader of the trace would.
    preds = [extract_answer(r) if r.strip() else extract_answer(rs) for r, rs in zip(response, reasoning)]
    golds = df["gold_answer"].to_list()
    correct = [bool(g) and verify(p, g) for p, g in zip(preds, golds)]
    return df.with_columns(
        pl.Series("reasoning", reasoning, dtype=pl.Utf8),
        pl.Series("response", response, dtype=pl.Utf8),
        pl.Series("think_closed", [s[2] for s in splits], dtype=pl.Boolean),
        pl.Series("predicted_answer", preds, dtype=pl.Utf8),
        pl.Series("is_correct", correct, dtype=pl.Boolean),
        pl.Series("reasoning_tokens", ctx.count_tokens(reasoning), dtype=pl.Int64),
    )


class TeacherStage(ShardedStage):
    name = "teacher_samples"
    reads = ("problems",)
    sections = ("teacher.enabled", "teacher.backend", "teacher.sampling", "teacher.seed", "teacher.system_prompt",
                "teacher.samples_per_problem", "teacher.prompt_template", "teacher.untagged", "student")

    def enabled(self, recipe) -> bool:
        return recipe.teacher is not None and recipe.teacher.enabled

    def inputs(self, ctx) -> pl.DataFrame:
        """One row per (problem, sample index): the unit this stage's funnel counts."""
        cfg = ctx.recipe.teacher
        problems = ctx.store.read("problems").sort("problem_id")
        return problems.select("problem_id", "source", "question", "answer").join(
            pl.DataFrame({"sample_index": list(range(cfg.samples_per_problem))}, schema={"sample_index": pl.Int64}), how="cross"
        ).sort("problem_id", "sample_index")

    def process_shard(self, ctx, shard: pl.DataFrame, i: int) -> ShardResult:
        cfg = ctx.recipe.teacher
        llm = ctx.llm(cfg)
        msgs = [chat_messages(cfg.system_prompt, render(cfg.prompt_template, question=q)) for q in shard["question"]]
        reqs = [ChatRequest.of(m, s) for m, s in zip(msgs, shard["sample_index"].to_list())]
        outs = llm.generate(reqs, cfg.sampling, cfg.seed)
        keys = [request_key(cfg.backend.model, r, cfg.sampling, cfg.seed) for r in reqs]
        df = shard.with_columns(
            pl.Series("sample_id", ["s-" + key[:16] for key in keys]),
            pl.lit("sampled").alias("origin"),
            pl.lit(cfg.backend.model).alias("model"),
            pl.Series("prompt", [json.dumps(m, ensure_ascii=False) for m in msgs]),
            pl.Series("completion", [o.text for o in outs], dtype=pl.Utf8),
            pl.Series("completion_tokens", [o.completion_tokens for o in outs], dtype=pl.Int64),
            pl.Series("finish_reason", [o.finish_reason for o in outs], dtype=pl.Utf8),
            pl.Series("error", [o.error for o in outs], dtype=pl.Utf8),
            pl.col("answer").alias("gold_answer"),
        )
        failed = df.filter(pl.col("error").is_not_null())
        # The recipe's convention; <think> too, which is how the OpenAI backend writes a server's
        # separate reasoning_content (a completion is split by the convention it uses).
        tags = ctx.recipe.student.think_tags
        ok = verify_samples(ctx, df.filter(pl.col("error").is_null()), cfg.untagged, [tags] if tags == THINK else [tags, THINK])
        return ShardResult(
            kept=ok.select(SAMPLE_COLUMNS),
            excluded=excluded_rows(failed.drop("answer"), "llm_error", pl.col("error")),
        )
