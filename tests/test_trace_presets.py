"""Published trace layouts by preset name, think-tag conventions, flags as users write them,
problems from the trace file, and one line per mismatch.

Each file is built here from ../shared/data rows in the shape of its dataset (see
bard_data/config/trace_presets.py for where each layout comes from); nothing is downloaded.
"""

from __future__ import annotations

import json

import polars as pl
import pytest

from bard_data.api import run_recipe
from bard_data.config import load_recipe
from bard_data.errors import DataError, RecipeError
from tests.recipes import tiny_recipe, write_recipe

WRONG = "123456789"


@pytest.fixture(scope="module")
def math_rows(shared_data):
    """Three MATH-500 problems with integer answers (problem, solution with \\boxed{}, answer)."""
    rows = [json.loads(line) for line in (shared_data / "math500" / "test.jsonl").read_text().splitlines()]
    return [r for r in rows if r["answer"].isdigit() and "\\boxed" in r["solution"]][:3]


@pytest.fixture(scope="module")
def gsm_rows(shared_data):
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:3]]
    return [{"question": r["question"], "answer": r["answer"], "gold": r["answer"].split("####")[-1].strip()}
            for r in rows]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _think(answer, open_="<think>", close="</think>"):
    return f"{open_}\nLet me work it out step by step. The result is {answer}.\n{close}\n\nSo the answer is \\boxed{{{answer}}}."


def _recipe(tmp_path, tiny_model_dir, shared_data, traces, problems=None, teacher=False, **over):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    recipe["sources"] = []
    if problems is not None:
        src = _jsonl(tmp_path / "problems.jsonl", problems)
        recipe["sources"] = [{"name": "probs", "path": str(src)}]
    recipe["traces"] = traces
    for k in ("compression", "judge") + (() if teacher else ("teacher",)):
        recipe.pop(k)
    recipe.update(over)
    return write_recipe(tmp_path, recipe)


def _run(tmp_path, tiny_model_dir, shared_data, traces, problems=None, until="imported_samples", **over):
    path = _recipe(tmp_path, tiny_model_dir, shared_data, traces, problems, **over)
    return run_recipe(load_recipe(path), quiet=True, until=until).store


def _problems(math_rows):
    return [{"question": r["problem"], "answer": r["answer"]} for r in math_rows]


def _samples(store):
    return store.read("imported_samples").sort("source_row", "sample_index")


# ---------------------------------------------------------------------------------------------
# each preset imports its shape with `preset:` alone


def test_openr1(tmp_path, tiny_model_dir, shared_data, math_rows):
    rows = [{"problem": r["problem"], "solution": r["solution"], "answer": r["answer"], "uuid": str(i),
             "generations": [_think(r["answer"]), _think(WRONG)[len("<think>"):]],  # the second R1 style, wrong
             "correctness_math_verify": [True, True], "is_reasoning_complete": [True, True]}
            for i, r in enumerate(math_rows)]
    f = _jsonl(tmp_path / "openr1.jsonl", rows)
    store = _run(tmp_path, tiny_model_dir, shared_data, [{"name": "r1", "path": str(f), "preset": "openr1"}],
                 _problems(math_rows))
    s = _samples(store)
    assert s.height == 6
    assert s["is_correct"].to_list() == [True, False] * 3
    assert s["flag_disagrees"].to_list() == [False, True] * 3
    assert s["think_closed"].all() and s["model"].unique().to_list() == ["DeepSeek-R1"]
    assert s["reasoning"][0] == f"Let me work it out step by step. The result is {math_rows[0]['answer']}."
    assert store.shard_funnels("imported_samples")[0]["counters"]["source_flag_disagrees"] == 3


