"""BARD rewards for GRPO: R_acc (answer verifies), R_bud (budget fidelity), and their products.

Every reward follows TRL's reward-function signature::

    f(prompts, completions, completion_ids=None, **columns) -> list[float]

``completions`` are strings or conversational lists (``[{"role": "assistant", "content": ...}]``);
the dataset's columns arrive as keyword lists, one value per completion: ``solution`` (the gold
answer; ``answer`` is accepted as an alias) and ``budget`` (the thinking budget in tokens).

Definitions (all knobs in ``RewardConfig``, none hidden):

- **R_acc** = 1 when the answer extracted from the response verifies against the gold answer
  (``bard_data.text.answers.verify``: math-verify for math, exact letter match for multiple choice),
  else 0. The answer is looked for after ``</think>`` (``think_open``/``think_close``: the dataset's
  convention, ``bard_data.text.reasoning``); a completion with no think tags at all is all
  response. An *unclosed* ``<think>`` (ran out of tokens while thinking) has no answer: an
  answer-looking tail of unfinished thinking is not an answer (``bard_data.text.reasoning``'s rule).
  An unparsable gold or prediction scores 0.
- **R_bud** from the reasoning length n (tokens inside ``<think>``) and the budget b: the formula
  of ``bard_data.budget.fidelity.r_bud`` (1 within the tolerance, then a ``linear`` or ``exp``
  decay at rate ``alpha``), with the dataset's ``tolerance`` and ``one_sided``.
  A missing ``</think>`` means the reasoning runs to the end of the completion (so dropping the
  tags cannot game the budget). The budget comes from the ``budget`` column (a null there means a
  row without a budget: no constraint, R_bud = 1); without that column it is read back from the
  prompt with the parser of the dataset's budget template (``bard_data.budget.statement``), and a
  prompt that states no budget is an error, never a silent R_bud = 1.
- **bard** = R_acc x R_bud (the default; a short wrong answer earns 0) and **additive** =
  R_acc + R_bud (the ablation that reward-hacks: a short wrong answer earns 1).

Counting n. With ``completion_ids`` (what TRL passes) the tokens between the ``<think>`` id (if it
was generated) and the ``</think>`` id are counted, trailing special tokens (eos, pad) dropped, and,
when a tokenizer is known, whitespace-only tokens at both edges dropped, so that the count matches
the text path's. Without ids the reasoning text (stripped, tags removed) is encoded with the
tokenizer (``add_special_tokens=False``), as the pipeline counts ``reasoning_tokens``. The
tokenizer may be a transformers tokenizer, a path to one, or ``"whitespace"`` (words; for tests
and quick looks, never for training).

Defaults and why:

- ``tolerance``, ``one_sided``: the dataset's (the recipe's ``budget`` section, written into the
  published dataset); the trainer passes them, so the reward judges fidelity as the data did.
  One-sided (a budget as a ceiling, where R_acc already gives a short wrong answer 0) is a
  setting of the recipe, or an override of the trainer's ``reward_one_sided``.
- ``shape = "linear"``, ``alpha = 1.0``: the deviation is relative, so alpha = 1 means each extra
  budget-worth of tokens costs the whole reward: R_bud falls to 0.6 at 1.5 b (tolerance 0.1) and to
  0 at (2 + tolerance) b. That still pays something for completions moderately over budget, which
  is where an SFT student starts RL (typically 20-50% over), so the group advantages of GRPO are
  not all zero; a steeper alpha (or exp with large alpha) makes the reward sparse early on.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Literal, Optional, Sequence

from pydantic import Field

from bard_data.budget.fidelity import fidelity_metrics, r_bud
from bard_data.budget.statement import parse_budget
from bard_data.completions import TokenCounter, completion_text
from bard_data.config.base import Strict
from bard_data.config.budget import BudgetConfig
from bard_data.config.stages import DEFAULT_BUDGET_TEMPLATE, FormatConfig
from bard_data.config.think_tags import ThinkTags
from bard_data.text.answers import extract_answer, verify

log = logging.getLogger(__name__)

__all__ = [
    "RewardConfig",
    "TokenCounter",
    "RewardFunction",
    "REWARDS",
    "get_reward",
    "accuracy_reward",
    "budget_reward",
    "bard_reward",
    "additive_reward",
    "budget_score",
    "completion_text",
]


class RewardConfig(Strict):
    """Shape of R_bud, the budget statement to read budgets back with, and how reasoning is
    delimited (see the module docstring for the defaults)."""

    tolerance: float = Field(BudgetConfig.model_fields["tolerance"].default, ge=0.0,
                             description="relative deviation still within the budget (the dataset's)")
    alpha: float = Field(1.0, ge=0.0, description="decay rate of R_bud beyond the tolerance")
    one_sided: bool = Field(BudgetConfig.model_fields["one_sided"].default,
                            description="only overshoot (n > b) is penalized (the dataset's)")
    shape: Literal["linear", "exp"] = "linear"
    budget_template: str = Field(DEFAULT_BUDGET_TEMPLATE, description="the dataset's budget statement (jinja2)")
    budget_placement: Literal["system", "user_prefix", "user_suffix"] = "system"
    think_open: str = "<think>"
    think_close: str = "</think>"
    # Token ids of the tags for the completion_ids path when no tokenizer is given.
    think_open_id: Optional[int] = None
    think_close_id: Optional[int] = None
    verify_timeout_s: float = Field(5.0, gt=0, description="math-verify timeout (main thread only)")

    @property
    def tags(self) -> ThinkTags:
        """The think-tag convention: the dataset's ``student.think_tags`` when the trainer passes them
        (``bard_data.report.published.think_tags``), else ``<think>``/``</think>``."""
        return ThinkTags(open=self.think_open, close=self.think_close)


# ---------------------------------------------------------------------------------------------
# completions and columns


def _prompt_text(prompt: Any) -> str:
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))


def _column(columns: dict, names: Sequence[str], n: int) -> Optional[list]:
    for name in names:
        if name in columns and columns[name] is not None:
            vals = columns[name]
            if not isinstance(vals, (list, tuple)):
                vals = [vals] * n
            if len(vals) != n:
                raise ValueError(f"column {name!r} has {len(vals)} values for {n} completions")
            return list(vals)
    return None


def _budgets(prompts, columns: dict, n: int, cfg: RewardConfig) -> list[Optional[int]]:
    vals = _column(columns, ("budget",), n)
    if vals is None:
        # No budget column: read the budget back from the prompt, in the dataset's wording.
        fmt = FormatConfig(budget_template=cfg.budget_template, budget_placement=cfg.budget_placement)
        prompts = list(prompts) if prompts is not None else [None] * n
        vals = []
        for i, p in enumerate(prompts):
            b = parse_budget(fmt, p if p is not None else "")
            if b is None:
                raise ValueError(f"row {i}: no budget column and the prompt states no budget in the form "
                                 f"{cfg.budget_template!r} ({cfg.budget_placement}); prompt: {_prompt_text(p)[:120]!r}")
            vals.append(b)
    out: list[Optional[int]] = []
    for i, v in enumerate(vals):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)  # a row without a budget (a standard chain): no constraint
        elif int(v) <= 0:
            raise ValueError(f"row {i}: budget {v} is not positive")
        else:
            out.append(int(v))
    return out


# ---------------------------------------------------------------------------------------------
# the reward arithmetic


def budget_score(n: int, budget: Optional[int], cfg: RewardConfig | None = None) -> float:
    """R_bud for one completion with n reasoning tokens (``budget.fidelity.r_bud``)."""
    cfg = cfg or RewardConfig()
    return r_bud(n, budget, cfg.tolerance, cfg.one_sided, cfg.alpha, cfg.shape)


def _accuracy(completions, columns: dict, cfg: RewardConfig) -> list[float]:
    n = len(completions)
    gold = _column(columns, ("solution", "answer", "gold"), n)
    if gold is None:
        raise ValueError("accuracy reward needs a 'solution' (or 'answer') column with the gold answers")
    out = []
    for c, g in zip(completions, gold):
        pred = extract_answer(completion_text(c), cfg.tags)
        out.append(1.0 if pred is not None and verify(pred, g, timeout_s=cfg.verify_timeout_s) else 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# reward functions


KINDS = ("accuracy", "budget", "bard", "additive")


class RewardFunction:
    """A configured reward (picklable; ``__name__`` is what TRL logs as ``rewards/<name>/mean``).

    ``log_budget_metrics``: when TRL hands in ``log_metric`` (GRPOTrainer does), also log
    ``budget/<metric>`` from ``budget.fidelity.fidelity_metrics`` for the batch. Turn it on for one reward only.
    """

    def __init__(self, kind: str, cfg: RewardConfig | None = None, tokenizer: Any = None,
                 name: str | None = None, log_budget_metrics: bool = False):
        if kind not in KINDS:
            raise ValueError(f"unknown reward kind {kind!r}; choose from {KINDS}")
        self.kind = kind
        self.cfg = cfg or RewardConfig()
        self.counter = TokenCounter(tokenizer, self.cfg)
        self.__name__ = name or kind
        self.log_budget_metrics = log_budget_metrics

    def __repr__(self) -> str:
        return f"RewardFunction({self.__name__!r}, kind={self.kind!r}, cfg={self.cfg!r})"

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
        completions = list(completions or [])
        n = len(completions)
        if n == 0:
            return []
        log_metric: Optional[Callable] = columns.pop("log_metric", None)
        needs_len = self.kind != "accuracy" or (self.log_budget_metrics and log_metric is not None)
        budgets = _budgets(prompts, columns, n, self.cfg) if needs_len else [None] * n
        lengths: list[int] = []
        closed: list[bool] = []
        if needs_len:
            lengths, closed = self.counter.reasoning_tokens(completions, completion_ids)
        if self.log_budget_metrics and log_metric is not None:
            for k, v in fidelity_metrics(lengths, budgets, self.cfg.tolerance, self.cfg.one_sided, closed).items():
                if not math.isnan(v):
                    log_metric(f"budget/{k}", float(v))
        if self.kind == "accuracy":
            return _accuracy(completions, columns, self.cfg)
        r_bud = [budget_score(L, b, self.cfg) for L, b in zip(lengths, budgets)]
        if self.kind == "budget":
            return r_bud
        r_acc = _accuracy(completions, columns, self.cfg)
        if self.kind == "bard":
            return [a * b for a, b in zip(r_acc, r_bud)]
        return [a + b for a, b in zip(r_acc, r_bud)]


def _make(kind: str):
    def build(tokenizer: Any = None, name: str | None = None, log_budget_metrics: bool = False, **cfg) -> RewardFunction:
        return RewardFunction(kind, RewardConfig(**cfg), tokenizer=tokenizer, name=name,
                              log_budget_metrics=log_budget_metrics)

    build.__name__ = f"make_{kind}_reward"
    return build


# Registry: YAML configs list rewards by these names (as open-r1 does). Aliases map to the same kind.
REWARDS: dict[str, Callable[..., RewardFunction]] = {
    "accuracy": _make("accuracy"),
    "budget": _make("budget"),
    "bard": _make("bard"),
    "additive": _make("additive"),
}
ALIASES = {"r_acc": "accuracy", "r_bud": "budget", "multiplicative": "bard", "bard_multiplicative": "bard",
           "bard_additive": "additive"}


def get_reward(name: str, tokenizer: Any = None, **cfg) -> RewardFunction:
    """A reward function by registry name, configured with ``RewardConfig`` fields (tolerance,
    alpha, one_sided, shape, ...); the function's ``__name__`` is the name given."""
    key = ALIASES.get(name, name)
    if key not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {sorted(REWARDS) + sorted(ALIASES)}")
    return REWARDS[key](tokenizer=tokenizer, name=name, **cfg)


