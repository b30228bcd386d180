"""Compression stage: rewrite each gold chain to several budgets b1 < b2 < ... (one contrastive
group per chain), measure the result in student tokens, retry misses with a corrected target."""

from __future__ import annotations

import polars as pl

from bard_data.budget.fidelity import corrected_target, deviation, within_tolerance
from bard_data.budget.schedule import schedule_budgets
from bard_data.config.stages import CompressionConfig
from bard_data.config.think_tags import THINK, ThinkTags
from bard_data.llm.base import ChatRequest, chat_messages
from bard_data.pipeline.stage import ShardedStage, ShardResult, concat_excluded, excluded_rows
from bard_data.text.answers import extract_answer, verify
from bard_data.text.ids import content_id
from bard_data.text.reasoning import split_reasoning
from bard_data.text.templates import render


def _compressed_reasoning(text: str, tags: ThinkTags = THINK) -> str:
    """The compressed reasoning in a compressor's output: its think block when it wrote one (in the
    recipe's convention), else the whole text."""
    reasoning, response, closed = split_reasoning(text, tags.open, tags.close, (tags.answer_open, tags.answer_close))
    if closed or reasoning:
        return reasoning
    return (text or "").strip()


def _empty_compressions(shard: pl.DataFrame) -> pl.DataFrame:
    """The compressions table with no rows, typed as ``process_shard`` writes it."""
    src = shard.schema
    own = {"compression_id": pl.Utf8, "sample_id": src["sample_id"], "problem_id": src["problem_id"],
           "group_id": src["group_id"], "budget_rank": src["budget_rank"], "budget": src["budget"],
           "target_tokens": src["budget"], "attempts": pl.Int64, "model": pl.Utf8, "compressed_reasoning": pl.Utf8,
           "compressed_tokens": pl.Int64, "reasoning_tokens": src["reasoning_tokens"], "deviation": pl.Float64,
           "within_tolerance": pl.Boolean, "predicted_answer": pl.Utf8, "gold_answer": src["gold_answer"],
           "answer_preserved": pl.Boolean, "finish_reason": pl.Utf8, "ratio": pl.Float64}
    return pl.DataFrame(schema=own)


def next_attempt(r: dict, tol: float, one_sided: bool) -> dict | None:
    """After attempt ``r`` (a row ``_attempt`` returned): the row's next attempt, with a target
    corrected from the miss (a failed call keeps its target), or None when it met the budget."""
    if r["error"] is None and within_tolerance(r["dev"], tol, one_sided):
        return None
    tgt = corrected_target(r["budget"], r["compressed_tokens"], r["target"]) if r["error"] is None else r["target"]
    return {**r, "target": tgt, "attempts": r["attempts"] + 1}


class CompressStage(ShardedStage):
    name = "compressions"
    reads = ("gold_chains",)
    sections = ("compression", "budget", "student")

    def enabled(self, recipe) -> bool:
        return recipe.compression is not None

    def inputs(self, ctx) -> pl.DataFrame:
        cfg: CompressionConfig = ctx.recipe.compression
        gold = ctx.store.read("gold_chains")
        sched = schedule_budgets(gold.select("sample_id", "reasoning_tokens"), cfg.budgets, cfg.seed)
        # A left join keeps chains that got no budget (too short) as rows with a null budget, so
        # the shard loop records them in the funnel instead of losing them.
        todo = gold.join(sched, on="sample_id", how="left").sort("sample_id", "budget_rank", nulls_last=True)
        return todo.with_row_index("_idx")

    def planned_requests(self, shard: pl.DataFrame) -> int:
        return shard.height - shard["budget"].null_count()  # first attempts; a chain too short gets none

    def _attempt(self, ctx, cfg: CompressionConfig, rows: list[dict], llm) -> list[dict]:
        """One generation round for ``rows``, measured in student tokens."""
        reqs = []
        for r in rows:
            user = render(cfg.prompt_template, question=r["question"], reasoning=r["reasoning"], answer=r["gold_answer"],
                          budget=r["budget"], target=r["target"], reasoning_tokens=r["reasoning_tokens"],
                          original_tokens=r["reasoning_tokens"])
            # The attempt number is the sample index: a retry whose target happens to equal an
            # earlier one is still a new request, not a cache hit of the miss.
            reqs.append(ChatRequest.of(chat_messages(cfg.system_prompt, user), r["attempts"]))
        outs = llm.generate(reqs, cfg.sampling, cfg.seed)
        tags = ctx.recipe.student.think_tags
        texts = [_compressed_reasoning(o.text, tags) if o.ok else "" for o in outs]
        counts = ctx.count_tokens(texts)
        res = []
        for r, o, t, n in zip(rows, outs, texts, counts):
            res.append({**r, "text": t, "compressed_tokens": n, "dev": deviation(n, r["budget"]), "error": o.error,
                        "finish_reason": o.finish_reason})
        return res

    def process_shard(self, ctx, shard: pl.DataFrame, i: int) -> ShardResult:
        cfg: CompressionConfig = ctx.recipe.compression
        tol, one_sided = ctx.recipe.budget.tolerance, ctx.recipe.budget.one_sided
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
                again = next_attempt(r, tol, one_sided)
                if again is not None:
                    nxt.append(again)
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
            "compressed_tokens": [r["compressed_tokens"] for r in rows],
            "reasoning_tokens": [r["reasoning_tokens"] for r in rows],
            "deviation": [r["dev"] for r in rows],
            "within_tolerance": [r["error"] is None and within_tolerance(r["dev"], tol, one_sided) for r in rows],
            "predicted_answer": preds,
            "gold_answer": [r["gold_answer"] for r in rows],
            "answer_preserved": [verify(p, r["gold_answer"]) for p, r in zip(preds, rows)],
            "finish_reason": [r["finish_reason"] for r in rows],
            "error": [r["error"] for r in rows],
        }, schema_overrides={"error": pl.Utf8, "predicted_answer": pl.Utf8})
        out = out.with_columns((pl.col("compressed_tokens") / pl.col("reasoning_tokens")).alias("ratio"))
        failed = out.filter(pl.col("error").is_not_null())
        return ShardResult(
            kept=out.filter(pl.col("error").is_null()).drop("error"),
            excluded=concat_excluded(too_short, excluded_rows(failed, "llm_error", pl.col("error"))),
            counters={"retried_requests": retried,
                      "needed_retry": int((out["attempts"] > 1).sum())},
        )
