"""The settings of each stage that calls an LLM or shapes the training rows, and their default prompts."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from bard_data.config.base import Strict
from bard_data.config.budget import BudgetScheduleConfig
from bard_data.config.llm import LLMStageConfig
from bard_data.config.think_tags import ThinkTags

DEFAULT_TEACHER_PROMPT = (
    "{{ question }}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
)


class TeacherConfig(LLMStageConfig):
    enabled: bool = Field(True, description="off: gold chains come from imported traces only")
    samples_per_problem: int = Field(4, gt=0)
    prompt_template: str = Field(DEFAULT_TEACHER_PROMPT, description="jinja2; sees `question`")
    untagged: Literal["response", "reasoning", "last_paragraph"] = Field(
        "last_paragraph", description="how to split a completion with no think tags (see text.reasoning.split_trace)")
    gold_policy: Literal["shortest", "all", "first"] = "shortest"
    max_reasoning_tokens: Optional[int] = Field(None, gt=0, description="longer gold chains are dropped (too_long)")
    min_reasoning_tokens: int = Field(1, ge=0, description="shorter chains are dropped (too_short)")


class StudentConfig(Strict):
    tokenizer: str = Field(description="budgets are counted in this tokenizer's tokens")
    trust_remote_code: bool = False
    think_tags: ThinkTags = Field(
        default_factory=ThinkTags,
        description="what reasoning is, everywhere the student is concerned: the split of sampled traces and "
        "compressions, the SFT assistant turns, the reward (by name: think, begin_of_thought, im_start; or {open, close})")


DEFAULT_COMPRESSION_PROMPT = """\
Below is a step-by-step solution to a problem. Rewrite the reasoning so that it is about \
{{ target }} tokens long (the original is {{ original_tokens }} tokens).

Rules:
- Keep every step that the final answer depends on; drop repetition, hesitation and detours.
- Keep the calculations that produce the answer, and keep them correct.
- End with the same final answer, written as \\boxed{ {{- answer -}} }.
- Output only the rewritten reasoning, nothing before or after it.

Problem:
{{ question }}

Original reasoning:
{{ reasoning }}
"""


class CompressionConfig(LLMStageConfig):
    budgets: BudgetScheduleConfig = Field(default_factory=BudgetScheduleConfig)
    prompt_template: str = Field(
        DEFAULT_COMPRESSION_PROMPT,
        description="jinja2: question, reasoning, answer, budget, target, reasoning_tokens (= original_tokens)")
    max_retries: int = Field(2, ge=0, description="extra attempts with a corrected target when a compression misses "
                             "the budget (fidelity as the recipe's `budget` section defines it)")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        if isinstance(data, dict):
            moved = [k for k in ("tolerance", "one_sided") if k in data]
            if moved:
                raise ValueError(f"{', '.join(moved)} moved to the recipe's `budget` section (budget.{moved[0]}): one "
                                 "definition of budget fidelity for compression, the SFT filter, the reward and eval")
        return data


DEFAULT_JUDGE_PROMPT = """\
You check whether a compressed solution is logically complete.

Problem:
{{ question }}

Original solution:
{{ reasoning }}

Compressed solution:
{{ compressed }}

Is every step that the final answer depends on still present in the compressed solution, so
that a reader can follow it to the answer {{ answer }} without the original? List the missing
steps, if any. Reply with JSON only:
{"complete": true or false, "score": a number from 0 to 1, "missing_steps": ["..."]}
"""


class JudgeConfig(LLMStageConfig):
    prompt_template: str = Field(DEFAULT_JUDGE_PROMPT, description="jinja2: question, reasoning, compressed, answer, budget")
    min_score: float = Field(0.5, ge=0, le=1, description="a compression passes with score >= this ...")
    require_complete: bool = Field(True, description="... and, if set, complete = true")
    structured_output: bool = Field(True, description="ask the backend for JSON-schema guided output")
    only_answer_preserved: bool = Field(True, description="skip judging compressions whose answer already changed")


DEFAULT_BUDGET_TEMPLATE = "Thinking budget: {{ budget }} tokens."
DEFAULT_QUESTION_TEMPLATE = "{{ question }}\n\nPlease reason step by step, and put your final answer within \\boxed{}."


class RLConfig(Strict):
    budget_from: Literal["schedule", "balance_bins"] = Field(
        "schedule",
        description="schedule: the compression budget schedule applied to the problem's gold chain length, one "
        "budget picked per problem by a hash of its id (problems without a gold chain: the median reasoning length "
        "of their own teacher samples, else of all gold chains); balance_bins: a bin drawn from the balance target, "
        "then log-uniform inside it")
    difficulty_min: float = Field(0.0, ge=0, le=1, description="keep prompts with teacher pass rate >= this")
    difficulty_max: float = Field(1.0, ge=0, le=1, description="... and <= this (the paper drops trivial ones)")
    keep_unknown_difficulty: bool = Field(True, description="problems with no teacher samples (no pass rate)")


class FormatConfig(Strict):
    budget_template: str = Field(DEFAULT_BUDGET_TEMPLATE, description="jinja2 with `budget`: how the budget is stated")
    budget_placement: Literal["system", "user_prefix", "user_suffix"] = "system"
    question_template: str = Field(DEFAULT_QUESTION_TEMPLATE, description="jinja2 with `question`")
    system_prompt: Optional[str] = Field(None, description="a system prompt for every row (the budget line is appended)")
    require_within_tolerance: bool = Field(True, description="drop compressions that missed the budget tolerance (over_budget)")
    rl: RLConfig = Field(default_factory=RLConfig)


