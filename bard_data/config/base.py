"""What every configuration object shares: unknown keys are errors, not silently ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def looks_like_path(s: str) -> bool:
    """A recipe string that names a local file or folder (else it is a Hub id such as ``org/name``)."""
    return s.startswith(("/", "./", "../", "~", "${")) or s.endswith((".jsonl", ".json", ".parquet"))
