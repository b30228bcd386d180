"""``bard-data plan``, live figures and cost accounting, against real runs of the same recipes.

The tiny offline model (transformers backend) builds one run in three steps -- planned fresh,
killed after its first compression shard and planned again, resumed to the end and planned a
last time -- and each plan is checked against what the run then really sent (its manifest). A rule
server behind the OpenAI-compatible backend, with prices in the recipe, checks the cost
arithmetic of the plan and of the manifest.
"""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest

from bard_data.api import run_recipe
from bard_data.config import load_recipe
from bard_data.pipeline import build as stage_build
from bard_data.pipeline.progress import StageProgress
from bard_data.pipeline.store import ArtifactStore
from bard_data.plan import parse_throughput, plan_recipe
from bard_data.report.stats import report
from tests.recipes import tiny_recipe, write_recipe
from tests.servers import RuleServer

LLM_STAGES = ("teacher_samples", "compressions", "judgments")


class Stop(Exception):
    pass


class _Recorder(StageProgress):
    """The runner's live figures, kept for the test (one per LLM stage run)."""

    made: list["_Recorder"] = []

    def __init__(self, bar, planned, **kw):
        super().__init__(bar, planned, **kw)
        _Recorder.made.append(self)


def _stage(plan, name):
    return next(s for s in plan.to_json()["stages"] if s["stage"] == name)


def _part(plan, stage, part):
    return next(p for p in _stage(plan, stage)["parts"] if p["name"] == part)


def _spent(run_dir, invocation=None) -> dict:
    m = json.loads((run_dir / "manifest.json").read_text())
    if invocation is None:
        return m["llm_stages"]
    return m["invocations"][invocation].get("llm_stages", {})


def _made(per_model: dict) -> int:
    return sum(s["requests_sent"] + s["cache_hits"] for s in per_model.values())


def _total(per_model: dict, key: str) -> float:
    return sum(s.get(key, 0) for s in per_model.values())


@pytest.fixture(scope="module")
def build(tmp_path_factory, tiny_model_dir, shared_data):
    """Gold policy ``first``: imported chains win, so the first compression pass is known before
    the teacher runs (policy ``shortest`` gives a range, see test_open_problems_give_a_range)."""
    tmp = tmp_path_factory.mktemp("plan")
    data = tiny_recipe(tmp, tiny_model_dir, shared_data)
    data["teacher"]["gold_policy"] = "first"
    recipe = load_recipe(write_recipe(tmp, data))
    run_dir = tmp / "run"
    out = {"recipe": recipe, "run_dir": run_dir, "fresh": plan_recipe(recipe)}
    assert not run_dir.exists()  # a plan writes nothing

    def kill_after_first_compression_shard(table, shard):
        if table == "compressions":
            raise Stop()

    _Recorder.made = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage_build, "StageProgress", _Recorder)
        with pytest.raises(Stop):
            run_recipe(recipe, quiet=True, hooks=[kill_after_first_compression_shard])
        out["partial_files"] = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
        out["partial"] = plan_recipe(recipe)
        out["partial_files_after"] = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
        run_recipe(recipe, quiet=True)
    out["progress"] = list(_Recorder.made)
    out["done"] = plan_recipe(recipe)
    out["done_fresh"] = plan_recipe(recipe, fresh=True)
    return out


def test_fresh_plan_exact_counts_match_the_real_run(build):
    run_dir, fresh = build["run_dir"], build["fresh"]
    spent = _spent(run_dir)
    store = ArtifactStore(run_dir)
    comps = store.read("compressions")
    teacher = _part(fresh, "teacher_samples", "requests")
    assert teacher["exact"] and teacher["requests"]["exp"] == 16 == _made(spent["teacher_samples"])  # 8 x 2 samples
    first = _part(fresh, "compressions", "first pass")
    assert first["exact"] and first["requests"]["exp"] == comps.height > 0  # one first attempt per compression
    # Prompt tokens: the model's tokenizer and chat template, as the transformers backend counts them.
    assert teacher["prompt_counted"] == "tokenizer"
    assert teacher["prompt_tokens"]["exp"] == _total(spent["teacher_samples"], "prompt_tokens")
    assert fresh.to_json()["data"]["imported_correct"] == 8


