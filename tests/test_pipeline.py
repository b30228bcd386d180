"""A whole recipe on the tiny offline model: every stage, the funnel, resume, the CLI.

A random model writes garbage, so these tests assert plumbing and bookkeeping: schemas, ids,
funnel arithmetic, what a resumed run recomputes and how many LLM requests it sends.
"""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest

from bard_data.api import run_recipe
from bard_data.config import load_recipe
from bard_data.pipeline.funnel import check_funnel
from bard_data.pipeline.store import ArtifactStore
from tests.recipes import tiny_recipe, write_recipe

TABLES = ["problems", "teacher_samples", "imported_samples", "gold_chains", "compressions", "judgments", "sft", "rl"]


def _requests_sent(run_dir) -> int:
    m = json.loads((run_dir / "manifest.json").read_text())
    return sum(inv["llm"].get(k, {}).get("requests_sent", 0) for inv in m["invocations"][-1:] for k in inv["llm"])


def _frames(run_dir) -> dict[str, pl.DataFrame]:
    store = ArtifactStore(run_dir)
    return {t: store.read(t) for t in TABLES if store.exists(t)}


def _as_set(df: pl.DataFrame) -> set:
    # Nested columns (messages) compare through their JSON text.
    return set(map(str, df.with_columns([pl.col(c).cast(pl.Utf8) if not df.schema[c].is_nested() else pl.col(c).map_elements(
        lambda v: json.dumps(v.to_list() if hasattr(v, "to_list") else v, default=str), return_dtype=pl.Utf8)
        for c in df.columns]).rows()))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, shared_data):
    tmp = tmp_path_factory.mktemp("full")
    recipe = load_recipe(write_recipe(tmp, tiny_recipe(tmp, tiny_model_dir, shared_data)))
    ctx = run_recipe(recipe, quiet=True)
    return ctx.run_dir, recipe


def test_every_table_written_with_contract_columns(full_run):
    run_dir, _ = full_run
    f = _frames(run_dir)
    assert set(f) == set(TABLES)
    assert f["problems"].height == 8
    assert {"problem_id", "source", "question", "answer", "domain", "split", "meta"} <= set(f["problems"].columns)
    assert f["teacher_samples"].height == 16  # 8 problems x 2 samples
    assert {"sample_id", "problem_id", "model", "prompt", "reasoning", "response", "predicted_answer",
            "is_correct", "reasoning_tokens", "finish_reason"} <= set(f["teacher_samples"].columns)
    # GSM8K worked solutions verify against their own gold answer: every imported trace is correct.
    assert f["imported_samples"].height == 8
    assert f["imported_samples"]["is_correct"].all()
    assert f["gold_chains"].height >= 8
    comps = f["compressions"]
    assert {"compression_id", "sample_id", "group_id", "budget", "compressed_tokens", "deviation",
            "within_tolerance", "answer_preserved"} <= set(comps.columns)
    # deviation is exactly (tokens - budget) / budget
    dev = (comps["compressed_tokens"] - comps["budget"]) / comps["budget"]
    assert (dev - comps["deviation"]).abs().max() < 1e-12
    # budgets of one contrastive group are strictly increasing with rank
    g = comps.sort("group_id", "budget_rank").group_by("group_id", maintain_order=True).agg(pl.col("budget"))
    assert all(b == sorted(set(b)) for b in g["budget"].to_list())
    assert f["judgments"].height == comps.height
    sft = f["sft"]
    assert sft.schema["messages"] == pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8}))
    assert set(sft["kind"].unique()) <= {"budget", "standard"}
    assert sft.filter(pl.col("kind") == "standard")["budget"].null_count() == sft.filter(pl.col("kind") == "standard").height
    rl = f["rl"]
    assert {"prompt", "budget", "solution", "difficulty", "source"} <= set(rl.columns)
    assert (rl["budget"] > 0).all()


def test_ids_are_unique_and_content_derived(full_run):
    run_dir, _ = full_run
    f = _frames(run_dir)
    for t, col in [("problems", "problem_id"), ("teacher_samples", "sample_id"), ("compressions", "compression_id")]:
        assert f[t][col].n_unique() == f[t].height, t


