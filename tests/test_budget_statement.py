"""The budget statement, rendered and read back in one place, followed through a whole build: a
recipe with its own wording, placed after the question, gives SFT rows, RL prompts, a reward and
eval prompts that all state (and read) the budget that way."""

from __future__ import annotations

import json
from types import SimpleNamespace

import polars as pl
import pytest

from bard_data.api import export, run_recipe
from bard_data.budget.statement import check_round_trip, parse_budget, prompt_messages
from bard_data.config import load_recipe
from bard_data.config.stages import FormatConfig
from bard_data.errors import RecipeError
from tests.recipes import tiny_recipe, write_recipe
from tests.servers import RuleServer

WORDING = "Think for at most {{ budget }} tokens, then answer."
CUSTOM = {"budget_template": WORDING, "budget_placement": "user_suffix"}


@pytest.mark.parametrize("placement", ["system", "user_prefix", "user_suffix"])
@pytest.mark.parametrize("template", ["Thinking budget: {{ budget }} tokens.", WORDING,
                                      "[budget={{budget}}]", "{{ budget }}", "Use {{ budget }} tokens (≤ {{ budget }})."])
def test_round_trip(template, placement):
    cfg = FormatConfig(budget_template=template, budget_placement=placement, system_prompt="Be brief.")
    if template.count("{{") == 2:  # the budget twice: ambiguous, refused
        with pytest.raises(RecipeError, match="state the budget once"):
            check_round_trip(cfg)
        return
    check_round_trip(cfg)
    for b in (3, 512, 8000):
        msgs = prompt_messages(cfg, "A question that says budget: 99 tokens.", b)
        assert parse_budget(cfg, msgs) == b
    assert parse_budget(cfg, prompt_messages(cfg, "q", None)) is None


def test_a_template_that_does_not_state_the_number_is_refused():
    with pytest.raises(RecipeError, match="format.budget_template"):
        check_round_trip(FormatConfig(budget_template="Think for {{ budget // 1000 }}k tokens."))
    with pytest.raises(RecipeError, match="reads back"):
        check_round_trip(FormatConfig(budget_template="{% if budget > 1000 %}Long: {% endif %}{{ budget }} tokens"))


def test_preflight_refuses_such_a_recipe_before_any_work(tmp_path, tiny_model_dir, shared_data):
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data, format={"budget_template": "{{ budget // 100 }}00 tokens"})
    with pytest.raises(RecipeError, match="format.budget_template"):
        run_recipe(load_recipe(write_recipe(tmp_path, data)), quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def custom_build(tmp_path_factory, tiny_model_dir, shared_data):
    """A rule server plays the LLMs (compressions keep the gold answer, some verdicts pass), so the
    SFT table has budget rows; every compression meets its budget (tolerance 1000)."""
    tmp = tmp_path_factory.mktemp("statement")
    data = tiny_recipe(tmp, tiny_model_dir, shared_data, n_problems=6, format=CUSTOM)
    with RuleServer() as srv:
        backend = {"kind": "openai", "model": "rules", "base_url": srv.base_url, "api_key_env": "BARD_TEST_NO_KEY",
                   "max_retries": 0}
        for section in ("teacher", "compression", "judge"):
            data[section]["backend"] = backend
        data["budget"] = {"tolerance": 1000.0}
        ctx = run_recipe(load_recipe(write_recipe(tmp, data)), quiet=True)
    published = export(ctx.run_dir, tmp / "published").out_dir
    return ctx.store, published


def test_sft_rows_and_rl_prompts_state_the_budget_in_the_recipes_wording(custom_build):
    store, _ = custom_build
    cfg = FormatConfig(**CUSTOM)
    sft = store.read("sft")
    budget_rows = sft.filter(pl.col("kind") == "budget")
    assert budget_rows.height > 0
    for msgs, b in zip(budget_rows["messages"].to_list(), budget_rows["budget"].to_list()):
        assert [m["role"] for m in msgs] == ["user", "assistant"]  # no system line
        assert msgs[0]["content"].endswith(f"\n\nThink for at most {b} tokens, then answer.")
        assert parse_budget(cfg, msgs) == b
    for msgs in sft.filter(pl.col("kind") == "standard")["messages"].to_list():
        assert parse_budget(cfg, msgs) is None
    rl = store.read("rl")
    assert rl.height > 0
    assert [parse_budget(cfg, p) for p in rl["prompt"].to_list()] == rl["budget"].to_list()


def test_the_reward_reads_budgets_in_the_datasets_wording(custom_build):
    """GRPO's rewards are built from the published dataset: without a budget column, R_bud comes
    from the budget parsed out of each prompt, and equals R_bud with the column."""
    from trainers.grpo import GRPOScriptArguments, build_rewards

    _, published = custom_build
    info = json.loads((published / "bard_run.json").read_text())
    assert info["prompt_format"]["budget_template"] == WORDING
    assert info["prompt_format"]["tolerance"] == 1000.0
    rl = pl.read_parquet(next((published / "rl").glob("*.parquet")))
    prompts = rl["prompt"].to_list()
    budgets = rl["budget"].to_list()
    comps = ["<think>\n" + " ".join(["w"] * (2 * b + 7)) + "\n</think>\n\\boxed{1}" for b in budgets]
    args = GRPOScriptArguments(dataset_name=str(published), reward_funcs=["budget"], reward_tolerance=0.1)
    [r_bud] = build_rewards(args, "whitespace")
    assert r_bud.cfg.budget_template == WORDING and r_bud.cfg.budget_placement == "user_suffix"
    assert r_bud.cfg.tolerance == 0.1 and r_bud.cfg.one_sided is False  # flag over the dataset's, and its one_sided
    from_prompt = r_bud(prompts, comps)
    from_column = r_bud(prompts, comps, budget=budgets)
    assert from_prompt == from_column
    assert all(0.0 <= r < 1.0 for r in from_prompt)  # every completion is far over its budget


def test_eval_prompts_use_the_datasets_wording(custom_build, tiny_model_dir):
    from trainers.evaluate import prompt_format_for

    _, published = custom_build
    args = SimpleNamespace(dataset=str(published), model=str(tiny_model_dir), budget_template=None,
                           budget_placement=None, question_template=None, system_prompt=None, tolerance=None,
                           one_sided=None)
    fmt, bud, tags, source = prompt_format_for(args)
    assert (fmt.budget_template, fmt.budget_placement, bud.tolerance) == (WORDING, "user_suffix", 1000.0)
    assert source.endswith("bard_run.json")
    assert (tags.open, tags.close) == ("<think>", "</think>")
    assert prompt_messages(fmt, "q", 64)[-1]["content"].endswith("\n\nThink for at most 64 tokens, then answer.")
    args.budget_placement = "system"  # a flag overrides one setting
    fmt, _, _, _ = prompt_format_for(args)
    assert fmt.budget_template == WORDING and fmt.budget_placement == "system"
