"""Prompt templates (jinja2), rendered in jinja2's immutable sandbox with StrictUndefined.

A recipe is data that people share and run without writing it, so a template must not be code:
every template bard_data renders (prompt, question and budget templates from a recipe or a
published dataset, the dataset card) goes through :class:`SandboxEnvironment`, the sandbox
transformers uses for the chat templates that ship with models, narrowed further:

- no attribute that starts with ``_`` (``__class__``, ``__globals__``, ``__init__`` ...), none of
  the internals ``is_internal_attribute`` lists, no mutating method of a list, dict or set, and
  ``str.format`` only through the sandbox's own formatter (jinja2's ImmutableSandboxedEnvironment);
- attributes and methods only of plain data (strings, numbers, lists, dicts ...) and of jinja2's
  own helpers (``loop``, ``cycler``, ``namespace``): any other object a template is handed (the
  card's report frames) passes to filters but exposes nothing of its own (no ``write_csv``);
- a misspelt or undefined variable, and an unsafe attribute, is an error at once (StrictUndefined).

:func:`check_template` also refuses, before any work, a template that *names* an unsafe attribute
anywhere (also inside a branch the example values do not take, or in a format string), so a
recipe fails at preflight, not at the first row that takes that branch. Every error is one line.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import Any, Iterator, Optional

import jinja2
import jinja2.nodes as nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bard_data.errors import RecipeError

__all__ = ["ENV", "SandboxEnvironment", "render", "check_template", "unsafe_reference", "template_error"]

# Objects a template may read attributes of and call methods on.
_PLAIN = (str, int, float, complex, bool, type(None), list, tuple, dict, set, frozenset, range)


class SandboxEnvironment(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, plus: attributes only of plain data and of jinja2's helpers."""

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if not super().is_safe_attribute(obj, attr, value):
            return False
        return isinstance(obj, _PLAIN) or type(obj).__module__.split(".")[0] == "jinja2"


def _env(**kw) -> SandboxEnvironment:
    return SandboxEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True, **kw)


ENV = _env()


def template_error(exc: BaseException) -> str:
    """One line for any error a template raised while compiling or rendering."""
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"line {exc.lineno}: {exc.message}"
    text = " ".join(str(getattr(exc, "message", None) or exc).split()).rstrip(".")
    if isinstance(exc, jinja2.TemplateError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    try:
        return ENV.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(f"template error: {template_error(exc)}") from None


def render(template: str, /, **values) -> str:
    try:
        return _compile(template).render(**values)
    except jinja2.UndefinedError as exc:
        raise RecipeError(f"template error: {template_error(exc)} (available: {', '.join(sorted(values))})") from None
    except RecipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - SecurityError and whatever else a template raises: one line
        raise RecipeError(f"template error: {template_error(exc)}") from None


# -- the static check -------------------------------------------------------------------------------------


_UNSAFE_FIELD = re.compile(r"(?:\.|\[)\s*_")


def _format_fields(s: str) -> Iterator[str]:
    try:
        for _, field, spec, _ in string.Formatter().parse(s):
            if field is not None:
                yield field
                if spec:
                    yield from _format_fields(spec)
    except ValueError:
        return


def _unsafe_name(name: Any) -> bool:
    return isinstance(name, str) and (name.startswith("_") or name == "mro")


def unsafe_reference(template: str) -> Optional[str]:
    """What a template names that the sandbox forbids (an attribute starting with ``_``, ``mro``,
    or such a field in a format string), wherever it appears; None when it names nothing of that."""
    try:
        tree = ENV.parse(template)
    except jinja2.TemplateSyntaxError:
        return None  # reported by the compile step
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Const)):
        if isinstance(node, nodes.Getattr) and _unsafe_name(node.attr):
            return f"access to attribute {node.attr!r} is unsafe (line {node.lineno})"
        if (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const)
                and _unsafe_name(node.arg.value)):
            return f"access to item {node.arg.value!r} is unsafe (line {node.lineno})"
        if (isinstance(node, nodes.Filter) and node.name == "attr" and node.args
                and isinstance(node.args[0], nodes.Const) and _unsafe_name(node.args[0].value)):
            return f"access to attribute {node.args[0].value!r} is unsafe (line {node.lineno})"
        if isinstance(node, nodes.Const) and isinstance(node.value, str) and "{" in node.value:
            for field in _format_fields(node.value):
                if _UNSAFE_FIELD.search(field):
                    return f"format field {{{field}}} reaches an unsafe attribute (line {node.lineno})"
    return None


def check_template(template: str, key: str = "template", /, **example) -> None:
    """Before any work: the template compiles, names nothing the sandbox forbids (in any branch)
    and renders with example values. Errors are ``<key>: template error: <one line>``."""
    try:
        render(template, **example)
    except RecipeError as exc:
        raise RecipeError(f"{key}: {exc}") from None
    bad = unsafe_reference(template)
    if bad:
        raise RecipeError(f"{key}: template error: {bad}")
