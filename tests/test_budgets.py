"""Budget schedules (all modes) and budget-fidelity arithmetic, on exact numbers."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from bard_data.budget.fidelity import corrected_target, deviation_expr, within_tolerance_expr
from bard_data.budget.schedule import schedule_budgets
from bard_data.config.budget import BudgetScheduleConfig


def chains(lengths: dict[str, int]) -> pl.DataFrame:
    return pl.DataFrame({"sample_id": list(lengths), "reasoning_tokens": list(lengths.values())})


def budgets_of(out: pl.DataFrame, sid: str) -> list[int]:
    return out.filter(pl.col("sample_id") == sid).sort("budget_rank")["budget"].to_list()


def check_invariants(out: pl.DataFrame, lengths: dict[str, int], cfg: BudgetScheduleConfig) -> None:
    assert out.columns == ["sample_id", "group_id", "budget_rank", "budget"]
    assert out.schema["budget"] == pl.Int64
    for sid, g in out.group_by("sample_id"):
        sid = sid[0]
        g = g.sort("budget_rank")
        assert g["budget_rank"].to_list() == list(range(g.height))
        b = g["budget"].to_list()
        assert all(cfg.floor <= x < lengths[sid] for x in b)
        assert all(b2 >= b1 * (1 + cfg.min_spacing) for b1, b2 in zip(b, b[1:]))
        assert g["group_id"].unique().to_list() == ["g-" + hashlib.sha1(sid.encode()).hexdigest()[:16]]


def test_fractions_exact():
    lengths = {"a": 1000, "b": 100, "c": 40, "d": 130, "e": 32}
    cfg = BudgetScheduleConfig()  # fractions 0.25/0.5/0.75, floor 32, spacing 0.15
    out = schedule_budgets(chains(lengths), cfg, seed=0)
    assert budgets_of(out, "a") == [250, 500, 750]
    assert budgets_of(out, "b") == [50, 75]  # 25 < floor
    assert budgets_of(out, "c") == []  # 10, 20, 30 all below the floor: too short to compress
    assert budgets_of(out, "d") == [33, 65, 98]  # 32.5 -> 33, 97.5 -> 98 (half away from zero)
    assert budgets_of(out, "e") == []
    assert out.height == 8
    check_invariants(out, lengths, cfg)


def test_fractions_round_to_and_spacing():
    cfg = BudgetScheduleConfig(fractions=[0.5, 0.55, 0.9], round_to=50, floor=50)
    out = schedule_budgets(chains({"a": 1000, "b": 180}), cfg, seed=0)
    # 500, 550 (>= 500*1.15 = 575? no: dropped), 900
    assert budgets_of(out, "a") == [500, 900]
    # 90 -> 100, 99 -> 100 (duplicate), 162 -> 150: 100 kept, 150 >= 115 kept
    assert budgets_of(out, "b") == [100, 150]
    check_invariants(out, {"a": 1000, "b": 180}, cfg)


def test_fixed_levels_bounds_and_spacing():
    cfg = BudgetScheduleConfig(mode="fixed", levels=[64, 128, 140, 256, 512, 1024])
    lengths = {"long": 5000, "mid": 300, "short": 100, "tiny": 60, "exact": 512}
    out = schedule_budgets(chains(lengths), cfg, seed=0)
    assert budgets_of(out, "long") == [64, 128, 256, 512, 1024]  # 140 < 128 * 1.15
    assert budgets_of(out, "mid") == [64, 128, 256]
    assert budgets_of(out, "short") == [64]
    assert budgets_of(out, "tiny") == []
    assert budgets_of(out, "exact") == [64, 128, 256]  # a budget equal to the length is not a compression
    check_invariants(out, lengths, cfg)


def test_floor_applies_to_fixed_levels():
    cfg = BudgetScheduleConfig(mode="fixed", levels=[16, 64, 128], floor=64)
    assert budgets_of(schedule_budgets(chains({"a": 1000}), cfg, 0), "a") == [64, 128]


def _many_chains(n: int = 400) -> dict[str, int]:
    rng = np.random.default_rng(7)
    lengths = np.exp(rng.uniform(np.log(20), np.log(20000), n)).astype(int)
    return {f"s{i:04d}": int(x) for i, x in enumerate(lengths)}


def test_log_uniform_invariants_and_seeds():
    lengths = _many_chains()
    cfg = BudgetScheduleConfig(mode="log_uniform", per_chain=3, floor=32, min_spacing=0.15)
    df = chains(lengths)
    a = schedule_budgets(df, cfg, seed=1)
    check_invariants(a, lengths, cfg)
    per = a.group_by("sample_id").len()
    assert per["len"].max() <= 3
    # Long chains (room for three well-spaced budgets) nearly always get all three.
    long_ids = [s for s, L in lengths.items() if L > 2000]
    full = per.filter(pl.col("sample_id").is_in(long_ids) & (pl.col("len") == 3)).height
    assert full == len(long_ids)
    # Chains at or below the floor get nothing.
    assert not set(a["sample_id"]) & {s for s, L in lengths.items() if L <= 32}

    # Same seed: same output; shuffled rows: same output; another seed: different budgets.
    assert schedule_budgets(df, cfg, seed=1).equals(a)
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=3)
    assert schedule_budgets(shuffled, cfg, seed=1).equals(a)
    b = schedule_budgets(df, cfg, seed=2)
    assert not b.equals(a)
    check_invariants(b, lengths, cfg)
    # Per chain seeding: a chain's budgets do not depend on the other chains in the frame.
    sub = schedule_budgets(df.filter(pl.col("sample_id").is_in(["s0001", "s0002"])), cfg, seed=1)
    assert sub.equals(a.filter(pl.col("sample_id").is_in(["s0001", "s0002"])))


def test_log_uniform_is_log_uniform():
    # One huge chain drawn many times (distinct ids): budgets spread evenly in log space.
    lengths = {f"x{i}": 32 * 2**10 for i in range(3000)}
    cfg = BudgetScheduleConfig(mode="log_uniform", per_chain=1, floor=32, min_spacing=0.0)
    out = schedule_budgets(chains(lengths), cfg, seed=0)
    assert out.height == 3000
    logs = np.log2(out["budget"].to_numpy() / 32)  # uniform on [0, 10)
    hist, _ = np.histogram(logs, bins=10, range=(0, 10))
    assert hist.min() > 240 and hist.max() < 360


def test_fractions_and_fixed_row_order_independent():
    lengths = _many_chains(200)
    df = chains(lengths)
    for cfg in (BudgetScheduleConfig(), BudgetScheduleConfig(mode="fixed", levels=[100, 200, 400, 800])):
        a = schedule_budgets(df, cfg, seed=0)
        assert schedule_budgets(df.reverse(), cfg, seed=99).equals(a)  # the seed only matters for log_uniform
        check_invariants(a, lengths, cfg)


def test_empty_and_null_input():
    cfg = BudgetScheduleConfig()
    empty = schedule_budgets(pl.DataFrame(schema={"sample_id": pl.Utf8, "reasoning_tokens": pl.Int64}), cfg, 0)
    assert empty.height == 0 and empty.columns == ["sample_id", "group_id", "budget_rank", "budget"]
    out = schedule_budgets(pl.DataFrame({"sample_id": ["a", "b"], "reasoning_tokens": [None, 1000]}), cfg, 0)
    assert out["sample_id"].unique().to_list() == ["b"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fractions": [0.5, 1.0]},
        {"fractions": [0.0, 0.5]},
        {"fractions": []},
        {"mode": "fixed"},
        {"mode": "fixed", "levels": [256, 128]},
        {"mode": "fixed", "levels": [0, 128]},
        {"floor": 0},
        {"per_chain": 0},
        {"round_to": 0},
        {"min_spacing": -0.1},
        {"unknown_key": 1},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValidationError):
        BudgetScheduleConfig(**kwargs)


def test_fractions_sorted():
    assert BudgetScheduleConfig(fractions=[0.75, 0.25]).fractions == [0.25, 0.75]


def test_deviation_and_tolerance_exact():
    df = pl.DataFrame(
        {
            "compressed_tokens": [110, 90, 115, 80, 100, 130, 0],
            "budget": [100, 100, 100, 100, 100, 100, 50],
        }
    )
    out = df.with_columns(
        deviation_expr(),
        within_tolerance_expr(0.1, one_sided=False).alias("two"),
        within_tolerance_expr(0.1, one_sided=True).alias("one"),
        within_tolerance_expr(0.15, one_sided=False).alias("two15"),
    )
    assert out["deviation"].to_list() == [0.1, -0.1, 0.15, -0.2, 0.0, 0.3, -1.0]
    assert out["two"].to_list() == [True, True, False, False, True, False, False]
    assert out["one"].to_list() == [True, True, False, True, True, False, True]
    assert out["two15"].to_list() == [True, True, True, False, True, False, False]


def test_deviation_custom_columns_and_nulls():
    df = pl.DataFrame({"n": [300, None], "b": [200, 200]})
    out = df.select(deviation_expr("n", "b"), within_tolerance_expr(0.5, False, "n", "b"))
    assert out["deviation"].to_list() == [0.5, None]
    assert out["within_tolerance"].to_list() == [True, None]


def test_corrected_target():
    # 20% over: ask for 1/1.2 of the last target.
    assert corrected_target(100, 120, 100) == 83
    # Under: ask for more.
    assert corrected_target(100, 50, 100) == 200
    # Compounds from the last target, not the budget.
    assert corrected_target(1000, 1100, 800) == 727
    # Clamped to [0.25x, 4x] of the budget.
    assert corrected_target(100, 1000, 100) == 25
    assert corrected_target(100, 10, 100) == 400
    assert corrected_target(100, 0, 100) == 400  # empty output counts as 1 token
    # At least 1.
    assert corrected_target(1, 100, 1) == 1
    assert corrected_target(100, 100, 100) == 100
    with pytest.raises(ValueError):
        corrected_target(0, 10, 10)


def test_problem_budgets_do_not_depend_on_how_many_problems_are_scheduled_at_once(monkeypatch):
    from bard_data.budget import schedule

    rng = np.random.default_rng(3)
    lengths = pl.DataFrame({"problem_id": [f"p{i:05d}" for i in range(3000)],
                            "reasoning_tokens": rng.integers(10, 20000, size=3000)})
    cfg = BudgetScheduleConfig()
    whole = schedule.problem_budgets(lengths, cfg, seed=5)
    monkeypatch.setattr(schedule, "_PICK_ROWS", 257)
    sliced = schedule.problem_budgets(lengths, cfg, seed=5)
    assert sliced.equals(whole) and whole.height == 3000
    assert whole["budget"].n_unique() > 100