def test_openthoughts_both_generations_and_sft_rows_in_the_recipes_tags(tmp_path, tiny_model_dir, shared_data,
                                                                         gsm_rows):
    """OpenThoughts-114k / Bespoke-Stratos (from/value, begin_of_thought tags) and OpenThoughts3
    (human/gpt, <think>) rows in one file; the SFT rows carry <think> tags."""
    def ot114k(q, a):
        value = (f"<|begin_of_thought|>\n\nAdd it up: {a}.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n"
                 f"The answer is \\boxed{{{a}}}.\n\n<|end_of_solution|>")
        return [{"from": "user", "value": f"Return your final response within \\boxed{{}}. {q}"},
                {"from": "assistant", "value": value}]

    def ot3(q, a):
        return [{"from": "human", "value": q}, {"from": "gpt", "value": _think(a)}]

    rows = [{"system": "Your role as an assistant ...", "conversations": ot114k(gsm_rows[0]["question"], gsm_rows[0]["gold"])},
            {"system": "", "conversations": ot114k(gsm_rows[1]["question"], WRONG)},
            {"system": "", "conversations": ot3(gsm_rows[2]["question"], gsm_rows[2]["gold"])}]
    f = _jsonl(tmp_path / "ot.jsonl", rows)
    store = _run(tmp_path, tiny_model_dir, shared_data, [{"name": "ot", "path": str(f), "preset": "openthoughts"}],
                 [{"question": r["question"], "answer": r["answer"]} for r in gsm_rows], until="sft")
    s = _samples(store)
    assert s["is_correct"].to_list() == [True, False, True]
    assert s["reasoning"][0] == f"Add it up: {gsm_rows[0]['gold']}."
    assert s["response"][0] == f"The answer is \\boxed{{{gsm_rows[0]['gold']}}}."
    assert s["think_closed"].all()
    sft = store.read("sft")
    assert sft.height == 2
    for msgs in sft["messages"].to_list():
        content = msgs[-1]["content"]
        assert msgs[-1]["role"] == "assistant" and content.startswith("<think>\n") and "\n</think>\n\n" in content
        assert "begin_of" not in content and "end_of" not in content


def test_openthoughts_metadata(tmp_path, tiny_model_dir, shared_data, math_rows):
    rows = [{"problem": r["problem"], "deepseek_reasoning": f"Working: {r['answer']}",
             "deepseek_solution": f"\\boxed{{{r['answer'] if i else WRONG}}}", "ground_truth_solution": r["solution"],
             "domain": "math"} for i, r in enumerate(math_rows)]
    f = _jsonl(tmp_path / "otmeta.jsonl", rows)
    store = _run(tmp_path, tiny_model_dir, shared_data,
                 [{"name": "otm", "path": str(f), "preset": "openthoughts-metadata", "problems_from": True}])
    s = _samples(store)
    assert s["is_correct"].to_list() == [False, True, True]
    assert s["reasoning"][1] == f"Working: {math_rows[1]['answer']}"
    # gold answers came from the \boxed{} of ground_truth_solution
    assert sorted(store.read("problems")["answer"].to_list()) == sorted(r["answer"] for r in math_rows)


def test_s1k_1_1_yes_no_grades(tmp_path, tiny_model_dir, shared_data, math_rows):
    grades = ["Yes", "No", "Yes"]
    attempts = [math_rows[0]["answer"], math_rows[1]["answer"], WRONG]
    rows = [{"solution": r["solution"], "question": r["problem"], "cot_type": "math", "source_type": "x",
             "metadata": "{}", "gemini_thinking_trajectory": "g", "gemini_attempt": "g", "gemini_grade": "No",
             "deepseek_thinking_trajectory": f"Think about {r['answer']} carefully.",
             "deepseek_attempt": f"Answer: $\\boxed{{{a}}}$", "deepseek_grade": g, "deepseek_grade_reason": "..."}
            for r, a, g in zip(math_rows, attempts, grades)]
    f = _jsonl(tmp_path / "s1k11.jsonl", rows)
    store = _run(tmp_path, tiny_model_dir, shared_data, [{"name": "s1", "path": str(f), "preset": "s1k"}],
                 _problems(math_rows))
    s = _samples(store)
    assert s["is_correct"].to_list() == [True, True, False]
    assert s["source_flag"].to_list() == [True, False, True]
    assert s["flag_disagrees"].to_list() == [False, True, True]
    assert s["reasoning"][0] == f"Think about {math_rows[0]['answer']} carefully."


