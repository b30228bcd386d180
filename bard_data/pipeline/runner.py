"""The run loop: a recipe's enabled stages, in the order their declared inputs give, over one run
directory. Stages decide; this module writes (through the store), keeps the funnel records, the
manifest and resume. It knows stages only through the contract in ``pipeline.stage``.

What an invocation does before any work, in order: take the run directory's lock (one run at a
time; the kernel drops it when a process dies, also by SIGKILL), delete temporary files a killed
writer left, check that the source files of finished tables did not change, check every shard
of the finished tables (a truncated or corrupt one is recomputed, with a warning), then -- only
when something is left to do -- the preflight: the tokenizer loads, every template renders,
every backend's model or server is there. A bad run-level input is one line, before any work.

A finished stage is skipped, so a rerun of a finished build does no work; a sharded stage
resumes at its first missing shard. Failed LLM calls (``llm_error`` rows) do not make a stage
final: its ``_SUCCESS`` is *provisional*, and so is every later stage's (their input may still
change). The next invocation redoes exactly the shards with failed calls; the calls that worked
are cache hits.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import polars as pl

from bard_data.config import Recipe
from bard_data.config.executor import ExecutorConfig
from bard_data.config.safety import trust_notes
from bard_data.errors import BardError
from bard_data.pipeline import manifest as mf
from bard_data.pipeline.build import run_stage
from bard_data.pipeline.context import RunContext
from bard_data.pipeline.executors import make_executor
from bard_data.pipeline.fingerprints import source_files, stage_fingerprints, why_recompute
from bard_data.pipeline.funnel import build_funnel
from bard_data.pipeline.lock import RunLock
from bard_data.pipeline.preflight import LLM_SECTIONS, preflight
from bard_data.pipeline.stage import Stage
from bard_data.pipeline.store import ArtifactStore, remove_temp_files

log = logging.getLogger(__name__)


# -- the stage graph -------------------------------------------------------------------------


def stage_order(stages: Sequence[Stage], recipe: Recipe) -> list[Stage]:
    """The enabled stages, each after every stage whose table it reads (ties keep the given
    order). A read of a table no enabled stage writes is no edge: that input is absent."""
    enabled = [s for s in stages if s.enabled(recipe)]
    names = [s.name for s in enabled]
    if len(set(names)) != len(names):
        raise BardError(f"two stages write one table: {names}")
    deps = {s.name: {t for t in s.reads_for(recipe) if t in names and t != s.name} for s in enabled}
    order: list[Stage] = []
    done: set[str] = set()
    while len(order) < len(enabled):
        ready = next((s for s in enabled if s.name not in done and deps[s.name] <= done), None)
        if ready is None:
            left = [s.name for s in enabled if s.name not in done]
            raise BardError(f"the stages {left} read each other's tables (a cycle)")
        order.append(ready)
        done.add(ready.name)
    return order


def _verify_done(store: ArtifactStore, stages: list[Stage]) -> None:
    """A finished table with a missing, truncated or corrupt shard is no longer finished: the
    damaged files are removed (with a warning) and the stage runs again for those shards."""
    for stage in stages:
        if not store.is_built(stage.name):
            continue
        problems = store.verify_table(stage.name)
        if problems:
            log.warning("table '%s' was finished but %s; recomputing", stage.name, "; ".join(problems[:5]))
            store.unmark_done(stage.name)


# -- the run ---------------------------------------------------------------------------------


def resolve_run_dir(recipe: Recipe, run_dir: str | Path | None) -> Path:
    return Path(run_dir).resolve() if run_dir else Path(recipe.resolve(recipe.run_dir, force=True))


@dataclass
class StagePlan:
    """What an invocation will do with one stage: ``done`` (kept as it is), ``build`` (new or
    unfinished), ``recompute`` (built under other settings; ``reasons`` says which changed)."""

    name: str
    action: str
    reasons: list[str] = field(default_factory=list)
    fingerprint: dict = field(default_factory=dict)


@dataclass
class RunPlan:
    stages: list[Stage]
    plans: list[StagePlan]
    files: dict[str, Any]
    previous: dict[str, Any]

    def by_name(self) -> dict[str, StagePlan]:
        return {p.name: p for p in self.plans}

    def lines(self) -> list[str]:
        """One line per stage that will do work, with why."""
        out = []
        for p in self.plans:
            if p.action == "recompute":
                out.append(f"recompute {p.name}: {'; '.join(p.reasons)}")
            elif p.action == "build":
                out.append(f"build {p.name}")
        return out


def plan_run(recipe: Recipe, stages: Sequence[Stage], run_dir: str | Path | None = None) -> RunPlan:
    """Which stages an invocation of ``recipe`` in ``run_dir`` will build, recompute or keep, and
    why; reads the run directory, writes nothing, starts nothing."""
    rd = resolve_run_dir(recipe, run_dir)
    previous = mf.read_manifest(rd)
    order = stage_order(stages, recipe)
    files = source_files(recipe, previous.get("sources") or {})
    fps = stage_fingerprints(order, recipe, files)
    store = ArtifactStore(rd)
    plans: list[StagePlan] = []
    recomputed: set[str] = set()
    for stage in order:
        fp = fps[stage.name]
        info = store.done_info(stage.name) if store.is_built(stage.name) else None
        if info is not None and "fingerprint" not in info and previous.get("recipe_hash") in (None, recipe.hash()):
            # Finished by a bard_data that kept no fingerprints, from this very recipe: adopted.
            plans.append(StagePlan(stage.name, "done", ["adopted"], fp))
        elif store.is_done(stage.name, fp["fingerprint"]):
            plans.append(StagePlan(stage.name, "done", [], fp))
        elif info is not None and info.get("fingerprint") != fp["fingerprint"]:
            old = info.get("basis") if info.get("fingerprint") else None
            reasons = why_recompute(old, fp["basis"], recomputed) or ["settings changed"]
            plans.append(StagePlan(stage.name, "recompute", reasons, fp))
            recomputed.add(stage.name)
        else:
            plans.append(StagePlan(stage.name, "build", [], fp))
            recomputed.add(stage.name)
    return RunPlan(order, plans, files, previous)


def run(recipe: Recipe, stages: Sequence[Stage], run_dir: str | Path | None = None, quiet: bool = False,
        until: Optional[str] = None, hooks: Optional[list] = None,
        executor: Optional[ExecutorConfig] = None) -> RunContext:
    """Run (or resume) every enabled stage of ``stages``; return the context (closed) for
    inspection. ``executor`` overrides the recipe's executor section (where LLM shards run).

    An edited recipe recomputes the stages whose fingerprint changed (and their descendants);
    the others are kept as they are (``plan_run`` says which, and why)."""
    if executor is not None:
        recipe = recipe.model_copy(update={"executor": executor})
    for note in trust_notes(recipe):  # what running this recipe trusts, before anything runs
        print(f"{recipe.source_file}: {note}", file=sys.stderr)
    rd = resolve_run_dir(recipe, run_dir)
    fresh = not rd.exists()
    rd.mkdir(parents=True, exist_ok=True)
    lock = RunLock(rd).acquire()
    try:
        return _run_locked(recipe, stages, rd, fresh, quiet, until, hooks)
    finally:
        lock.release()


def _run_locked(recipe: Recipe, stages: Sequence[Stage], rd: Path, fresh: bool, quiet: bool,
                until: Optional[str], hooks: Optional[list]) -> RunContext:
    started = time.time()
    ctx = RunContext(recipe, rd, quiet=quiet, invocation=f"{int(started * 1000)}-{os.getpid()}")
    ctx.shard_hooks.extend(hooks or [])
    executor = None
    try:
        leftovers = remove_temp_files(rd)
        if leftovers:
            log.info("%s: removed %d temporary file(s) an interrupted run left", rd, leftovers)
        plan = plan_run(recipe, stages, rd)
        order, previous = plan.stages, plan.previous
        names = [s.name for s in order]
        _verify_done(ctx.store, order)
        for p in plan.plans:  # stamp adopted tables, so the next edit knows what they were built from
            if p.reasons == ["adopted"]:
                ctx.store.mark_done(p.name, {**ctx.store.done_info(p.name), **p.fingerprint})
        fps = {p.name: p.fingerprint for p in plan.plans}
        pending = [t for t in names if not ctx.store.is_done(t, fps[t]["fingerprint"])]
        if until in names:
            pending = [t for t in pending if names.index(t) <= names.index(until)]
        for line in plan.lines():
            log.info("%s", line)
        fingerprints = {t: fps[t]["fingerprint"] for t in names}
        repro = mf.reproducibility(recipe, names, fingerprints, previous, pending)
        _say_reproducibility(repro, pending)
        if pending:
            preflight(ctx, [s for s in order if s.name in pending])
            executor = make_executor(recipe.executor)
    except BaseException:
        ctx.close()
        if fresh and all(p.name == ".lock" for p in rd.iterdir()):
            shutil.rmtree(rd, ignore_errors=True)  # a bad input leaves no run directory behind
        raise
    recomputed = [p.name for p in plan.plans if p.action == "recompute" and p.name in pending]
    history = list(previous.get("history") or [])
    if not history or history[-1].get("recipe_hash") != recipe.hash() or recomputed:
        history.append({"recipe_hash": recipe.hash(), "time": started, "invocation": ctx.invocation,
                        "recomputed": recomputed, "reasons": {p.name: p.reasons for p in plan.plans
                                                              if p.name in recomputed}})
    manifest = {
        "name": recipe.name,
        "recipe": recipe.resolved_dict(),
        "recipe_file": recipe.source_file,
        "recipe_dir": recipe.base_dir,
        "recipe_hash": recipe.hash(),
        "versions": mf.versions(),
        "models": mf.models(recipe),
        "seeds": mf.seeds(recipe),
        "stages": names,
        "fingerprints": fingerprints,
        "reproducibility": repro,
        "verifications": previous.get("verifications", []),
        "sources": plan.files,
        "history": history,
        "cache": str(ctx.cache_path),
        "invocations": mf.reconcile_invocations(previous.get("invocations", []), ctx.cache.ledger),
        "timings": previous.get("timings", {}),
    }
    invocation: dict[str, Any] = {"id": ctx.invocation, "started": started, "status": "running",
                                  "pid": os.getpid(), "stages_run": [], "llm": {}, "llm_stages": {}}
    prices = mf.stage_prices(recipe, LLM_SECTIONS)
    running: dict[str, Any] = {}  # the stage under way and the LLM counters before it

    def save() -> None:
        if running:  # per stage: the counters' growth while it ran (Ray workers' deltas included)
            name = running["stage"]
            used = mf.usage_delta(running["before"], ctx.llm_stats(), prices.get(name))
            if used:
                invocation["llm_stages"][name] = used
        invocation["llm"] = ctx.llm_stats()
        mf.write_manifest(rd, manifest, invocation)

    status = "finished"
    try:
        save()
        retry_from: Optional[str] = None  # the first table with rows awaiting an LLM retry
        for stage in order:
            if stage.name not in pending:
                continue
            t0 = time.perf_counter()
            running.update(stage=stage.name, before=ctx.llm_stats())
            run_stage(ctx, stage, executor, fps[stage.name])
            dt = time.perf_counter() - t0
            errors = ctx.store.llm_errors(stage.name)
            if errors:
                ctx.store.mark_provisional(stage.name, f"{errors} row(s) dropped as llm_error; a rerun retries them")
                retry_from = retry_from or stage.name
            elif retry_from:
                ctx.store.mark_provisional(stage.name, f"built on '{retry_from}', which has rows awaiting an LLM retry")
            manifest["timings"][stage.name] = manifest["timings"].get(stage.name, 0.0) + dt
            invocation["stages_run"].append(stage.name)
            save()
            running.clear()
            if until and stage.name == until:
                break
        if invocation["stages_run"] or not ctx.store.exists("funnel"):
            ctx.store.write_table("funnel", build_funnel(ctx.store, names))
        manifest["llm_errors"] = {t: n for t in names if (n := ctx.store.llm_errors(t))}
        manifest["complete"] = all(ctx.store.is_done(t, fps[t]["fingerprint"]) for t in names)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException as exc:
        status = f"failed: {type(exc).__name__}"
        raise
    finally:
        invocation["status"] = status
        invocation["wall_s"] = time.time() - started
        try:
            save()
        finally:
            if executor is not None:
                executor.close()
            ctx.close()
    return ctx


def _say_reproducibility(repro: dict[str, dict], pending: list[str]) -> None:
    """At the start of a run: the stages still to build whose samples a kill, a resume or another
    batching could change (``reproducible: false`` in the manifest), and those that depend on a server."""
    for table, e in repro.items():
        if table not in pending:
            continue
        if e["reproducible"] is False:
            log.warning("%s is not reproducible (%s %s): %s", table, e["backend"], e["model"], e["why"])
        elif e["reproducible"] is not True:
            log.info("%s is reproducible only if the server is (%s %s): %s", table, e["backend"], e["model"], e["why"])


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Per-stage progress (shards written / planned) and whether the stage finished."""
    store = ArtifactStore(run_dir)
    out = {}
    for table in mf.read_manifest(run_dir).get("stages", []):
        out[table] = {"done": store.is_done(table), "shards_written": len(store.parts(table)),
                      "shards_planned": store.planned_shards(table), "llm_errors": store.llm_errors(table),
                      "provisional": store.done_info(table).get("provisional")}
    return out


def funnel_frame(run_dir: str | Path) -> Optional[pl.DataFrame]:
    store = ArtifactStore(run_dir)
    return store.read("funnel") if store.exists("funnel") else None
