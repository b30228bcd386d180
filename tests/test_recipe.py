"""Bad recipes and bad source data: each is one line naming the file and the key or column."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bard_data.api import run_recipe
from bard_data.config import load_recipe
from bard_data.errors import DataError, RecipeError
from tests.recipes import tiny_recipe, write_recipe


@pytest.fixture
def good(tmp_path, tiny_model_dir, shared_data):
    return tiny_recipe(tmp_path, tiny_model_dir, shared_data)


def _err(tmp_path, data, cls=RecipeError) -> str:
    p = write_recipe(tmp_path, data) if isinstance(data, dict) else data
    with pytest.raises(cls) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(p) in msg
    return msg


def test_good_recipe_loads_with_typed_sections(tmp_path, good):
    r = load_recipe(write_recipe(tmp_path, good))
    assert r.teacher.backend.kind == "transformers"
    assert r.teacher.samples_per_problem == 2
    assert r.compression.budgets.fractions == [0.3, 0.6]
    assert r.traces[0].columns.generation == "answer"
    assert len(r.hash()) == 16


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, good, shared_data):
    sub = tmp_path / "recipes"
    sub.mkdir()
    # A path that leaves the recipe's folder says so (${recipe_dir}/.., absolute or ~): tests/test_security_doors.py.
    good["sources"][0]["path"] = "${recipe_dir}/../data.jsonl"
    (tmp_path / "data.jsonl").write_text((shared_data / "gsm8k" / "train.jsonl").read_text().split("\n", 1)[0] + "\n")
    good["traces"] = []
    r = load_recipe(write_recipe(sub, good))
    assert r.resolve(r.sources[0].path) == str((tmp_path / "data.jsonl").resolve())


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nsources: [\n  - a: b\n")
    msg = _err(tmp_path, p)
    assert "malformed YAML" in msg and "bad.yaml:" in msg


def test_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    assert "must be a YAML mapping" in _err(tmp_path, p)


def test_non_utf8_recipe(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in _err(tmp_path, p)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_unknown_top_level_key(tmp_path, good):
    good["teachr"] = {}
    assert "teachr: unknown key" in _err(tmp_path, good)


def test_unknown_nested_key_names_path(tmp_path, good):
    good["teacher"]["sampling"]["temprature"] = 0.5
    assert "teacher.sampling.temprature: unknown key" in _err(tmp_path, good)


def test_wrong_type_names_path_and_value(tmp_path, good):
    good["teacher"]["samples_per_problem"] = "many"
    msg = _err(tmp_path, good)
    assert "teacher.samples_per_problem" in msg and "'many'" in msg


def test_unknown_backend_kind(tmp_path, good):
    good["teacher"]["backend"]["kind"] = "tgi"
    assert "teacher.backend" in _err(tmp_path, good)


def test_missing_required_key(tmp_path, good):
    del good["student"]
    assert "student: missing required key" in _err(tmp_path, good)


def test_missing_source_file(tmp_path, good):
    good["sources"][0]["path"] = str(tmp_path / "missing.jsonl")
    assert "sources[0].path: file not found" in _err(tmp_path, good)


def test_missing_model_folder(tmp_path, good):
    good["teacher"]["backend"]["model"] = "./no-such-model"
    assert "teacher.backend.model: model folder not found" in _err(tmp_path, good)


def test_negative_budget_rejected(tmp_path, good):
    good["compression"]["budgets"] = {"mode": "fixed", "levels": [-5, 10]}
    assert "compression.budgets" in _err(tmp_path, good)


def test_duplicate_source_names(tmp_path, good):
    good["sources"].append(dict(good["sources"][0]))
    assert "source names must be unique" in _err(tmp_path, good)


def _run_err(tmp_path, good, cls) -> str:
    r = load_recipe(write_recipe(tmp_path, good))
    with pytest.raises(cls) as e:
        run_recipe(r, quiet=True)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_column_names_source_and_column(tmp_path, good):
    good["sources"][0]["columns"] = {"question": "problem", "answer": "answer"}
    msg = _run_err(tmp_path, good, DataError)
    assert "column 'problem' (columns.question)" in msg and "train.jsonl" in msg


def test_empty_source(tmp_path, good):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    good["sources"][0]["path"] = str(p)
    assert "has no rows" in _run_err(tmp_path, good, DataError)


def test_malformed_jsonl_names_line(tmp_path, good):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"question": "a", "answer": "#### 1"}\n{"question": "b", "answer": \n')
    good["sources"][0]["path"] = str(p)
    assert "broken.jsonl:2: malformed JSON" in _run_err(tmp_path, good, DataError)


def test_non_utf8_source_names_line(tmp_path, good):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"question": "a", "answer": "#### 1"}\n{"question": "caf\xe9", "answer": "#### 2"}\n')
    good["sources"][0]["path"] = str(p)
    assert "latin.jsonl:2: not UTF-8" in _run_err(tmp_path, good, DataError)


def test_unloadable_tokenizer_is_one_line(tmp_path, good):
    bad = tmp_path / "not-a-tokenizer"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    good["student"]["tokenizer"] = str(bad)
    assert "student.tokenizer: cannot load tokenizer" in _run_err(tmp_path, good, RecipeError)


def test_bad_prompt_template_variable(tmp_path, good):
    good["teacher"]["prompt_template"] = "{{ questoin }}"
    assert "questoin" in _run_err(tmp_path, good, RecipeError)


def test_cli_prints_one_line_and_exits_2(tmp_path, good):
    good["teacher"]["sampling"]["temprature"] = 0.5
    p = write_recipe(tmp_path, good)
    out = subprocess.run([sys.executable, "-m", "bard_data.cli", "run", str(p)], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "temprature" in lines[0]


def test_bad_rows_become_funnel_reasons_not_crashes(tmp_path, good):
    """Duplicates (exact and case/space variants), empty questions, unparsable gold, NUL bytes."""
    p = tmp_path / "rows.jsonl"
    rows = [
        {"question": "What is 2+2?", "answer": "#### 4"},
        {"question": "what  is 2+2?", "answer": "#### 4"},
        {"question": "What is 2+2?", "answer": "#### 4"},
        {"question": "   ", "answer": "#### 1"},
        {"question": "What is 3+3?", "answer": "no number here"},
        {"question": "What is\x00 5+5?", "answer": "#### 10"},
    ]
    p.write_text("\n".join(__import__("json").dumps(r) for r in rows) + "\n")
    good["sources"][0]["path"] = str(p)
    good["sources"][0]["answer_format"] = "gsm8k"
    good["traces"] = []
    for k in ("teacher", "compression", "judge"):
        good.pop(k)
    good["traces"] = [{"name": "self", "path": str(p), "columns": {"generation": "answer"}}]
    r = load_recipe(write_recipe(tmp_path, good))
    ctx = run_recipe(r, quiet=True, until="problems")
    probs = ctx.store.read("problems")
    ex = ctx.store.read_excluded("problems")
    assert probs.height == 2
    assert sorted(ex["reason"].to_list()) == ["duplicate", "duplicate", "empty_question", "gold_unparsable"]
    assert "\x00" not in "".join(probs["question"].to_list())


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml", "demo_sampled.yaml"])
def test_shipped_recipes_validate(name):
    from pathlib import Path

    r = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / name)
    assert r.compression is not None and r.judge is not None
    if name == "demo_sampled.yaml":  # live sampling only: no imported traces
        assert not r.traces and r.teacher.samples_per_problem == 4
    else:
        assert r.decontamination is not None


def test_readme_stage_table_is_the_registry():
    """The README's stage table lists the registry's stages, in order, with what each reads and
    depends on, so the architecture section cannot go stale."""
    import re
    from pathlib import Path

    from bard_data.stages import STAGES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|\s*([\w, ]*?)\s*\|\s*([\w., ]*?)\s*\|$", readme, flags=re.M)
    listed = [(name, [t for t in reads.split(", ") if t], [t for t in secs.split(", ") if t]) for name, reads, secs in rows]
    assert listed == [(s.name, list(s.reads), list(s.sections)) for s in STAGES]