def test_s1k_original_joins_trajectories_and_takes_gold_from_the_boxed_solution(tmp_path, tiny_model_dir,
                                                                                shared_data, math_rows):
    """s1K (v1): thinking_trajectories is a list joined by newlines, no grade; problems_from takes the
    gold from the \\boxed{} of `solution` (there is no answer column)."""
    rows = [{"solution": r["solution"], "question": r["problem"], "cot": None, "cot_type": "math",
             "thinking_trajectories": ["First part.", f"Second part: {r['answer']}."], "attempt": f"\\boxed{{{r['answer']}}}"}
            for r in math_rows]
    f = _jsonl(tmp_path / "s1k.jsonl", rows)
    store = _run(tmp_path, tiny_model_dir, shared_data,
                 [{"name": "s1", "path": str(f), "preset": "s1k", "problems_from": True}])
    s = _samples(store)
    assert s.height == 3 and s["is_correct"].all() and s["source_flag"].is_null().all()
    assert s["reasoning"][0] == f"First part.\nSecond part: {math_rows[0]['answer']}."
    problems = store.read("problems").sort("source_row")
    assert problems["answer"].to_list() == [r["answer"] for r in math_rows]
    assert problems["source"].unique().to_list() == ["s1"]


def test_limo(tmp_path, tiny_model_dir, shared_data, math_rows):
    rows = [{"question": r["problem"], "answer": r["answer"],
             "solution": f"Okay, let me think.\n\nSo it is {r['answer'] if i != 1 else WRONG}.\n\n**Final Answer**\n"
                         f"\\boxed{{{r['answer'] if i != 1 else WRONG}}}"} for i, r in enumerate(math_rows)]
    f = _jsonl(tmp_path / "limo.jsonl", rows)
    store = _run(tmp_path, tiny_model_dir, shared_data,
                 [{"name": "limo", "path": str(f), "preset": "limo", "problems_from": True}])
    s = _samples(store)
    assert s["is_correct"].to_list() == [True, False, True]
    assert s["reasoning"][0].startswith("Okay, let me think.") and s["response"][0].startswith("**Final Answer**")


def test_numina_qwq(tmp_path, tiny_model_dir, shared_data, math_rows):
    rows = [{"problem_id": str(i), "prompt": r["problem"], "ground_truth": r["answer"],
             "response": _think(r["answer"] if i != 2 else WRONG), "correct": i != 0}
            for i, r in enumerate(math_rows)]
    f = _jsonl(tmp_path / "numina.jsonl", rows)
    store = _run(tmp_path, tiny_model_dir, shared_data, [{"name": "qwq", "path": str(f), "preset": "numina-qwq"}],
                 _problems(math_rows))
    s = _samples(store)
    assert s["is_correct"].to_list() == [True, True, False]
    assert s["flag_disagrees"].to_list() == [True, False, True]
    assert s["model"].unique().to_list() == ["QwQ-32B"]


def test_messages(tmp_path, tiny_model_dir, shared_data, gsm_rows):
    rows = [{"messages": [{"role": "system", "content": "Think first."},
                          {"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": _think(r["gold"] if i else WRONG)}],
             "num_tokens": 100, "source": "gsm8k"} for i, r in enumerate(gsm_rows)]
    f = _jsonl(tmp_path / "mot.jsonl", rows)
    store = _run(tmp_path, tiny_model_dir, shared_data, [{"name": "mot", "path": str(f), "preset": "messages"}],
                 [{"question": r["question"], "answer": r["answer"]} for r in gsm_rows])
    s = _samples(store)
    assert s["is_correct"].to_list() == [False, True, True]