def test_fresh_plan_bounds_hold_against_the_real_run(build):
    run_dir, fresh = build["run_dir"], build["fresh"]
    spent = _spent(run_dir)
    comps = ArtifactStore(run_dir).read("compressions")
    retries = _part(fresh, "compressions", "retries")
    real_retries = int(comps["attempts"].sum()) - comps.height
    assert retries["requests"]["lo"] <= real_retries <= retries["requests"]["hi"]
    judge = _stage(fresh, "judgments")["total"]
    assert judge["requests"]["lo"] <= _made(spent["judgments"]) <= judge["requests"]["hi"]
    for stage in LLM_STAGES:
        t = _stage(fresh, stage)["total"]
        assert _made(spent[stage]) <= t["requests"]["hi"], stage
        assert _total(spent[stage], "completion_tokens") <= t["completion_tokens"]["hi"], stage
    # The same estimate, asked on the finished run with --fresh, compares itself with the spend.
    assert _stage(build["done_fresh"], "judgments")["total"]["requests"] == judge["requests"]
    assert "estimate beside what the run spent" in build["done_fresh"].render()


def test_partial_run_counts_cached_requests_and_writes_nothing(build):
    run_dir, partial = build["run_dir"], build["partial"]
    assert build["partial_files"] == build["partial_files_after"]  # the plan read the run and its cache only
    killed = _spent(run_dir, 0)
    resumed = _spent(run_dir, 1)
    teacher = _stage(partial, "teacher_samples")
    assert teacher["status"] == "done" and teacher["total"]["cached"] == 16 and teacher["total"]["to_send"]["hi"] == 0
    comp = _stage(partial, "compressions")
    # Every request of the shard written before the kill is cached (and counted), the rest is to send.
    assert comp["total"]["cached"] == killed["compressions"][next(iter(killed["compressions"]))]["requests_sent"] > 0
    send = comp["total"]["to_send"]
    assert send["lo"] <= _total(resumed["compressions"], "requests_sent") <= send["hi"]
    # The first pass stays exact and the judge, not started, has nothing cached.
    assert _part(partial, "compressions", "first pass")["exact"]
    assert _stage(partial, "judgments")["total"]["cached"] == 0


def test_finished_run_plan_equals_what_was_spent(build):
    done, run_dir = build["done"], build["run_dir"]
    spent = _spent(run_dir)
    for stage in LLM_STAGES:
        s = _stage(done, stage)
        assert s["status"] == "done" and s["total"]["to_send"]["hi"] == 0
        assert s["total"]["exact"] and s["total"]["requests"]["exp"] == _made(spent[stage]), stage
        assert s["total"]["cached_prompt_tokens"] == _total(spent[stage], "prompt_tokens"), stage
        assert s["total"]["cached_completion_tokens"] == _total(spent[stage], "completion_tokens"), stage
    text = done.render()
    assert "estimate beside what the run spent" in text and "made (sent + cached)" in text
    # The run measured its throughput: the plan uses it for time.
    assert done.source == "measured in this run" and set(done.throughput) == set(LLM_STAGES)


def test_manifest_generate_seconds_and_per_stage_counters(build):
    m = json.loads((build["run_dir"] / "manifest.json").read_text())
    for stage in LLM_STAGES:
        for model, s in m["llm_stages"][stage].items():
            assert s["backend"] == "transformers"
            assert s["generate_seconds"] > 0 and s["requests_sent"] > 0, stage
    for inv in m["invocations"]:
        for stage, per_model in inv["llm_stages"].items():
            assert all(s["generate_seconds"] > 0 for s in per_model.values() if s["requests_sent"]), stage
    # per-model totals are the sum of the per-stage records
    model, tot = next(iter(m["tokens"].items()))
    assert tot["requests_sent"] == sum(m["llm_stages"][s][model]["requests_sent"] for s in LLM_STAGES)
    assert tot["generate_seconds"] > 0


def test_live_figures_count_every_request(build):
    resumed = _spent(build["run_dir"], 1)
    last = {}
    for p in build["progress"]:  # the resumed invocation's bars come last
        last[p.name] = p
    for stage in ("compressions", "judgments"):
        p = last[stage]
        assert p.done == _made(resumed[stage]) and p.sent == _total(resumed[stage], "requests_sent")
        assert p.tokens == _total(resumed[stage], "completion_tokens")
        f = p.figures()
        assert f["total"] >= f["done"] and "req " in p.postfix() and "tok/s" in p.postfix()


def test_progress_postfix_and_eta():
    now = [100.0]

    class Bar:
        shown = ""

        def set_postfix_str(self, s, refresh=True):
            self.shown = s

    p = StageProgress(Bar(), planned=10, clock=lambda: now[0])
    p.add(cache_hits=2)
    now[0] = 104.0
    p.add(requests=4, completion_tokens=400)
    f = p.figures()
    assert (f["done"], f["total"], f["cache_hits"]) == (6, 10, 2)
    assert f["tok_per_s"] == 100.0 and f["eta_s"] == 4.0  # 4 left at one sent request per second
    p.add(requests=6)  # retries past the plan
    assert p.figures()["total"] == 12 and p.figures()["eta_s"] == 0.0
    assert p.bar.shown.startswith("req 12/12, ")