def test_funnel_accounts_for_every_row(full_run):
    run_dir, _ = full_run
    funnel = ArtifactStore(run_dir).read("funnel")
    assert check_funnel(funnel) == []
    stages = funnel["stage"].unique().to_list()
    assert set(TABLES) <= set(stages)
    # every gold chain that compression did not keep has a reason, and every kept row is a row
    comps = funnel.filter(pl.col("stage") == "compressions").row(0, named=True)
    assert comps["rows_out"] == ArtifactStore(run_dir).read("compressions").height


def test_rerun_of_finished_run_does_no_work(full_run):
    run_dir, recipe = full_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("part-*.parquet")}
    run_recipe(recipe, quiet=True)
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("part-*.parquet")}
    assert {k: v for k, v in after.items() if "funnel" not in str(k)} == {k: v for k, v in before.items() if "funnel" not in str(k)}
    assert _requests_sent(run_dir) == 0


def test_interrupted_run_resumes_to_same_tables_without_repeating_requests(full_run, tmp_path, tiny_model_dir, shared_data):
    ref_dir, _ = full_run
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_model_dir, shared_data)))

    class Stop(Exception):
        pass

    written = []

    def kill_after_three(table, shard):
        written.append((table, shard))
        if table == "compressions" and sum(t == "compressions" for t, _ in written) == 2:
            raise Stop()

    with pytest.raises(Stop):
        run_recipe(recipe, quiet=True, hooks=[kill_after_three])
    cache_rows_before = _cache_rows(tmp_path / "run")
    first_sent = _requests_sent(tmp_path / "run")
    assert first_sent > 0
    run_recipe(recipe, quiet=True)
    resumed_sent = _requests_sent(tmp_path / "run")
    # A resumed run sends exactly the requests that were not cached yet: total cache growth.
    assert resumed_sent == _cache_rows(tmp_path / "run") - cache_rows_before
    a, b = _frames(ref_dir), _frames(tmp_path / "run")
    assert set(a) == set(b)
    for t in a:
        assert _as_set(a[t]) == _as_set(b[t]), t


def _cache_rows(run_dir) -> int:
    import sqlite3

    with sqlite3.connect(run_dir / "cache" / "completions.sqlite") as c:
        return c.execute("select count(*) from completions").fetchone()[0]


