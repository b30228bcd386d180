"""Budget schedules for multi-budget contrastive compression, and budget-fidelity arithmetic.

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
from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bard_data.errors import DataError

__all__ = [
    "BudgetScheduleConfig",
    "schedule_budgets",
    "group_id_for",
    "deviation_expr",
    "within_tolerance_expr",
    "corrected_target",
    "stable_hash64",
    "uniform01",
]

_U64 = np.uint64
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------
# Deterministic randomness (shared with balance.py)
# --------------------------------------------------------------------------------------------


def stable_hash64(values: list[str] | pl.Series) -> np.ndarray:
    """A 64-bit key per string (first 8 bytes of blake2b), stable across processes and versions."""
    vals = values.to_list() if isinstance(values, pl.Series) else list(values)
    out = np.empty(len(vals), dtype=_U64)
    for i, v in enumerate(vals):
        out[i] = int.from_bytes(hashlib.blake2b(str(v).encode("utf-8"), digest_size=8).digest(), "little")
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x + _U64(0x9E3779B97F4A7C15)).astype(_U64)
        z = ((z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)).astype(_U64)
        z = ((z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)).astype(_U64)
        return (z ^ (z >> _U64(31))).astype(_U64)


def uniform01(keys: np.ndarray, seed: int, counter: np.ndarray | int = 0) -> np.ndarray:
    """Uniform floats in [0, 1), one per key, a pure function of (key, seed, counter)."""
    keys = np.asarray(keys, dtype=_U64)
    with np.errstate(over="ignore"):
        s = _splitmix64(np.full(1, int(seed) & _MASK64, dtype=_U64))[0]
        c = np.asarray(counter, dtype=np.int64).astype(_U64)
        x = _splitmix64(keys ^ s)
        x = _splitmix64((x + c * _U64(0xD1B54A32D192ED03)).astype(_U64))
    return (x >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def group_id_for(sample_id: str) -> str:
    """The contrastive group of a chain: ``"g-" + sha1(sample_id)[:16]``."""
    return "g-" + hashlib.sha1(str(sample_id).encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class BudgetScheduleConfig(BaseModel):
    """How many budgets each gold chain is compressed to, and which."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["fixed", "fractions", "log_uniform"] = Field(
        "fractions",
        description="fixed: the same absolute `levels` for every chain (those below its length); "
        "fractions: `fractions` of the chain's own reasoning length; log_uniform: `per_chain` budgets "
        "drawn log-uniformly in [floor, length), seeded per chain.",
    )
    levels: list[int] = Field(
        default_factory=list,
        description="Absolute budgets in tokens for mode=fixed, strictly increasing (e.g. [256, 512, 1024]).",
    )
    fractions: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        description="For mode=fractions: budgets as fractions of the chain's reasoning length, each in (0, 1).",
    )
    per_chain: int = Field(3, ge=1, le=64, description="For mode=log_uniform: budgets drawn per chain (m).")
    floor: int = Field(32, gt=0, description="Minimum budget in tokens (all modes); smaller budgets are dropped.")
    min_spacing: float = Field(
        0.15,
        ge=0.0,
        description="Relative spacing: consecutive budgets of one chain satisfy b[i+1] >= b[i] * (1 + min_spacing); "
        "budgets too close to the previous kept one are dropped (greedy, ascending).",
    )
    round_to: int = Field(1, ge=1, description="Budgets are rounded to the nearest multiple of this many tokens.")
    max_resamples: int = Field(
        8,
        ge=1,
        le=256,
        description="For mode=log_uniform: draws of the m budgets tried per chain until one satisfies the spacing; "
        "if none does, the draw keeping the most budgets is used and the violating budgets are dropped.",
    )

    @field_validator("levels")
    @classmethod
    def _levels_ok(cls, v: list[int]) -> list[int]:
        if any(b <= 0 for b in v):
            raise ValueError("levels must be positive token counts")
        if any(b2 <= b1 for b1, b2 in zip(v, v[1:])):
            raise ValueError("levels must be strictly increasing")
        return v

    @field_validator("fractions")
    @classmethod
    def _fractions_ok(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("fractions must not be empty")
        if any(not (0.0 < f < 1.0) for f in v):
            raise ValueError("fractions must each lie in (0, 1)")
        if len(set(v)) != len(v):
            raise ValueError("fractions must be distinct")
        return sorted(v)

    @model_validator(mode="after")
    def _mode_needs(self) -> "BudgetScheduleConfig":
        if self.mode == "fixed" and not self.levels:
            raise ValueError("mode=fixed needs `levels` (e.g. [256, 512, 1024])")
        return self


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
    draws, the first fully spaced draw wins, else the draw keeping the most budgets (ties: earliest)."""
    m, r = cfg.per_chain, cfg.max_resamples
    keys = stable_hash64(df["sample_id"])
    n = df.height
    chain_idx = np.repeat(np.arange(n), r * m)
    draw = np.tile(np.repeat(np.arange(r), m), n)
    slot = np.tile(np.arange(m), n * r)
    u = uniform01(keys[chain_idx], seed, draw * m + slot)
    length = df["reasoning_tokens"].to_numpy().astype(np.float64)[chain_idx]
    lo = math.log(cfg.floor)
    vals = np.exp(lo + u * (np.log(length) - lo))
    long = pl.DataFrame(
        {
            "_chain": chain_idx.astype(np.int64),
            "_draw": draw.astype(np.int64),
            "budget_f": vals,
            "reasoning_tokens": length.astype(np.int64),
        }
    ).with_columns(_round_expr(pl.col("budget_f"), cfg.round_to).alias("budget"))
    long = (
        long.filter((pl.col("budget") >= cfg.floor) & (pl.col("budget") < pl.col("reasoning_tokens")))
        .unique(["_chain", "_draw", "budget"])
        .with_columns((pl.col("_chain") * r + pl.col("_draw")).alias("_key"))
    )
    spaced = _greedy_spacing(long.select("_chain", "_draw", "_key", "budget"), cfg.min_spacing)
    per_draw = spaced.group_by("_chain", "_draw").agg(pl.col("_kept").sum().alias("n_kept"))
    # Any draw with m kept budgets is fully spaced; otherwise take the draw keeping the most.
    best = per_draw.sort(["_chain", "n_kept", "_draw"], descending=[False, True, False]).unique(
        "_chain", keep="first"
    )
    chosen = spaced.join(best.select("_chain", "_draw"), on=["_chain", "_draw"], how="inner").filter(pl.col("_kept"))
    ids = df.select("sample_id").with_row_index("_chain").with_columns(pl.col("_chain").cast(pl.Int64))
    return chosen.join(ids, on="_chain", how="left").select("sample_id", "budget")


# --------------------------------------------------------------------------------------------
# Fidelity arithmetic
# --------------------------------------------------------------------------------------------

_EPS = 1e-12


def deviation_expr(tokens_col: str = "compressed_tokens", budget_col: str = "budget") -> pl.Expr:
    """Relative deviation from the budget: (tokens - budget) / budget (Float64; null if either is)."""
    t = pl.col(tokens_col).cast(pl.Float64)
    b = pl.col(budget_col).cast(pl.Float64)
    return ((t - b) / b).alias("deviation")


def within_tolerance_expr(
    tolerance: float,
    one_sided: bool,
    tokens_col: str = "compressed_tokens",
    budget_col: str = "budget",
) -> pl.Expr:
    """Two-sided: |deviation| <= tolerance; one-sided (only overshoot counts): deviation <= tolerance."""
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    dev = deviation_expr(tokens_col, budget_col)
    ok = dev <= tolerance + _EPS if one_sided else dev.abs() <= tolerance + _EPS
    return ok.alias("within_tolerance")


def corrected_target(budget: int, observed_tokens: int, last_target: int) -> int:
    """The token target to ask for on a retry after a compression missed its budget.

    Scales the last target by budget / observed (a 20% overshoot asks for 1/1.2 of the last
    target), clamped to [0.25 x budget, 4 x budget] and to at least 1. An empty output
    (observed <= 0) counts as one token, i.e. asks for the upper clamp.
    """
    if budget <= 0:
        raise ValueError("budget must be positive")
    observed = max(int(observed_tokens), 1)
    last = max(int(last_target), 1)
    target = last * budget / observed
    target = min(max(target, 0.25 * budget), 4.0 * budget)
    return max(1, int(round(target)))
