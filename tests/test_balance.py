"""Budget-distribution balancing: TV toward the target, bookkeeping, determinism, groups, upsampling."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from bard_data.budget.balance import (
    assign_bins,
    balance,
    bin_labels,
    compute_edges,
    mix_standard,
    target_weights,
    total_variation,
)
from bard_data.config.budget import BalanceConfig
from bard_data.errors import RecipeError

POW2 = [64, 128, 256, 512, 1024, 2048, 4096, 8192]


@pytest.fixture(scope="module")
def skewed() -> pl.DataFrame:
    """100k budget-aware rows: chains with log-normal lengths, 3 budgets each (1/4, 1/2, 3/4)."""
    rng = np.random.default_rng(123)
    n = 100_000
    lengths = np.exp(rng.normal(np.log(2000), 1.0, n // 3 + 1))
    i = np.arange(n)
    budgets = np.maximum(np.rint(lengths[i // 3] * (0.25 * (1 + i % 3))), 1).astype(np.int64)
    return pl.DataFrame(
        {
            "compression_id": [f"c{k:06d}" for k in range(n)],
            "group_id": [f"g{k // 3:05d}" for k in range(n)],
            "budget": budgets,
        }
    )


def check_bookkeeping(df: pl.DataFrame, kept: pl.DataFrame, dropped: pl.DataFrame, report: dict) -> None:
    originals = kept.filter(pl.col("copy_index") == 0)
    assert originals["compression_id"].n_unique() == originals.height
    assert originals.height + dropped.height == df.height  # rows in = kept + dropped
    assert set(originals["compression_id"]) | set(dropped["compression_id"]) == set(df["compression_id"])
    assert not set(originals["compression_id"]) & set(dropped["compression_id"])
    assert sum(report["after"].values()) == kept.height == report["rows_kept"]
    assert sum(report["before"].values()) + report["outside_bins"] == df.height == report["rows_in"]
    assert set(dropped["reason"]) <= {"balanced_away", "outside_bins"}
    assert dropped.filter(pl.col("reason") == "outside_bins").height == report["outside_bins"]
    # Report counts agree with the kept rows' bins.
    counts = dict(kept.group_by("budget_bin").len().iter_rows())
    assert {k: v for k, v in report["after"].items() if v} == counts
    assert abs(sum(report["target"].values()) - 1.0) < 1e-12


def test_uniform_from_skewed(skewed):
    cfg = BalanceConfig(min_budget=64, max_budget=8192, n_bins=7)
    kept, dropped, report = balance(skewed, cfg, seed=0)
    assert report["edges"] == POW2
    assert report["tv_before"] > 0.2
    assert report["tv_after"] <= 0.05
    check_bookkeeping(skewed, kept, dropped, report)
    # The default total is the largest exact uniform draw: every bin gets the thinnest bin's count.
    thinnest = min(report["before"].values())
    assert set(report["after"].values()) == {thinnest}
    assert kept.height == 7 * thinnest > 5000
    assert kept["copy_index"].max() == 0
    print(f"\nuniform (7 log bins 64..8192): tv_before={report['tv_before']:.4f} tv_after={report['tv_after']:.4f}")


def test_default_edges_span_the_data(skewed):
    kept, dropped, report = balance(skewed, BalanceConfig(), seed=0)
    assert report["edges"][0] == skewed["budget"].min() and report["edges"][-1] == skewed["budget"].max()
    assert report["outside_bins"] == 0
    assert report["tv_after"] <= 0.05
    check_bookkeeping(skewed, kept, dropped, report)


def test_explicit_total_fills_thin_bins_then_spreads(skewed):
    cfg = BalanceConfig(edges=POW2, total=40_000)
    kept, dropped, report = balance(skewed, cfg, seed=0)
    check_bookkeeping(skewed, kept, dropped, report)
    assert kept.height == 40_000
    before, after = report["before"], report["after"]
    # Bins that cannot meet 1/7 of 40k give everything; the others share the rest evenly.
    full = [b for b in before if before[b] < 40_000 / 7]
    assert full and all(after[b] == before[b] for b in full)
    rest = [after[b] for b in before if b not in full]
    assert max(rest) - min(rest) <= 1
    assert report["tv_after"] == pytest.approx(total_variation(list(after.values()), [1 / 7] * 7))
    assert report["tv_after"] < report["tv_before"]
    print(f"\nexplicit total 40k: tv_before={report['tv_before']:.4f} tv_after={report['tv_after']:.4f}")


def test_quotas_exact_small():
    df = pl.DataFrame(
        {
            "compression_id": [f"c{i:04d}" for i in range(1210)],
            "budget": [40] * 10 + [80] * 200 + [100] * 1000,
        }
    )
    cfg = BalanceConfig(edges=[32, 64, 96, 128], total=300)
    kept, dropped, report = balance(df, cfg, seed=5)
    assert report["after"] == {"[32,64)": 10, "[64,96)": 145, "[96,128]": 145}
    assert dropped.height == 910
    # Total 600: the middle bin (200 rows) gives all it has; the last bin takes the rest.
    _, _, report = balance(df, cfg.model_copy(update={"total": 600}), seed=5)
    assert report["after"] == {"[32,64)": 10, "[64,96)": 200, "[96,128]": 390}
    # Weighted target.
    cfg = BalanceConfig(edges=[32, 64, 96, 128], target={"[64,96)": 1.0, "[96,128]": 3.0})
    kept, dropped, report = balance(df, cfg, seed=5)
    assert report["after"] == {"[32,64)": 0, "[64,96)": 200, "[96,128]": 600}
    assert report["target"] == {"[32,64)": 0.0, "[64,96)": 0.25, "[96,128]": 0.75}
    assert report["tv_after"] == 0.0


def test_deterministic_and_row_order_independent(skewed):
    cfg = BalanceConfig(edges=POW2)
    k1, d1, r1 = balance(skewed, cfg, seed=42)
    k2, d2, r2 = balance(skewed, cfg, seed=42)
    assert k1.equals(k2) and d1.equals(d2) and r1 == r2
    shuffled = skewed.sample(fraction=1.0, shuffle=True, seed=9)
    k3, d3, r3 = balance(shuffled, cfg, seed=42)
    assert k3.equals(k1) and d3.equals(d1) and r3 == r1
    k4, _, r4 = balance(skewed, cfg, seed=43)
    assert r4["after"] == r1["after"]  # same quotas
    assert set(k4["compression_id"]) != set(k1["compression_id"])  # other rows


def test_upsampling_respects_cap(skewed):
    cfg = BalanceConfig(edges=POW2, upsample=True, max_upsample=2.0)
    kept, dropped, report = balance(skewed, cfg, seed=1)
    check_bookkeeping(skewed, kept, dropped, report)
    before, after = report["before"], report["after"]
    thinnest = min(before, key=before.get)
    assert after[thinnest] == 2 * before[thinnest]  # the thinnest bin doubled, no more
    assert all(after[b] <= 2 * before[b] for b in before)
    assert report["tv_after"] <= 0.05
    copies = kept.group_by("compression_id").agg(pl.col("copy_index").sort())
    assert all(c == list(range(len(c))) for c in copies["copy_index"].to_list())
    assert copies["copy_index"].list.len().max() == 2
    assert report["rows_upsampled"] == kept.filter(pl.col("copy_index") > 0).height == before[thinnest]
    # A fractional cap: at most floor(n * 1.5) rows per bin, and the total target is reached exactly.
    cfg = BalanceConfig(edges=POW2, upsample=True, max_upsample=1.5, total=60_000)
    kept, dropped, report = balance(skewed, cfg, seed=1)
    check_bookkeeping(skewed, kept, dropped, report)
    assert all(report["after"][b] <= int(report["before"][b] * 1.5) for b in report["before"])
    assert kept.height == 60_000
    print(f"\nupsample x2: tv_after={balance(skewed, BalanceConfig(edges=POW2, upsample=True), 1)[2]['tv_after']:.4f}")


def test_keep_groups_whole(skewed):
    cfg = BalanceConfig(edges=POW2, keep_groups=True)
    kept, dropped, report = balance(skewed, cfg, seed=3)
    check_bookkeeping(skewed, kept, dropped, report)
    in_range = assign_bins(skewed, POW2).filter(pl.col("bin_index").is_not_null())
    sizes = dict(in_range.group_by("group_id").len().iter_rows())
    kept_sizes = dict(kept.group_by("group_id").len().iter_rows())
    assert kept_sizes and all(kept_sizes[g] == sizes[g] for g in kept_sizes)  # every kept group whole
    assert not set(kept_sizes) & set(dropped.filter(pl.col("reason") == "balanced_away")["group_id"])
    assert report["groups_kept"] == len(kept_sizes)
    assert report["tv_after"] < report["tv_before"]
    assert report["tv_after"] <= 0.1
    # Deterministic and row-order independent as well.
    k2, _, _ = balance(skewed.reverse(), cfg, seed=3)
    assert k2.equals(kept)
    print(f"\nkeep_groups: tv_before={report['tv_before']:.4f} tv_after={report['tv_after']:.4f}", report["groups_kept"])


def test_labels_and_bins():
    assert bin_labels([32, 64, 128]) == ["[32,64)", "[64,128]"]
    df = pl.DataFrame({"budget": [31, 32, 63, 64, 127, 128, 129, None]})
    out = assign_bins(df, [32, 64, 128])
    assert out["bin_index"].to_list() == [None, 0, 0, 1, 1, 1, None, None]
    assert out["budget_bin"].to_list() == [None, "[32,64)", "[32,64)", "[64,128]", "[64,128]", "[64,128]", None, None]
    assert assign_bins(pl.DataFrame({"b": [5, 10]}), [0, 10], col="b")["budget_bin"].to_list() == ["[0,10]"] * 2


def test_compute_edges():
    s = pl.Series([64, 100, 8192])
    assert compute_edges(s, BalanceConfig(n_bins=7)) == POW2
    assert compute_edges(s, BalanceConfig(edges=[1, 2, 3])) == [1, 2, 3]
    assert compute_edges(s, BalanceConfig(n_bins=2, min_budget=100, max_budget=400)) == [100, 200, 400]
    assert compute_edges(pl.Series([10, 12]), BalanceConfig(n_bins=8)) == [10, 11, 12]  # rounding merges edges
    assert compute_edges(pl.Series([50, 50]), BalanceConfig()) == [50, 51]


def test_target_weights():
    labels = ["[32,64)", "[64,128]"]
    assert target_weights(labels, "uniform") == [0.5, 0.5]
    assert target_weights(labels, {"[32,64)": 3, "[64,128]": 1}) == [0.75, 0.25]
    with pytest.raises(RecipeError, match=r"\[1,2\)"):
        target_weights(labels, {"[1,2)": 1.0})


def test_mix_standard():
    std = pl.DataFrame({"sample_id": [f"s{i:04d}" for i in range(1000)], "x": list(range(1000))})
    kept, dropped = mix_standard(500, std, 0.9, seed=0)
    assert kept.height == 450 and dropped.height == 550
    assert set(dropped["reason"]) == {"balanced_away"}
    assert kept.columns == ["sample_id", "x"]
    assert set(kept["sample_id"]).isdisjoint(dropped["sample_id"])
    k2, d2 = mix_standard(500, std.reverse(), 0.9, seed=0)
    assert k2.equals(kept) and d2.equals(dropped)
    k3, _ = mix_standard(500, std, 0.9, seed=1)
    assert set(k3["sample_id"]) != set(kept["sample_id"])
    all_kept, none_dropped = mix_standard(5000, std, 0.9, seed=0)
    assert all_kept.height == 1000 and none_dropped.height == 0
    assert mix_standard(5, std, 0.9, seed=0)[0].height == 5  # round(4.5) = 5, half up
    assert mix_standard(0, std, 0.9, seed=0)[0].height == 0


def test_empty_input():
    df = pl.DataFrame(schema={"compression_id": pl.Utf8, "group_id": pl.Utf8, "budget": pl.Int64})
    kept, dropped, report = balance(df, BalanceConfig(), seed=0)
    assert kept.height == 0 and dropped.height == 0 and report["rows_kept"] == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"edges": [64]},
        {"edges": [64, 64, 128]},
        {"keep_groups": True, "upsample": True},
        {"max_upsample": 0.5},
        {"target": {}},
        {"target": {"[1,2)": -1.0}},
        {"target": "zipf"},
        {"min_budget": 100, "max_budget": 50},
        {"n_bins": 0},
        {"total": 0},
        {"bins": 3},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValidationError):
        BalanceConfig(**kwargs)
