"""Trace presets: the layouts of published reasoning-trace datasets, as data.

``traces: [{name, path, preset: NAME}]`` fills a trace source's column mapping, its think-tag
convention(s), how list-valued columns are read, how untagged text splits and the model name; any
key the recipe states itself wins (``columns.correct: null`` drops a preset's flag column). A
column given as a list names alternatives: the first the file has is used, and a trailing null
makes the column optional.

Where each layout comes from (the dataset cards and the code that builds or reads them) is in
``PRESETS[name].origin`` and in the README's Recipes section; what could not be checked on a real
row is in ``.unverified``.

Correctness flags are read the same way for every source (``FLAG_WORDS``): booleans, 0/1, and the
strings true/false, yes/no, correct/incorrect in any case; a null is "no flag".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union, get_args

ColumnSpec = Union[str, list, None]  # a column, alternatives (None = optional), or none

# Conversation turns: ShareGPT {from, value} or TRL/OpenAI {role, content}.
USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt")
TURN_KEYS = (("role", "content"), ("from", "value"))

FLAG_WORDS: dict[str, bool] = {
    "true": True, "yes": True, "correct": True, "1": True,
    "false": False, "no": False, "incorrect": False, "0": False,
}


@dataclass(frozen=True)
class TracePreset:
    layout: str  # one line: the columns it reads
    origin: str  # where the layout comes from
    columns: dict[str, ColumnSpec]
    think_tags: tuple[str, ...] = ("think",)
    untagged: str = "last_paragraph"
    lists: str = "explode"
    model: Optional[str] = None
    unverified: str = ""
    question_prefixes: tuple[str, ...] = ()  # instructions the set prepends to its questions, removed


PresetName = Literal["openr1", "openthoughts", "openthoughts-metadata", "s1k", "limo", "numina-qwq", "messages"]

PRESETS: dict[str, TracePreset] = {
    "openr1": TracePreset(
        layout="problem, answer, solution; list-valued generations with correctness_math_verify aligned by index",
        origin="open-r1/OpenR1-Math-220k card (dataset_info, commit 075afe0)",
        columns={"question": "problem", "generation": "generations", "correct": "correctness_math_verify",
                 "answer": "answer", "solution": "solution"},
        model="DeepSeek-R1",
        unverified="whether every generation opens with <think> or only closes it (both split the same)",
    ),
    "openthoughts": TracePreset(
        layout="ShareGPT conversations [{from, value}]: question = user turn, trace = assistant turn "
               "<|begin_of_thought|>...<|end_of_thought|><|begin_of_solution|>...<|end_of_solution|> "
               "(OpenThoughts3: from human/gpt, <think>...</think>); the math prompts' prefix \"Return your final response "
               "within \\boxed{}. \" is removed from the question",
        origin="open-thoughts/open-thoughts open_thoughts/prompt.py (commit 66a50f0); OpenThoughts-114k and "
               "bespokelabs/Bespoke-Stratos-17k cards; OpenThoughts3-1.2M subsets' card YAML",
        columns={"question": None, "conversation": "conversations"},
        think_tags=("begin_of_thought", "think"),
        question_prefixes=("Return your final response within \\boxed{}. ",),
        unverified="OpenThoughts3's <think> tags (from third-party loaders, not a raw row); no gold column in "
                   "these sets: list the problems under `sources` or map columns.answer/solution",
    ),
    "openthoughts-metadata": TracePreset(
        layout="problem, deepseek_reasoning, deepseek_solution, ground_truth_solution (gold in its \\boxed{})",
        origin="open-thoughts/OpenThoughts-114k card, `metadata` config",
        columns={"question": "problem", "reasoning": "deepseek_reasoning", "response": "deepseek_solution",
                 "solution": "ground_truth_solution"},
        model="DeepSeek-R1",
    ),
    "s1k": TracePreset(
        layout="question, solution; s1K-1.1: deepseek_thinking_trajectory, deepseek_attempt, deepseek_grade "
               "(Yes/No); s1K: thinking_trajectories (list, joined by newlines), attempt",
        origin="simplescaling/s1 data/tokenization.py and data/grading.ipynb; s1K-1.1 and s1 sibling cards",
        columns={"question": "question",
                 "reasoning": ["deepseek_thinking_trajectory", "thinking_trajectories"],
                 "response": ["deepseek_attempt", "attempt"],
                 "correct": ["deepseek_grade", None], "solution": "solution"},
        lists="join",
        unverified="an early s1K-1.1 commit typed deepseek_* as lists (joined here like s1K's trajectories)",
    ),
    "limo": TracePreset(
        layout="question, solution (the whole untagged trace; last paragraph = response), answer",
        origin="GAIR/LIMO file tree (limo.jsonl) and GAIR-NLP/LIMO README",
        columns={"question": "question", "generation": "solution", "answer": "answer"},
        unverified="that `solution` carries no think tags (the repo copy was not readable)",
    ),
    "numina-qwq": TracePreset(
        layout="prompt, response (QwQ trace), correct (bool), ground_truth",
        origin="PrimeIntellect/NuminaMath-QwQ-CoT-5M, as third-party loaders read it (card not readable)",
        columns={"question": "prompt", "generation": "response", "correct": "correct", "answer": "ground_truth"},
        model="QwQ-32B",
        unverified="column types, other columns, and whether `response` carries <think> tags",
    ),
    "messages": TracePreset(
        layout="TRL conversational `messages` [{role, content}]: question = user turn, trace = assistant turn "
               "with <think>...</think>",
        origin="TRL dataset formats docs; open-r1/Mixture-of-Thoughts card",
        columns={"question": None, "conversation": "messages"},
    ),
}

assert set(get_args(PresetName)) == set(PRESETS), "PresetName and PRESETS list the same presets"
