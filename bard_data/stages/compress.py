"""Compression stage: rewrite each gold chain to several budgets b1 < b2 < ... (one contrastive
group per chain), measure the result in student tokens, retry misses with a corrected target."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from bard_data.answers import extract_answer, verify
from bard_data.budgets import BudgetScheduleConfig, corrected_target, schedule_budgets
from bard_data.ids import content_id
from bard_data.llm.base import ChatRequest
from bard_data.llm.config import LLMStageConfig
from bard_data.prompts import render
from bard_data.reasoning import split_reasoning
from bard_data.stages.base import ShardResult, Stage, concat_excluded, excluded_rows, run_sharded
from bard_data.stages.teacher import chat_messages

DEFAULT_COMPRESSION_PROMPT = """\
Below is a step-by-step solution to a problem. Rewrite the reasoning so that it is about \
{{ target }} tokens long (the original is {{ original_tokens }} tokens).

Rules:
- Keep every step that the final answer depends on; drop repetition, hesitation and detours.
- Keep the calculations that produce the answer, and keep them correct.
- End with the same final answer, written as \\boxed{ {{- answer -}} }.
- Output only the rewritten reasoning, nothing before or after it.

Problem:
{{ question }}

Original reasoning:
{{ reasoning }}
"""


class CompressionConfig(LLMStageConfig):
    budgets: BudgetScheduleConfig = Field(default_factory=BudgetScheduleConfig)
    prompt_template: str = Field(DEFAULT_COMPRESSION_PROMPT, description="jinja2: question, reasoning, answer, budget, target, original_tokens")
    tolerance: float = Field(0.2, gt=0, description="|deviation| (or deviation, one-sided) allowed")
    one_sided: bool = Field(False, description="only overshoot counts as a miss")
    max_retries: int = Field(2, ge=0, description="extra attempts with a corrected target when a compression misses")
    untagged: Literal["reasoning", "last_paragraph"] = Field(
        "reasoning", description="a compression without think tags is all reasoning by default")


def _within(dev: float, tol: float, one_sided: bool) -> bool:
    return dev <= tol if one_sided else abs(dev) <= tol


def _compressed_reasoning(text: str) -> str:
    reasoning, response, closed = split_reasoning(text)
    if closed or reasoning:
        return reasoning
    return (text or "").strip()


def _empty_compressions(shard: pl.DataFrame) -> pl.DataFrame:
    """The compressions table with no rows, typed as ``process_shard`` writes it."""
    src = shard.schema
    own = {"compression_id": pl.Utf8, "sample_id": src["sample_id"], "problem_id": src["problem_id"],
           "group_id": src["group_id"], "budget_rank": src["budget_rank"], "budget": src["budget"],
           "target_tokens": src["budget"], "attempts": pl.Int64, "model": pl.Utf8, "compressed_reasoning": pl.Utf8,
           "compressed_tokens": pl.Int64, "original_tokens": src["reasoning_tokens"], "deviation": pl.Float64,
           "within_tolerance": pl.Boolean, "predicted_answer": pl.Utf8, "gold_answer": src["gold_answer"],
           "answer_preserved": pl.Boolean, "finish_reason": pl.Utf8, "ratio": pl.Float64}
    return pl.DataFrame(schema=own)


class CompressStage(Stage):
    table = "compressions"
    requires = ("gold_chains",)

    def enabled(self, ctx) -> bool:
        return ctx.recipe.compression is not None

    def inputs(self, ctx) -> pl.DataFrame:
        cfg: CompressionConfig = ctx.recipe.compression
        gold = ctx.store.read("gold_chains")
        sched = schedule_budgets(gold.select("sample_id", "reasoning_tokens"), cfg.budgets, cfg.seed)
        # A left join keeps chains that got no budget (too short) as rows with a null budget, so
        # the shard loop records them in the funnel instead of losing them.
        todo = gold.join(sched, on="sample_id", how="left").sort("sample_id", "budget_rank", nulls_last=True)
        return todo.with_row_index("_idx")

    def _attempt(self, ctx, cfg: CompressionConfig, rows: list[dict], llm) -> list[dict]:
        """One generation round for ``rows``, measured in student tokens."""
        reqs = []
        for r in rows:
            user = render(cfg.prompt_template, question=r["question"], reasoning=r["reasoning"], answer=r["gold_answer"],
                          budget=r["budget"], target=r["target"], original_tokens=r["reasoning_tokens"])
            # The attempt number is the sample index: a retry whose target happens to equal an
            # earlier one is still a new request, not a cache hit of the miss.
            reqs.append(ChatRequest.of(chat_messages(cfg.system_prompt, user), r["attempts"]))
        outs = llm.generate(reqs, cfg.sampling, cfg.seed)
        texts = [_compressed_reasoning(o.text) if o.ok else "" for o in outs]
        counts = ctx.count_tokens(texts)
        res = []
        for r, o, t, n in zip(rows, outs, texts, counts):
            dev = (n - r["budget"]) / r["budget"]
            res.append({**r, "text": t, "tokens": n, "dev": dev, "error": o.error, "finish_reason": o.finish_reason})
        return res

    def process_shard(self, ctx, shard: pl.DataFrame, i: int) -> ShardResult:
        cfg: CompressionConfig = ctx.recipe.compression
        model = cfg.backend.model
        too_short = excluded_rows(shard.filter(pl.col("budget").is_null()), "too_short_to_compress",
                                  pl.format("{} reasoning tokens", "reasoning_tokens"))
        shard = shard.filter(pl.col("budget").is_not_null())
        if shard.height == 0:
            # An empty but typed table: the judge and SFT stages read its columns (no gold
            # chains at all is a real outcome, e.g. a weak teacher), and no engine is started.
            return ShardResult(kept=_empty_compressions(shard), excluded=too_short)
        llm = ctx.llm(cfg)
        pending = [{**r, "target": r["budget"], "attempts": 0} for r in shard.iter_rows(named=True)]
        tried: dict[int, list[dict]] = {}
        retried = 0
        for round_ in range(cfg.max_retries + 1):
            if not pending:
                break
            retried += len(pending) if round_ else 0
            nxt = []
            for r in self._attempt(ctx, cfg, pending, llm):
                tried.setdefault(r["_idx"], []).append(r)
                ok = r["error"] is None and _within(r["dev"], cfg.tolerance, cfg.one_sided)
                if not ok:
                    tgt = corrected_target(r["budget"], r["tokens"], r["target"]) if r["error"] is None else r["target"]
                    nxt.append({**r, "target": tgt, "attempts": r["attempts"] + 1})
            pending = nxt
        rows = []
        for idx in sorted(tried):
            good = [r for r in tried[idx] if r["error"] is None]
            pick = min(good, key=lambda r: abs(r["dev"])) if good else tried[idx][-1]
            rows.append({**pick, "attempts": len(tried[idx])})
        preds = [extract_answer(r["text"]) for r in rows]
        out = pl.DataFrame({
            "compression_id": [content_id("c", r["sample_id"], r["budget"], model, cfg.prompt_template) for r in rows],
            "sample_id": [r["sample_id"] for r in rows],
            "problem_id": [r["problem_id"] for r in rows],
            "group_id": [r["group_id"] for r in rows],
            "budget_rank": [r["budget_rank"] for r in rows],
            "budget": [r["budget"] for r in rows],
            "target_tokens": [r["target"] for r in rows],
            "attempts": [r["attempts"] for r in rows],
            "model": [model] * len(rows),
            "compressed_reasoning": [r["text"] for r in rows],
            "compressed_tokens": [r["tokens"] for r in rows],
            "original_tokens": [r["reasoning_tokens"] for r in rows],
            "deviation": [r["dev"] for r in rows],
            "within_tolerance": [r["error"] is None and _within(r["dev"], cfg.tolerance, cfg.one_sided) for r in rows],
            "predicted_answer": preds,
            "gold_answer": [r["gold_answer"] for r in rows],
            "answer_preserved": [verify(p, r["gold_answer"]) for p, r in zip(preds, rows)],
            "finish_reason": [r["finish_reason"] for r in rows],
            "error": [r["error"] for r in rows],
        }, schema_overrides={"error": pl.Utf8, "predicted_answer": pl.Utf8})
        out = out.with_columns((pl.col("compressed_tokens") / pl.col("original_tokens")).alias("ratio"))
        failed = out.filter(pl.col("error").is_not_null())
        return ShardResult(
            kept=out.filter(pl.col("error").is_null()).drop("error"),
            excluded=concat_excluded(too_short, excluded_rows(failed, "llm_error", pl.col("error"))),
            counters={"retried_requests": retried,
                      "needed_retry": int((out["attempts"] > 1).sum())},
        )

    def run(self, ctx) -> None:
        run_sharded(ctx, self.table, self.inputs(ctx), lambda shard, i: self.process_shard(ctx, shard, i),
                    ctx.recipe.shard_size, stage=self)
