"""The two training tables: ``sft`` (filtered, balanced, mixed with standard chains, in TRL's
conversational format) and ``rl`` (GRPO prompts with a budget, the gold answer and difficulty)."""

from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import polars as pl
from pydantic import Field

from bard_data.llm.config import Strict
from bard_data.prompts import render
from bard_data.reasoning import format_think
from bard_data.stages.base import ShardResult, Stage, concat_excluded, excluded_rows

DEFAULT_BUDGET_TEMPLATE = "Thinking budget: {{ budget }} tokens."
DEFAULT_QUESTION_TEMPLATE = "{{ question }}\n\nPlease reason step by step, and put your final answer within \\boxed{}."


class RLConfig(Strict):
    difficulty_min: float = Field(0.0, ge=0, le=1, description="keep prompts with teacher pass rate >= this")
    difficulty_max: float = Field(1.0, ge=0, le=1, description="... and <= this (the paper drops trivial ones)")
    keep_unknown_difficulty: bool = Field(True, description="problems with no teacher samples (no pass rate)")


class FormatConfig(Strict):
    budget_template: str = Field(DEFAULT_BUDGET_TEMPLATE, description="jinja2 with `budget`: how the budget is stated")
    budget_placement: Literal["system", "user_prefix", "user_suffix"] = "system"
    question_template: str = Field(DEFAULT_QUESTION_TEMPLATE, description="jinja2 with `question`")
    system_prompt: Optional[str] = Field(None, description="a system prompt for every row (the budget line is appended)")
    require_within_tolerance: bool = Field(True, description="drop compressions that missed the budget tolerance (over_budget)")
    rl: RLConfig = Field(default_factory=RLConfig)


def prompt_messages(cfg: FormatConfig, question: str, budget: Optional[int]) -> list[dict[str, str]]:
    user = render(cfg.question_template, question=question)
    system = cfg.system_prompt
    if budget is not None:
        line = render(cfg.budget_template, budget=int(budget))
        if cfg.budget_placement == "system":
            system = f"{system}\n{line}" if system else line
        elif cfg.budget_placement == "user_prefix":
            user = f"{line}\n\n{user}"
        else:
            user = f"{user}\n\n{line}"
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _messages_column(cfg, questions, budgets, reasonings=None, responses=None) -> pl.Series:
    rows = []
    for i, (q, b) in enumerate(zip(questions, budgets)):
        msgs = prompt_messages(cfg, q, b)
        if reasonings is not None:
            msgs = msgs + [{"role": "assistant", "content": format_think(reasonings[i], responses[i])}]
        rows.append(msgs)
    return pl.Series(rows, dtype=pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8})))


def filter_compressions(comps: pl.DataFrame, judgments: Optional[pl.DataFrame], require_within: bool):
    """Keep compressions that preserved the answer, met the budget and passed the judge."""
    excluded = []
    bad = comps.filter(~pl.col("answer_preserved"))
    excluded.append(excluded_rows(bad, "answer_changed", pl.format("predicted {} gold {}", "predicted_answer", "gold_answer")))
    comps = comps.filter(pl.col("answer_preserved"))
    if require_within:
        bad = comps.filter(~pl.col("within_tolerance"))
        excluded.append(excluded_rows(bad, "over_budget", pl.format("deviation {}", pl.col("deviation").round(3))))
        comps = comps.filter(pl.col("within_tolerance"))
    if judgments is not None:
        j = judgments.select("compression_id", "verdict", "score", "parse_error")
        comps = comps.join(j, on="compression_id", how="left")
        reason = (
            pl.when(pl.col("verdict").is_null()).then(pl.lit("judge_error"))
            .when(pl.col("verdict") == "unparsable").then(pl.lit("judge_unparsable"))
            .when(pl.col("verdict") != "pass").then(pl.lit("judge_rejected"))
        )
        comps = comps.with_columns(reason.alias("_r"))
        excluded.append(excluded_rows(comps.filter(pl.col("_r").is_not_null()), pl.col("_r"),
                                      pl.format("verdict {} score {}", "verdict", "score")).drop("_r"))
        comps = comps.filter(pl.col("_r").is_null()).drop("_r", "verdict", "score", "parse_error")
    return comps, concat_excluded(*excluded)


