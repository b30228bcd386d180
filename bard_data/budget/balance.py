"""Budget-distribution balancing: spread budget-aware rows over the budget range toward a target.

Budgets are binned (explicit edges, or ``n_bins`` log-spaced bins between the smallest and largest
budget); every bin gets a quota from the target distribution and the total, over-full bins are
downsampled, thin bins optionally upsampled (each row repeated at most ``max_upsample`` times).
``keep_groups`` selects whole contrastive groups (all budgets of one chain) instead of rows.

Bins are half-open ``[lo,hi)`` except the last, which is closed ``[lo,hi]`` (numpy.histogram's
convention), so computed edges that end at the largest budget still hold it.

Every random choice is a pure function of (seed, row id): results do not depend on row order.
Total variation: ``TV = 0.5 * sum_i |p_i - target_i|`` over bins.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from bard_data.budget.keyed import stable_hash64, uniform01
from bard_data.config.budget import BalanceConfig
from bard_data.errors import DataError, RecipeError

__all__ = [
    "bin_labels",
    "assign_bins",
    "compute_edges",
    "target_weights",
    "total_variation",
    "balance",
    "balance_table",
    "balance_report_empty",
    "mix_standard",
]

BALANCED_AWAY = "balanced_away"
OUTSIDE_BINS = "outside_bins"


# --------------------------------------------------------------------------------------------
# Bins
# --------------------------------------------------------------------------------------------


def bin_labels(edges: list[int]) -> list[str]:
    """Labels like ``"[32,64)"``; the last bin is closed: ``"[4096,8192]"``."""
    k = len(edges) - 1
    return [f"[{edges[i]},{edges[i + 1]}{']' if i == k - 1 else ')'}" for i in range(k)]


def assign_bins(df: pl.DataFrame, edges: list[int], col: str = "budget") -> pl.DataFrame:
    """Add ``bin_index`` (Int32) and ``budget_bin`` (label, Utf8); both null outside the edges."""
    labels = bin_labels(edges)
    x = pl.col(col)
    idx = pl.sum_horizontal([(x >= e).cast(pl.Int32) for e in edges[1:-1]]) if len(edges) > 2 else pl.lit(0)
    inside = (x >= edges[0]) & (x <= edges[-1])
    bin_index = pl.when(inside).then(idx).otherwise(None).cast(pl.Int32)
    df = df.with_columns(bin_index.alias("bin_index"))
    return df.with_columns(
        pl.col("bin_index")
        .replace_strict(list(range(len(labels))), labels, default=None, return_dtype=pl.Utf8)
        .alias("budget_bin")
    )


def compute_edges(budgets: pl.Series, cfg: BalanceConfig) -> list[int]:
    """The configured edges, or ``n_bins`` log-spaced integer edges from min to max budget
    (duplicates after rounding removed, so small ranges can give fewer bins)."""
    if cfg.edges is not None:
        return list(cfg.edges)
    vals = budgets.drop_nulls()
    if (cfg.min_budget is None or cfg.max_budget is None) and vals.len() == 0:
        raise DataError("balance: no budgets to derive bin edges from")
    lo = int(cfg.min_budget if cfg.min_budget is not None else vals.min())
    hi = int(cfg.max_budget if cfg.max_budget is not None else vals.max())
    if lo <= 0:
        raise DataError(f"balance: budgets must be positive for log-spaced bins (smallest is {lo})")
    if hi <= lo:
        return [lo, lo + 1]
    raw = np.geomspace(lo, hi, cfg.n_bins + 1)
    edges = [lo]
    for e in raw[1:-1]:
        e = int(round(float(e)))
        if edges[-1] < e < hi:
            edges.append(e)
    edges.append(hi)
    return edges


def target_weights(labels: list[str], target: str | dict[str, float]) -> list[float]:
    """Target shares per bin label (summing to 1)."""
    if target == "uniform":
        return [1.0 / len(labels)] * len(labels)
    assert isinstance(target, dict)
    unknown = [k for k in target if k not in labels]
    if unknown:
        raise RecipeError(f"balance.target: unknown bin label(s) {', '.join(unknown)}; bins are {', '.join(labels)}")
    w = [float(target.get(lab, 0.0)) for lab in labels]
    s = sum(w)
    if s <= 0:
        raise RecipeError("balance.target: weights of the bins sum to 0")
    return [x / s for x in w]


def total_variation(counts: list[int], target: list[float]) -> float:
    """0.5 * sum |count_i / total - target_i| (1.0 for no rows against a non-empty target)."""
    n = sum(counts)
    if n == 0:
        return 1.0 if sum(target) > 0 else 0.0
    return float(0.5 * sum(abs(c / n - float(t)) for c, t in zip(counts, target)))


# --------------------------------------------------------------------------------------------
# Quotas
# --------------------------------------------------------------------------------------------


def _default_total(cap: np.ndarray, p: np.ndarray) -> int:
    """Largest T with T * p'_i <= cap_i, p' the target renormalised over bins that have rows."""
    active = (p > 0) & (cap > 0)
    if not active.any():
        return 0
    pa = p[active] / p[active].sum()
    return int(math.floor(float(np.min(cap[active] / pa)) + 1e-9))


def _quotas(cap: np.ndarray, p: np.ndarray, total: int) -> np.ndarray:
    """Integer quotas summing to min(total, capacity): water-filling toward p (bins that cannot
    meet their share give all they have; the rest goes to the other bins pro rata), then
    largest-remainder rounding."""
    k = len(cap)
    q = np.zeros(k, dtype=np.int64)
    active = (p > 0) & (cap > 0)
    if not active.any() or total <= 0:
        return q
    if cap[active].sum() <= total:
        q[active] = cap[active]
        return q
    fixed = np.zeros(k, dtype=bool)
    while True:
        free = active & ~fixed
        remaining = total - int(q[fixed].sum())
        ideal = np.zeros(k)
        ideal[free] = remaining * p[free] / p[free].sum()
        over = free & (ideal >= cap)
        if not over.any():
            break
        q[over] = cap[over]
        fixed |= over
    base = np.floor(ideal[free] + 1e-9).astype(np.int64)
    q[free] = np.minimum(base, cap[free])
    short = total - int(q.sum())
    if short > 0:
        frac = np.where(free & (q < cap), ideal - q, -1.0)
        order = sorted(range(k), key=lambda i: (-frac[i], i))
        for i in order[:short]:
            if frac[i] >= 0:
                q[i] += 1
    return q


# --------------------------------------------------------------------------------------------
# Balancing
# --------------------------------------------------------------------------------------------


def _random_key(ids: pl.Series, seed: int) -> pl.Series:
    return pl.Series("_u", uniform01(stable_hash64(ids), seed), dtype=pl.Float64)


def _counts(frame: pl.DataFrame, k: int) -> list[int]:
    if frame.height == 0:
        return [0] * k
    vc = frame.group_by("bin_index").len()
    m = dict(zip(vc["bin_index"].to_list(), vc["len"].to_list()))
    return [int(m.get(i, 0)) for i in range(k)]


def _select_rows(binned: pl.DataFrame, q: np.ndarray, seed: int, id_col: str) -> pl.DataFrame:
    """Per bin, rank rows by a seeded hash of the id and give each row its number of copies."""
    quota = pl.DataFrame({"bin_index": np.arange(len(q), dtype=np.int32), "_q": q.astype(np.int64)})
    ranked = (
        binned.with_columns(_random_key(binned[id_col], seed))
        .sort(["bin_index", "_u", id_col])
        .with_columns(
            pl.int_range(pl.len()).over("bin_index").cast(pl.Int64).alias("_r"),
            pl.len().over("bin_index").cast(pl.Int64).alias("_n"),
        )
        .join(quota, on="bin_index", how="left")
    )
    copies = (pl.col("_q") // pl.col("_n")) + (pl.col("_r") < (pl.col("_q") % pl.col("_n"))).cast(pl.Int64)
    return ranked.with_columns(copies.alias("_copies")).drop("_u", "_r", "_n", "_q")


def _select_groups(binned: pl.DataFrame, q: np.ndarray, seed: int) -> set:
    """Greedy whole-group acceptance toward the quotas.

    Groups are visited scarcest-first: a group's priority is the largest quota/available ratio of the
    bins its rows fall in (groups holding rows of thin bins go first, before common bins fill up),
    ties broken by a seeded hash of group_id. A group is accepted when every bin it touches still
    has room for its rows; one pass, then a second pass that accepts a group when it fills more
    empty quota slots than it overflows.
    """
    k = len(q)
    n_avail = np.array(_counts(binned, k), dtype=np.float64)
    scarcity = np.where(n_avail > 0, q / np.maximum(n_avail, 1), 0.0)
    per = binned.group_by("group_id", "bin_index").len()
    groups = per.group_by("group_id").agg(pl.col("bin_index"), pl.col("len"))
    groups = groups.with_columns(_random_key(groups["group_id"], seed))
    prio = [max(scarcity[b] for b in bins) for bins in groups["bin_index"].to_list()]
    groups = groups.with_columns(pl.Series("_prio", prio, dtype=pl.Float64)).sort(
        ["_prio", "_u", "group_id"], descending=[True, False, False]
    )
    gids = groups["group_id"].to_list()
    bins_l = groups["bin_index"].to_list()
    lens_l = groups["len"].to_list()
    filled = np.zeros(k, dtype=np.int64)
    accepted = [False] * len(gids)
    for j, (bins, lens) in enumerate(zip(bins_l, lens_l)):
        if all(filled[b] + c <= q[b] for b, c in zip(bins, lens)):
            for b, c in zip(bins, lens):
                filled[b] += c
            accepted[j] = True
    for j, (bins, lens) in enumerate(zip(bins_l, lens_l)):
        if accepted[j]:
            continue
        gain = sum(min(c, max(int(q[b] - filled[b]), 0)) for b, c in zip(bins, lens))
        over = sum(lens) - gain
        if gain > over:
            for b, c in zip(bins, lens):
                filled[b] += c
            accepted[j] = True
    return {g for g, a in zip(gids, accepted) if a}


def balance(df: pl.DataFrame, cfg: BalanceConfig, seed: int) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Balance budget-aware rows toward the target bin distribution.

    ``df`` needs ``budget``, ``compression_id`` (unique) and, for ``keep_groups``, ``group_id``.
    Returns ``(kept, dropped, report)``: ``kept`` has the input columns plus ``budget_bin``,
    ``bin_index`` and ``copy_index`` (0 for the original, 1.. for upsampled repeats, which share
    the original's compression_id), sorted by (compression_id, copy_index); ``dropped`` has the
    input columns, ``budget_bin``, ``bin_index`` and ``reason`` (``balanced_away``, or
    ``outside_bins`` for rows outside explicit edges/min/max), so ``len(df) == kept originals +
    len(dropped)``. ``report``: edges, labels, before/after counts and target shares by label,
    tv_before, tv_after, and totals.
    """
    id_col = "compression_id"
    need = ["budget", id_col] + (["group_id"] if cfg.keep_groups else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"balance: input lacks column(s) {', '.join(missing)}")
    if df[id_col].is_duplicated().any():
        raise DataError(f"balance: {id_col} is not unique")
    for c in ("budget_bin", "bin_index", "copy_index", "reason"):
        if c in df.columns:
            df = df.drop(c)

    edges = compute_edges(df["budget"], cfg) if df.height or cfg.edges else []
    if not edges:
        empty_kept = df.with_columns(
            pl.lit(None, pl.Utf8).alias("budget_bin"), pl.lit(None, pl.Int32).alias("bin_index"),
            pl.lit(0, pl.Int32).alias("copy_index"),
        )
        return empty_kept, df.with_columns(pl.lit(None, pl.Utf8).alias("reason")), {
            **balance_report_empty(), "total_requested": cfg.total}
    labels = bin_labels(edges)
    k = len(labels)
    p = np.array(target_weights(labels, cfg.target))

    binned_all = assign_bins(df, edges)
    outside = binned_all.filter(pl.col("bin_index").is_null())
    binned = binned_all.filter(pl.col("bin_index").is_not_null())
    before = _counts(binned, k)
    n = np.array(before, dtype=np.int64)

    if cfg.keep_groups:
        cap = n.copy()
    elif cfg.upsample:
        cap = np.floor(n * cfg.max_upsample + 1e-9).astype(np.int64)
    else:
        cap = n.copy()
    total = cfg.total if cfg.total is not None else _default_total(cap, p)
    q = _quotas(cap, p, total)

    if cfg.keep_groups:
        chosen = _select_groups(binned, q, seed)
        sel = binned.with_columns(pl.col("group_id").is_in(list(chosen)).cast(pl.Int64).alias("_copies"))
    else:
        sel = _select_rows(binned, q, seed, id_col)

    kept = (
        sel.filter(pl.col("_copies") > 0)
        .with_columns(pl.int_ranges(0, pl.col("_copies"), dtype=pl.Int32).alias("copy_index"))
        .explode("copy_index")
        .drop("_copies")
        .sort([id_col, "copy_index"])
    )
    dropped_in = sel.filter(pl.col("_copies") == 0).drop("_copies").with_columns(
        pl.lit(BALANCED_AWAY).alias("reason")
    )
    dropped_out = outside.with_columns(pl.lit(OUTSIDE_BINS).alias("reason"))
    dropped = pl.concat([dropped_in, dropped_out], how="vertical_relaxed").sort(id_col)

    after = _counts(kept, k)
    report = {
        "edges": [int(e) for e in edges],
        "labels": labels,
        "before": dict(zip(labels, before)),
        "after": dict(zip(labels, after)),
        "target": dict(zip(labels, [float(x) for x in p])),
        "quota": dict(zip(labels, [int(x) for x in q])),
        "tv_before": float(total_variation(before, list(p))),
        "tv_after": float(total_variation(after, list(p))),
        "rows_in": df.height,
        "rows_kept": kept.height,
        "rows_upsampled": int(kept.filter(pl.col("copy_index") > 0).height),
        "outside_bins": outside.height,
        "total_requested": int(total),
        "keep_groups": cfg.keep_groups,
    }
    if cfg.keep_groups:
        report["groups_in"] = int(binned["group_id"].n_unique())
        report["groups_kept"] = int(kept["group_id"].n_unique())
    return kept, dropped, report


