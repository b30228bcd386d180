"""Budget-grid evaluation on the tiny model: table schema, and every number recomputed from the
samples it was built from."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

BUDGETS = [4, 8, 16]
EVAL_COLUMNS = {
    "method": pl.Utf8, "budget": pl.Int64, "n": pl.Int64, "accuracy": pl.Float64,
    "reasoning_tokens_mean": pl.Float64, "reasoning_tokens_p50": pl.Float64, "reasoning_tokens_p90": pl.Float64,
    "deviation_mean": pl.Float64, "within_tolerance": pl.Float64, "overshoot": pl.Float64,
    "undershoot": pl.Float64, "think_closed": pl.Float64, "completion_tokens_mean": pl.Float64,
    "errors": pl.Int64, "spearman_length_budget": pl.Float64, "model": pl.Utf8, "data": pl.Utf8,
}


@pytest.fixture(scope="module")
def eval_run(tiny_model_dir, shared_data, tmp_path_factory):
    from trainers.evaluate import main

    out = tmp_path_factory.mktemp("eval") / "out"
    rc = main([
        "--model", str(tiny_model_dir), "--data", str(shared_data / "gsm8k" / "test.jsonl"),
        "--budgets", ",".join(map(str, BUDGETS)), "--backend", "transformers", "--out", str(out),
        "--limit", "3", "--max-tokens", "24", "--answer-tokens", "6", "--temperature", "1.0", "--seed", "1",
        "--tolerance", "0.1", "--one-sided", "false",
    ])
    assert rc == 0
    return out, pl.read_parquet(out / "eval.parquet"), pl.read_parquet(out / "samples.parquet")


def test_schema_and_files(eval_run):
    out, table, samples = eval_run
    assert dict(table.schema) == EVAL_COLUMNS
    assert table.height == 3 * len(BUDGETS)
    assert sorted(set(zip(table["method"], table["budget"]))) == sorted(
        (m, b) for m in ("budget", "no_budget", "truncation") for b in BUDGETS
    )
    assert samples.height == 3 * 3 * len(BUDGETS)
    assert (table["n"] == 3).all()
    for name in ("accuracy_vs_budget.png", "length_vs_budget.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # budget rows carry the budget in the prompt, the baselines do not
    assert (samples.filter(pl.col("method") == "budget")["prompt_budget"] == samples.filter(pl.col("method") == "budget")["budget"]).all()
    assert samples.filter(pl.col("method") != "budget")["prompt_budget"].is_null().all()
    assert samples["gold"].null_count() == 0  # GSM8K "#### N" normalized


def test_metrics_recomputed_from_samples(eval_run, tiny_model_dir):
    from scipy.stats import spearmanr
    from transformers import AutoTokenizer

    from bard_data.text.answers import extract_answer, verify

    _, table, samples = eval_run
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # reasoning length: tokens of the text inside <think> (to the end when unclosed)
    for text, n in zip(samples["completion"], samples["reasoning_tokens"]):
        head = text.split("</think>")[0].replace("<think>", "").strip()
        assert n == len(tok(head, add_special_tokens=False)["input_ids"])
    # correctness is R_acc
    for text, gold, ok in zip(samples["completion"], samples["gold"], samples["correct"]):
        pred = extract_answer(text)
        assert ok == (pred is not None and verify(pred, gold))
    for row in table.iter_rows(named=True):
        g = samples.filter((pl.col("method") == row["method"]) & (pl.col("budget") == row["budget"]))
        n = np.array(g["reasoning_tokens"].to_list(), dtype=float)
        b = row["budget"]
        dev = (n - b) / b
        assert row["accuracy"] == pytest.approx(float(np.mean(g["correct"].to_list())), abs=1e-12)
        assert row["reasoning_tokens_mean"] == pytest.approx(n.mean(), abs=1e-12)
        assert row["reasoning_tokens_p50"] == pytest.approx(np.median(n), abs=1e-12)
        assert row["reasoning_tokens_p90"] == pytest.approx(np.percentile(n, 90), abs=1e-12)
        assert row["deviation_mean"] == pytest.approx(np.abs(dev).mean(), abs=1e-12)
        assert row["within_tolerance"] == pytest.approx(np.mean(np.abs(dev) <= 0.1 + 1e-12), abs=1e-12)
        assert row["overshoot"] == pytest.approx(np.mean(dev > 0.1 + 1e-12), abs=1e-12)
        assert row["think_closed"] == pytest.approx(np.mean(g["think_closed"].to_list()), abs=1e-12)
    for method in ("budget", "no_budget", "truncation"):
        g = samples.filter(pl.col("method") == method)
        rho = table.filter(pl.col("method") == method)["spearman_length_budget"].unique().to_list()
        assert len(rho) == 1
        expected = spearmanr(g["reasoning_tokens"].to_list(), g["budget"].to_list()).statistic
        if math.isnan(expected):
            assert math.isnan(rho[0])
        else:
            assert rho[0] == pytest.approx(expected, abs=1e-12)


def test_baselines_are_consistent(eval_run):
    _, table, samples = eval_run
    nb = samples.filter(pl.col("method") == "no_budget")
    # one generation per problem, scored at every budget
    assert nb.group_by("problem_id").agg(pl.col("completion").n_unique())["completion"].to_list() == [1, 1, 1]
    assert table.filter(pl.col("method") == "no_budget")["accuracy"].n_unique() == 1
    rho = table.filter(pl.col("method") == "no_budget")["spearman_length_budget"][0]
    assert math.isnan(rho) or rho == pytest.approx(0.0, abs=1e-12)
    tr = samples.filter(pl.col("method") == "truncation").join(
        nb.select("problem_id", "budget", pl.col("completion").alias("orig")), on=["problem_id", "budget"]
    )
    for row in tr.iter_rows(named=True):
        if row["truncated"]:
            # forced: thinking cut and closed, then an answer was generated
            assert row["think_closed"] and "</think>" in row["completion"]
            assert row["reasoning_tokens"] <= row["budget"] + 8  # re-tokenizing garbage bytes may add a few
        else:
            assert row["completion"] == row["orig"]


def test_load_eval_sets(shared_data):
    from trainers.eval_data import load_eval_set, parse_data_spec
    from trainers.eval_report import spearman

    m = load_eval_set(str(shared_data / "math500"), limit=2)
    assert m[0]["question"].startswith("Convert the point") and m[0]["gold"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    a = load_eval_set(str(shared_data / "amc23" / "test.jsonl"), limit=1)
    assert a[0]["gold"] == "27" and a[0]["source"] == "amc23" and a[0]["problem_id"] == "0"
    g = load_eval_set(str(shared_data / "gsm8k" / "test.jsonl"), limit=1)
    assert g[0]["gold"] == "18"
    mapped = load_eval_set(f"{shared_data / 'amc23' / 'test.jsonl'}:question=problem,answer=answer,id=url", limit=1)
    assert mapped[0]["problem_id"].startswith("https://")
    assert parse_data_spec("/x/y.jsonl") == ("/x/y.jsonl", {})
    with pytest.raises(ValueError):
        load_eval_set(f"{shared_data / 'amc23' / 'test.jsonl'}:question=nope")
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 1, 2, 2], [1, 2, 1, 2]) == pytest.approx(0.0)
    assert math.isnan(spearman([5, 5, 5], [1, 2, 3]))
