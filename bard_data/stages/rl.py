"""The ``rl`` table: GRPO prompts with a thinking budget, the gold answer (``solution``) and the
teacher pass rate (``difficulty``).

Budgets (``format.rl.budget_from``):

- ``schedule`` (default): the compression budget schedule applied to the problem's reference
  reasoning length, one of the resulting budgets picked by a keyed draw on the problem id (stable
  across reruns and shard sizes; see ``budget.schedule.problem_budgets``). The reference length
  is the problem's shortest gold chain; a problem without one takes the median reasoning length
  of its own teacher samples (right or wrong), and one without samples the median of all gold
  chains. So a GSM8K problem gets a GSM8K-sized budget, not one drawn from the whole range.
- ``balance_bins``: a bin drawn from the balance target, then log-uniform inside it, both keyed
  by the problem id (the global distribution of the SFT data, whatever the problem).
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import polars as pl

from bard_data.budget.keyed import stable_hash64, uniform01
from bard_data.budget.schedule import problem_budgets
from bard_data.budget.statement import messages_column
from bard_data.config.budget import BudgetScheduleConfig
from bard_data.config.stages import FormatConfig
from bard_data.pipeline.stage import ShardResult, Stage, excluded_rows
from bard_data.stages.gold import all_samples, pass_rates

log = logging.getLogger(__name__)


def bin_budgets(problem_ids: pl.Series, balance: pl.DataFrame, seed: int) -> pl.Series:
    """``balance_bins``: a bin drawn from the target weights, then log-uniform inside it; each
    draw keyed by the problem id."""
    keys = stable_hash64(problem_ids)
    w = balance["target"].to_numpy().astype(float)
    cdf = np.cumsum(w / w.sum())
    bins = np.minimum(np.searchsorted(cdf, uniform01(keys, seed, 1), side="right"), len(w) - 1)
    lo = np.log(balance["lo"].to_numpy().astype(float))[bins]
    hi = np.log(balance["hi"].to_numpy().astype(float))[bins]
    b = np.exp(lo + (hi - lo) * uniform01(keys, seed, 2))
    return pl.Series("budget", np.maximum(1, b.astype(np.int64)), dtype=pl.Int64)


def reference_lengths(problem_ids: pl.Series, gold: pl.DataFrame, samples: pl.DataFrame) -> pl.DataFrame:
    """Per problem: its shortest gold chain's reasoning_tokens, else the median over its teacher
    samples, else the median over all gold chains (see the module docstring)."""
    own = gold.group_by("problem_id").agg(pl.col("reasoning_tokens").min().alias("_g"))
    tried = samples.group_by("problem_id").agg(pl.col("reasoning_tokens").median().round().alias("_s"))
    overall = gold["reasoning_tokens"].median() if gold.height else None
    if overall is None and samples.height:
        overall = samples["reasoning_tokens"].median()
    df = pl.DataFrame({"problem_id": problem_ids}).join(own, on="problem_id", how="left").join(
        tried, on="problem_id", how="left")
    return df.select("problem_id", pl.coalesce("_g", "_s", pl.lit(overall)).cast(pl.Int64).alias("reasoning_tokens"))


class RLStage(Stage):
    name = "rl"
    reads = ("problems", "teacher_samples", "imported_samples", "gold_chains")
    sections = ("format.budget_template", "format.budget_placement", "format.question_template",
                "format.system_prompt", "format.rl", "compression.budgets", "seed")

    def reads_for(self, recipe) -> tuple[str, ...]:
        return self.reads + (("sft",) if recipe.format.rl.budget_from == "balance_bins" else ())

    def run(self, ctx) -> Iterator[ShardResult]:
        r = ctx.recipe
        fmt: FormatConfig = r.format
        store = ctx.store
        problems = store.read("problems").sort("problem_id")
        samples = all_samples(store, columns=["problem_id", "is_correct", "reasoning_tokens"])  # not the text
        rates = pass_rates(samples).select("problem_id", pl.col("pass_rate").alias("difficulty"))
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
        df = df.with_columns(self._budgets(ctx, df["problem_id"], samples))
        rl = df.with_columns(
            messages_column(fmt, df["question"], df["budget"]).alias("prompt"),
            pl.col("answer").alias("solution"),
        ).select("prompt", "budget", "solution", "difficulty", "source", "problem_id", "split")
        yield ShardResult(kept=rl, excluded=dropped, rows_in=problems.height)

    @staticmethod
    def _budgets(ctx, problem_ids: pl.Series, samples: pl.DataFrame) -> pl.Series:
        r, store = ctx.recipe, ctx.store
        if r.format.rl.budget_from == "balance_bins":
            bins = store.read("balance") if store.exists("balance") else pl.DataFrame()
            if bins.height and bins["target"].sum() > 0:
                return bin_budgets(problem_ids, bins, r.seed)
            log.warning("rl: no balance bins (no compressions were balanced); budgets come from the schedule")
        schedule = r.compression.budgets if r.compression is not None else BudgetScheduleConfig()
        gold = store.read("gold_chains", columns=["problem_id", "reasoning_tokens"]) \
            if store.exists("gold_chains") else pl.DataFrame(schema={"problem_id": pl.Utf8, "reasoning_tokens": pl.Int64})
        lengths = reference_lengths(problem_ids, gold, samples)
        return problem_budgets(lengths, schedule, r.seed)["budget"]
