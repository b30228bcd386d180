"""Fail on run-level input before any work: the tokenizer loads, every template renders (and the
budget statement reads back), and the model or server of every LLM stage still to run is there."""

from __future__ import annotations

from typing import Optional, Sequence

from bard_data.budget.statement import check_round_trip, prompt_messages
from bard_data.errors import RecipeError
from bard_data.llm.probe import check_backend
from bard_data.pipeline.context import RunContext
from bard_data.pipeline.stage import Stage
from bard_data.text.templates import check_template

# What each prompt template sees (the stages render with exactly these names).
EXAMPLE_VALUES = dict(question="q", reasoning="r", answer="1", budget=100, target=100, reasoning_tokens=200,
                      original_tokens=200, compressed="c")
LLM_SECTIONS = (("teacher", "teacher_samples"), ("compression", "compressions"), ("judge", "judgments"))


def check_templates(r) -> None:
    """Every template of a recipe, in the sandbox, with the key it sits under: it compiles, names
    no attribute the sandbox forbids (in any branch), and renders with example values; the budget
    statement also reads back. Before any other check: a template payload fails first."""
    if r.teacher is not None:
        check_template(r.teacher.prompt_template, "teacher.prompt_template", question="q")
    if r.compression is not None:
        check_template(r.compression.prompt_template, "compression.prompt_template", **EXAMPLE_VALUES)
    if r.judge is not None:
        check_template(r.judge.prompt_template, "judge.prompt_template", **EXAMPLE_VALUES)
    check_template(r.format.question_template, "format.question_template", question="q")
    check_template(r.format.budget_template, "format.budget_template", budget=100)
    prompt_messages(r.format, "q", 100)
    check_round_trip(r.format)


def preflight(ctx: RunContext, pending: Optional[Sequence[Stage]] = None) -> None:
    """``pending``: the stages still to build (default: all). Only their backends are probed, and
    the student tokenizer is loaded (a slow import) only when one of them counts tokens (declares
    the ``student`` section)."""
    r = ctx.recipe
    try:
        check_templates(r)
    except RecipeError as exc:
        raise RecipeError(f"{r.source_file}: {exc}") from None
    if pending is None or any("student" in s.sections for s in pending):
        _ = ctx.tokenizer
    names = None if pending is None else {s.name for s in pending}
    checked: set[str] = set()
    for section, table in LLM_SECTIONS:
        cfg = getattr(r, section)
        if cfg is None or getattr(cfg, "enabled", True) is False or (names is not None and table not in names):
            continue
        key = cfg.backend.model_dump_json()
        if key in checked:
            continue
        checked.add(key)
        check_backend(cfg.backend, resolve=r.resolve)
