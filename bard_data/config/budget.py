"""The budget: how fidelity to it is judged, how budgets are scheduled per chain, and how the
budget distribution is balanced."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from bard_data.config.base import Strict


class BudgetConfig(Strict):
    """Budget fidelity, defined once: a length n meets budget b when its relative deviation
    d = (n - b) / b satisfies |d| <= tolerance (two-sided) or d <= tolerance (one-sided: only
    overshoot counts). The compression stage's retries and ``within_tolerance``, the SFT filter,
    the data card, the GRPO reward and the eval all use this definition; the value is written
    into the published dataset, and the reward and the eval default to it."""

    tolerance: float = Field(0.2, ge=0, description="relative deviation |n-b|/b (or (n-b)/b, one-sided) still within the budget")
    one_sided: bool = Field(False, description="only overshoot counts as a miss")


class BudgetScheduleConfig(Strict):
    """How many budgets each gold chain is compressed to, and which."""

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


class BalanceConfig(Strict):
    """Target budget distribution of the budget-aware rows, and the standard-chain mix."""

    edges: list[int] | None = Field(
        None,
        description="Explicit bin edges in tokens, strictly increasing (k+1 edges make k bins; the last bin is "
        "closed). Rows outside [edges[0], edges[-1]] are dropped as `outside_bins`. Default: log-spaced bins.",
    )
    n_bins: int = Field(8, ge=1, le=1000, description="Number of log-spaced bins when `edges` is not given.")
    min_budget: int | None = Field(
        None, gt=0, description="Lower end of the log-spaced bins (default: the smallest budget in the data)."
    )
    max_budget: int | None = Field(
        None, gt=0, description="Upper end of the log-spaced bins (default: the largest budget in the data)."
    )
    target: Literal["uniform"] | dict[str, float] = Field(
        "uniform",
        description="Target share per bin: 'uniform', or weights by bin label (e.g. {'[32,64)': 1.0, ...}); "
        "weights are normalised; bins left out get weight 0.",
    )
    total: int | None = Field(
        None,
        ge=1,
        description="Budget-aware rows to keep. Default: the largest draw that meets the target exactly with every "
        "bin within its capacity (its rows; times `max_upsample` when upsampling). If a bin cannot fill its "
        "share of an explicit total, it gives all it has and the rest goes to the other bins pro rata.",
    )
    upsample: bool = Field(False, description="Repeat rows of thin bins (up to `max_upsample` x) to meet the target.")
    max_upsample: float = Field(
        2.0, ge=1.0, description="Cap on upsampling: a bin holds at most this many times its distinct rows."
    )
    keep_groups: bool = Field(
        False,
        description="Select whole contrastive groups (`group_id`: all budgets of one chain) rather than rows; "
        "reaches a higher TV than row-level selection, which the report states.",
    )
    standard_ratio: float = Field(
        0.9,
        ge=0.0,
        description="Standard (no-budget) chains mixed in per kept budget-aware row (the paper: ~350K standard to "
        "~390K budget-aware).",
    )

    @field_validator("edges")
    @classmethod
    def _edges_ok(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError("edges need at least two values (one bin)")
        if any(e < 0 for e in v):
            raise ValueError("edges must be >= 0")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("edges must be strictly increasing")
        return v

    @field_validator("target")
    @classmethod
    def _target_ok(cls, v):
        if isinstance(v, dict):
            if not v:
                raise ValueError("target weights must not be empty")
            if any((not math.isfinite(w)) or w < 0 for w in v.values()):
                raise ValueError("target weights must be finite and >= 0")
            if sum(v.values()) <= 0:
                raise ValueError("target weights must not all be 0")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "BalanceConfig":
        if self.min_budget is not None and self.max_budget is not None and self.max_budget <= self.min_budget:
            raise ValueError("max_budget must be greater than min_budget")
        if self.keep_groups and self.upsample:
            raise ValueError("keep_groups and upsample cannot both be on (whole groups are not repeated)")
        return self
