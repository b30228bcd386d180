"""Imported teacher traces in every shape: judged by the same rules as sampled ones."""

from __future__ import annotations

import json

import polars as pl
import pytest

from bard_data.api import run_recipe
from bard_data.config import load_recipe
from tests.recipes import tiny_recipe, write_recipe

PROBLEMS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 6 pens. How many pens are in 5 boxes?", "answer": "6 * 5 = 30\n#### 30"},
    {"question": "Sara reads 10 pages a day for 3 days. How many pages?", "answer": "10 * 3 = 30\n#### 30"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path, tiny_model_dir, shared_data, traces, trace_rows, teacher=False):
    src = _jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    tr = _jsonl(tmp_path / "traces.jsonl", trace_rows)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    recipe["sources"] = [{"name": "toy", "path": str(src), "answer_format": "gsm8k"}]
    recipe["traces"] = [{**t, "path": str(tr)} for t in traces]
    for k in ("compression", "judge"):
        recipe.pop(k)
    if not teacher:
        recipe.pop("teacher")
    ctx = run_recipe(load_recipe(write_recipe(tmp_path, recipe)), quiet=True, until="gold_chains")
    return ctx.store


def test_tagged_untagged_and_r1_style_traces(tmp_path, tiny_model_dir, shared_data):
    rows = [
        {"q": PROBLEMS[0]["question"], "gen": "<think>3 + 4 = 7</think>The answer is \\boxed{7}."},
        {"q": PROBLEMS[1]["question"], "gen": "6 * 5 = 30, so 30 pens.</think>\\boxed{30}"},
        {"q": PROBLEMS[2]["question"], "gen": "10 pages times 3 days.\n10 * 3 = 30\n\n#### 30"},
    ]
    store = _run(tmp_path, tiny_model_dir, shared_data,
                 [{"name": "mixed", "columns": {"question": "q", "generation": "gen"}, "model": "r1"}], rows)
    s = store.read("imported_samples").sort("source_row")
    assert s["is_correct"].to_list() == [True, True, True]
    assert s["reasoning"].to_list() == ["3 + 4 = 7", "6 * 5 = 30, so 30 pens.", "10 pages times 3 days.\n10 * 3 = 30"]
    assert s["response"].to_list() == ["The answer is \\boxed{7}.", "\\boxed{30}", "#### 30"]
    assert s["think_closed"].to_list() == [True, True, False]
    assert (s["reasoning_tokens"] > 0).all()
    assert s["model"].unique().to_list() == ["r1"]
    assert s["origin"].unique().to_list() == ["imported:mixed"]
    assert store.read("gold_chains").height == 3


def test_list_valued_generations_explode_and_flags_are_checked(tmp_path, tiny_model_dir, shared_data):
    rows = [
        {"q": PROBLEMS[0]["question"],
         "gens": ["<think>3+4=7</think>\\boxed{7}", "<think>3+4=8</think>\\boxed{8}"],
         "ok": [True, True]},  # the source claims both are right: the second is not
        {"q": PROBLEMS[1]["question"], "gens": ["<think>6*5</think>\\boxed{30}"], "ok": [False]},
        {"q": "A question that is not among the problems?", "gens": ["<think>x</think>\\boxed{1}"], "ok": [True]},
    ]
    store = _run(tmp_path, tiny_model_dir, shared_data,
                 [{"name": "lists", "columns": {"question": "q", "generation": "gens", "correct": "ok"}}], rows)
    s = store.read("imported_samples").sort("source_row", "sample_index")
    assert s.height == 3
    assert s["sample_index"].to_list() == [0, 1, 0]
    assert s["is_correct"].to_list() == [True, False, True]
    assert s["source_flag"].to_list() == [True, True, False]
    assert s["flag_disagrees"].to_list() == [False, True, True]
    ex = store.read_excluded("imported_samples")
    assert ex["reason"].to_list() == ["unknown_problem"]
    funnel = store.shard_funnels("imported_samples")[0]
    assert funnel["rows_in"] == 4 and funnel["rows_out"] == 3
    assert funnel["counters"]["source_flag_disagrees"] == 2
    gold = store.read("gold_chains")
    assert sorted(gold["problem_id"].to_list()) == sorted(s.filter(pl.col("is_correct"))["problem_id"].unique().to_list())
    # pass rate per problem from the verifier, not the source's flags
    rates = dict(zip(gold["problem_id"], gold["pass_rate"]))
    p0 = s.filter(pl.col("sample_index") == 1)["problem_id"][0]
    assert rates[p0] == pytest.approx(0.5)


def test_reasoning_and_response_columns(tmp_path, tiny_model_dir, shared_data):
    rows = [{"q": PROBLEMS[0]["question"], "r": "3 plus 4 is 7", "a": "\\boxed{7}"}]
    store = _run(tmp_path, tiny_model_dir, shared_data,
                 [{"name": "split", "columns": {"question": "q", "reasoning": "r", "response": "a"}}], rows)
    s = store.read("imported_samples")
    assert s["reasoning"].to_list() == ["3 plus 4 is 7"] and s["is_correct"].to_list() == [True]


def test_imported_and_sampled_traces_mix(tmp_path, tiny_model_dir, shared_data):
    rows = [{"q": p["question"], "gen": p["answer"]} for p in PROBLEMS]
    store = _run(tmp_path, tiny_model_dir, shared_data,
                 [{"name": "gsm", "columns": {"question": "q", "generation": "gen"}}], rows, teacher=True)
    sampled, imported = store.read("teacher_samples"), store.read("imported_samples")
    assert sampled.height == 6 and imported.height == 3
    assert set(sampled["origin"]) == {"sampled"} and set(imported["origin"]) == {"imported:gsm"}
    gold = store.read("gold_chains")
    # every problem has its imported chain correct; n_samples counts sampled + imported
    assert gold.height == 3
    assert gold["n_samples"].to_list() == [3, 3, 3]


def test_missing_trace_column_is_one_line(tmp_path, tiny_model_dir, shared_data):
    from bard_data.errors import DataError

    with pytest.raises(DataError, match=r"column 'gen' \(columns.generation\)"):
        _run(tmp_path, tiny_model_dir, shared_data,
             [{"name": "bad", "columns": {"question": "q", "generation": "gen"}}], [{"q": "x", "other": 1}])