def test_explicit_columns_override_the_preset(tmp_path, tiny_model_dir, shared_data, math_rows):
    rows = [{"problem": r["problem"], "answer": r["answer"], "gens": [_think(r["answer"])], "ok": ["no"]}
            for r in math_rows]
    f = _jsonl(tmp_path / "renamed.jsonl", rows)
    traces = [{"name": "r1", "path": str(f), "preset": "openr1",
               "columns": {"generation": "gens", "correct": "ok", "solution": None}, "model": "my-r1"}]
    store = _run(tmp_path, tiny_model_dir, shared_data, traces, _problems(math_rows))
    s = _samples(store)
    assert s["is_correct"].all() and s["flag_disagrees"].all() and s["model"].unique().to_list() == ["my-r1"]
    resolved = json.loads((tmp_path / "run" / "manifest.json").read_text())["recipe"]["traces"][0]
    assert resolved["columns"]["question"] == "problem" and resolved["columns"]["generation"] == "gens"


# ---------------------------------------------------------------------------------------------
# think tags: one convention for what the student is trained on


def test_recipe_convention_writes_the_sft_rows(tmp_path, tiny_model_dir, shared_data, math_rows):
    """OpenR1 traces (<think>) under a recipe whose student convention is begin_of_thought: split with
    the source's tags, written in the recipe's."""
    rows = [{"problem": r["problem"], "answer": r["answer"], "solution": r["solution"],
             "generations": [_think(r["answer"])], "correctness_math_verify": [True]} for r in math_rows]
    f = _jsonl(tmp_path / "openr1.jsonl", rows)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    student = {**recipe["student"], "think_tags": "begin_of_thought"}
    store = _run(tmp_path, tiny_model_dir, shared_data,
                 [{"name": "r1", "path": str(f), "preset": "openr1", "problems_from": True}], until="sft", student=student)
    content = store.read("sft")["messages"].to_list()[0][-1]["content"]
    assert content.startswith("<|begin_of_thought|>\n\n") and "<think>" not in content
    assert content.endswith("\n\n<|end_of_solution|>") and "<|begin_of_solution|>" in content


# ---------------------------------------------------------------------------------------------
# flags as users write them


def test_flags_in_every_spelling(tmp_path, tiny_model_dir, shared_data, math_rows):
    from bard_data.config.think_tags import THINK
    from bard_data.stages.trace_files import load_traces

    written = [True, 1, "TRUE", "yes", "Correct", False, 0, "false", "No", "INCORRECT", None, 1.0]
    rows = [{"q": "x", "gen": "y", "ok": v} for v in written]
    f = _jsonl(tmp_path / "flags.jsonl", rows)
    recipe = load_recipe(_recipe(tmp_path, tiny_model_dir, shared_data,
                                 [{"name": "f", "path": str(f), "columns": {"question": "q", "generation": "gen",
                                                                           "correct": "ok"}}], _problems(math_rows)))
    flags = load_traces(recipe, recipe.traces[0], THINK)["source_flag"].to_list()
    assert flags == [True] * 5 + [False] * 5 + [None, True]


# ---------------------------------------------------------------------------------------------
# every mismatch is one line, before any LLM call


def _r1_row(r, **kw):
    return {"problem": r["problem"], "answer": r["answer"], "solution": r["solution"],
            "generations": [_think(r["answer"])], "correctness_math_verify": [True], **kw}


