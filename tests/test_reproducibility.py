"""Reproducible builds: the same recipe gives the same tables, interrupted or not, on every backend.

- Unit: which settings each backend gets (vLLM on the CPU: per-request seeds with chunked prefill
  off; forced chunked prefill turns them off), what the manifest records per stage and what a
  run says at start; the per-row seeded sampler of the transformers backend.
- Whole runs, demo-shaped recipe on the tiny model, each compared with an uninterrupted run as
  row sets of every table (``all_tables``: every table folder and every excluded table):
  - transformers: SIGKILL in the middle of the compression stage, then resume; and another
    ``batch_size`` and ``shard_size``;
  - vLLM offline engine on the CPU (``bard-data run`` in its own processes, one engine each): a
    run SIGKILLed in the middle of the compression stage and resumed, with another shard size;
  - openai backend against vLLM's real OpenAI server process, seeded: SIGKILL mid-compression,
    resumed with another concurrency and shard size.
- ``bard-data verify``: rows recomputed from the cache match; a tampered cache is caught; a
  server that ignores ``seed`` is caught by ``--resample`` and recorded ``reproducible: false``.
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from bard_data.api import run_recipe, verify
from bard_data.config import load_recipe
from bard_data.config.llm import OpenAIBackendConfig, SamplingConfig, TransformersBackendConfig, VLLMBackendConfig
from bard_data.errors import BackendError
from bard_data.llm.repro import SERVER_DEPENDENT, assess
from bard_data.pipeline import manifest as mf
from bard_data.pipeline.store import ArtifactStore
from tests.recipes import tiny_recipe, write_recipe
from tests.servers import SERVED_NAME, RuleServer, shared_vllm_server, vllm_model_dir
from tests.test_reliability_runs import child_env, cli

LLM_TABLES = ("teacher_samples", "compressions", "judgments")


# -- helpers -------------------------------------------------------------------------------------------


def all_tables(run_dir: Path) -> dict[str, Counter]:
    """Every table of a run (each folder with parts, and every excluded table) as a multiset of
    rows of content."""
    store = ArtifactStore(run_dir)
    out: dict[str, Counter] = {}
    for folder in sorted({p.parent for p in run_dir.rglob("part-*.parquet")}):
        name = str(folder.relative_to(run_dir))
        if name.startswith("excluded/"):
            df = store.read_excluded(name.split("/", 1)[1])
        else:
            df = store.read(name)
        df = df.select(sorted(df.columns))
        out[name] = Counter(_as_set_rows(df))
    return out


def _as_set_rows(df: pl.DataFrame) -> list[str]:
    """Each row as text (nested columns through JSON), duplicates kept."""
    if not df.height:
        return []
    return list(map(str, df.with_columns([
        pl.col(c).cast(pl.Utf8) if not df.schema[c].is_nested() else pl.col(c).map_elements(
            lambda v: json.dumps(v.to_list() if hasattr(v, "to_list") else v, default=str), return_dtype=pl.Utf8)
        for c in df.columns]).rows()))


def assert_same_build(ref: Path, got: Path) -> int:
    a, b = all_tables(ref), all_tables(got)
    assert set(a) == set(b), (sorted(a), sorted(b))
    for t in a:
        assert a[t] == b[t], f"table {t} differs: {sum((a[t] - b[t]).values())} rows only in the reference, " \
                             f"{sum((b[t] - a[t]).values())} only in the other run"
    return sum(sum(c.values()) for c in a.values())


def kill_in_compression(recipe_path: Path, run_dir: Path, err: Path, timeout: float = 900) -> None:
    """``bard-data run`` in its own process, SIGKILLed as soon as the compression stage has written
    its first shard (its other shards still to do)."""
    with open(err, "wb") as f:
        proc = subprocess.Popen(cli("run", str(recipe_path), "-q"), env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=f)
    comp = run_dir / "compressions"
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not list(comp.glob("part-*.parquet")):
            assert time.monotonic() < deadline, "the compression stage did not start"
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{err.read_text(errors='replace')}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (comp / "_SUCCESS").exists(), "killed after the compression stage"
    assert not (run_dir / "judgments" / "_SUCCESS").exists()


def run_cli(recipe_path: Path, err: Path, timeout: float = 900) -> None:
    with open(err, "wb") as f:
        out = subprocess.run(cli("run", str(recipe_path), "-q"), env=child_env(), stdout=subprocess.PIPE, stderr=f,
                             timeout=timeout)
    assert out.returncode == 0, err.read_text(errors="replace")[-4000:]


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def requests_sent(run_dir: Path) -> int:
    return sum(int(s.get("requests_sent", 0)) for inv in manifest(run_dir)["invocations"] for s in inv["llm"].values())


# -- unit: what each backend gets, what the manifest says -------------------------------------------------


def test_vllm_cpu_gets_seeds_with_whole_prefills_and_forced_chunking_turns_them_off(tmp_path):
    from bard_data.llm.vllm_settings import CPU_MIN_BATCHED_TOKENS, engine_kwargs_for, seed_plan

    cfg = VLLMBackendConfig(kind="vllm", model="m", max_model_len=2048)
    kw = engine_kwargs_for("m", cfg, on_cpu=True)
    assert kw["enable_chunked_prefill"] is False and kw["max_num_batched_tokens"] == max(2048, CPU_MIN_BATCHED_TOKENS)
    assert seed_plan(cfg, on_cpu=True)[0] is True
    long = VLLMBackendConfig(kind="vllm", model="m", max_model_len=32768)
    assert engine_kwargs_for("m", long, on_cpu=True)["max_num_batched_tokens"] == 32768  # a prompt fits one step
    assert "max_num_batched_tokens" not in engine_kwargs_for("m", VLLMBackendConfig(kind="vllm", model="m"), True)
    # GPU: seeds, vLLM's own scheduling
    gpu = engine_kwargs_for("m", cfg, on_cpu=False)
    assert "enable_chunked_prefill" not in gpu and seed_plan(cfg, on_cpu=False)[0] is True
    # explicit engine_kwargs win; chunked prefill forced on the CPU turns seeds off, and says why
    forced = VLLMBackendConfig(kind="vllm", model="m", max_model_len=2048,
                               engine_kwargs={"enable_chunked_prefill": True, "max_num_batched_tokens": 512})
    kw = engine_kwargs_for("m", forced, on_cpu=True)
    assert kw["enable_chunked_prefill"] is True and kw["max_num_batched_tokens"] == 512
    seeded, why = seed_plan(forced, on_cpu=True)
    assert seeded is False and "enable_chunked_prefill" in why
    # a recipe that turns seeds off keeps vLLM's defaults
    off = VLLMBackendConfig(kind="vllm", model="m", max_model_len=2048, per_request_seed=False)
    assert "enable_chunked_prefill" not in engine_kwargs_for("m", off, on_cpu=True)


def test_reproducibility_per_backend():
    hot, greedy = SamplingConfig(temperature=0.7), SamplingConfig(temperature=0.0)
    v = VLLMBackendConfig(kind="vllm", model="m")
    assert assess(v, hot, on_cpu=True)["reproducible"] is True
    gpu = assess(v, hot, on_cpu=False)
    assert gpu["reproducible"] is False and gpu["seeded"] is True and "batch_invariant" in gpu["why"]
    bi = VLLMBackendConfig(kind="vllm", model="m", batch_invariant=True)
    assert assess(bi, hot, on_cpu=False)["reproducible"] is True
    forced = VLLMBackendConfig(kind="vllm", model="m", engine_kwargs={"enable_chunked_prefill": True})
    e = assess(forced, hot, on_cpu=True)
    assert e["reproducible"] is False and e["seeded"] is False and "enable_chunked_prefill" in e["why"]
    assert assess(VLLMBackendConfig(kind="vllm", model="m", per_request_seed=False), hot, True)["reproducible"] is False
    # greedy needs no seed, but seeds off leave vLLM's chunked prefill on, which is not measured
    assert assess(VLLMBackendConfig(kind="vllm", model="m", per_request_seed=False), greedy, True)["reproducible"] is False
    unchunked = VLLMBackendConfig(kind="vllm", model="m", per_request_seed=False,
                                  engine_kwargs={"enable_chunked_prefill": False})
    assert assess(unchunked, greedy, True)["reproducible"] is True
    assert assess(v, greedy, on_cpu=True)["reproducible"] is True
    t = TransformersBackendConfig(kind="transformers", model="m")
    assert assess(t, hot)["reproducible"] is True and assess(t, hot)["seeded"] is True
    assert assess(t.model_copy(update={"dtype": "bfloat16"}), hot)["reproducible"] is False
    o = OpenAIBackendConfig(kind="openai", model="m", base_url="http://127.0.0.1:1/v1")
    assert assess(o, hot)["reproducible"] == SERVER_DEPENDENT and "verify" in assess(o, hot)["why"]


def test_false_stages_are_said_at_start_and_recorded(tmp_path, tiny_model_dir, shared_data, caplog):
    from bard_data.pipeline.runner import _say_reproducibility

    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    data["compression"]["backend"] = {"kind": "vllm", "model": str(tiny_model_dir),
                                      "engine_kwargs": {"enable_chunked_prefill": True}}
    data["judge"]["backend"] = {"kind": "openai", "model": "x", "base_url": "http://127.0.0.1:1/v1"}
    recipe = load_recipe(write_recipe(tmp_path, data))
    repro = mf.reproducibility(recipe, list(LLM_TABLES), {})
    assert [repro[t]["reproducible"] for t in LLM_TABLES] == [True, False, SERVER_DEPENDENT]
    with caplog.at_level(logging.INFO, logger="bard_data.pipeline.runner"):
        _say_reproducibility(repro, ["compressions", "judgments"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("compressions is not reproducible (vllm")
    assert "enable_chunked_prefill" in warnings[0]
    assert any(r.getMessage().startswith("judgments is reproducible only if the server is") for r in caplog.records)
    # A stage not to be built again keeps the verdict recorded when it was built (same
    # fingerprint); one to be built is assessed anew.
    fps = {t: f"fp-{t}" for t in LLM_TABLES}
    previous = {"fingerprints": fps, "reproducibility": {t: {**repro[t], "why": "as built"} for t in LLM_TABLES}}
    again = mf.reproducibility(recipe, list(LLM_TABLES), fps, previous, pending=["judgments"])
    assert again["teacher_samples"]["why"] == again["compressions"]["why"] == "as built"
    assert again["judgments"]["why"] == repro["judgments"]["why"]
    moved = mf.reproducibility(recipe, list(LLM_TABLES), {**fps, "compressions": "other"}, previous, pending=[])
    assert moved["compressions"]["why"] == repro["compressions"]["why"]


def test_batch_invariant_mode_refused_on_cpu_and_part_of_the_fingerprint(tmp_path, monkeypatch):
    from bard_data.llm.vllm_settings import enable_batch_invariance as _enable_batch_invariance

    with pytest.raises(BackendError, match="needs a GPU"):
        _enable_batch_invariance("m", on_cpu=True)
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    with pytest.raises(BackendError, match="VLLM_BATCH_INVARIANT=1 in the environment needs a GPU"):
        _enable_batch_invariance("m", on_cpu=True)
    # It changes what the engine computes: part of the backend's settings, so of the stage's
    # fingerprint (turning it on recomputes the stage; its requests' cache keys are unchanged).
    off = VLLMBackendConfig(kind="vllm", model="m").model_dump(mode="json")
    on = VLLMBackendConfig(kind="vllm", model="m", batch_invariant=True).model_dump(mode="json")
    assert off["batch_invariant"] is False and on["batch_invariant"] is True


def test_row_seeded_sampler_is_per_row_and_samples_the_distribution():
    import torch

    from bard_data.llm.seeded import RowSeededSampler

    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    ids = torch.zeros(6, 1, dtype=torch.long)

    def draws(rows, seeds, steps=30, **kw):
        s = RowSeededSampler(seeds, temperature=0.8, **kw)
        return torch.stack([s(ids[: len(rows)], logits[rows]).argmax(-1) for _ in range(steps)], dim=1)

    full = draws([0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15])
    # a row's draws are its own: alone, or with other neighbours in another order
    assert torch.equal(draws([3], [13]), full[3:4])
    assert torch.equal(draws([5, 3, 0], [15, 13, 10]), full[[5, 3, 0]])
    assert not torch.equal(draws([3], [99]), full[3:4])  # ...and depend on the seed
    # top_k=1 and a tiny top_p are greedy
    assert (draws([0, 1], [1, 2], top_k=1) == logits[[0, 1]].argmax(-1, keepdim=True)).all()
    assert (draws([0, 1], [1, 2], top_p=1e-6) == logits[[0, 1]].argmax(-1, keepdim=True)).all()
    # Gumbel-max draws follow softmax(logits / T): 4000 draws over 4 tokens
    small = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = RowSeededSampler([7], temperature=1.0)
    counts = torch.bincount(torch.stack([s(ids[:1], small).argmax(-1)[0] for _ in range(4000)]), minlength=4)
    expected = torch.softmax(small[0], -1) * 4000
    assert ((counts - expected).abs() < 5 * expected.sqrt() + 5).all(), (counts, expected)


# -- transformers: kill mid-compression, other batch and shard sizes --------------------------------------------


@pytest.fixture(scope="module")
def tf_reference(tmp_path_factory, tiny_model_dir, shared_data):
    tmp = tmp_path_factory.mktemp("tf-ref")
    recipe = load_recipe(write_recipe(tmp, tiny_recipe(tmp, tiny_model_dir, shared_data)))
    return run_recipe(recipe, quiet=True).run_dir


def test_transformers_kill_in_compression_then_resume_gives_the_same_tables(tf_reference, tmp_path, tiny_model_dir,
                                                                             shared_data):
    recipe_path = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_model_dir, shared_data))
    run_dir = tmp_path / "run"
    kill_in_compression(recipe_path, run_dir, tmp_path / "killed.txt")
    run_cli(recipe_path, tmp_path / "resumed.txt")
    rows = assert_same_build(tf_reference, run_dir)
    m = manifest(run_dir)
    assert m["complete"] is True and [inv["status"] for inv in m["invocations"]] == ["killed", "finished"]
    assert all(m["reproducibility"][t]["reproducible"] is True for t in LLM_TABLES)
    print(f"\ntransformers: killed in compressions, resumed: {rows} rows equal to the uninterrupted run")


def test_transformers_batch_and_shard_size_do_not_change_outputs(tf_reference, tmp_path, tiny_model_dir, shared_data):
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data, shard_size=5)
    for section in ("teacher", "compression", "judge"):
        data[section]["backend"]["batch_size"] = 3
    run_dir = run_recipe(load_recipe(write_recipe(tmp_path, data)), quiet=True).run_dir
    assert_same_build(tf_reference, run_dir)


# -- verify ---------------------------------------------------------------------------------------------------


def test_verify_recomputes_rows_from_the_cache_and_resends_with_resample(tf_reference, tmp_path):
    import shutil

    before = requests_sent(tf_reference)
    rep = verify(tf_reference, sample=3, resample=0, seed=1)
    assert rep["ok"] and set(rep["stages"]) == set(LLM_TABLES)
    for e in rep["stages"].values():
        assert e["rows_checked"] == e["rows_matched"] == 3 and e["not_cached"] == 0 and "resampled" not in e
    assert requests_sent(tf_reference) == before  # no request by default
    rep = verify(tf_reference, sample=2, resample=2, seed=2)
    assert rep["ok"], rep
    assert all(e["resampled"] == e["texts_matched"] == 2 for e in rep["stages"].values())
    m = manifest(tf_reference)
    assert len(m["verifications"]) == 2
    assert m["reproducibility"]["compressions"]["verified"]["texts_matched"] == 2
    assert m["reproducibility"]["compressions"]["reproducible"] is True

    # A cached completion that is not what the table was built from is caught.
    bad = tmp_path / "tampered"
    shutil.copytree(tf_reference, bad)
    with sqlite3.connect(bad / "cache" / "completions.sqlite") as c:
        c.execute("UPDATE completions SET text = text || ' tampered'")
    out = subprocess.run(cli("verify", str(bad), "--sample", "2"), env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1, out.stderr
    assert "MISMATCH" in out.stdout and "columns differ: " in out.stdout, out.stdout
    print("\n" + out.stdout)


def test_verify_resample_catches_a_server_that_ignores_the_seed(tmp_path, tiny_model_dir, shared_data):
    import random

    noise = random.Random()  # the server's own RNG: seeds ignored

    def reply(prompt: str) -> str:
        return f"<think>\nstep {noise.randint(0, 10**9)}\n</think>\n\nThe answer is \\boxed{{1}}."

    with RuleServer(reply=reply) as srv:
        data = tiny_recipe(tmp_path, tiny_model_dir, shared_data, n_problems=3, compression=None, judge=None)
        data["teacher"]["backend"] = {"kind": "openai", "model": "rules", "base_url": srv.base_url,
                                      "api_key_env": "BARD_TEST_NO_KEY"}
        run_dir = run_recipe(load_recipe(write_recipe(tmp_path, data)), quiet=True).run_dir
        assert all("seed" in body for body in srv.requests)  # a seed goes with every request
        assert manifest(run_dir)["reproducibility"]["teacher_samples"]["reproducible"] == SERVER_DEPENDENT
        rep = verify(run_dir, sample=2)
        assert rep["ok"]  # the rows are what the cache says
        rep = verify(run_dir, sample=2, resample=2)
        assert not rep["ok"]
        e = rep["stages"]["teacher_samples"]
        assert e["resampled"] == 2 and e["texts_matched"] == 0
        entry = manifest(run_dir)["reproducibility"]["teacher_samples"]
        assert entry["reproducible"] is False and "verify --resample" in entry["why"]
        # ...and the next run of the recipe keeps saying so (the stage's fingerprint is the same;
        # another server would be another fingerprint, with its own verdict).
        run_recipe(load_recipe(write_recipe(tmp_path, data)), quiet=True)
        assert manifest(run_dir)["reproducibility"]["teacher_samples"]["reproducible"] is False


# -- vLLM offline engine on the CPU -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_model(tiny_model_dir, tmp_path_factory, shared_data) -> Path:
    return vllm_model_dir(tiny_model_dir, lambda: tmp_path_factory.mktemp("tiny-vllm"), shared_data)


def test_vllm_cpu_kill_in_compression_then_resume_gives_the_same_tables(tmp_path, vllm_model, shared_data):
    """Each ``bard-data run`` is its own process with its own engine, so the resumed run's engine
    has sampled nothing the killed one had: only per-request seeds make its samples the same. The
    killed run also uses another shard size (so other batches) than the reference."""
    def recipe(folder: Path, shard_size: int) -> Path:
        folder.mkdir()
        data = tiny_recipe(folder, vllm_model, shared_data, shard_size=shard_size)
        backend = {"kind": "vllm", "model": str(vllm_model), "max_model_len": 1024}
        for section in ("teacher", "compression", "judge"):
            data[section]["backend"] = backend
        return write_recipe(folder, data)

    ref_recipe = recipe(tmp_path / "ref", 4)
    run_cli(ref_recipe, tmp_path / "ref.txt")
    got_recipe = recipe(tmp_path / "killed", 3)
    kill_in_compression(got_recipe, tmp_path / "killed" / "run", tmp_path / "killed.txt")
    run_cli(got_recipe, tmp_path / "resumed.txt")
    rows = assert_same_build(tmp_path / "ref" / "run", tmp_path / "killed" / "run")
    m = manifest(tmp_path / "killed" / "run")
    assert m["complete"] is True and [inv["status"] for inv in m["invocations"]] == ["killed", "finished"]
    for t in LLM_TABLES:
        assert m["reproducibility"][t]["reproducible"] is True and m["reproducibility"][t]["seeded"] is True
    assert requests_sent(tmp_path / "killed" / "run") == requests_sent(tmp_path / "ref" / "run")
    print(f"\nvLLM CPU: killed in compressions, resumed with another shard size: {rows} rows equal")


# -- openai backend against vLLM's real server, seeded ------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def vllm_server(request, vllm_model, tmp_path_factory):
    """Started when the module starts (shared per session, tests/servers.py), so it warms up
    while the other tests of the module run."""
    return shared_vllm_server(vllm_model, tmp_path_factory.mktemp("vllm-server"), request.config)


def test_openai_seeded_kill_in_compression_then_resume_gives_the_same_tables(vllm_server, tmp_path, vllm_model,
                                                                             shared_data):
    srv = vllm_server.wait_ready()

    def recipe(folder: Path, shard_size: int, concurrency: int) -> Path:
        folder.mkdir()
        data = tiny_recipe(folder, vllm_model, shared_data, shard_size=shard_size)
        backend = {"kind": "openai", "model": SERVED_NAME, "base_url": srv.base_url,
                   "api_key_env": "BARD_TEST_NO_KEY", "concurrency": concurrency}
        for section in ("teacher", "compression", "judge"):
            data[section]["backend"] = backend
        return write_recipe(folder, data)

    ref = run_recipe(load_recipe(recipe(tmp_path / "ref", 4, 8)), quiet=True).run_dir
    got_recipe = recipe(tmp_path / "killed", 4, 8)
    kill_in_compression(got_recipe, tmp_path / "killed" / "run", tmp_path / "killed.txt")
    resumed = recipe(tmp_path / "resumed", 3, 2)  # another shard size and concurrency, same build
    run_recipe(load_recipe(resumed), run_dir=tmp_path / "killed" / "run", quiet=True)
    rows = assert_same_build(ref, tmp_path / "killed" / "run")
    assert manifest(ref)["reproducibility"]["compressions"]["reproducible"] == SERVER_DEPENDENT
    print(f"\nopenai (vLLM server, seeded): killed in compressions, resumed: {rows} rows equal")
