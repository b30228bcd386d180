"""Where a build's rows come from: problem sets, imported teacher traces, decontamination references."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from bard_data.config.base import Strict


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


class TraceColumns(Strict):
    question: str = "question"
    generation: Optional[str] = Field(None, description="the whole output (str or list of str); split by tags/rule")
    reasoning: Optional[str] = Field(None, description="reasoning alone (str or list); use with `response`")
    response: Optional[str] = None
    correct: Optional[str] = Field(None, description="the source's own correctness flags (bool or list of bool)")
    model: Optional[str] = Field(None, description="column naming the model that wrote each trace")


class TraceSource(Strict):
    name: str
    path: str
    format: Literal["auto", "jsonl", "parquet", "datasets", "hub"] = "auto"
    hub_config: Optional[str] = None
    hub_split: str = "train"
    limit: Optional[int] = Field(None, gt=0)
    columns: TraceColumns = Field(default_factory=TraceColumns)
    model: str = Field("unknown", description="provenance when no model column")
    untagged: Literal["response", "reasoning", "last_paragraph"] = "last_paragraph"


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
