"""Gold chains: the verified-correct teacher traces kept for compression, and pass rates.

Reads sampled (``teacher_samples``) and imported (``imported_samples``) traces alike. The pass
rate of a problem (correct / samples) is the RL stage's difficulty signal.
"""

from __future__ import annotations

import polars as pl

from bard_data.stages.base import ShardResult, Stage, concat_excluded, excluded_rows

GOLD_COLUMNS = [
    "sample_id", "problem_id", "source", "origin", "model", "question", "gold_answer",
    "reasoning", "response", "predicted_answer", "reasoning_tokens", "n_samples", "n_correct", "pass_rate",
]
SAMPLE_TABLES = ("teacher_samples", "imported_samples")


def all_samples(store) -> pl.DataFrame:
    frames = [store.read(t) for t in SAMPLE_TABLES if store.exists(t)]
    if not frames:
        raise FileNotFoundError("no teacher samples: enable the teacher or list traces in the recipe")
    return pl.concat(frames, how="diagonal_relaxed")


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


class GoldStage(Stage):
    table = "gold_chains"
    requires = ("problems",)

    def run(self, ctx) -> None:
        t = ctx.recipe.teacher
        policy = t.gold_policy if t else "shortest"
        res = select_gold(
            all_samples(ctx.store), ctx.store.read("problems"), policy,
            t.min_reasoning_tokens if t else 1, t.max_reasoning_tokens if t else None,
        )
        ctx.store.write_table(self.table, res.kept, res.excluded, res.funnel(self.table, 0, res.rows_in))