def test_open_problems_give_a_range(tmp_path, tiny_model_dir, shared_data):
    """Policy shortest: a sampled chain may replace an imported one, so the first pass is a range
    until the teacher's samples are known."""
    plan = plan_recipe(load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_model_dir, shared_data))))
    first = _part(plan, "compressions", "first pass")["requests"]
    assert first["lo"] < first["exp"] <= first["hi"]
    assert any("wait for teacher samples" in n for n in _stage(plan, "compressions")["notes"])


def test_cli_plan_json_throughput_and_assumptions(build):
    recipe, run_dir = build["recipe"], build["run_dir"]
    out = subprocess.run([sys.executable, "-m", "bard_data.cli", "plan", recipe.source_file, "--run-dir",
                          str(run_dir / "elsewhere"), "--json", "--throughput", "teacher=100,judgments=50",
                          "--assume", "retry_rate=0.25"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    j = json.loads(out.stdout)
    teacher = next(s for s in j["stages"] if s["stage"] == "teacher_samples")
    assert teacher["time_s"]["exp"] == pytest.approx(teacher["total"]["completion_tokens"]["exp"] / 100, abs=0.1)
    assert next(s for s in j["stages"] if s["stage"] == "compressions")["time_s"] is None
    assert j["assumptions"]["retry_rate"] == {"value": 0.25, "source": "given",
                                              "meaning": j["assumptions"]["retry_rate"]["meaning"]}
    assert parse_throughput(str(run_dir))[1] == f"measured in {run_dir}"
    bad = subprocess.run([sys.executable, "-m", "bard_data.cli", "plan", recipe.source_file, "--throughput", "x=1"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown stage 'x'" in bad.stderr


PRICE = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}


def test_prices_give_the_expected_cost_and_the_manifest_records_it(tmp_path, tiny_model_dir, shared_data):
    with RuleServer() as srv:
        backend = {"kind": "openai", "model": "rules", "base_url": srv.base_url, "api_key_env": "BARD_TEST_NO_KEY",
                   "max_retries": 0, "price": PRICE}
        data = tiny_recipe(tmp_path, tiny_model_dir, shared_data, n_problems=4)
        for section in ("teacher", "compression", "judge"):
            data[section]["backend"] = backend
        recipe = load_recipe(write_recipe(tmp_path, data))
        plan = plan_recipe(recipe)
        for s in plan.to_json()["stages"]:
            t = s["total"]
            assert t["prompt_counted"] == "estimated"  # a served model: no local tokenizer
            exp = (t["prompt_tokens"]["exp"] * 3.0 + t["completion_tokens"]["exp"] * 15.0) / 1e6
            hi = (t["prompt_tokens"]["hi"] * 3.0 + t["completion_tokens"]["hi"] * 15.0) / 1e6
            assert s["cost_usd"] == {"exp": pytest.approx(exp, abs=1e-4), "hi": pytest.approx(hi, abs=1e-4)}
            assert 0 < s["cost_usd"]["exp"] <= s["cost_usd"]["hi"]
        assert "cost exp (max)" in plan.render() and "$" in plan.render()
        _Recorder.made = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stage_build, "StageProgress", _Recorder)
            run_recipe(recipe, quiet=True)
        sent_to_server = len(srv.requests)
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    total_cost = 0.0
    for stage in LLM_STAGES:
        (s,) = m["llm_stages"][stage].values()
        assert s["backend"] == "openai" and s["generate_seconds"] > 0
        assert s["cost_usd"] == pytest.approx((s["prompt_tokens"] * 3.0 + s["completion_tokens"] * 15.0) / 1e6)
        total_cost += s["cost_usd"]
        p = next(r for r in _Recorder.made if r.name == stage)  # openai: reported request by request
        assert p.sent == s["requests_sent"] and p.tokens == s["completion_tokens"]
    assert sum(_total(m["llm_stages"][st], "requests_sent") for st in LLM_STAGES) == sent_to_server
    assert m["tokens"]["rules"]["cost_usd"] == pytest.approx(total_cost)
    rep = report(tmp_path / "run")["cost_throughput"]
    assert rep["stage"].to_list() == [*LLM_STAGES, "total"]
    assert rep.filter(pl.col("stage") == "total")["cost_usd"][0] == pytest.approx(total_cost, abs=1e-4)
    assert (rep["completion_tok_per_s"] > 0).all()
    done = plan_recipe(recipe)
    assert "cost plan / spent" in done.render() and "$" in done.render()
    for stage in LLM_STAGES:  # identical judge requests (one compressed text, two budgets) count as cache hits
        assert _stage(done, stage)["total"]["requests"]["exp"] == _made(m["llm_stages"][stage])
