"""Prompt templates (jinja2), rendered with StrictUndefined so a misspelt variable is an error."""

from __future__ import annotations

from functools import lru_cache

import jinja2

from bard_data.errors import RecipeError

ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    try:
        return ENV.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(f"prompt template line {exc.lineno}: {exc.message}") from None


def render(template: str, **values) -> str:
    try:
        return _compile(template).render(**values)
    except jinja2.UndefinedError as exc:
        raise RecipeError(f"prompt template: {exc.message} (available: {', '.join(sorted(values))})") from None


def check_template(template: str, **example) -> None:
    """Render once with example values so a bad template fails before any work."""
    render(template, **example)