# Plain functions with the default configuration (text counted with ``tokenizer`` when given as a
# keyword, else from completion_ids with think ids from ``think_close_id``/``think_open_id``).


def _call(kind: str, prompts, completions, completion_ids, tokenizer, cfg, columns) -> list[float]:
    cfg = cfg if isinstance(cfg, RewardConfig) else RewardConfig(**(cfg or {}))
    return RewardFunction(kind, cfg, tokenizer=tokenizer)(prompts, completions, completion_ids, **columns)


def accuracy_reward(prompts=None, completions=None, completion_ids=None, *, tokenizer=None, config=None, **columns) -> list[float]:
    """R_acc: 1 if the extracted final answer verifies against ``solution``, else 0."""
    return _call("accuracy", prompts, completions, completion_ids, tokenizer, config, columns)


def budget_reward(prompts=None, completions=None, completion_ids=None, *, tokenizer=None, config=None, **columns) -> list[float]:
    """R_bud from the reasoning length and ``budget``."""
    return _call("budget", prompts, completions, completion_ids, tokenizer, config, columns)


def bard_reward(prompts=None, completions=None, completion_ids=None, *, tokenizer=None, config=None, **columns) -> list[float]:
    """R_acc x R_bud (the default BARD reward)."""
    return _call("bard", prompts, completions, completion_ids, tokenizer, config, columns)


def additive_reward(prompts=None, completions=None, completion_ids=None, *, tokenizer=None, config=None, **columns) -> list[float]:
    """R_acc + R_bud (the ablation: a short wrong answer still earns R_bud)."""
    return _call("additive", prompts, completions, completion_ids, tokenizer, config, columns)
