"""The bad-input matrix, beyond tests/test_recipe.py: each case asserts the exact error class.

A bad run-level input (recipe, source file, model, server, tokenizer) stops before any work with
a one-line ``BardError``; a bad row becomes a funnel reason; a bad input on a finished run loses
nothing. Model and judge outputs of every odd shape go through the real parsing code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bard_data.api import run_recipe
from bard_data.config import load_recipe
from bard_data.errors import BackendError, BardError, DataError, RecipeError
from bard_data.pipeline.funnel import check_funnel
from bard_data.pipeline.store import ArtifactStore
from bard_data.stages.problems import MAX_QUESTION_CHARS
from bard_data.stages.teacher import verify_samples
from tests.recipes import tiny_recipe, write_recipe
from tests.servers import RuleServer, free_port


@pytest.fixture
def good(tmp_path, tiny_model_dir, shared_data):
    return tiny_recipe(tmp_path, tiny_model_dir, shared_data)


def exactly(cls, excinfo) -> str:
    """The error is ``cls`` itself (not a sibling or a bare exception) and one line."""
    assert type(excinfo.value) is cls, f"{type(excinfo.value).__name__}: {excinfo.value}"
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def load_err(tmp_path, data, cls=RecipeError) -> str:
    p = write_recipe(tmp_path, data) if isinstance(data, dict) else data
    with pytest.raises(BardError) as e:
        load_recipe(p)
    msg = exactly(cls, e)
    assert str(p) in msg
    return msg


def run_err(tmp_path, data, cls, **kw) -> str:
    r = load_recipe(write_recipe(tmp_path, data))
    with pytest.raises(BardError) as e:
        run_recipe(r, quiet=True, **kw)
    return exactly(cls, e)


def only_sources(good: dict, path: Path, **src) -> dict:
    good["sources"] = [{"name": "src", "path": str(path), **src}]
    good["traces"] = []
    for k in ("teacher", "compression", "judge"):
        good.pop(k, None)
    return good


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- recipes: malformed, unknown keys, wrong types, missing files ------------------------------------


def test_nul_byte_in_recipe(tmp_path):
    p = tmp_path / "nul.yaml"
    p.write_bytes(b"name: a\x00b\nrun_dir: x\n")
    assert "malformed YAML" in load_err(tmp_path, p)


def test_unknown_key_in_trace_columns(tmp_path, good):
    good["traces"][0]["columns"]["generaton"] = "answer"
    assert "traces[0].columns.generaton: unknown key" in load_err(tmp_path, good)


@pytest.mark.parametrize("path, value, expect", [
    (("shard_size",), 0, "shard_size"),
    (("sources",), {"name": "x", "path": "y.jsonl"}, "sources"),
    (("teacher", "sampling", "top_p"), 1.5, "teacher.sampling.top_p"),
    (("sources", 0, "answer_format"), "roman", "sources[0].answer_format"),
], ids=["shard_size_zero", "sources_not_a_list", "top_p_out_of_range", "unknown_answer_format"])
def test_wrong_types_and_values(tmp_path, good, path, value, expect):
    node = good
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    assert expect in load_err(tmp_path, good)


def test_no_sources(tmp_path, good):
    good["sources"] = []
    assert "sources" in load_err(tmp_path, good)


@pytest.mark.parametrize("section, budgets", [
    ("levels_zero", {"mode": "fixed", "levels": [0, 10]}),
    ("floor_zero", {"mode": "fractions", "floor": 0}),
    ("fraction_zero", {"mode": "fractions", "fractions": [0.0, 0.5]}),
    ("fraction_one", {"mode": "fractions", "fractions": [0.5, 1.0]}),
])
def test_budgets_not_positive(tmp_path, good, section, budgets):
    good["compression"]["budgets"] = budgets
    assert "compression.budgets" in load_err(tmp_path, good)


def test_max_tokens_zero(tmp_path, good):
    good["judge"]["sampling"]["max_tokens"] = 0
    assert "judge.sampling.max_tokens" in load_err(tmp_path, good)


def test_missing_trace_file(tmp_path, good):
    good["traces"][0]["path"] = str(tmp_path / "gone.jsonl")
    assert "traces[0].path: file not found" in load_err(tmp_path, good)


def test_missing_decontamination_reference(tmp_path, good):
    good["decontamination"] = {"references": [{"name": "math500", "path": str(tmp_path / "nope.jsonl")}]}
    assert "decontamination.references[0].path: file not found" in load_err(tmp_path, good)


# -- source files: renamed columns, empty, not UTF-8, not objects, not a table --------------------------


def test_renamed_column_in_source(tmp_path, good):
    p = write_jsonl(tmp_path / "renamed.jsonl", [{"problem": "What is 1+1?", "answer": "#### 2"}])
    msg = run_err(tmp_path, only_sources(good, p), DataError)
    assert "column 'question' (columns.question) not in the source; it has: problem, answer" in msg


def test_trace_source_without_its_generation_column(tmp_path, good):
    p = write_jsonl(tmp_path / "traces.jsonl", [{"question": "What is 1+1?", "solution": "2"}])
    good["sources"][0]["limit"] = 2
    good["traces"] = [{"name": "t", "path": str(p), "columns": {"generation": "output"}}]
    for k in ("teacher", "compression", "judge"):
        good.pop(k)
    assert "column 'output' (columns.generation)" in run_err(tmp_path, good, DataError)


def test_parquet_source_with_no_rows(tmp_path, good):
    p = tmp_path / "empty.parquet"
    pl.DataFrame(schema={"question": pl.Utf8, "answer": pl.Utf8}).write_parquet(p)
    assert "has no rows" in run_err(tmp_path, only_sources(good, p), DataError)


def test_jsonl_source_with_only_blank_lines(tmp_path, good):
    p = tmp_path / "blank.jsonl"
    p.write_text("\n   \n\n")
    assert "has no rows" in run_err(tmp_path, only_sources(good, p), DataError)


def test_jsonl_line_not_an_object(tmp_path, good):
    p = tmp_path / "list.jsonl"
    p.write_text('{"question": "a", "answer": "#### 1"}\n["b", "#### 2"]\n')
    assert "list.jsonl:2: each line must be a JSON object" in run_err(tmp_path, only_sources(good, p), DataError)


def test_parquet_bytes_not_utf8(tmp_path, good):
    p = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"question": pa.array([b"fine", b"caf\xe9"], type=pa.binary()),
                             "answer": ["#### 1", "#### 2"]}), p)
    msg = run_err(tmp_path, only_sources(good, p), DataError)
    assert "column 'question' (columns.question) row 1: not UTF-8" in msg


def test_folder_that_is_not_a_dataset(tmp_path, good):
    d = tmp_path / "folder"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    good = only_sources(good, d)
    good["sources"][0]["format"] = "datasets"
    assert "cannot read as datasets" in run_err(tmp_path, good, DataError)


# -- models, servers, tokenizers -------------------------------------------------------------------------


def test_unreachable_server_stops_before_any_shard(tmp_path, good, monkeypatch):
    port = free_port()  # nothing listens there
    good["teacher"]["backend"] = {"kind": "openai", "model": "m", "base_url": f"http://127.0.0.1:{port}/v1",
                                  "max_retries": 0, "timeout_s": 5}
    msg = run_err(tmp_path, good, BackendError)
    assert msg.startswith(f"openai backend: cannot reach http://127.0.0.1:{port}/v1: ConnectionRefusedError")
    assert not (tmp_path / "run").exists()  # nothing written, not even an empty run directory


@pytest.mark.parametrize("kind", ["transformers", "vllm"])
def test_unknown_hub_model_offline(tmp_path, good, kind, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    good["judge"]["backend"] = {"kind": kind, "model": "no-such-org/no-such-model-xyz"}
    msg = run_err(tmp_path, good, BackendError)
    assert msg.startswith(f"{kind} backend: cannot load model 'no-such-org/no-such-model-xyz'")
    assert not (tmp_path / "run").exists()


def test_unknown_hub_model_offline_when_the_backend_starts(monkeypatch):
    from bard_data.config.llm import TransformersBackendConfig, VLLMBackendConfig
    from bard_data.llm import make_backend

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for cfg in (TransformersBackendConfig(kind="transformers", model="no-such-org/no-such-model-xyz"),
                VLLMBackendConfig(kind="vllm", model="no-such-org/no-such-model-xyz")):
        with pytest.raises(BardError) as e:
            make_backend(cfg)
        assert exactly(BackendError, e).startswith(f"{cfg.kind} backend: cannot load model")


def test_tokenizer_hub_id_offline(tmp_path, good, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    good["student"]["tokenizer"] = "no-such-org/no-such-tokenizer-xyz"
    assert "student.tokenizer: cannot load tokenizer" in run_err(tmp_path, good, RecipeError)


# -- bad rows become funnel reasons ----------------------------------------------------------------------


def test_ten_megabyte_question_is_a_funnel_reason(tmp_path, good):
    huge = "What is " + "very " * (10 * 2**20 // 5) + "big?"
    assert len(huge) > 10 * 2**20 > MAX_QUESTION_CHARS
    p = write_jsonl(tmp_path / "big.jsonl", [{"question": huge, "answer": "#### 1"},
                                             {"question": "What is 1+1?", "answer": "#### 2"}])
    r = load_recipe(write_recipe(tmp_path, only_sources(good, p)))
    ctx = run_recipe(r, quiet=True, until="problems")
    assert ctx.store.read("problems")["question"].to_list() == ["What is 1+1?"]
    ex = ctx.store.read_excluded("problems")
    assert ex["reason"].to_list() == ["question_too_long"] and ex["detail"].to_list() == ["src row 0"]


def test_duplicate_source_ids_and_unparsable_golds(tmp_path, good):
    """Ids are content-derived: two rows sharing a source id but not a question are two problems;
    the same problem under two ids is one. Golds that do not parse are dropped with their text;
    NUL bytes are removed from golds as from questions."""
    rows = [
        {"id": "a", "question": "What is 1+1?", "answer": "\\boxed{2}"},
        {"id": "a", "question": "What is 2+2?", "answer": "\\boxed{4}"},
        {"id": "b", "question": "What is 1+1?", "answer": "\\boxed{2}"},
        {"id": "c", "question": "What is 3+3?", "answer": "six, probably"},
        {"id": "d", "question": "What is 5+5?", "answer": "\\boxed{10\x00}"},
    ]
    p = write_jsonl(tmp_path / "ids.jsonl", rows)
    r = load_recipe(write_recipe(tmp_path, only_sources(good, p, answer_format="boxed", columns={"id": "id"})))
    ctx = run_recipe(r, quiet=True, until="problems")
    probs = ctx.store.read("problems").sort("source_row")
    assert probs.select("source_id", "answer").rows() == [("a", "2"), ("a", "4"), ("d", "10")]
    assert probs["problem_id"].n_unique() == 3
    ex = ctx.store.read_excluded("problems").sort("source_row")
    assert ex.select("source_id", "reason").rows() == [("b", "duplicate"), ("c", "gold_unparsable")]
    assert ex["detail"].to_list()[1] == "raw answer: six, probably"
    funnel = ctx.store.read("funnel").filter(pl.col("stage") == "problems")
    assert check_funnel(funnel) == []


class _Ctx:
    """What verify_samples needs from a run: a token counter."""

    @staticmethod
    def count_tokens(texts):
        return [len(t.split()) for t in texts]


@pytest.mark.parametrize("completion, reasoning, response, closed, predicted, correct", [
    ("I added them.\n\nThe answer is 4", "I added them.", "The answer is 4", False, "4", True),  # no think tags
    ("<think><think>2+2</think>is 4</think>\\boxed{4}", "2+2", "is 4\\boxed{4}", True, "4", True),  # nested tags
    ("  \n\t ", "", "", False, None, False),  # only whitespace
    ("", "", "", False, None, False),  # empty
    ("<think>2+2 is 4 and then", "2+2 is 4 and then", "", False, "4", True),  # never closed
    ("</think></think>", "", "", True, None, False),  # tags only
], ids=["no_tags", "nested_tags", "whitespace", "empty", "unclosed", "tags_only"])
def test_odd_model_outputs_through_verify_samples(completion, reasoning, response, closed, predicted, correct):
    df = pl.DataFrame({"completion": [completion], "gold_answer": ["4"]})
    out = verify_samples(_Ctx(), df).row(0, named=True)
    assert (out["reasoning"], out["response"], out["think_closed"]) == (reasoning, response, closed)
    assert (out["predicted_answer"], out["is_correct"]) == (predicted, correct)
    assert out["reasoning_tokens"] == len(reasoning.split())


def test_judge_outputs_not_json_or_wrong_fields_become_judge_unparsable(tmp_path, good):
    """A rule server plays teacher, compressor and judge; the judge answers prose, JSON with the
    wrong fields, or a valid verdict (by a hash of its prompt)."""
    with RuleServer() as srv:
        backend = {"kind": "openai", "model": "rules", "base_url": srv.base_url, "api_key_env": "BARD_TEST_NO_KEY",
                   "max_retries": 0}
        good["teacher"]["backend"] = backend
        good["compression"].update(backend=backend)
        good["budget"] = {"tolerance": 1000.0}
        good["judge"].update(backend=backend, only_answer_preserved=True)
        ctx = run_recipe(load_recipe(write_recipe(tmp_path, good)), quiet=True)
    store = ctx.store
    j = store.read("judgments")
    assert set(j["parse_error"].drop_nulls().unique()) == {"not_json", "missing field: complete"}
    unparsable = j.filter(pl.col("verdict") == "unparsable")
    assert unparsable.height == j["parse_error"].is_not_null().sum() > 0
    assert (j.filter(pl.col("parse_error").is_null())["verdict"] == "pass").all()
    filter_ex = store.read_excluded("filtered_compressions")
    dropped = filter_ex.filter(pl.col("reason") == "judge_unparsable")
    assert sorted(dropped["compression_id"].to_list()) == sorted(unparsable["compression_id"].to_list())
    budget_rows = store.read("sft").filter(pl.col("kind") == "budget")
    assert budget_rows.height > 0  # the valid verdicts pass
    assert check_funnel(store.read("funnel")) == []


# -- nothing already written is lost ----------------------------------------------------------------------


@pytest.fixture
def finished(tmp_path, tiny_model_dir, shared_data):
    """A finished run whose source is a copy the test may break."""
    src = tmp_path / "src.jsonl"
    src.write_text("".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines(keepends=True)[:4]))
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data, n_problems=4, compression=None, judge=None)
    data["sources"][0]["path"] = str(src)
    data["traces"][0]["path"] = str(src)
    path = write_recipe(tmp_path, data)
    ctx = run_recipe(load_recipe(path), quiet=True)
    snap = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in ctx.run_dir.rglob("*")
            if p.is_file() and "cache" not in p.parts and p.name != ".lock"}
    return path, src, ctx.run_dir, snap


def _untouched(run_dir: Path, snap: dict, skip: tuple[str, ...] = ()) -> None:
    now = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*")
           if p.is_file() and "cache" not in p.parts and p.name != ".lock" and p.name not in skip}
    assert now == snap


def test_broken_source_on_a_finished_run_is_an_error_and_loses_nothing(finished):
    """A source file edited under a finished run is recomputed from; a broken one is a one-line
    error naming it, and every table stays as it was (the manifest records the failed attempt)."""
    path, src, run_dir, snap = finished
    good_bytes = src.read_bytes()
    src.write_bytes(good_bytes[:100] + b"\xff\xfe broken" + good_bytes[100:])
    with pytest.raises(BardError) as e:
        run_recipe(load_recipe(path), quiet=True)
    msg = exactly(DataError, e)
    assert str(src) in msg and "not UTF-8" in msg
    assert json.loads((run_dir / "manifest.json").read_text())["invocations"][-1]["status"].startswith("failed")
    _untouched(run_dir, {p: v for p, v in snap.items() if p.name != "manifest.json"}, skip=("manifest.json",))
    # Restored (even with a new mtime), the run is whole again and a rerun does nothing.
    src.write_bytes(good_bytes)
    run_recipe(load_recipe(path), quiet=True)
    assert json.loads((run_dir / "manifest.json").read_text())["invocations"][-1]["llm"] == {}
    assert json.loads((run_dir / "manifest.json").read_text())["invocations"][-1]["stages_run"] == []


def test_deleted_source_on_a_finished_run_is_an_error_and_loses_nothing(finished):
    path, src, run_dir, snap = finished
    os.unlink(src)
    with pytest.raises(BardError) as e:
        load_recipe(path)
    assert "sources[0].path: file not found" in exactly(RecipeError, e)
    _untouched(run_dir, snap)
    assert ArtifactStore(run_dir).read("problems").height == 4
