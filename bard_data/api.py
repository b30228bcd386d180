"""The library surface, for notebooks and scripts: the same operations as the ``bard-data``
command, as plain functions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from bard_data.config import Recipe, load_recipe
from bard_data.config.executor import ExecutorConfig
from bard_data.pipeline import runner
from bard_data.pipeline.context import RunContext
from bard_data.pipeline.manifest import read_manifest
from bard_data.pipeline.runner import RunPlan, funnel_frame, resolve_run_dir, run_status
from bard_data.pipeline.verify import verify_run
from bard_data.plan import Plan
from bard_data.plan import plan_recipe as _plan_recipe
from bard_data.report.diff import diff_builds
from bard_data.report.publish import export, push
from bard_data.report.sql import connect, query
from bard_data.report.stats import report
from bard_data.stages import STAGES

__all__ = ["load_recipe", "run_recipe", "plan_run", "plan_recipe", "diff_builds", "run_status", "read_manifest",
           "funnel_frame", "resolve_run_dir", "query", "connect", "report", "export", "push", "verify"]


def run_recipe(recipe: Recipe | str | Path, run_dir: str | Path | None = None, quiet: bool = False,
               until: Optional[str] = None, hooks: Optional[list] = None,
               executor: Optional[ExecutorConfig] = None) -> RunContext:
    """Run (or resume) a recipe (a ``Recipe`` or the path of its YAML file) with every stage of
    the registry; returns the run's context (closed) for inspection."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return runner.run(recipe, STAGES, run_dir, quiet=quiet, until=until, hooks=hooks, executor=executor)


def plan_run(recipe: Recipe | str | Path, run_dir: str | Path | None = None) -> RunPlan:
    """Which stages running ``recipe`` in ``run_dir`` would build, recompute (and why) or keep."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return runner.plan_run(recipe, STAGES, run_dir)


def plan_recipe(recipe: Recipe | str | Path, run_dir: str | Path | None = None, *, throughput: Optional[str] = None,
                assume: Optional[dict[str, float]] = None, fresh: bool = False) -> Plan:
    """What ``recipe`` will ask of its LLMs in ``run_dir`` (requests, tokens, time, cost), without
    starting an engine (``bard-data plan``); ``Plan.render()`` and ``Plan.to_json()`` show it."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return _plan_recipe(recipe, run_dir, throughput=throughput, assume=assume, fresh=fresh)


def verify(run_dir: str | Path, sample: int = 5, resample: int = 0, seed: int = 0, record: bool = True) -> dict:
    """Recompute ``sample`` random rows of each LLM stage of a finished run from the completion
    cache and compare them with the stored rows; with ``resample`` > 0 also re-send that many of
    their requests per stage to the backend and compare the texts (``bard-data verify``)."""
    return verify_run(run_dir, STAGES, sample=sample, resample_n=resample, seed=seed, record=record)