class SFTStage(Stage):
    table = "sft"
    requires = ("gold_chains",)

    def run(self, ctx) -> None:
        from bard_data.balance import assign_bins, balance, mix_standard

        r = ctx.recipe
        fmt: FormatConfig = r.format
        gold = ctx.store.read("gold_chains")
        have_comps = r.compression is not None and ctx.store.exists("compressions")
        comps = ctx.store.read("compressions") if have_comps else pl.DataFrame()
        rows_in = comps.height + gold.height
        judgments = ctx.store.read("judgments") if r.judge is not None and ctx.store.exists("judgments") else None
        excluded = []
        budget_rows = pl.DataFrame()
        report: dict = {}
        if comps.height:
            comps, ex = filter_compressions(comps, judgments, fmt.require_within_tolerance)
            excluded.append(ex)
            kept, dropped, report = balance(comps, r.balance, r.seed)
            excluded.append(dropped)
            kept = kept.join(gold.select("sample_id", "question", "response", "source"), on="sample_id", how="left")
            budget_rows = kept.with_columns(
                _messages_column(fmt, kept["question"].to_list(), kept["budget"].to_list(),
                                 kept["compressed_reasoning"].to_list(), kept["response"].to_list()).alias("messages"),
                pl.lit("budget").alias("kind"),
            )
        n_budget = budget_rows.height
        std, std_dropped = mix_standard(n_budget, gold, r.balance.standard_ratio, r.seed) if n_budget else (gold, None)
        excluded.append(std_dropped)
        std_rows = std.with_columns(
            _messages_column(fmt, std["question"].to_list(), [None] * std.height,
                             std["reasoning"].to_list(), std["response"].to_list()).alias("messages"),
            pl.lit("standard").alias("kind"),
            pl.lit(None, pl.Int64).alias("budget"),
            pl.lit(None, pl.Utf8).alias("budget_bin"),
            pl.lit(None, pl.Utf8).alias("compression_id"),
            pl.lit(None, pl.Utf8).alias("group_id"),
        )
        if "copy_index" not in budget_rows.columns and budget_rows.height:
            budget_rows = budget_rows.with_columns(pl.lit(0).alias("copy_index"))
        std_rows = std_rows.with_columns(pl.lit(0).alias("copy_index"))
        # Upsampled copies share a compression_id; copy_index tells them apart.
        cols = ["messages", "budget", "budget_bin", "kind", "problem_id", "source", "sample_id", "compression_id", "group_id", "copy_index"]
        frames = [f.select(cols) for f in (budget_rows, std_rows) if f.height]
        sft = pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame(schema={c: pl.Utf8 for c in cols})
        sft = sft.with_columns(pl.col("budget").cast(pl.Int64))
        added = int(budget_rows["copy_index"].gt(0).sum()) if "copy_index" in budget_rows.columns else 0
        res = ShardResult(kept=sft, excluded=concat_excluded(*excluded), rows_in=rows_in, added=added)
        ctx.store.write_table(self.table, res.kept, res.excluded, res.funnel(self.table, 0, rows_in),
                              info={"balance": report})


def sample_rl_budgets(problem_ids: list[str], edges: list[int], weights: list[float], seed: int) -> list[int]:
    """A budget per prompt: a bin drawn from the target weights, then log-uniform inside it."""
    if len(edges) < 2:
        return [int(edges[0]) if edges else 512] * len(problem_ids)
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=float)
    w = w / w.sum()
    bins = rng.choice(len(w), size=len(problem_ids), p=w)
    u = rng.random(len(problem_ids))
    lo = np.log(np.asarray(edges[:-1], dtype=float))[bins]
    hi = np.log(np.asarray(edges[1:], dtype=float))[bins]
    return [max(1, int(math.exp(a + (b - a) * x))) for a, b, x in zip(lo, hi, u)]


class RLStage(Stage):
    table = "rl"
    requires = ("problems", "sft")

    def run(self, ctx) -> None:
        from bard_data.stages.gold import all_samples, pass_rates

        r = ctx.recipe
        fmt: FormatConfig = r.format
        problems = ctx.store.read("problems").sort("problem_id")
        rates = pass_rates(all_samples(ctx.store)).select("problem_id", pl.col("pass_rate").alias("difficulty"))
        df = problems.join(rates, on="problem_id", how="left")
        d = pl.col("difficulty")
        reason = (
            pl.when(d.is_null()).then(pl.lit(None if fmt.rl.keep_unknown_difficulty else "no_teacher_samples"))
            .when(d < fmt.rl.difficulty_min).then(pl.lit("too_hard"))
            .when(d > fmt.rl.difficulty_max).then(pl.lit("too_easy"))
        )
        df = df.with_columns(reason.alias("_r"))
        dropped = excluded_rows(df.filter(pl.col("_r").is_not_null()), pl.col("_r"), pl.format("pass rate {}", d)).drop("_r")
        df = df.filter(pl.col("_r").is_null()).drop("_r")
        report = ctx.store.done_info("sft").get("balance") or {}
        edges = report.get("edges") or [r.compression.budgets.floor if r.compression else 64, 4096]
        target = report.get("target") or {}
        # The target dict is keyed by bin label in bin order (see balance.balance).
        weights = list(target.values())
        if len(weights) != len(edges) - 1:
            weights = [1.0] * (len(edges) - 1)
        budgets = sample_rl_budgets(df["problem_id"].to_list(), edges, weights, r.seed)
        rl = df.with_columns(pl.Series("budget", budgets, dtype=pl.Int64)).with_columns(
            _messages_column(fmt, df["question"].to_list(), budgets).alias("prompt"),
            pl.col("answer").alias("solution"),
        ).select("prompt", "budget", "solution", "difficulty", "source", "problem_id", "split")
        res = ShardResult(kept=rl, excluded=dropped, rows_in=problems.height)
        ctx.store.write_table(self.table, res.kept, res.excluded, res.funnel(self.table, 0, problems.height))
