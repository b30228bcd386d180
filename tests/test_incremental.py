"""Iterating on a recipe: an edited recipe recomputes exactly the stages it changes (the others keep
their files), a completion cache shared by several runs, a kill during a rebuild, and `diff`.

Requests are counted from the manifest's invocations (the cache's ledger), never timed.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest

from bard_data.api import run_recipe
from bard_data.config import load_recipe
from bard_data.pipeline.store import ArtifactStore
from tests.recipes import tiny_recipe, write_recipe
from tests.test_reliability_runs import assert_same_tables, child_env, cli

ALL = ["problems", "teacher_samples", "imported_samples", "gold_chains", "compressions", "judgments",
       "filtered_compressions", "sft", "rl"]


def last(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["invocations"][-1]


def sent(run_dir: Path) -> tuple[int, int]:
    """(requests sent, cache hits) of the last invocation, over its models."""
    llm = last(run_dir)["llm"]
    return (sum(s.get("requests_sent", 0) for s in llm.values()), sum(s.get("cache_hits", 0) for s in llm.values()))


def mtimes(run_dir: Path, table: str) -> dict:
    return {p: p.stat().st_mtime_ns for p in (run_dir / table).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir, shared_data):
    tmp = tmp_path_factory.mktemp("base")
    data = tiny_recipe(tmp, tiny_model_dir, shared_data)
    run_recipe(load_recipe(write_recipe(tmp, data)), quiet=True)
    return data, tmp / "run"


def rebuild(base, tmp_path: Path, edit) -> tuple[Path, Path, dict]:
    """A copy of the base run (its cache too), the recipe edited by ``edit(data)``, run again."""
    data, run = base
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = {t: mtimes(copy, t) for t in ALL}
    data = json.loads(json.dumps(data))
    data["run_dir"] = str(copy)
    edit(data)
    run_recipe(load_recipe(write_recipe(tmp_path, data)), quiet=True)
    return run, copy, before


def recomputed(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "manifest.json").read_text())["history"][-1]["recomputed"]


def check_kept(copy: Path, before: dict, rebuilt: list[str]) -> None:
    """The stages not rebuilt keep their files, untouched."""
    for t in ALL:
        if t not in rebuilt:
            assert mtimes(copy, t) == before[t], t


def test_balance_edit_recomputes_sft_only_and_sends_nothing(base, tmp_path):
    _, copy, before = rebuild(base, tmp_path, lambda d: d["balance"].update(n_bins=4))
    assert recomputed(copy) == ["sft"]
    assert last(copy)["stages_run"] == ["sft"]
    assert sent(copy) == (0, 0)  # no LLM stage ran: no engine, no request
    check_kept(copy, before, ["sft"])
    assert ArtifactStore(copy).read("balance").height == 4
    reasons = json.loads((copy / "manifest.json").read_text())["history"][-1]["reasons"]
    assert reasons == {"sft": ["balance.n_bins: 3 -> 4"]}


def test_format_edit_recomputes_sft_and_rl(base, tmp_path):
    _, copy, before = rebuild(base, tmp_path, lambda d: d.update(format={"budget_template": "Budget: {{ budget }}."}))
    assert recomputed(copy) == ["sft", "rl"]
    assert sent(copy) == (0, 0)
    check_kept(copy, before, ["sft", "rl"])
    assert "Budget: " in ArtifactStore(copy).read("rl")["prompt"][0][0]["content"]


def test_judge_threshold_edit_sends_nothing(base, tmp_path):
    _, copy, before = rebuild(base, tmp_path, lambda d: d["judge"].update(min_score=0.9))
    assert recomputed(copy) == ["judgments", "filtered_compressions", "sft"]
    n_judged = ArtifactStore(copy).read("judgments").height
    assert sent(copy) == (0, n_judged)  # every verdict comes back from the cache, re-scored
    check_kept(copy, before, ["judgments", "filtered_compressions", "sft"])


def test_budget_edit_sends_only_the_changed_compressions(base, tmp_path):
    old_run, copy, before = rebuild(base, tmp_path, lambda d: d["compression"]["budgets"].update(fractions=[0.3, 0.5]))
    assert recomputed(copy) == ["compressions", "judgments", "filtered_compressions", "sft", "rl"]
    old = ArtifactStore(old_run).read("compressions").select("sample_id", "budget")
    new = ArtifactStore(copy).read("compressions")
    fresh = new.join(old, on=["sample_id", "budget"], how="anti")
    assert 0 < fresh.height < new.height  # the 0.3 budgets are the same requests as before
    requests, hits = sent(copy)
    # A new (chain, budget) costs its attempts and its judgment; the unchanged ones are hits.
    assert requests == int(fresh["attempts"].sum()) + fresh.height
    assert requests + hits == int(new["attempts"].sum()) + new.height
    check_kept(copy, before, recomputed(copy))


def test_compression_prompt_edit_sends_every_compression_again(base, tmp_path):
    def edit(d):
        from bard_data.config.stages import DEFAULT_COMPRESSION_PROMPT

        d["compression"]["prompt_template"] = DEFAULT_COMPRESSION_PROMPT + "\nBe concise."

    _, copy, before = rebuild(base, tmp_path, edit)
    assert recomputed(copy) == ["compressions", "judgments", "filtered_compressions", "sft"]
    new = ArtifactStore(copy).read("compressions")
    requests, hits = sent(copy)
    assert requests >= int(new["attempts"].sum())  # every compression is a new request
    assert requests + hits == int(new["attempts"].sum()) + new.height
    check_kept(copy, before, recomputed(copy))


def test_teacher_sampling_edit_resamples_the_teacher(base, tmp_path):
    old_run, copy, _ = rebuild(base, tmp_path, lambda d: d["teacher"]["sampling"].update(temperature=0.7))
    assert recomputed(copy)[:2] == ["teacher_samples", "gold_chains"]
    n_samples = ArtifactStore(copy).read("teacher_samples").height
    gold_old = set(ArtifactStore(old_run).read("gold_chains")["sample_id"])
    gold_new = set(ArtifactStore(copy).read("gold_chains")["sample_id"])
    requests, _ = sent(copy)
    if gold_new == gold_old:  # the random tiny model never solves GSM8K: the gold chains are the imported ones
        assert requests == n_samples
    else:
        assert requests > n_samples


def test_source_edit_recomputes_from_problems_and_reuses_the_cache(base, tmp_path):
    _, copy, before = rebuild(base, tmp_path, lambda d: d["sources"][0].update(limit=6))
    assert recomputed(copy)[0] == "problems"
    assert ArtifactStore(copy).read("problems").height == 6
    assert sent(copy)[0] == 0  # every request for the 6 remaining problems is in the cache
    check_kept(copy, before, recomputed(copy))


def test_shared_cache_new_run_dir_sends_nothing(base, tmp_path):
    data, run = base
    data = {**json.loads(json.dumps(data)), "run_dir": str(tmp_path / "other"), "cache_dir": str(run / "cache")}
    run_recipe(load_recipe(write_recipe(tmp_path, data)), quiet=True)
    assert sent(tmp_path / "other")[0] == 0
    assert not (tmp_path / "other" / "cache").exists()
    assert assert_same_tables(run, tmp_path / "other") > 0


def test_two_runs_writing_one_cache_at_once(tmp_path, tiny_model_dir, shared_data):
    """Two processes filling one shared cache concurrently: both finish, nothing is lost (each
    recipe rerun against the cache sends nothing), and the cache holds both runs' completions."""
    cache = tmp_path / "shared-cache"
    paths = []
    for k in (1, 2):
        d = tiny_recipe(tmp_path / f"r{k}", tiny_model_dir, shared_data, n_problems=4, seed=k)
        (tmp_path / f"r{k}").mkdir()
        for section in ("teacher", "compression", "judge"):
            d[section]["seed"] = 100 * k + d[section]["seed"]  # other requests than the other run's
        paths.append(write_recipe(tmp_path / f"r{k}", d))
    procs = [subprocess.Popen(cli("run", str(p), "-q", "--cache-dir", str(cache)), env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for p in paths]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    total = sum(sent(p.parent / "run")[0] for p in paths)
    with sqlite3.connect(cache / "completions.sqlite") as c:
        assert c.execute("select count(*) from completions").fetchone()[0] == total > 0
    for p in paths:  # each recipe again, in a new run directory, against the shared cache
        shutil.rmtree(p.parent / "run")
        out = subprocess.run(cli("run", str(p), "-q", "--cache-dir", str(cache)), env=child_env(),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        assert sent(p.parent / "run")[0] == 0


def test_sigkill_during_a_rebuild_resumes_to_the_uninterrupted_tables(base, tmp_path):
    from bard_data.config.stages import DEFAULT_COMPRESSION_PROMPT

    data, run = base
    edited = json.loads(json.dumps(data))
    edited["compression"]["prompt_template"] = DEFAULT_COMPRESSION_PROMPT + "\nKeep it short."
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(run, ref)
    shutil.copytree(run, killed)
    run_recipe(load_recipe(write_recipe(tmp_path, {**edited, "run_dir": str(ref)}, "ref.yaml")), quiet=True)
    path = write_recipe(tmp_path, {**edited, "run_dir": str(killed)}, "killed.yaml")
    start = time.time()
    proc = subprocess.Popen(cli("run", str(path), "-q"), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

    def rebuilt_shards() -> int:  # compression shards already written under the new fingerprint
        return sum(1 for p in (killed / "compressions").glob("part-*.parquet") if p.stat().st_mtime > start)

    deadline = time.monotonic() + 300
    while proc.poll() is None and rebuilt_shards() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the rebuild finished before it could be killed: " + proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not ArtifactStore(killed).is_built("compressions")  # mid-rebuild: not marked done
    out = subprocess.run(cli("run", str(path), "-q"), env=child_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert assert_same_tables(ref, killed) > 0
    # The kill cost no request twice: the requests of both invocations equal the uninterrupted rebuild's.
    inv = json.loads((killed / "manifest.json").read_text())["invocations"]
    killed_requests = sum(s.get("requests_sent", 0) for i in inv[-2:] for s in i["llm"].values())
    assert killed_requests == sent(ref)[0]


def test_diff_shows_the_changed_key_and_both_histograms(base, tmp_path):
    old_run, copy, _ = rebuild(base, tmp_path, lambda d: d["balance"].update(n_bins=4))
    out = subprocess.run(cli("diff", str(old_run), str(copy)), env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "balance.n_bins: 3 -> 4" in out.stdout
    js = subprocess.run(cli("diff", str(old_run), str(copy), "--json"), env=child_env(), capture_output=True,
                        text=True, timeout=300)
    d = json.loads(js.stdout)
    keys = {c["key"]: (c["a"], c["b"]) for c in d["recipe"]}
    assert keys == {"balance.n_bins": (3, 4)}
    hist = d["parts"]["budget_histogram"]
    assert len(hist["a"]) == 3 and len(hist["b"]) == 4
    a, b = ArtifactStore(old_run).read("sft"), ArtifactStore(copy).read("sft")
    s = d["sft"]
    assert (s["rows_a"], s["rows_b"]) == (a.height, b.height)
    assert s["unchanged"] + s["removed"] + s["changed"] == a.height
    assert s["unchanged"] + s["added"] + s["changed"] == b.height
    std = pl.col("kind") == "standard"
    assert a.filter(std).height == b.filter(std).height or s["added"] + s["removed"] > 0


def test_diff_of_exported_datasets(base, tmp_path):
    from bard_data.api import diff_builds, export

    old_run, copy, _ = rebuild(base, tmp_path, lambda d: d["balance"].update(n_bins=4))
    a = export(old_run, tmp_path / "exp-a").out_dir
    b = export(copy, tmp_path / "exp-b").out_dir
    d = diff_builds(a, b)
    assert [c["key"] for c in d["recipe"]] == ["balance.n_bins"]
    assert d["sft"]["rows_a"] == ArtifactStore(old_run).read("sft").height
    assert d["sft"]["rows_b"] == ArtifactStore(copy).read("sft").height
    x, y = d["parts"]["budget_histogram"]
    assert (x.height, y.height) == (3, 4)


def test_a_trace_edit_rebuilds_problems_only_when_the_trace_defines_problems(base, tmp_path):
    """problems reads a trace file only when it has problems_from: other trace edits leave the
    problems' fingerprint (and so teacher_samples') as it was."""
    from bard_data.config import parse_recipe
    from bard_data.pipeline.fingerprints import source_files, stage_fingerprints
    from bard_data.pipeline.runner import stage_order
    from bard_data.stages import STAGES

    data, _ = base

    def fps(edit):
        d = json.loads(json.dumps(data))
        edit(d)
        r = parse_recipe(d, "<test>", tmp_path)
        order = stage_order(STAGES, r)
        return {k: v["fingerprint"] for k, v in stage_fingerprints(order, r, source_files(r, {})).items()}

    ref = fps(lambda d: None)
    limited = fps(lambda d: d["traces"][0].update(limit=5))
    assert limited["problems"] == ref["problems"] and limited["teacher_samples"] == ref["teacher_samples"]
    assert limited["imported_samples"] != ref["imported_samples"]
    defining = fps(lambda d: d["traces"][0].update(problems_from=True, columns={**d["traces"][0]["columns"],
                                                                                  "answer": "answer"}))
    assert defining["problems"] != ref["problems"]
