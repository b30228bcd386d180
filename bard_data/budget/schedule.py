"""Budget schedules for multi-budget contrastive compression.

Every gold chain (one teacher sample) gets m budgets b_0 < b_1 < ... < b_{m-1}, all below the
chain's own reasoning length (compressing to at least the original length is meaningless) and at
or above a floor. The chain's rows form one contrastive group (``group_id``), so the student sees
how the same chain shrinks as the budget shrinks.

Everything here is pure (no LLM) and vectorised over Polars frames. Random choices (the
``log_uniform`` mode) are drawn from a counter-based generator keyed by ``seed`` and a stable hash
of ``sample_id``: the output does not depend on row order, Polars version or process.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import polars as pl

from bard_data.budget.keyed import stable_hash64, uniform01
from bard_data.config.budget import BudgetScheduleConfig
from bard_data.errors import DataError

__all__ = ["schedule_budgets", "group_id_for", "problem_budgets"]


def group_id_for(sample_id: str) -> str:
    """The contrastive group of a chain: ``"g-" + sha1(sample_id)[:16]``."""
    return "g-" + hashlib.sha1(str(sample_id).encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Scheduling
# --------------------------------------------------------------------------------------------

_OUT_SCHEMA = {"sample_id": pl.Utf8, "group_id": pl.Utf8, "budget_rank": pl.Int32, "budget": pl.Int64}


def _round_expr(e: pl.Expr, round_to: int) -> pl.Expr:
    """Nearest multiple of round_to, halves up (budgets are positive; no reliance on a Polars
    rounding-mode argument, which older Polars lacks)."""
    if round_to == 1:
        return (e + 0.5).floor().cast(pl.Int64)
    return (((e / round_to) + 0.5).floor() * round_to).cast(pl.Int64)


def _greedy_spacing(long: pl.DataFrame, min_spacing: float) -> pl.DataFrame:
    """Keep budgets ascending per ``_key``; drop any below previous_kept * (1 + min_spacing).

    ``long`` has ``_key`` (chain/draw key) and ``budget`` (already in bounds). Vectorised over chains:
    the loop runs over budget positions (a handful), not rows.
    """
    if long.height == 0:
        return long.with_columns(pl.lit(True).alias("_kept"))
    long = long.sort(["_key", "budget"]).with_columns(pl.int_range(pl.len()).over("_key").alias("_pos"))
    width = int(long["_pos"].max()) + 1
    wide = long.pivot(on="_pos", index="_key", values="budget", sort_columns=True)
    cols = [str(i) for i in range(width)]
    factor = 1.0 + min_spacing
    # Sequential over positions; each step is one vectorised expression over all chains.
    frame = wide.with_columns(
        pl.col(cols[0]).is_not_null().alias("k0"), pl.col(cols[0]).cast(pl.Float64).alias("_last")
    )
    for i, c in enumerate(cols[1:], start=1):
        b = pl.col(c).cast(pl.Float64)
        frame = frame.with_columns(
            (b.is_not_null() & (b >= pl.col("_last") * factor - 1e-9)).fill_null(False).alias(f"k{i}")
        ).with_columns(pl.when(pl.col(f"k{i}")).then(b).otherwise(pl.col("_last")).alias("_last"))
    flags = frame.select(["_key"] + [f"k{i}" for i in range(width)]).unpivot(
        index="_key", variable_name="_pos", value_name="_kept"
    )
    flags = flags.with_columns(pl.col("_pos").str.slice(1).cast(pl.Int64))
    return long.with_columns(pl.col("_pos").cast(pl.Int64)).join(flags, on=["_key", "_pos"], how="left").drop("_pos")


def _chains_frame(chains: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in ("sample_id", "reasoning_tokens") if c not in chains.columns]
    if missing:
        raise DataError(f"schedule_budgets: input lacks column(s) {', '.join(missing)}")
    df = (
        chains.select(pl.col("sample_id").cast(pl.Utf8), pl.col("reasoning_tokens").cast(pl.Int64))
        .filter(pl.col("sample_id").is_not_null())
        .unique()
    )
    dup = df.group_by("sample_id").len().filter(pl.col("len") > 1)
    if dup.height:
        raise DataError(
            f"schedule_budgets: sample_id {dup['sample_id'].sort()[0]!r} appears with different reasoning_tokens"
        )
    return df


def schedule_budgets(chains: pl.DataFrame, cfg: BudgetScheduleConfig, seed: int) -> pl.DataFrame:
    """One row per (chain, budget): ``sample_id, group_id, budget_rank, budget``.

    Budgets satisfy ``floor <= budget < reasoning_tokens`` and the relative spacing; ranks are
    0..m-1 ascending after the drops. Chains left with no budget have no rows (the caller records
    them as ``too_short_to_compress``). The output is sorted by (sample_id, budget_rank) and does
    not depend on the input's row order.
    """
    df = _chains_frame(chains)
    if df.height == 0:
        return pl.DataFrame(schema=_OUT_SCHEMA)
    df = df.filter(pl.col("reasoning_tokens").is_not_null() & (pl.col("reasoning_tokens") > cfg.floor))
    if df.height == 0:
        return pl.DataFrame(schema=_OUT_SCHEMA)

    in_bounds = (pl.col("budget") >= cfg.floor) & (pl.col("budget") < pl.col("reasoning_tokens"))

    if cfg.mode == "fixed":
        levels = pl.DataFrame({"budget": [int(x) for x in cfg.levels]}, schema={"budget": pl.Int64})
        long = df.join(levels.with_columns(_round_expr(pl.col("budget"), cfg.round_to)), how="cross")
        long = long.filter(in_bounds).unique(["sample_id", "budget"]).with_columns(pl.col("sample_id").alias("_key"))
        spaced = _greedy_spacing(long, cfg.min_spacing).filter(pl.col("_kept"))
    elif cfg.mode == "fractions":
        fr = pl.DataFrame({"_frac": [float(f) for f in cfg.fractions]})
        long = df.join(fr, how="cross").with_columns(
            _round_expr(pl.col("reasoning_tokens") * pl.col("_frac"), cfg.round_to).alias("budget")
        )
        long = long.filter(in_bounds).unique(["sample_id", "budget"]).with_columns(pl.col("sample_id").alias("_key"))
        spaced = _greedy_spacing(long.drop("_frac"), cfg.min_spacing).filter(pl.col("_kept"))
    else:
        spaced = _log_uniform(df, cfg, seed)

    out = (
        spaced.select("sample_id", "budget")
        .sort(["sample_id", "budget"])
        .with_columns(pl.int_range(pl.len()).over("sample_id").cast(pl.Int32).alias("budget_rank"))
    )
    gids = out.select("sample_id").unique()
    gids = gids.with_columns(
        pl.Series("group_id", [group_id_for(s) for s in gids["sample_id"].to_list()], dtype=pl.Utf8)
    )
    return out.join(gids, on="sample_id", how="left").select(
        pl.col("sample_id"), pl.col("group_id"), pl.col("budget_rank"), pl.col("budget").cast(pl.Int64)
    ).sort(["sample_id", "budget_rank"])


def _log_uniform(df: pl.DataFrame, cfg: BudgetScheduleConfig, seed: int) -> pl.DataFrame:
    """Draw ``per_chain`` budgets log-uniform in [floor, length) per chain; up to ``max_resamples``
    draws, the first fully spaced draw wins, else the draw keeping the most budgets (ties: earliest).

    Draw d is made only for the chains that no earlier draw spaced fully (a later draw could not
    win over a full one), so most chains cost one draw instead of ``max_resamples``; every draw is
    keyed by (chain, draw, slot), so the result is the one all draws at once would give."""
    m, r = cfg.per_chain, cfg.max_resamples
    keys = stable_hash64(df["sample_id"])
    length_all = df["reasoning_tokens"].to_numpy().astype(np.float64)
    lo = math.log(cfg.floor)
    active = np.arange(df.height)
    spaced_draws, per_draws = [], []
    for d in range(r):
        if not len(active):
            break
        chain_idx = np.repeat(active, m)
        slot = np.tile(np.arange(m), len(active))
        u = uniform01(keys[chain_idx], seed, d * m + slot)
        length = length_all[chain_idx]
        vals = np.exp(lo + u * (np.log(length) - lo))
        long = pl.DataFrame(
            {"_chain": chain_idx.astype(np.int64), "_draw": np.full(len(chain_idx), d, dtype=np.int64),
             "budget_f": vals, "reasoning_tokens": length.astype(np.int64)}
        ).with_columns(_round_expr(pl.col("budget_f"), cfg.round_to).alias("budget"))
        long = (
            long.filter((pl.col("budget") >= cfg.floor) & (pl.col("budget") < pl.col("reasoning_tokens")))
            .unique(["_chain", "_draw", "budget"])
            .with_columns((pl.col("_chain") * r + pl.col("_draw")).alias("_key"))
        )
        spaced = _greedy_spacing(long.select("_chain", "_draw", "_key", "budget"), cfg.min_spacing)
        per_draw = spaced.group_by("_chain", "_draw").agg(pl.col("_kept").sum().alias("n_kept"))
        spaced_draws.append(spaced)
        per_draws.append(per_draw)
        full = per_draw.filter(pl.col("n_kept") >= m)["_chain"].to_numpy()
        active = np.setdiff1d(active, full, assume_unique=True)
    if not spaced_draws:
        return pl.DataFrame(schema={"sample_id": pl.Utf8, "budget": pl.Int64})
    spaced = pl.concat(spaced_draws)
    per_draw = pl.concat(per_draws)
    # Any draw with m kept budgets is fully spaced; otherwise take the draw keeping the most.
    best = per_draw.sort(["_chain", "n_kept", "_draw"], descending=[False, True, False]).unique(
        "_chain", keep="first"
    )
    chosen = spaced.join(best.select("_chain", "_draw"), on=["_chain", "_draw"], how="inner").filter(pl.col("_kept"))
    ids = df.select("sample_id").with_row_index("_chain").with_columns(pl.col("_chain").cast(pl.Int64))
    return chosen.join(ids, on="_chain", how="left").select("sample_id", "budget")


# The keyed draw that picks one of a problem's scheduled budgets (a counter no other draw uses).
_PICK_COUNTER = 1 << 20
# Problems scheduled at once by problem_budgets (its result does not depend on the slicing).
_PICK_ROWS = 1 << 16


def problem_budgets(lengths: pl.DataFrame, cfg: BudgetScheduleConfig, seed: int) -> pl.DataFrame:
    """One budget per problem, for RL prompts: the schedule applied to the problem's reference
    reasoning length, as if it were one chain (keyed by ``problem_id``), then one of its budgets
    picked by a keyed draw on the problem id. A length that leaves no budget (at or below the
    floor) gets the floor.

    ``lengths``: ``problem_id, reasoning_tokens``; returns ``problem_id, budget`` in its order.
    The result does not depend on row order, shard size or the other problems.
    """
    df = lengths.select(pl.col("problem_id").cast(pl.Utf8), pl.col("reasoning_tokens").cast(pl.Int64))
    if df.height > _PICK_ROWS:  # the draws take tens of rows per problem: a slice of problems at a time
        return pl.concat([problem_budgets(df.slice(i, _PICK_ROWS), cfg, seed)
                          for i in range(0, df.height, _PICK_ROWS)])
    sched = schedule_budgets(df.rename({"problem_id": "sample_id"}), cfg, seed)
    grouped = sched.group_by("sample_id").agg(pl.col("budget").sort()).rename({"sample_id": "problem_id"})
    out = df.join(grouped, on="problem_id", how="left", maintain_order="left")
    u = pl.Series(uniform01(stable_hash64(out["problem_id"]), seed, _PICK_COUNTER))
    n = out["budget"].list.len().fill_null(0)
    pick = (u * n).floor().cast(pl.Int64)
    chosen = out["budget"].list.get(pick.clip(0, None), null_on_oob=True)
    return pl.DataFrame({"problem_id": out["problem_id"],
                         "budget": chosen.fill_null(cfg.floor).cast(pl.Int64)})
