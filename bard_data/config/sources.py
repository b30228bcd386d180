"""Where a build's rows come from: problem sets, imported teacher traces, decontamination references."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from bard_data.config.base import Strict
from bard_data.config.think_tags import ThinkTags
from bard_data.config.trace_presets import PRESETS, PresetName


class ColumnMap(Strict):
    question: str = "question"
    answer: str = "answer"
    id: Optional[str] = None
    domain: Optional[str] = None
    split: Optional[str] = None


class ProblemSource(Strict):
    name: str
    path: str = Field(description="JSONL/Parquet file, a `datasets` folder, or a Hub dataset id")
    format: Literal["auto", "jsonl", "parquet", "datasets", "hub"] = "auto"
    hub_config: Optional[str] = None
    hub_split: str = "train"
    columns: ColumnMap = Field(default_factory=ColumnMap)
    answer_format: Literal["auto", "gsm8k", "boxed", "latex", "number"] = "auto"
    domain: str = "math"
    split: str = "train"
    limit: Optional[int] = Field(None, gt=0, description="first N rows of the source")


# A mapped column: its name, or alternatives (the first the file has; a trailing null: optional).
Column = Optional[Union[str, list[Optional[str]]]]


class TraceColumns(Strict):
    question: Column = Field("question", description="the problem text (null: the conversation's user turn)")
    generation: Column = Field(None, description="the whole output (str or list of str); split by the think tags")
    reasoning: Column = Field(None, description="reasoning alone (str or list); use with `response`")
    response: Column = None
    conversation: Column = Field(None, description="a list of turns ({role, content} or ShareGPT {from, value}): "
                                 "the trace is the last assistant turn, the question the user turn before it")
    correct: Column = Field(None, description="the source's own correctness flags (bool, 0/1, true/false, yes/no, "
                            "correct/incorrect; or a list of them, one per generation)")
    model: Column = Field(None, description="column naming the model that wrote each trace")
    answer: Column = Field(None, description="gold answer (problems_from)")
    solution: Column = Field(None, description="reference solution; its \\boxed{} is the gold when there is no answer "
                             "(problems_from)")


class TraceSource(Strict):
    name: str
    path: str
    format: Literal["auto", "jsonl", "parquet", "datasets", "hub"] = "auto"
    hub_config: Optional[str] = None
    hub_split: str = "train"
    limit: Optional[int] = Field(None, gt=0)
    preset: Optional[PresetName] = Field(None, description="a published layout: fills columns, think_tags, lists, "
                                         "untagged and model (keys set here win); see config/trace_presets.py")
    columns: TraceColumns = Field(default_factory=TraceColumns)
    model: str = Field("unknown", description="provenance when no model column")
    untagged: Literal["response", "reasoning", "last_paragraph"] = "last_paragraph"
    think_tags: Optional[list[ThinkTags]] = Field(
        None, description="the source's think-tag convention(s), by name or {open, close}; several: the first a trace "
        "uses (default: the recipe's student.think_tags)")
    lists: Literal["explode", "join"] = Field(
        "explode", description="list-valued trace columns: one trace per item, or one trace of the items joined by newlines")
    problems_from: bool = Field(False, description="the file also defines problems and gold answers "
                                "(columns.question with columns.answer and/or columns.solution)")

    @field_validator("think_tags", mode="before")
    @classmethod
    def _one_or_more(cls, v):
        return v if v is None or isinstance(v, list) else [v]

    @model_validator(mode="after")
    def _apply_preset(self) -> "TraceSource":
        """Fill what the recipe left unset from the preset (the resolved recipe then shows it)."""
        if self.preset is None:
            return self
        p = PRESETS[self.preset]
        given = self.columns.model_fields_set
        cols = {k: (getattr(self.columns, k) if k in given else p.columns.get(k)) for k in TraceColumns.model_fields}
        self.columns = TraceColumns.model_validate(cols)
        if "think_tags" not in self.model_fields_set:
            self.think_tags = [ThinkTags.model_validate(t) for t in p.think_tags]
        for key in ("untagged", "lists"):
            if key not in self.model_fields_set:
                setattr(self, key, getattr(p, key))
        if "model" not in self.model_fields_set and p.model:
            self.model = p.model
        return self


class DecontamReference(Strict):
    """One held-out benchmark whose questions must not appear in the training problems."""

    name: str = Field(description="Short name used in reports and in the excluded rows' `detail` (e.g. math500).")
    path: str = Field(
        description="JSONL (.jsonl/.ndjson), JSON list, CSV or Parquet file of reference questions; "
        "a relative path is resolved against the recipe's directory."
    )
    column: str = Field("problem", description="Column (field) holding the question text.")


class DecontamConfig(Strict):
    """Word n-gram decontamination against benchmark references."""

    enabled: bool = Field(True, description="Run decontamination at all.")
    references: list[DecontamReference] = Field(
        default_factory=list, description="Benchmarks to test against (none: nothing is excluded)."
    )
    ngram: int = Field(
        8,
        ge=3,
        le=50,
        description="Words per n-gram (8-13 is the usual range; smaller catches more paraphrase and more false hits).",
    )

    @field_validator("references")
    @classmethod
    def _unique_names(cls, v: list[DecontamReference]) -> list[DecontamReference]:
        names = [r.name for r in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate reference name(s): {', '.join(dup)}")
        return v
