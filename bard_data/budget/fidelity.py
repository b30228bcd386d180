"""Budget fidelity, defined once: how far a reasoning length n is from its budget b.

- deviation d = (n - b) / b (signed; relative, so a budget of 500 and one of 8000 compare);
- within tolerance: |d| <= tolerance (two-sided) or d <= tolerance (one-sided: thinking less
  than the budget is never a miss);
- R_bud, the budget reward: 1 within the tolerance; beyond it, with excess = d' - tolerance
  (d' = max(d, 0) one-sided, |d| two-sided), ``linear``: max(0, 1 - alpha * excess),
  ``exp``: exp(-alpha * excess);
- the fidelity metrics of a batch (what the eval reports and GRPO logs).

The compression stage (its retries and its ``within_tolerance`` column), the SFT filter, the
card, the reward and the eval all call these; ``tolerance`` and ``one_sided`` come from the
recipe's ``budget`` section (``BudgetConfig``) and travel with the published dataset.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import polars as pl

__all__ = [
    "deviation",
    "within_tolerance",
    "deviation_expr",
    "within_tolerance_expr",
    "r_bud",
    "fidelity_metrics",
    "corrected_target",
]

# Deviations are ratios of integers: a length exactly at the tolerance must count as within it
# whatever the float rounding of (n - b) / b.
EPS = 1e-12


def deviation(reasoning_tokens: int, budget: int) -> float:
    """(n - b) / b."""
    return (reasoning_tokens - budget) / budget


def within_tolerance(dev: float, tolerance: float, one_sided: bool) -> bool:
    return dev <= tolerance + EPS if one_sided else abs(dev) <= tolerance + EPS


def deviation_expr(tokens_col: str = "compressed_tokens", budget_col: str = "budget") -> pl.Expr:
    """``deviation`` over columns (Float64; null where either is null)."""
    t = pl.col(tokens_col).cast(pl.Float64)
    b = pl.col(budget_col).cast(pl.Float64)
    return ((t - b) / b).alias("deviation")


def within_tolerance_expr(tolerance: float, one_sided: bool, tokens_col: str = "compressed_tokens",
                          budget_col: str = "budget") -> pl.Expr:
    """``within_tolerance`` over columns (Boolean; null where either is null)."""
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    d = deviation_expr(tokens_col, budget_col)
    ok = d <= tolerance + EPS if one_sided else d.abs() <= tolerance + EPS
    return ok.alias("within_tolerance")


def r_bud(reasoning_tokens: int, budget: Optional[int], tolerance: float, one_sided: bool,
          alpha: float = 1.0, shape: Literal["linear", "exp"] = "linear") -> float:
    """R_bud for one completion (see the module docstring). ``budget`` None means no budget was
    stated: no constraint, 1.0 (a row whose budget cannot be found is the caller's error)."""
    if budget is None:
        return 1.0
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    d = deviation(reasoning_tokens, budget)
    d = max(d, 0.0) if one_sided else abs(d)
    if d <= tolerance + EPS:
        return 1.0
    excess = d - tolerance
    if shape == "linear":
        return max(0.0, 1.0 - alpha * excess)
    return math.exp(-alpha * excess)


def fidelity_metrics(reasoning_tokens: Sequence[int], budgets: Sequence[Optional[int]], tolerance: float,
                     one_sided: bool, closed: Optional[Sequence[bool]] = None) -> dict[str, float]:
    """Budget fidelity of a batch, over the rows with a budget:

    - ``deviation_mean``: mean |d|; ``deviation_signed_mean``: mean d
    - ``within_tolerance``: share within the tolerance (``within_tolerance``, with ``one_sided``)
    - ``overshoot``: share with d > tolerance; ``undershoot``: share with -d > tolerance
    - ``reasoning_tokens_mean`` (all rows), ``think_closed`` (share of closed think blocks, all rows)

    Rates are NaN when no row has a budget.
    """
    lengths, budgets = list(reasoning_tokens), list(budgets)
    if len(budgets) != len(lengths):
        raise ValueError(f"{len(budgets)} budgets for {len(lengths)} lengths")
    devs = [deviation(n, b) for n, b in zip(lengths, budgets) if b is not None and b > 0]
    nan = float("nan")
    k = len(devs)
    return {
        "deviation_mean": sum(abs(d) for d in devs) / k if k else nan,
        "deviation_signed_mean": sum(devs) / k if k else nan,
        "within_tolerance": sum(within_tolerance(d, tolerance, one_sided) for d in devs) / k if k else nan,
        "overshoot": sum(d > tolerance + EPS for d in devs) / k if k else nan,
        "undershoot": sum(-d > tolerance + EPS for d in devs) / k if k else nan,
        "reasoning_tokens_mean": sum(lengths) / len(lengths) if lengths else nan,
        "think_closed": (sum(bool(c) for c in closed) / len(closed)) if closed is not None and len(closed) else nan,
    }


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
