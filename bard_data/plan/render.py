"""The plan as text: one table of the stages, the assumptions behind its expected values, and on a
run that spent something, the estimate beside what the manifest records."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from bard_data.plan.figures import Part, Range

if TYPE_CHECKING:
    from bard_data.plan import Plan


def _n(x: float) -> str:
    return f"{int(round(x)):,}"


def _count(r: Range) -> str:
    """``20`` when exact, else the expected value and the bounds: ``30 [0-60]``."""
    return _n(r.exp) if r.exact else f"{_n(r.exp)} [{_n(r.lo)}-{_n(r.hi)}]"


def _secs(s: float) -> str:
    s = float(s)
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.0f} s"


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _row(label: str, status: str, rows_in: Optional[Range], p: Part, time_s: Optional[Range],
         cost: Optional[Range]) -> list[str]:
    send = p.to_send
    return [label, status, _count(rows_in) if rows_in is not None else "", _count(p.requests), _n(p.cached),
            _count(send), ("" if p.prompt_counted else "~") + _n(p.prompt.exp),
            f"{_n(p.completion.exp)} / {_n(p.completion.hi)}",
            f"{_secs(time_s.exp)} ({_secs(time_s.hi)})" if time_s is not None else "-",
            f"{_usd(cost.exp)} ({_usd(cost.hi)})" if cost is not None else "-"]


def render(plan: "Plan") -> str:
    e = plan.est
    where = ("as a fresh run" if e.fresh else "fresh run") if e.fresh or not e.run_dir.exists() else "run directory"
    lines = [f"plan for recipe {e.recipe.name} in {e.run_dir} ({where}); computed in {plan.seconds:.1f} s, "
             "no engine started, nothing sent or written"]
    d = e.data
    known = [f"{d.get('problems', 0)} problems"]
    if "imported_samples" in d:
        known.append(f"{d['imported_samples']} imported traces ({d.get('imported_correct', 0)} verified)")
    if "teacher_samples_known" in d:
        known.append(f"{d['teacher_samples_known']} teacher samples known")
    known.append(f"{d.get('gold_chains_known', 0)} gold chains known")
    if d.get("open_problems"):
        known.append(f"{d['open_problems']} problems awaiting teacher samples")
    lines.append("known without an LLM: " + ", ".join(known))
    lines.append("")
    head = ["stage", "status", "rows in", "requests", "cached", "to send", "prompt tok", "completion tok exp / max",
            "time exp (max)", "cost exp (max)"]
    rows = [head]
    grand = []
    for st in e.stages:
        t = st.totals
        rows.append(_row(st.stage, st.status, st.rows_in, t, plan.time_s(st), plan.cost(st)))
        if len(st.parts) > 1:
            for p in st.parts:
                rows.append(_row(f"  {p.name}", "", None, p, None, None))
        grand.append(t)
    lines += _table(rows, right=set(range(2, 10)))
    lines.append("")
    lines.append("requests: exact, or expected [at least-at most]; to send = requests - cached; prompt tokens of the "
                 "requests to send (~ estimated: no local tokenizer, or a guessed text); completion: expected / "
                 "max_tokens x requests.")
    if plan.throughput:
        lines.append(f"time: expected completion tokens / throughput ({plan.source}: "
                     + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in plan.throughput.items()) + ")")
    else:
        lines.append("time: pass --throughput teacher=TOK_S,compression=TOK_S,judge=TOK_S (or a run directory "
                     "whose manifest measured them)")
    if not any(st.price is not None for st in e.stages):
        lines.append("cost: set price: {input_per_mtok, output_per_mtok} on an OpenAI-compatible backend")
    for st in e.stages:
        for note in st.notes:
            lines.append(f"note ({st.stage}): {note}")
    lines.append("expected values assume: " + "; ".join(
        f"{k} {v['value']:g} ({v['source']})" for k, v in e.assumptions.as_dict().items()))
    spent = plan.spent()
    if spent:
        lines += ["", "estimate beside what the run spent (manifest, all invocations; the estimate counts every "
                      "request, cached ones at the tokens the cache recorded):"]
        rows = [["stage", "requests (plan)", "made (sent + cached)", "prompt tok plan / spent",
                 "completion tok plan / spent", "generate s", "tok/s", "cost plan / spent"]]
        for st in e.stages:
            s: dict[str, Any] = spent.get(st.stage, {})
            t = st.totals
            made = int(s.get("requests_sent", 0)) + int(s.get("cache_hits", 0))
            secs = float(s.get("generate_seconds", 0) or 0)
            cost = plan.cost(st, all_requests=True)
            rows.append([
                st.stage, _count(t.requests), f"{made:,} ({int(s.get('requests_sent', 0)):,} + {int(s.get('cache_hits', 0)):,})",
                f"{_n(t.cached_prompt + t.prompt.exp)} / {_n(s.get('prompt_tokens', 0))}",
                f"{_n(t.cached_completion + t.completion.exp)} / {_n(s.get('completion_tokens', 0))}",
                f"{secs:.1f}", f"{float(s.get('completion_tokens', 0)) / secs:.0f}" if secs else "-",
                (f"{_usd(cost.exp)} / " if cost else "- / ") + (_usd(s["cost_usd"]) if "cost_usd" in s else "-"),
            ])
        lines += _table(rows, right=set(range(1, 8)))
    return "\n".join(lines)
