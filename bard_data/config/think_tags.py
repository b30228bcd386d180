"""Think-tag conventions: the markers that delimit reasoning (and, in some layouts, the answer).

One convention, the recipe's (``student.think_tags``, default ``<think>``/``</think>``), decides what
"reasoning tokens" are everywhere the student is concerned: the split of sampled traces, the
compression outputs, the assistant turns of the SFT rows and the GRPO reward (the published
dataset carries it). Imported traces are split with their own source's convention (a preset's or
``traces[].think_tags``) and then written in the recipe's.

A convention is written in a recipe by name (``think``, ``begin_of_thought``, ``im_start``) or as
``{open: ..., close: ..., answer_open: ..., answer_close: ...}``.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, model_validator

from bard_data.config.base import Strict

# name -> (open, close, answer_open, answer_close)
THINK_CONVENTIONS: dict[str, tuple[str, str, Optional[str], Optional[str]]] = {
    # DeepSeek-R1, QwQ, Qwen3, open-r1's Mixture-of-Thoughts, OpenThoughts3.
    "think": ("<think>", "</think>", None, None),
    # Sky-T1 / OpenThoughts-114k / Bespoke-Stratos: the answer sits between solution markers.
    "begin_of_thought": ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>"),
    # simplescaling/s1 SFT text: "<|im_start|>think\n...<|im_start|>answer\n...".
    "im_start": ("<|im_start|>think", "<|im_start|>answer", None, None),
}


class ThinkTags(Strict):
    """Reasoning is the text between ``open`` and ``close``; the answer is what follows ``close``,
    with ``answer_open``/``answer_close`` (when the convention has them) removed."""

    open: str = Field("<think>", min_length=1, description="marker that opens the reasoning")
    close: str = Field("</think>", min_length=1, description="marker that closes the reasoning")
    answer_open: Optional[str] = Field(None, description="marker that opens the answer (stripped), if any")
    answer_close: Optional[str] = Field(None, description="marker that closes the answer (stripped), if any")

    @model_validator(mode="before")
    @classmethod
    def _by_name(cls, data: Any) -> Any:
        if isinstance(data, str):
            if data not in THINK_CONVENTIONS:
                raise ValueError(f"unknown think-tag convention {data!r}; known: {', '.join(THINK_CONVENTIONS)} "
                                 "(or {open: ..., close: ...})")
            o, c, ao, ac = THINK_CONVENTIONS[data]
            return {"open": o, "close": c, "answer_open": ao, "answer_close": ac}
        return data

    @model_validator(mode="after")
    def _distinct(self) -> "ThinkTags":
        if self.open == self.close:
            raise ValueError(f"think tags: open and close are the same marker {self.open!r}")
        return self

    @property
    def name(self) -> Optional[str]:
        """The convention's name when it is a named one."""
        key = (self.open, self.close, self.answer_open, self.answer_close)
        return next((n for n, v in THINK_CONVENTIONS.items() if v == key), None)


THINK = ThinkTags()