MISMATCHES = {
    "missing_column": (
        "s1k", lambda rs: [{"question": r["problem"], "solution": r["solution"], "attempt": "1"} for r in rs],
        "column 'deepseek_thinking_trajectory' or 'thinking_trajectories' (columns.reasoning, preset s1k) not in the "
        "source; it has: question, solution, attempt"),
    "list_for_a_string": (
        "openr1", lambda rs: [_r1_row(r, problem=[r["problem"]]) for r in rs],
        "column 'problem' (columns.question) row 0: a list where text was expected"),
    "no_assistant_turn": (
        "openthoughts", lambda rs: [{"conversations": [{"from": "user", "value": r["problem"]}] +
                                     ([{"from": "assistant", "value": _think(1)}] if i != 1 else [])}
                                    for i, r in enumerate(rs)],
        "column 'conversations' (columns.conversation) row 1: no assistant turn (roles: user; an assistant turn has "
        "from assistant or gpt)"),
    "turns_of_another_shape": (
        "messages", lambda rs: [{"messages": [{"speaker": "user", "text": r["problem"]}]} for r in rs],
        "column 'messages' (columns.conversation) row 0: turns have the fields speaker, text; expected {role, content} "
        "or {from, value}"),
    "column_of_structs": (
        "numina-qwq", lambda rs: [{"prompt": r["problem"], "response": {"text": _think(r["answer"])}, "correct": True,
                                   "ground_truth": r["answer"]} for r in rs],
        "column 'response' (columns.generation) row 0: a struct (text) where text was expected"),
    "list_of_structs_for_generations": (
        "openr1", lambda rs: [_r1_row(r, generations=[{"text": "a"}]) for r in rs],
        "column 'generations' (columns.generation) row 0: a list of a struct (text) where a list of text"),
    "list_lengths_differ": (
        "openr1", lambda rs: [_r1_row(r, generations=[_think(1), _think(2)], correctness_math_verify=[True, False][:2 - i % 2])
                              for i, r in enumerate(rs)],
        "column 'correctness_math_verify' (columns.correct) row 1: 1 item(s) for the 2 in 'generations' "
        "(columns.generation): list-valued columns must align item by item"),
    "flag_not_a_flag": (
        "s1k", lambda rs: [{"question": r["problem"], "solution": r["solution"], "deepseek_thinking_trajectory": "t",
                            "deepseek_attempt": "a", "deepseek_grade": ["Yes", "No", "Maybe"][i]} for i, r in enumerate(rs)],
        "column 'deepseek_grade' (columns.correct) row 2: not a correctness flag: 'Maybe' (use true/false, yes/no, "
        "correct/incorrect or 1/0, any case)"),
    "list_flag_not_a_flag": (
        "openr1", lambda rs: [_r1_row(r, generations=[_think(1), _think(2)], correctness_math_verify=[1, 2]) for r in rs],
        "column 'correctness_math_verify' (columns.correct) row 0 item 1: not a correctness flag: 2"),
    "list_of_flags_for_one_trace": (
        "numina-qwq", lambda rs: [{"prompt": r["problem"], "response": _think(r["answer"]), "correct": [True, False],
                                   "ground_truth": r["answer"]} for r in rs],
        "column 'correct' (columns.correct) row 0: 2 item(s) for the one trace in 'response' (columns.generation)"),
    "string_in_one_line_a_list_in_another": (
        "openr1", lambda rs: [_r1_row(r, generations=_think(1) if i == 2 else [_think(1)]) for i, r in enumerate(rs)],
        "column 'generations' row 2: a scalar where row 0 has a list (one kind of value per column)"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_mismatch_is_one_line_before_any_llm_call(tmp_path, tiny_model_dir, shared_data, math_rows, case):
    preset, rows, expect = MISMATCHES[case]
    f = _jsonl(tmp_path / "traces.jsonl", rows(math_rows))
    path = _recipe(tmp_path, tiny_model_dir, shared_data, [{"name": "t", "path": str(f), "preset": preset}],
                   _problems(math_rows), teacher=True)
    with pytest.raises(DataError) as err:
        run_recipe(load_recipe(path), quiet=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: traces[t] {f}")
    assert expect in msg
    assert not (tmp_path / "run" / "teacher_samples").exists()


def test_cli_prints_one_line_and_no_traceback(tmp_path, tiny_model_dir, shared_data, math_rows, capsys):
    from bard_data.cli import main

    f = _jsonl(tmp_path / "s1k.jsonl", [{"question": r["problem"], "solution": r["solution"],
                                         "deepseek_thinking_trajectory": "t", "deepseek_attempt": "a",
                                         "deepseek_grade": "Perhaps"} for r in math_rows])
    path = _recipe(tmp_path, tiny_model_dir, shared_data, [{"name": "t", "path": str(f), "preset": "s1k"}],
                   _problems(math_rows))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert "column 'deepseek_grade' (columns.correct) row 0: not a correctness flag: 'Perhaps'" in err


def test_problems_from_needs_a_gold_column(tmp_path, tiny_model_dir, shared_data, gsm_rows):
    rows = [{"conversations": [{"from": "user", "value": r["question"]}, {"from": "assistant", "value": _think(1)}]}
            for r in gsm_rows]
    f = _jsonl(tmp_path / "ot.jsonl", rows)
    with pytest.raises(DataError, match=r"traces\[ot\] .*: problems_from needs the gold answers: map columns.answer "
                                        r"or columns.solution \(preset openthoughts names neither\)$"):
        _run(tmp_path, tiny_model_dir, shared_data,
             [{"name": "ot", "path": str(f), "preset": "openthoughts", "problems_from": True}])


@pytest.mark.parametrize("traces, expect", [
    ([{"name": "t", "path": "t.jsonl", "preset": "r1"}],
     "traces[0].preset: Input should be 'openr1', 'openthoughts', 'openthoughts-metadata', 's1k', 'limo', "
     "'numina-qwq' or 'messages' (got 'r1')"),
    ([{"name": "t", "path": "t.jsonl", "preset": "openr1"}],
     "no problems: list `sources`, or set `problems_from: true` on a trace source"),
    ([{"name": "t", "path": "t.jsonl", "preset": "openr1", "think_tags": "dashes"}],
     "traces[0].think_tags[0]: unknown think-tag convention 'dashes'; known: think, begin_of_thought, im_start"),
    ([{"name": "t", "path": "t.jsonl", "problems_from": True}, {"name": "t", "path": "t.jsonl"}],
     "trace source names must be unique; repeated: ['t']"),
])
def test_recipe_errors_are_one_line(tmp_path, tiny_model_dir, shared_data, traces, expect):
    _jsonl(tmp_path / "t.jsonl", [{"question": "q", "generation": "g"}])
    for t in traces:
        t["path"] = str(tmp_path / t["path"])
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe(tmp_path, tiny_model_dir, shared_data, traces))
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_source_and_trace_problems_may_not_share_a_name(tmp_path, tiny_model_dir, shared_data, math_rows):
    f = _jsonl(tmp_path / "t.jsonl", [_r1_row(r) for r in math_rows])
    with pytest.raises(RecipeError, match="a source and a trace source with problems_from share the name"):
        load_recipe(_recipe(tmp_path, tiny_model_dir, shared_data,
                            [{"name": "probs", "path": str(f), "preset": "openr1", "problems_from": True}],
                            _problems(math_rows)))


def test_problems_from_and_sources_together(tmp_path, tiny_model_dir, shared_data, math_rows, gsm_rows):
    """The trace file adds its problems to the listed sources; each trace matches its own."""
    f = _jsonl(tmp_path / "r1.jsonl", [_r1_row(r) for r in math_rows])
    store = _run(tmp_path, tiny_model_dir, shared_data,
                 [{"name": "r1", "path": str(f), "preset": "openr1", "problems_from": True}],
                 [{"question": r["question"], "answer": r["answer"]} for r in gsm_rows])
    problems = store.read("problems")
    assert problems.group_by("source").len().sort("source").rows() == [("probs", 3), ("r1", 3)]
    s = _samples(store)
    assert s["is_correct"].all() and set(s["problem_id"]) == set(problems.filter(pl.col("source") == "r1")["problem_id"])


def test_readme_lists_every_preset_with_its_origin():
    """The README's preset table has one row per preset, each saying where its layout comes from."""
    import re
    from pathlib import Path

    from bard_data.config.trace_presets import PRESETS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("| preset | reads | where the layout comes from |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `([\w-]+)` \| .+ \| (.+) \|$", table, flags=re.M)
    assert [name for name, _ in rows] == list(PRESETS)
    assert all(origin.strip() for _, origin in rows)
