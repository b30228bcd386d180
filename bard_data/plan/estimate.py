"""What a recipe will ask of its LLMs, worked out by the stages' own code without an LLM.

The data stages run for real in memory (problems, imported traces, gold selection, the budget
schedule); the LLM stages run with ``ReplayLLM``, which answers from the completion cache and
records every request. What the cache answers is known exactly, so each stage is replayed as far
as its cached completions reach:

- teacher: one request per (problem, sample): exact. Cached completions become samples.
- gold chains: selected over the known samples (imported traces need no LLM). A problem with
  teacher samples still to come is *open*: its gold chain may change (policy ``shortest``: a
  shorter sampled chain replaces the imported one; ``all``: more chains), so its compression
  requests are a range.
- compressions: the first pass is one request per (known gold chain, budget): exact for closed
  problems. Retries are replayed through the cache (a cached attempt decides its retry and the
  retry's target exactly); after an uncached attempt they are a bound (``max_retries``) and an
  expected value (``retry_rate``).
- judge: one request per compression (that kept its answer, with ``only_answer_preserved``):
  exact for compressions the cache completes; expected and bounded for the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import polars as pl

from bard_data.budget.schedule import schedule_budgets
from bard_data.config import Recipe
from bard_data.pipeline.runner import plan_run, resolve_run_dir
from bard_data.plan.figures import Assumptions, Part, Range, geometric, total
from bard_data.plan.replay import NOT_CACHED, OverlayStore, PlanContext, PromptCounter, Seen
from bard_data.stages import STAGES
from bard_data.stages.compress import next_attempt
from bard_data.stages.gold import select_gold

SECTIONS = {"teacher_samples": "teacher", "compressions": "compression", "judgments": "judge"}


@dataclass
class StageEstimate:
    stage: str
    section: str
    status: str  # done, build or recompute (runner.plan_run)
    model: str
    backend: str
    rows_in: Range
    parts: list[Part]
    price: Any = None  # PriceConfig of the stage's backend, if any
    notes: list[str] = field(default_factory=list)

    @property
    def totals(self) -> Part:
        return total(self.parts, self.stage)

    @property
    def done(self) -> bool:
        return self.status == "done"


@dataclass
class Estimate:
    recipe: Recipe
    run_dir: Path
    fresh: bool
    data: dict[str, Any]
    stages: list[StageEstimate]
    assumptions: Assumptions
    manifest: dict[str, Any]


def _seen_tally(part: Part, entries: list[tuple[Seen, float, bool]], counter: PromptCounter) -> list[int]:
    """Add requests a stage made through the replay: (seen, expected completion tokens, certain).
    Returns the prompt tokens of each entry (cached ones as the cache recorded them)."""
    misses = [i for i, (s, _, _) in enumerate(entries) if s.hit is None and not s.dup]
    counted = dict(zip(misses, counter.count([entries[i][0].request for i in misses])))
    part.prompt_counted = part.prompt_counted and (counter.exact or not misses)
    prompts = []
    for i, (s, completion, certain) in enumerate(entries):
        if s.dup:  # answered by its twin in the same batch
            part.hit(0, 0, certain)
            prompts.append(0)
        elif s.hit is not None:
            part.hit(s.hit.prompt_tokens, s.hit.completion_tokens, certain)
            prompts.append(s.hit.prompt_tokens)
        else:
            part.miss(counted[i], completion, s.max_tokens, certain)
            prompts.append(counted[i])
    return prompts


def _mean(xs: list[float], default: float) -> float:
    return sum(xs) / len(xs) if xs else default


def _whole(ctx: PlanContext, stage) -> pl.DataFrame:
    if ctx.store.on_disk(stage.name):
        return ctx.store.read(stage.name)
    return pl.concat([r.kept for r in stage.run(ctx)], how="diagonal_relaxed")


def estimate(recipe: Recipe, run_dir: str | Path | None = None, *, fresh: bool = False,
             assume: Optional[dict[str, float]] = None) -> Estimate:
    """The requests and tokens of every LLM stage of ``recipe`` in ``run_dir`` (``fresh``: as if the
    run directory and its cache were empty). Starts no engine, calls no server, writes nothing."""
    rd = resolve_run_dir(recipe, run_dir)
    rp = plan_run(recipe, STAGES, rd)
    status = {p.name: "build" if fresh and p.action == "done" else p.action for p in rp.plans}
    by_name = {s.name: s for s in rp.stages}
    store = OverlayStore(None if fresh else rd, {n for n, a in status.items() if a == "done"})
    ctx = PlanContext(recipe, rd, store, None)
    ctx._cache_file = None if fresh else ctx.cache_path
    a = Assumptions(assume)
    data: dict[str, Any] = {}
    stages: list[StageEstimate] = []

    problems = _whole(ctx, by_name["problems"])
    store.put("problems", problems)
    data["problems"] = problems.height
    if "imported_samples" in by_name:
        imported = _whole(ctx, by_name["imported_samples"])
        store.put("imported_samples", imported)
        data["imported_samples"] = imported.height
        data["imported_correct"] = int(imported["is_correct"].sum())

    # -- teacher ---------------------------------------------------------------------------------
    open_k: dict[str, int] = {}
    t = recipe.teacher
    fill_t = None
    if "teacher_samples" in by_name:
        stage = by_name["teacher_samples"]
        inputs = stage.inputs(ctx)
        llm = ctx.llm(t)
        llm.seen = []
        done = store.on_disk("teacher_samples")
        llm.texts = not done  # a finished table has the samples: read no completion texts from the cache
        replayed = stage.process_shard(ctx, inputs, 0).kept
        llm.texts = True
        if done:  # only what the plan looks at, unless the gold chains must be selected again
            cols = ["problem_id", "is_correct", "completion_tokens"] if store.on_disk("gold_chains") else None
            samples = store.read("teacher_samples", cols)
        else:
            samples = replayed
        store.put("teacher_samples", samples)
        hits = [s.hit.completion_tokens for s in llm.seen if s.hit is not None]
        if done:
            hits = samples["completion_tokens"].drop_nulls().to_list()
        fill_t = a.set("fill", _mean(hits, 0) / t.sampling.max_tokens, len(hits))
        a.set("teacher_pass_rate", float(samples["is_correct"].mean() or 0) if samples.height else None, samples.height)
        exp_t = _mean(hits, fill_t * t.sampling.max_tokens)
        part = Part("requests", prompt_counted=ctx.counter(t.backend).exact)
        _seen_tally(part, [(s, exp_t, True) for s in llm.seen], ctx.counter(t.backend))
        if status["teacher_samples"] == "done":
            part.nothing_to_send()
        else:
            known = dict(samples.group_by("problem_id").len().iter_rows())
            open_k = {p: t.samples_per_problem - known.get(p, 0) for p in problems["problem_id"].to_list()
                      if t.samples_per_problem - known.get(p, 0) > 0}
        stages.append(StageEstimate("teacher_samples", "teacher", status["teacher_samples"], t.backend.model,
                                    t.backend.kind, Range.of(inputs.height), [part], getattr(t.backend, "price", None)))
        data["teacher_samples_known"] = samples.height
    else:
        a.set("fill")
    data["open_problems"] = len(open_k)

    # -- gold chains -----------------------------------------------------------------------------
    if store.on_disk("gold_chains"):
        gold = store.read("gold_chains")
    else:
        frames = [store.read(n) for n in ("teacher_samples", "imported_samples") if store.exists(n)]
        policy = t.gold_policy if t else "shortest"
        gold = select_gold(pl.concat(frames, how="diagonal_relaxed"), problems, policy,
                           t.min_reasoning_tokens if t else 1, t.max_reasoning_tokens if t else None).kept
    store.put("gold_chains", gold)
    data["gold_chains_known"] = gold.height

    comp_state: dict[str, Any] = {}
    if "compressions" in by_name:
        stages.append(_compressions(ctx, by_name["compressions"], status["compressions"], gold, open_k, a, fill_t,
                                    comp_state))
    if "judgments" in by_name:
        stages.append(_judgments(ctx, by_name["judgments"], status["judgments"], a, comp_state))
    ctx.close()
    return Estimate(recipe, rd, fresh, data, stages, a, rp.previous)


def _new_chain(ctx: PlanContext, gold: pl.DataFrame, fill_t: Optional[float]) -> tuple[float, list[int]]:
    """A gold chain the teacher has yet to write: its expected reasoning length (known sampled
    chains, else the teacher's expected completion) and its budgets under the schedule."""
    cfg, t = ctx.recipe.compression, ctx.recipe.teacher
    sampled = gold.filter(pl.col("origin") == "sampled")["reasoning_tokens"].to_list() if gold.height else []
    length = _mean(sampled, (fill_t or 0.5) * (t.sampling.max_tokens if t else 1024))
    sched = schedule_budgets(pl.DataFrame({"sample_id": ["new-chain"], "reasoning_tokens": [int(length)]}),
                             cfg.budgets, cfg.seed)
    return length, sched["budget"].to_list()


def _max_budgets(cfg) -> int:
    b = cfg.budgets
    return len(b.levels) if b.mode == "fixed" else len(b.fractions) if b.mode == "fractions" else b.per_chain


def _compressions(ctx: PlanContext, stage, status: str, gold: pl.DataFrame, open_k: dict[str, int],
                  a: Assumptions, fill_t: Optional[float], state: dict[str, Any]) -> StageEstimate:
    r = ctx.recipe
    cfg, tol, one_sided, R = r.compression, r.budget.tolerance, r.budget.one_sided, r.compression.max_retries
    policy = r.teacher.gold_policy if r.teacher else "shortest"
    inputs = stage.inputs(ctx)
    first = inputs.filter(pl.col("budget").is_not_null())
    origin = dict(zip(gold["sample_id"].to_list(), gold["origin"].to_list()))
    imported_gold = {p for p, s in zip(gold["problem_id"].to_list(), gold["sample_id"].to_list())
                     if str(origin.get(s, "")).startswith("imported")}
    # A known chain's requests are certain unless a sampled chain still to come can replace it.
    certain = {p: p not in open_k or policy == "all" or (policy == "first" and p in imported_gold)
               for p in first["problem_id"].unique().to_list()}
    llm = ctx.llm(cfg)
    llm.seen = []
    pending = [{**row, "target": row["budget"], "attempts": 0} for row in first.iter_rows(named=True)]
    rounds: list[list[tuple[Seen, dict]]] = []
    complete: set[int] = set()
    open_at: dict[int, int] = {}
    evaluated = missed = 0
    for rnd in range(R + 1):
        if not pending:
            break
        n0 = len(llm.seen)
        tried = stage._attempt(ctx, cfg, pending, llm)
        rounds.append([(s, pending[s.pos]) for s in llm.seen[n0:]])
        nxt = []
        for row in tried:
            if row["error"] == NOT_CACHED:
                open_at[row["_idx"]] = rnd
                continue
            evaluated += 1
            again = next_attempt(row, tol, one_sided)
            missed += again is not None
            if again is not None and rnd < R:
                nxt.append(again)
            else:
                complete.add(row["_idx"])
        pending = nxt
    q = a.set("retry_rate", missed / evaluated if evaluated else None, evaluated)
    hits = [(s.hit.completion_tokens, row["target"]) for rnd_ in rounds for s, row in rnd_ if s.hit is not None]
    ratio = a.set("compression_fill", sum(c for c, _ in hits) / max(1, sum(b for _, b in hits)), len(hits))
    counter = ctx.counter(cfg.backend)
    parts = [Part("first pass", prompt_counted=counter.exact), Part("retries", prompt_counted=counter.exact)]
    first_prompts: list[int] = []
    for rnd, entries in enumerate(rounds):
        prompts = _seen_tally(parts[min(rnd, 1)], [(s, ratio * row["target"], certain[row["problem_id"]])
                                                   for s, row in entries], counter)
        if rnd == 0:
            first_prompts = prompts
    by_idx = {row["_idx"]: row for row in first.iter_rows(named=True)}
    p_first = _mean([x for x in first_prompts if x], 0)
    for idx, rnd in open_at.items():  # retries after an uncached attempt
        n = R - rnd
        parts[1].uncertain(0, geometric(q, n), n, p_first, ratio * by_idx[idx]["budget"], cfg.sampling.max_tokens)
    # Open problems: chains the teacher may still add or replace.
    length, budgets = _new_chain(ctx, gold, fill_t)
    m, m_new = _max_budgets(cfg), len(budgets)
    p_pass = a.values["teacher_pass_rate"] if "teacher_pass_rate" in a.values else a.set("teacher_pass_rate")
    c_known = first.group_by("problem_id").len()
    c_known = dict(c_known.iter_rows()) if c_known.height else {}
    chains, extra = Range(), Range()
    for p, u in open_k.items():
        c = c_known.get(p, 0)
        if policy == "all":
            chains.add(0, u * p_pass, u)
            extra.add(0, u * p_pass * m_new, u * m)
        elif c and not certain.get(p, False):  # its known chain's requests are already counted, not as certain
            extra.add(0, 0, max(0, m - c))
        elif not c and p not in imported_gold:
            chains.add(0, 1 - (1 - p_pass) ** u, 1)
            extra.add(0, (1 - (1 - p_pass) ** u) * m_new, m)
    p_new, b_new = 0.0, _mean(budgets, cfg.budgets.floor)
    if extra.hi or extra.exp:
        if open_at or first_prompts:
            p_new = p_first - _mean(first["reasoning_tokens"].to_list(), 0) + length
        else:
            p_new = _hypothetical_prompt(ctx, stage, cfg, length, budgets)
        parts[0].prompt_counted = parts[1].prompt_counted = False  # chains nobody has written yet
        parts[0].uncertain(extra.lo, extra.exp, extra.hi, p_new, ratio * b_new, cfg.sampling.max_tokens)
        parts[1].uncertain(0, extra.exp * geometric(q, R), extra.hi * R, p_new, ratio * b_new, cfg.sampling.max_tokens)
    comps = None
    if complete:
        llm.recording = False
        comps = stage.process_shard(ctx, first.filter(pl.col("_idx").is_in(list(complete))), 0).kept
        llm.recording = True
    if ctx.store.on_disk("compressions"):
        comps = ctx.store.read("compressions")
    if comps is not None:
        ctx.store.put("compressions", comps)
    if status == "done":
        for part in parts:
            part.nothing_to_send()
        n, attempts = comps.height, int(comps["attempts"].sum() or 0)
        parts[0].requests, parts[1].requests = Range.of(n), Range.of(attempts - n)
    state.update(first=first, open=[by_idx[i] for i in open_at], extra=extra, ratio=ratio, done=status == "done",
                 comps=comps, p_new=p_new + ratio * b_new,
                 uncertain={x["sample_id"] for x in by_idx.values() if not certain[x["problem_id"]]})
    rows_in = Range.of(gold.height) + chains
    notes = [f"{len(open_k)} problem(s) still wait for teacher samples: their gold chains, and so these "
             f"requests, may change (gold policy {policy})"] if extra.hi or not all(certain.values()) else []
    return StageEstimate("compressions", "compression", status, cfg.backend.model, cfg.backend.kind, rows_in, parts,
                         getattr(cfg.backend, "price", None), notes)


def _hypothetical_prompt(ctx: PlanContext, stage, cfg, length: float, budgets: list[int]) -> float:
    """Prompt tokens of a compression request for a chain nobody has written yet: the template
    with an empty chain, plus the chain's expected length."""
    p = ctx.store.read("problems").row(0, named=True)
    b = budgets[0] if budgets else cfg.budgets.floor
    row = {"question": p["question"], "reasoning": "", "gold_answer": p["answer"], "budget": b, "target": b,
           "reasoning_tokens": int(length), "attempts": 0, "_idx": -1}
    llm = ctx.llm(cfg)
    n0 = len(llm.seen)
    stage._attempt(ctx, cfg, [row], llm)
    seen, llm.seen = llm.seen[n0:], llm.seen[:n0]
    return ctx.counter(cfg.backend).count([s.request for s in seen])[0] + length


def _judgments(ctx: PlanContext, stage, status: str, a: Assumptions, comp: dict[str, Any]) -> StageEstimate:
    cfg = ctx.recipe.judge
    llm = ctx.llm(cfg)
    llm.seen = []
    inputs = stage.inputs(ctx) if ctx.store.exists("compressions") else None
    if inputs is not None and inputs.height:
        stage.process_shard(ctx, inputs, 0)
    comps = comp.get("comps")
    measured = comps["answer_preserved"].to_list() if comps is not None and comps.height else []
    keep = a.set("answer_preserved", _mean(measured, 0), len(measured)) if cfg.only_answer_preserved else 1.0
    hits = [s.hit.completion_tokens for s in llm.seen if s.hit is not None]
    fill = a.values.get("fill", 0.5)
    exp_c = _mean(hits, fill * cfg.sampling.max_tokens)
    counter = ctx.counter(cfg.backend)
    part = Part("requests", prompt_counted=counter.exact)
    uncertain = comp.get("uncertain", set())
    ids = inputs["sample_id"].to_list() if inputs is not None else []
    prompts = _seen_tally(part, [(s, exp_c, ids[s.pos] not in uncertain) for s in llm.seen], counter)
    # Compressions the cache does not complete yet: one request each when they keep the answer.
    open_rows, extra = comp.get("open", []), comp.get("extra", Range())
    if open_rows or extra.hi:
        ratio = comp.get("ratio", 1.0)
        rows = open_rows or comp["first"].head(1).to_dicts()
        guess = pl.DataFrame({"compression_id": [f"open-{i}" for i in range(len(rows))],
                              "question": [x["question"] for x in rows], "reasoning": [x["reasoning"] for x in rows],
                              "compressed_reasoning": [""] * len(rows), "gold_answer": [x["gold_answer"] for x in rows],
                              "budget": [x["budget"] for x in rows]}) if rows else None
        p_open = _mean([x for x in prompts if x], comp.get("p_new", 0.0))
        if guess is not None:
            n0 = len(llm.seen)
            stage.process_shard(ctx, guess, 0)
            seen, llm.seen = llm.seen[n0:], llm.seen[:n0]
            counts = counter.count([s.request for s in seen])
            p_open = _mean([c + ratio * x["budget"] for c, x in zip(counts, rows)], p_open)
        part.uncertain(0, len(open_rows) * keep, len(open_rows), p_open, exp_c, cfg.sampling.max_tokens)
        part.uncertain(0, extra.exp * keep, max(0.0, extra.hi), p_open, exp_c, cfg.sampling.max_tokens)
        part.prompt_counted = False
    if status == "done":
        part.nothing_to_send()
        if ctx.store.on_disk("judgments"):
            part.requests = Range.of(ctx.store.read("judgments", ["compression_id"]).height)
    first = comp.get("first")
    rows_in = Range.of(comps.height if comps is not None else 0)
    if first is not None and not comp.get("done"):
        rows_in = Range.of(first.height) + extra
    return StageEstimate("judgments", "judge", status, cfg.backend.model, cfg.backend.kind, rows_in, [part],
                         getattr(cfg.backend, "price", None))