def mix_standard(
    budget_rows: int, standard: pl.DataFrame, ratio: float, seed: int, id_col: str | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Pick round(ratio * budget_rows) standard (no-budget) rows, all if fewer are available.

    Rows are chosen by a seeded hash of ``id_col`` (default: the first of sample_id,
    compression_id, problem_id, id present; else the row's JSON), so the choice does not depend on
    row order. Returns (kept, dropped with reason "balanced_away"), both sorted by that key.
    """
    if ratio < 0:
        raise ValueError("ratio must be >= 0")
    want = int(math.floor(ratio * budget_rows + 0.5))
    if id_col is None:
        id_col = next((c for c in ("sample_id", "compression_id", "problem_id", "id") if c in standard.columns), None)
    if id_col is not None and id_col not in standard.columns:
        raise DataError(f"mix_standard: standard rows lack column {id_col!r}")
    keys = standard[id_col].cast(pl.Utf8) if id_col else standard.select(pl.struct(pl.all()).struct.json_encode())
    if isinstance(keys, pl.DataFrame):
        keys = keys.to_series()
    u = pl.Series("_u", uniform01(stable_hash64(keys.fill_null("")), seed))
    tmp = standard.with_columns(u, keys.alias("_key")).sort(["_u", "_key"]).with_row_index("_r")
    kept = tmp.filter(pl.col("_r") < want).sort("_key").drop("_r", "_u", "_key")
    dropped = (
        tmp.filter(pl.col("_r") >= want)
        .sort("_key")
        .drop("_r", "_u", "_key")
        .with_columns(pl.lit(BALANCED_AWAY).alias("reason"))
    )
    return kept, dropped


def balance_report_empty() -> dict:
    return {"edges": [], "labels": [], "before": {}, "after": {}, "target": {}, "tv_before": 0.0, "tv_after": 0.0,
            "rows_in": 0, "rows_kept": 0, "rows_upsampled": 0, "outside_bins": 0, "total_requested": None}


BALANCE_SCHEMA = {"bin_index": pl.Int32, "bin": pl.Utf8, "lo": pl.Int64, "hi": pl.Int64, "before": pl.Int64,
                  "after": pl.Int64, "target": pl.Float64, "quota": pl.Int64}


def balance_table(report: dict) -> pl.DataFrame:
    """``balance``'s report as the ``balance`` table: one row per bin, in bin order (what the RL
    stage draws budgets from in ``balance_bins`` mode, and what the stats queries read)."""
    edges = [int(e) for e in report.get("edges") or []]
    if len(edges) < 2:
        return pl.DataFrame(schema=BALANCE_SCHEMA)
    labels = report.get("labels") or bin_labels(edges)
    rows = [{
        "bin_index": i, "bin": lab, "lo": edges[i], "hi": edges[i + 1],
        "before": int(report.get("before", {}).get(lab, 0)), "after": int(report.get("after", {}).get(lab, 0)),
        "target": float(report.get("target", {}).get(lab, 0.0)),
        "quota": int(report["quota"][lab]) if lab in (report.get("quota") or {}) else None,
    } for i, lab in enumerate(labels)]
    return pl.DataFrame(rows, schema=BALANCE_SCHEMA)
