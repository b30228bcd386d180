"""Typed, validated configuration: every recipe section and the recipe itself.

A leaf package: it imports pydantic and ``bard_data.errors``, never a stage or a backend, so
anything may import it.
"""

from bard_data.config.recipe import Recipe, load_recipe, parse_recipe

__all__ = ["Recipe", "load_recipe", "parse_recipe"]
