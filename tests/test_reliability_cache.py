"""Cache integrity: the key holds exactly what changes a request; damaged files are recomputed.

- ``request_key`` changes with the model, the messages (prompt template, system prompt), every
  sampling parameter, the seed, the sample index and the output schema, and is the same in
  another process; it has no slot for batch size, concurrency, timeouts or progress display.
- Real runs: a new run directory that starts from a copy of a finished run's cache sends
  nothing when only throughput settings changed (batch size, progress bars; the openai
  backend's concurrency, timeout and retries), exactly the changed stage's requests when its
  prompt, seed or sampling changed, and everything when the model changed.
- A truncated part file, a truncated funnel record and a truncated cache file are detected,
  logged as warnings and recomputed; the tables equal the undamaged run's.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from bard_data.api import run_recipe
from bard_data.config import load_recipe
from bard_data.llm.base import ChatRequest, Completion, SamplingConfig, request_key
from bard_data.llm.cache import CompletionCache
from bard_data.pipeline.store import ArtifactStore
from tests.recipes import tiny_recipe, write_recipe
from tests.servers import RuleServer
from tests.test_reliability_runs import assert_same_tables, cache_rows, llm_totals

MSGS = [{"role": "user", "content": "What is 2+2?"}]


def _key(model="m", messages=MSGS, sampling=None, seed=1, sample_index=0, schema=None) -> str:
    return request_key(model, ChatRequest.of(messages, sample_index, schema), sampling or SamplingConfig(), seed)


def test_request_key_changes_with_everything_that_changes_a_request():
    variants = {
        "base": _key(),
        "model": _key(model="m2"),
        "prompt template": _key(messages=[{"role": "user", "content": "What is 2+2? Think."}]),
        "system prompt": _key(messages=[{"role": "system", "content": "Be brief."}, *MSGS]),
        "role": _key(messages=[{"role": "system", "content": "What is 2+2?"}]),
        "seed": _key(seed=2),
        "sample index": _key(sample_index=1),
        "schema": _key(schema={"type": "object"}),
    }
    for field, value in [("temperature", 0.7), ("top_p", 0.9), ("top_k", 20), ("max_tokens", 1000),
                         ("repetition_penalty", 1.1), ("stop", ["\n\n"])]:
        variants[field] = _key(sampling=SamplingConfig(**{field: value}))
    assert len(set(variants.values())) == len(variants), variants
    # A key is a pure function of its inputs: the same again, and in another process.
    assert _key() == variants["base"]
    code = ("from bard_data.llm.base import ChatRequest, SamplingConfig, request_key; "
            "print(request_key('m', ChatRequest.of([{'role': 'user', 'content': 'What is 2+2?'}]), SamplingConfig(), 1))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == variants["base"]


def test_request_key_has_no_room_for_throughput_settings():
    import inspect

    from bard_data.config.llm import OpenAIBackendConfig, TransformersBackendConfig

    assert list(inspect.signature(request_key).parameters) == ["model", "request", "sampling", "seed"]
    assert set(SamplingConfig.model_fields) == {"temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "stop"}
    # The backend settings that only change throughput are not in SamplingConfig (so not in the key).
    throughput = {"batch_size", "concurrency", "timeout_s", "max_retries", "backoff_s", "device", "dtype"}
    fields = set(TransformersBackendConfig.model_fields) | set(OpenAIBackendConfig.model_fields)
    assert throughput <= fields and not throughput & set(SamplingConfig.model_fields)


# -- real runs sharing a cache -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, shared_data):
    tmp = tmp_path_factory.mktemp("cache-ref")
    recipe = load_recipe(write_recipe(tmp, tiny_recipe(tmp, tiny_model_dir, shared_data)))
    ctx = run_recipe(recipe, quiet=True)
    return ctx.run_dir, recipe


def _run_with_copied_cache(ref: Path, tmp: Path, data: dict, quiet: bool = True) -> tuple[Path, int, int]:
    """Run ``data`` in a fresh run directory that starts with a copy of ``ref``'s cache file;
    returns the run dir, the requests it sent and how many completions it added to the cache."""
    data["run_dir"] = str(tmp / "run")
    (tmp / "run" / "cache").mkdir(parents=True)
    shutil.copy2(ref / "cache" / "completions.sqlite", tmp / "run" / "cache" / "completions.sqlite")
    before = cache_rows(tmp / "run")
    run_recipe(load_recipe(write_recipe(tmp, data)), quiet=quiet)
    return tmp / "run", llm_totals(tmp / "run")["requests_sent"], cache_rows(tmp / "run") - before


def test_throughput_settings_hit_the_cache(reference, tmp_path, tiny_model_dir, shared_data):
    ref, _ = reference
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    for section in ("teacher", "compression", "judge"):
        data[section]["backend"]["batch_size"] = 3  # was 16
    run_dir, sent, added = _run_with_copied_cache(ref, tmp_path, data, quiet=False)  # progress bars on
    assert (sent, added) == (0, 0)
    assert_same_tables(ref, run_dir)


def test_openai_throughput_settings_hit_the_cache(tmp_path, tiny_model_dir, shared_data):
    """Concurrency, timeouts and retry settings of the openai backend are not in the key."""
    with RuleServer() as srv:
        def data(tmp: Path, **backend) -> dict:
            b = {"kind": "openai", "model": "rules", "base_url": srv.base_url, "api_key_env": "BARD_TEST_NO_KEY",
                 **backend}
            d = tiny_recipe(tmp, tiny_model_dir, shared_data, n_problems=4)
            d["teacher"]["backend"] = b
            d["compression"].update(backend=b)
            d["budget"] = {"tolerance": 1000.0}
            d["judge"]["backend"] = b
            return d

        (tmp_path / "a").mkdir()
        ref = run_recipe(load_recipe(write_recipe(tmp_path / "a", data(tmp_path / "a", concurrency=8))), quiet=True).run_dir
        n = len(srv.requests)
        assert llm_totals(ref)["requests_sent"] == n == cache_rows(ref) > 0
        (tmp_path / "b").mkdir()
        run_dir, sent, added = _run_with_copied_cache(ref, tmp_path / "b", data(
            tmp_path / "b", concurrency=1, timeout_s=30, max_retries=0, backoff_s=0.0))
    assert (sent, added, len(srv.requests)) == (0, 0, n)
    assert_same_tables(ref, run_dir)


@pytest.mark.parametrize("change", ["prompt_template", "seed", "temperature", "max_tokens"])
def test_changing_a_request_misses_the_cache(reference, tmp_path, tiny_model_dir, shared_data, change):
    """The judge is the last LLM stage, so changing its requests changes nothing upstream:
    exactly its requests miss, one per compression."""
    ref, _ = reference
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    judge = data["judge"]
    if change == "prompt_template":
        from bard_data.config.stages import DEFAULT_JUDGE_PROMPT

        judge["prompt_template"] = DEFAULT_JUDGE_PROMPT + "\nBe strict."
    elif change == "seed":
        judge["seed"] += 1
    else:
        judge["sampling"][change] = {"temperature": 0.7, "max_tokens": 15}[change]
    run_dir, sent, added = _run_with_copied_cache(ref, tmp_path, data)
    n_judged = ArtifactStore(ref).read("judgments").height
    assert sent == added == n_judged > 0
    for t in ("teacher_samples", "compressions"):
        assert ArtifactStore(run_dir).read(t).equals(ArtifactStore(ref).read(t))


def test_changing_the_model_misses_every_request(reference, tmp_path, tiny_model_dir, shared_data):
    ref, _ = reference
    twin = tmp_path / "twin-model"
    shutil.copytree(tiny_model_dir, twin)  # same weights under another name
    data = tiny_recipe(tmp_path, twin, shared_data)
    data["student"]["tokenizer"] = str(tiny_model_dir)
    run_dir, sent, added = _run_with_copied_cache(ref, tmp_path, data)
    assert sent == added == llm_totals(ref)["requests_sent"]


# -- damaged files ----------------------------------------------------------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_part_funnel_and_cache_are_recomputed_with_warnings(reference, tmp_path, caplog):
    ref, recipe = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    store = ArtifactStore(run_dir)
    _truncate(store.part_path("teacher_samples", 1))
    _truncate(store.funnel_path("gold_chains", 0), 0.2)
    _truncate(store.excluded_path("gold_chains", 0))
    _truncate(run_dir / "cache" / "completions.sqlite")
    with caplog.at_level(logging.WARNING):
        run_recipe(recipe, run_dir, quiet=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("completion cache" in w and "is corrupt" in w for w in warnings), warnings
    assert any("shard 1 of 'teacher_samples' is damaged" in w for w in warnings), warnings
    assert any("shard 0 of 'gold_chains' is damaged" in w for w in warnings), warnings
    assert list((run_dir / "cache").glob("completions.sqlite.corrupt-*"))  # kept for inspection
    assert_same_tables(ref, run_dir)
    # The damaged teacher shard was regenerated (its cache was lost too): its 4 requests, no more.
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["invocations"][-1]["stages_run"] == ["teacher_samples", "gold_chains"]
    assert llm_totals(run_dir, slice(-1, None))["requests_sent"] == 4 == cache_rows(run_dir)


@pytest.mark.parametrize("damage", ["garbage", "short", "empty_table"])
def test_damaged_cache_file_is_set_aside(tmp_path, caplog, damage):
    path = tmp_path / "completions.sqlite"
    c = CompletionCache(path)
    c.put_many("m", {"k": Completion(text="t", prompt_tokens=1, completion_tokens=1)})
    c.close()
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 50)
    elif damage == "short":
        _truncate(path, 0.01)
    else:
        with sqlite3.connect(path) as con:
            con.execute("DROP TABLE completions")
            con.execute("CREATE TABLE completions (x)")
    with caplog.at_level(logging.WARNING):
        c = CompletionCache(path)
    assert any("is corrupt" in r.getMessage() for r in caplog.records)
    assert len(c) == 0
    c.put_many("m", {"k2": Completion(text="u")})
    assert list(c.get_many(["k2"])) == ["k2"]
    c.close()


def test_empty_cache_file_is_reported(tmp_path, caplog):
    path = tmp_path / "completions.sqlite"
    c = CompletionCache(path)
    c.put_many("m", {"k": Completion(text="t", prompt_tokens=1, completion_tokens=1)})
    c.close()
    path.write_bytes(b"")  # truncated to nothing: SQLite alone would take it for a new database
    with caplog.at_level(logging.WARNING):
        c = CompletionCache(path)
    assert any("is an empty file" in r.getMessage() for r in caplog.records)
    assert len(c) == 0
    c.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a brand-new cache is not reported
        CompletionCache(tmp_path / "new.sqlite").close()
    assert not caplog.records


def test_store_sees_partial_files_and_leftovers(tmp_path, caplog):
    store = ArtifactStore(tmp_path)
    kept = pl.DataFrame({"x": list(range(100))})
    excluded = pl.DataFrame({"x": [1], "reason": ["llm_error"], "detail": ["boom"]})
    funnel = {"rows_in": 101, "rows_out": 100, "dropped": {"llm_error": 1}, "input_hash": "h"}
    store.write_shard("t", 0, kept, excluded, funnel)
    assert store.shard_problem("t", 0, "h") is None
    assert store.shard_problem("t", 0, "other") == "stale"
    assert store.shard_problem("t", 0, "h", retry_errors=True) == "llm_error"
    # A temp file a killed writer left is never a part.
    (tmp_path / "t" / ".part-00001.parquet.abc.tmp").write_bytes(b"PAR1 half")
    assert store.parts("t") == [store.part_path("t", 0)]
    # Rewritten without errors, the shard's old excluded rows go.
    store.write_shard("t", 0, kept, None, {**funnel, "dropped": {}, "rows_in": 100})
    assert not store.excluded_path("t", 0).exists()
    assert store.shard_problem("t", 0, "h", retry_errors=True) is None
    _truncate(store.part_path("t", 0))
    with caplog.at_level(logging.WARNING):
        assert store.shard_problem("t", 0) is not None
    assert "is damaged" in caplog.text and not store.part_path("t", 0).exists()
