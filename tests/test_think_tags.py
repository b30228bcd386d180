"""Think-tag conventions: one split taking the markers, used by traces, compressions, SFT rows and
the reward; the published dataset carries the recipe's convention."""

from __future__ import annotations

import pytest

from bard_data.config.think_tags import THINK, ThinkTags
from bard_data.text.reasoning import format_think, reasoning_span, split_reasoning, split_trace

BOT = ThinkTags.model_validate("begin_of_thought")


def test_named_conventions_and_their_layout():
    assert ThinkTags.model_validate("think") == THINK
    text = format_think("two and two", "\\boxed{4}", BOT)
    assert text == ("<|begin_of_thought|>\n\ntwo and two\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n"
                    "\\boxed{4}\n\n<|end_of_solution|>")
    assert format_think("r", "a") == "<think>\nr\n</think>\n\na"
    assert ThinkTags.model_validate("im_start").open == "<|im_start|>think"
    with pytest.raises(ValueError, match="open and close are the same marker"):
        ThinkTags(open="##", close="##")


def test_split_picks_the_convention_each_text_uses():
    ot = format_think("two and two", "\\boxed{4}", BOT)
    assert split_trace(ot, tags=BOT) == ("two and two", "\\boxed{4}", True)
    both = [BOT, THINK]
    assert split_trace(ot, tags=both) == ("two and two", "\\boxed{4}", True)
    assert split_trace("<think>a</think>b", tags=both) == ("a", "b", True)
    assert split_trace("a</think>b", tags=both) == ("a", "b", True)  # R1 style: the close tag decides
    # untagged text under another convention still follows the untagged rule
    assert split_trace("step one\n\nanswer 4", tags=BOT) == ("step one", "answer 4", False)
    # the default convention is unchanged
    assert split_reasoning("<think>r</think>a") == ("r", "a", True)
    assert reasoning_span("<|begin_of_thought|>a b<|end_of_thought|>c", BOT) == ("a b", True)
    assert reasoning_span("no tags at all") == ("no tags at all", False)


def test_reward_counts_and_reads_with_the_datasets_tags():
    from bard_data.rewards import RewardConfig, TokenCounter, accuracy_reward

    custom = {"think_open": "<reasoning>", "think_close": "</reasoning>"}
    counter = TokenCounter("whitespace", RewardConfig(**custom))
    assert counter.reasoning_tokens(["<reasoning>a b c</reasoning> \\boxed{4}"]) == ([3], [True])
    # the answer is read after the dataset's close tag only
    assert accuracy_reward(completions=["<reasoning>\\boxed{4}</reasoning> \\boxed{5}"], solution=["4"],
                           config=custom) == [0.0]
    assert accuracy_reward(completions=["<reasoning>\\boxed{5}</reasoning> \\boxed{4}"], solution=["4"],
                           config=custom) == [1.0]
    with pytest.raises(ValueError, match="unknown think-tag convention 'nope'; known: think, begin_of_thought"):
        ThinkTags.model_validate("nope")


def test_sft_messages_in_the_recipes_tags_fast_and_slow_path_alike():
    from bard_data.budget.statement import messages_column
    from bard_data.config.stages import FormatConfig

    fast = messages_column(FormatConfig(), ["q"], [100], ["r"], ["a"], BOT).to_list()[0]
    slow = messages_column(FormatConfig(question_template="{{ question | trim }}"), ["q"], [100], ["r"], ["a"],
                           BOT).to_list()[0]
    assert fast[-1] == slow[-1] == {"role": "assistant", "content": format_think("r", "a", BOT)}


def test_published_dataset_carries_the_tags():
    from bard_data.report.published import prompt_format, think_tags

    info = {"prompt_format": prompt_format({"student": {"tokenizer": "x", "think_tags": "im_start"}})}
    assert think_tags(info).open == "<|im_start|>think"
    assert think_tags({}) == THINK
