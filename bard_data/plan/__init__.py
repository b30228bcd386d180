"""``bard-data plan``: what a recipe will cost before it runs (or what is left of a partly built
run), from the stages' own code and the completion cache, without an engine or a server.

Per LLM stage: rows in, requests (exact where the inputs are known; else expected, with bounds),
cached requests, prompt tokens (the model's tokenizer where it is local, else estimated) and
completion tokens (expected, and ``max_tokens`` x requests); with throughput figures the expected
time, with prices (``price`` on an OpenAI-compatible backend) the expected and upper-bound cost.
On a run that spent something, what it spent (the manifest) beside the estimate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from bard_data.config import Recipe
from bard_data.errors import BardError
from bard_data.pipeline import manifest as mf
from bard_data.plan.estimate import SECTIONS, Estimate, StageEstimate, estimate
from bard_data.plan.figures import Range

__all__ = ["Plan", "plan_recipe", "parse_throughput", "parse_assumptions", "measured_throughput"]


def measured_throughput(manifest: dict[str, Any]) -> dict[str, float]:
    """Completion tokens per second of generation per stage, from a manifest's ``llm_stages``."""
    out = {}
    for stage, per_model in (manifest.get("llm_stages") or {}).items():
        tokens = sum(float(s.get("completion_tokens", 0) or 0) for s in per_model.values())
        secs = sum(float(s.get("generate_seconds", 0) or 0) for s in per_model.values())
        if tokens > 0 and secs > 0:
            out[stage] = tokens / secs
    return out


def parse_throughput(spec: Optional[str]) -> tuple[dict[str, float], str]:
    """``teacher=2500,compression=9000`` (completion tokens/s; a section or table name each), or a
    run directory / manifest.json whose measured figures to use. Returns (per table, source)."""
    if not spec:
        return {}, ""
    p = Path(spec).expanduser()
    if p.exists():
        m = mf.read_manifest(p if p.is_dir() else p.parent) if p.is_dir() or p.name == mf.FILE else {}
        figures = measured_throughput(m)
        if not figures:
            raise BardError(f"{spec}: no measured throughput there (no manifest with llm_stages and generate_seconds)")
        return figures, f"measured in {p}"
    tables = {**{v: k for k, v in SECTIONS.items()}, **{k: k for k in SECTIONS}}
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, value = item.partition("=")
        if name.strip() not in tables:
            raise BardError(f"--throughput: unknown stage '{name.strip()}' (use {', '.join(sorted(tables))})")
        try:
            out[tables[name.strip()]] = float(value)
        except ValueError:
            raise BardError(f"--throughput: '{item}' is not STAGE=TOKENS_PER_SECOND") from None
        if out[tables[name.strip()]] <= 0:
            raise BardError(f"--throughput: '{item}': tokens per second must be positive")
    return out, "given"


def parse_assumptions(spec: Optional[str]) -> dict[str, float]:
    out = {}
    for item in filter(None, (x.strip() for x in (spec or "").split(","))):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise BardError(f"--assume: '{item}' is not NAME=NUMBER") from None
    return out


class Plan:
    """An ``Estimate`` with throughput and prices applied: time and cost per stage."""

    def __init__(self, est: Estimate, throughput: dict[str, float], source: str, seconds: float):
        self.est, self.throughput, self.source, self.seconds = est, throughput, source, seconds
        ex = est.recipe.executor
        self.workers = ex.num_workers if ex.kind == "ray" else 1

    def time_s(self, st: StageEstimate, all_requests: bool = False) -> Optional[Range]:
        tps = self.throughput.get(st.stage)
        if not tps:
            return None
        t = st.totals
        comp = Range(0, t.completion.exp + (t.cached_completion if all_requests else 0),
                     t.completion.hi + (t.cached_completion if all_requests else 0))
        scale = 1.0 / (tps * (self.workers if self.source.startswith("measured") else 1))
        return Range(0, comp.exp * scale, comp.hi * scale)

    def cost(self, st: StageEstimate, all_requests: bool = False) -> Optional[Range]:
        if st.price is None:
            return None
        t = st.totals
        cp, cc = (t.cached_prompt, t.cached_completion) if all_requests else (0, 0)
        return Range(st.price.cost(t.prompt.lo + cp, 0), st.price.cost(t.prompt.exp + cp, t.completion.exp + cc),
                     st.price.cost(t.prompt.hi + cp, t.completion.hi + cc))

    def spent(self) -> dict[str, dict[str, Any]]:
        """Per stage, summed over models and invocations: what the run's manifest records."""
        out = {}
        for stage, per_model in (self.est.manifest.get("llm_stages") or {}).items():
            acc: dict[str, Any] = {}
            for s in per_model.values():
                mf.add_counters(acc, s)
            out[stage] = acc
        return out

    def to_json(self) -> dict[str, Any]:
        e = self.est
        stages = []
        for st in e.stages:
            t = st.totals
            time_s, cost = self.time_s(st), self.cost(st)
            stages.append({
                "stage": st.stage, "section": st.section, "status": st.status, "model": st.model, "backend": st.backend,
                "rows_in": st.rows_in.as_dict(), "parts": [p.as_dict() for p in st.parts], "total": t.as_dict(),
                "throughput_tok_per_s": self.throughput.get(st.stage),
                "time_s": {"exp": round(time_s.exp, 1), "hi": round(time_s.hi, 1)} if time_s else None,
                "price": st.price.model_dump() if st.price is not None else None,
                "cost_usd": {"exp": round(cost.exp, 4), "hi": round(cost.hi, 4)} if cost else None,
                "notes": st.notes,
            })
        return {"recipe": e.recipe.name, "run_dir": str(e.run_dir), "fresh": e.fresh, "data": e.data,
                "stages": stages, "assumptions": e.assumptions.as_dict(),
                "throughput_source": self.source or None, "spent": self.spent() or None,
                "plan_seconds": round(self.seconds, 2)}

    def render(self) -> str:
        from bard_data.plan.render import render

        return render(self)


def plan_recipe(recipe: Recipe, run_dir: str | Path | None = None, *, throughput: Optional[str] = None,
                assume: Optional[dict[str, float]] = None, fresh: bool = False) -> Plan:
    """Plan ``recipe`` in ``run_dir`` (``fresh``: as if nothing were built or cached there).
    ``throughput``: see ``parse_throughput``; without it, the run's own measured figures if any."""
    t0 = time.perf_counter()
    figures, source = parse_throughput(throughput)
    try:
        est = estimate(recipe, run_dir, fresh=fresh, assume=assume)
    except ValueError as exc:
        raise BardError(f"plan: {exc}") from None
    if not figures:
        figures = measured_throughput(est.manifest)
        source = "measured in this run" if figures else ""
    return Plan(est, figures, source, time.perf_counter() - t0)


def plan_cli(args) -> int:
    from bard_data.config import load_recipe

    recipe = load_recipe(args.recipe)
    if getattr(args, "cache_dir", None):
        recipe = recipe.model_copy(update={"cache_dir": str(Path(args.cache_dir).resolve())})
    plan = plan_recipe(recipe, args.run_dir, throughput=args.throughput, assume=parse_assumptions(args.assume),
                       fresh=args.fresh)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1, default=str))
    else:
        print(plan.render())
    return 0
