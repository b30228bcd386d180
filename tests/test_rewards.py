"""BARD rewards: exact values of R_acc, R_bud, their product and sum, and the budget metrics.

Token counts use the "whitespace" tokenizer (one token per word) so every expected value is
exact; the completion_ids path is checked with explicit tag ids and with the tiny tokenizer.
"""

from __future__ import annotations

import math
import pickle

import pytest
from pydantic import ValidationError

from bard_data.budget.fidelity import fidelity_metrics
from bard_data.config.budget import BudgetConfig
from bard_data.rewards import (
    REWARDS,
    RewardConfig,
    TokenCounter,
    accuracy_reward,
    additive_reward,
    bard_reward,
    budget_reward,
    budget_score,
    completion_text,
    get_reward,
)

WS = "whitespace"
EXACT = dict(abs=1e-12)


def think(n: int, answer: str = "The answer is \\boxed{72}.") -> str:
    """A completion with n reasoning words and an answer after </think>."""
    words = " ".join(f"w{i}" for i in range(n))
    return f"<think>\n{words}\n</think>\n\n{answer}"


def conv(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# The formula's cases below are written for a 10% one-sided tolerance (each case may override it).
BASE = {"tolerance": 0.1, "one_sided": True}


def bud(n: int, b, **cfg) -> float:
    return budget_reward(None, [think(n)], tokenizer=WS, config={**BASE, **cfg}, budget=[b])[0]


# ------------------------------------------------------------------------------------------ R_acc


@pytest.mark.parametrize(
    "text,gold,expected",
    [
        (think(5), "72", 1.0),                                    # right, boxed after </think>
        (think(5, "The answer is \\boxed{71}."), "72", 0.0),      # wrong
        (think(5, "\\boxed{\\frac{1}{2}}"), "0.5", 1.0),          # math-verify equivalence
        ("The answer is 72.", "72", 1.0),                         # no think tags: whole text
        ("<think>\nso it is \\boxed{72}", "72", 0.0),            # unclosed think: no answer
        (think(3, "I do not know."), "72", 0.0),                  # nothing extractable
        (think(5), "\\frac{", 0.0),                               # unparsable gold
        (think(5), None, 0.0),                                    # missing gold
        (think(2, "\\boxed{C}"), "C", 1.0),                       # multiple choice: letter match
        (think(2, "\\boxed{B}"), "C", 0.0),
        (think(2, "The answer is 72"), "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),  # raw GSM8K gold
    ],
)
def test_accuracy(text, gold, expected):
    assert accuracy_reward(None, [text], solution=[gold]) == [expected]


def test_accuracy_conversational_and_answer_alias():
    comps = [conv(think(4)), conv(think(4, "\\boxed{3}"))]
    assert accuracy_reward(None, comps, solution=["72", "72"]) == [1.0, 0.0]
    assert accuracy_reward(None, comps, answer=["72", "3"]) == [1.0, 1.0]


def test_accuracy_needs_gold_column():
    with pytest.raises(ValueError, match="solution"):
        accuracy_reward(None, [think(1)])


# ------------------------------------------------------------------------------------------ R_bud


@pytest.mark.parametrize(
    "n,b,cfg,expected",
    [
        (10, 10, {}, 1.0),                                    # exactly at budget
        (11, 10, {}, 1.0),                                    # at the tolerance edge (dev 0.1)
        (12, 10, {}, 0.9),                                    # dev .2, excess .1
        (15, 10, {}, 0.6),                                    # dev .5, excess .4
        (15, 10, {"shape": "exp"}, math.exp(-0.4)),
        (31, 10, {}, 0.0),                                    # dev 2.1 -> 1 - 2.0 = -1 -> clipped 0
        (40, 10, {"shape": "exp"}, math.exp(-2.9)),           # exp never reaches 0
        (5, 10, {}, 1.0),                                     # under budget, one-sided: no penalty
        (0, 10, {}, 1.0),
        (5, 10, {"one_sided": False}, 0.6),                   # two-sided: |dev| .5
        (5, 10, {"one_sided": False, "shape": "exp"}, math.exp(-0.4)),
        (15, 10, {"one_sided": False}, 0.6),                  # two-sided overshoot same as one-sided
        (15, 10, {"alpha": 0.5}, 0.8),
        (15, 10, {"alpha": 2.0, "shape": "exp"}, math.exp(-0.8)),
        (12, 10, {"tolerance": 0.0}, 0.8),
        (13, 10, {"tolerance": 0.3}, 1.0),
        (15, None, {}, 1.0),                                  # no budget: no constraint
    ],
)
def test_budget_reward(n, b, cfg, expected):
    assert bud(n, b, **cfg) == pytest.approx(expected, **EXACT)


def test_budget_score_matches_reward():
    cfg = RewardConfig(alpha=1.5, shape="linear", **BASE)
    assert budget_score(30, 20, cfg) == pytest.approx(1 - 1.5 * 0.4, **EXACT)
    with pytest.raises(ValueError, match="positive"):
        budget_score(30, 0, cfg)  # a zero budget is a data error, not "no budget"
    with pytest.raises(ValueError, match="not positive"):
        budget_reward(None, [think(3)], tokenizer=WS, budget=[0])


def test_defaults_are_the_budget_sections():
    """One definition of fidelity: the reward's defaults are the recipe's (and a trainer passes the
    dataset's own values)."""
    assert RewardConfig().tolerance == BudgetConfig().tolerance
    assert RewardConfig().one_sided == BudgetConfig().one_sided


def test_missing_close_tag_counts_to_the_end():
    words = " ".join(["w"] * 15)
    kw = dict(tokenizer=WS, config=BASE, budget=[10])
    # unclosed think and a plain completion both count every word as reasoning
    assert budget_reward(None, [f"<think>\n{words}"], **kw) == [pytest.approx(0.6, **EXACT)]
    assert budget_reward(None, [words], **kw) == [pytest.approx(0.6, **EXACT)]
    # the answer after </think> is not reasoning
    assert budget_reward(None, [f"<think>\nw w\n</think>\n\n{words}"], **kw) == [1.0]


def test_budget_from_prompt_when_no_column():
    prompt = [{"role": "system", "content": "Thinking budget: 10 tokens."}, {"role": "user", "content": "q"}]
    assert budget_reward([prompt], [think(15)], tokenizer=WS, config=BASE) == [pytest.approx(0.6, **EXACT)]


def test_budget_from_prompt_in_the_datasets_wording():
    """The parser comes from the dataset's template and placement, not from one regex."""
    cfg = {**BASE, "budget_template": "Think for at most {{ budget }} tokens, then answer.",
           "budget_placement": "user_suffix"}
    prompt = [{"role": "user", "content": "What is 6 x 7?\n\nThink for at most 10 tokens, then answer."}]
    assert budget_reward([prompt], [think(15)], tokenizer=WS, config=cfg) == [pytest.approx(0.6, **EXACT)]
    # The default wording is not looked for in a dataset that uses another one: an error, not R_bud = 1.
    default = [{"role": "system", "content": "Thinking budget: 10 tokens."}, {"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match="row 0: no budget column and the prompt states no budget"):
        budget_reward([default], [think(15)], tokenizer=WS, config=cfg)


def test_prompt_without_budget_is_an_error():
    with pytest.raises(ValueError, match="states no budget"):
        budget_reward([[{"role": "user", "content": "q"}]], [think(15)], tokenizer=WS)


def test_conversational_completions():
    kw = dict(tokenizer=WS, config=BASE, budget=[10])
    assert budget_reward(None, [conv(think(15))], **kw) == [pytest.approx(0.6, **EXACT)]
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == "ab"


def test_completion_ids_path_with_tag_ids():
    cfg = {"think_open_id": 1, "think_close_id": 2, **BASE}
    closed = [1, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 2, 9, 9]     # 15 reasoning ids
    unclosed = [1] + [7] * 15                                              # runs to the end
    r = budget_reward(None, ["ignored", "ignored"], [closed, unclosed], config=cfg, budget=[10, 10])
    assert r == [pytest.approx(0.6, **EXACT), pytest.approx(0.6, **EXACT)]
    r = budget_reward(None, ["x"], [[7] * 11 + [2]], config=cfg, budget=[10])  # opening tag in the prompt
    assert r == [1.0]


def test_completion_ids_agree_with_text(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [think(12), "<think>\nLet x be 3 plus 4, so x = 7.", "no tags at all here 7"]
    ids = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    counter = TokenCounter(tok)
    from_ids, closed_ids = counter.reasoning_tokens(texts, ids)
    from_text, closed_text = counter.reasoning_tokens(texts)
    assert from_ids == from_text
    assert closed_ids == closed_text == [True, False, False]
    assert all(n > 0 for n in from_text)


def test_counting_needs_ids_or_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        budget_reward(None, [think(3)], budget=[10])


# ------------------------------------------------------------------------- products and ablation


def test_bard_is_product():
    comps = [think(10), think(15), think(5, "\\boxed{1}"), think(40)]
    r = bard_reward(None, comps, tokenizer=WS, config=BASE, solution=["72"] * 4, budget=[10] * 4)
    assert r == pytest.approx([1.0, 0.6, 0.0, 0.0], **EXACT)


def test_additive_is_sum():
    comps = [think(10), think(15), think(5, "\\boxed{1}"), think(40)]
    r = additive_reward(None, comps, tokenizer=WS, config=BASE, solution=["72"] * 4, budget=[10] * 4)
    assert r == pytest.approx([2.0, 1.6, 1.0, 1.0], **EXACT)


def test_reward_hacking_case():
    """A short wrong answer: nothing under R_acc x R_bud, a full R_bud under R_acc + R_bud
    (with a one-sided budget, where thinking less is never penalized)."""
    short_wrong = [think(1, "\\boxed{0}")]
    kw = dict(tokenizer=WS, config=BASE, solution=["72"], budget=[1000])
    assert bard_reward(None, short_wrong, **kw) == [0.0]
    assert additive_reward(None, short_wrong, **kw)[0] > 0
    assert additive_reward(None, short_wrong, **kw) == [1.0]


# ---------------------------------------------------------------------------------------- registry


def test_registry_names_and_config():
    assert set(REWARDS) == {"accuracy", "budget", "bard", "additive"}
    f = get_reward("bard", tokenizer=WS, alpha=0.5, **BASE)
    assert f.__name__ == "bard"
    assert f(None, [think(15)], solution=["72"], budget=[10]) == [pytest.approx(0.8, **EXACT)]
    assert get_reward("r_bud", tokenizer=WS).__name__ == "r_bud"
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("nope")
    with pytest.raises(ValidationError):
        get_reward("budget", shape="cubic")
    with pytest.raises(ValidationError):
        RewardConfig(tolerance=-0.1)
    # picklable (TRL may ship reward functions to other processes)
    g = pickle.loads(pickle.dumps(f))
    assert g(None, [think(15)], solution=["72"], budget=[10]) == [pytest.approx(0.8, **EXACT)]


def test_trl_log_metric_hook():
    logged: dict[str, float] = {}
    f = get_reward("accuracy", tokenizer=WS, log_budget_metrics=True)
    r = f(None, [think(10), think(15)], solution=["72", "72"], budget=[10, 10],
          log_metric=lambda k, v: logged.__setitem__(k, v), trainer_state=None)
    assert r == [1.0, 1.0]
    assert logged["budget/deviation_mean"] == pytest.approx(0.25, **EXACT)
    assert logged["budget/within_tolerance"] == pytest.approx(0.5, **EXACT)
    assert logged["budget/overshoot"] == pytest.approx(0.5, **EXACT)
    assert logged["budget/think_closed"] == 1.0


# ----------------------------------------------------------------------------------------- metrics


def test_fidelity_metrics_exact():
    comps = [think(10), think(15), think(5), think(11), "<think>\n" + " ".join(["w"] * 7)]
    lengths, closed = TokenCounter(WS).reasoning_tokens(comps)
    m = fidelity_metrics(lengths, [10, 10, 10, 10, None], tolerance=0.1, one_sided=False, closed=closed)
    assert m["deviation_mean"] == pytest.approx((0 + 0.5 + 0.5 + 0.1) / 4, **EXACT)
    assert m["deviation_signed_mean"] == pytest.approx((0 + 0.5 - 0.5 + 0.1) / 4, **EXACT)
    assert m["within_tolerance"] == 0.5
    assert m["overshoot"] == 0.25
    assert m["undershoot"] == 0.25
    assert m["reasoning_tokens_mean"] == pytest.approx((10 + 15 + 5 + 11 + 7) / 5, **EXACT)
    assert m["think_closed"] == 0.8
    # One-sided: the short one (5 for 10) is within the budget.
    assert fidelity_metrics(lengths, [10, 10, 10, 10, None], 0.1, True)["within_tolerance"] == 0.75


def test_fidelity_metrics_no_budgets_are_nan():
    m = fidelity_metrics([3], [None], tolerance=0.1, one_sided=False)
    assert math.isnan(m["deviation_mean"]) and math.isnan(m["within_tolerance"])
    assert m["reasoning_tokens_mean"] == 3.0