def test_cli_run_and_status(full_run):
    run_dir, recipe = full_run
    out = subprocess.run([sys.executable, "-m", "bard_data.cli", "status", str(run_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "teacher_samples" in out.stdout and "done" in out.stdout
    out = subprocess.run([sys.executable, "-m", "bard_data.cli", "run", recipe.source_file, "--run-dir", str(run_dir), "-q"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "complete" in out.stdout


def test_edited_recipe_says_what_it_recomputes(full_run, tmp_path):
    """An edited recipe in the same run directory: the CLI prints, before any work, which stages
    it recomputes and which keys changed (--dry-run prints only that and writes nothing)."""
    run_dir, recipe = full_run
    data = yaml_load(recipe.source_file)
    data["judge"]["min_score"] = 0.9
    p = tmp_path / "edited.yaml"
    p.write_text(__import__("yaml").safe_dump(data))
    before = (run_dir / "manifest.json").read_bytes()
    out = subprocess.run([sys.executable, "-m", "bard_data.cli", "run", str(p), "--run-dir", str(run_dir), "--dry-run"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "recompute judgments: judge.min_score: 0.5 -> 0.9" in lines
    assert "recompute sft: its input 'filtered_compressions' is rebuilt" in lines
    assert (run_dir / "manifest.json").read_bytes() == before
    got = {ln.split()[1].rstrip(":"): ln.split()[0] for ln in out.stdout.strip().splitlines()}
    assert got == {"problems": "done", "teacher_samples": "done", "imported_samples": "done", "gold_chains": "done",
                   "compressions": "done", "judgments": "recompute", "filtered_compressions": "recompute",
                   "sft": "recompute", "rl": "done"}


def yaml_load(path):
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def test_sft_written_in_slices_equals_one_part(full_run, tmp_path, monkeypatch):
    """SFT messages built and written a slice at a time give the rows one part gives, in order."""
    import shutil
    from types import SimpleNamespace

    from bard_data.pipeline.build import run_whole
    from bard_data.stages import sft

    run_dir, recipe = full_run
    ref = ArtifactStore(run_dir)
    assert len(ref.parts("sft")) == 1
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    store = ArtifactStore(copy)
    monkeypatch.setattr(sft, "SFT_SHARD_BYTES", 200)
    run_whole(SimpleNamespace(recipe=recipe, store=store, on_shard_written=lambda t, i: None), sft.SFTStage())
    assert len(store.parts("sft")) > 2
    a, b = ref.read("sft"), store.read("sft")
    assert a.height > 0 and a.schema == b.schema and a.equals(b)
    ea, eb = ref.read_excluded("sft"), store.read_excluded("sft")
    assert (ea is None and eb is None) or ea.equals(eb)
    fa, fb = ref.shard_funnels("sft"), store.shard_funnels("sft")
    for k in ("rows_in", "rows_out", "added"):
        assert sum(f[k] for f in fa) == sum(f[k] for f in fb)
    assert store.verify_table("sft") == [] and store.read("balance").equals(ref.read("balance"))


def test_sft_text_gathered_on_disk_equals_an_in_memory_join(full_run, tmp_path, monkeypatch):
    """The sft stage gathers its text on disk in the table's order and reads it back in small
    batches; every row's messages equal the ones built from the whole gold_chains and
    compressions tables joined in memory on sample_id and compression_id."""
    import shutil
    from types import SimpleNamespace

    from bard_data.budget.statement import messages_column
    from bard_data.pipeline.build import run_whole
    from bard_data.stages import sft

    run_dir, recipe = full_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    store = ArtifactStore(copy)
    # Every compression passes the filters (the tiny model changes every answer), and both input
    # tables are stored in several parts in an order of their own: the locators have work to do.
    comps = store.read("compressions")
    assert comps.height > 6
    store.write_table("filtered_compressions", comps.drop("compressed_reasoning"))
    for table, df in (("compressions", comps), ("gold_chains", store.read("gold_chains"))):
        df = df.reverse()
        store.clear_table(table)
        for i, k in enumerate(range(0, df.height, max(1, df.height // 3))):
            store.write_shard(table, i, df.slice(k, max(1, df.height // 3)))
    monkeypatch.setattr(sft, "SFT_SHARD_BYTES", 300)
    run_whole(SimpleNamespace(recipe=recipe, store=store, on_shard_written=lambda t, i: None), sft.SFTStage())
    assert not store.scratch_dir("sft").exists()
    got = store.read("sft")
    assert {"budget", "standard"} <= set(got["kind"])
    gold = store.read("gold_chains").select("sample_id", "question", "reasoning", "response")
    comps = store.read("compressions", ["compression_id", "compressed_reasoning"])
    joined = (got.with_row_index("_i").join(gold, on="sample_id", how="left")
              .join(comps, on="compression_id", how="left").sort("_i"))
    parts = []
    for kind in ("budget", "standard"):
        rows = joined.filter(pl.col("kind") == kind)
        reasoning = rows["compressed_reasoning"] if kind == "budget" else rows["reasoning"]
        budget = rows["budget"] if kind == "budget" else pl.Series([None] * rows.height, dtype=pl.Int64)
        parts.append(rows.select("_i", messages_column(recipe.format, rows["question"], budget, reasoning,
                                                       rows["response"], recipe.student.think_tags).alias("want")))
    want = pl.concat(parts).sort("_i")["want"]
    assert _as_set(got.select("messages")) == _as_set(want.to_frame("messages"))
    assert got["messages"].to_list() == want.to_list()


def test_no_gold_chains_still_completes_with_typed_empty_tables(tmp_path, tiny_model_dir, shared_data):
    """A weak teacher can leave no verified chain: every later stage finishes with empty tables of
    the right columns (no engine started for nothing), and the funnel says why."""
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:4]]
    traces = tmp_path / "wrong.jsonl"
    traces.write_text("".join(json.dumps({"question": r["question"], "answer": "Some steps.\n#### 987654321"}) + "\n"
                              for r in rows))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, shared_data, n_problems=4, teacher=None)
    recipe["traces"][0]["path"] = str(traces)
    ctx = run_recipe(load_recipe(write_recipe(tmp_path, recipe)), quiet=True)
    f = _frames(ctx.run_dir)
    assert f["gold_chains"].height == 0
    assert f["compressions"].height == 0 and "answer_preserved" in f["compressions"].columns
    assert f["judgments"].height == 0 and f["sft"].height == 0
    assert f["rl"].height == 4
    store = ArtifactStore(ctx.run_dir)
    assert store.read_excluded("gold_chains")["reason"].to_list() == ["teacher_wrong"] * 4
    assert _requests_sent(ctx.run_dir) == 0
    assert check_funnel(store.read("funnel")) == []
