"""What a built dataset says about how it was built, for the trainers and the eval: the prompt
format its rows were written with (budget statement, placement, question template, system prompt),
its budget fidelity (tolerance, one-sided or not) and its think-tag convention.

A run directory keeps it in ``manifest.json`` (the resolved recipe); an export or a pushed dataset
in ``bard_run.json`` (its ``prompt_format`` block). The GRPO reward and ``bard-data eval`` default
to these values, so a model is rewarded and evaluated on the prompts it was trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from bard_data.config.budget import BudgetConfig
from bard_data.config.stages import FormatConfig
from bard_data.config.think_tags import ThinkTags
from bard_data.errors import BardError
from bard_data.pipeline import manifest as mf

__all__ = ["EXPORT_MARKER", "prompt_format", "build_info", "format_config", "budget_config", "think_tags"]

# What an export writes beside the configs (sanitized manifest, tokens, balance report, prompt format).
EXPORT_MARKER = "bard_run.json"
FORMAT_KEYS = ("budget_template", "budget_placement", "question_template", "system_prompt")
BUDGET_KEYS = ("tolerance", "one_sided")


def prompt_format(recipe: dict[str, Any]) -> dict[str, Any]:
    """The prompt format, budget fidelity and think-tag convention of a resolved recipe (defaults
    filled in)."""
    fmt = FormatConfig.model_validate(recipe.get("format") or {})
    budget = BudgetConfig.model_validate(recipe.get("budget") or {})
    tags = ThinkTags.model_validate((recipe.get("student") or {}).get("think_tags") or {})
    return {**{k: getattr(fmt, k) for k in FORMAT_KEYS}, **{k: getattr(budget, k) for k in BUDGET_KEYS},
            "think_tags": tags.model_dump()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise BardError(f"{path}: not valid JSON") from None
    return data if isinstance(data, dict) else {}


def build_info(name_or_path: str, revision: Optional[str] = None) -> dict[str, Any]:
    """``{"prompt_format": ..., "source": where it was read}`` of a run directory, a dataset
    folder (``bard_run.json``), a parquet file inside one, or a Hub dataset id. Missing (a dataset
    not built by bard_data): ``{}``."""
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.exists():
        for folder in ([p] if p.is_dir() else []) + list(p.parents)[:3]:
            if mf.exists(folder):
                return {"prompt_format": prompt_format(mf.read_manifest(folder).get("recipe") or {}),
                        "source": str(mf.path(folder))}
            if (folder / EXPORT_MARKER).is_file():
                info = _read_json(folder / EXPORT_MARKER)
                fmt = info.get("prompt_format") or prompt_format(info.get("recipe") or {})
                return {"prompt_format": fmt, "source": str(folder / EXPORT_MARKER)}
        return {}
    if "/" not in str(name_or_path):
        return {}
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(str(name_or_path), EXPORT_MARKER, repo_type="dataset", revision=revision)
    except Exception:  # noqa: BLE001 - a dataset without the file is a dataset not built here
        return {}
    info = _read_json(Path(local))
    return {"prompt_format": info.get("prompt_format") or prompt_format(info.get("recipe") or {}),
            "source": f"{name_or_path}/{EXPORT_MARKER}"}


def format_config(info: dict[str, Any], **overrides: Any) -> FormatConfig:
    """The dataset's prompt format; ``overrides`` (not None) win."""
    fmt = {k: v for k, v in (info.get("prompt_format") or {}).items() if k in FORMAT_KEYS}
    fmt.update({k: v for k, v in overrides.items() if v is not None})
    return FormatConfig.model_validate(fmt)


def budget_config(info: dict[str, Any], **overrides: Any) -> BudgetConfig:
    """The dataset's budget fidelity; ``overrides`` (not None) win."""
    b = {k: v for k, v in (info.get("prompt_format") or {}).items() if k in BUDGET_KEYS}
    b.update({k: v for k, v in overrides.items() if v is not None})
    return BudgetConfig.model_validate(b)


def think_tags(info: dict[str, Any]) -> ThinkTags:
    """The dataset's think-tag convention (what its SFT rows delimit reasoning with; the GRPO reward
    counts reasoning with it); ``<think>``/``</think>`` for a dataset that does not say."""
    return ThinkTags.model_validate((info.get("prompt_format") or {}).get("think_tags") or {})
