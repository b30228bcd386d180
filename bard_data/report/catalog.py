"""The shipped SQL queries (``bard_data/report/queries/*.sql``): the report's parts.

Each query file is one report part. Its header comments name it and the views it needs::

    -- title: Funnel: rows in and out of every stage, and rows dropped by reason
    -- requires: funnel
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

from bard_data.errors import BardError

__all__ = ["PARTS", "Query", "load_query", "shipped_queries", "titles"]

# Report parts in the order they are printed and rendered (one file each in bard_data/queries).
PARTS = [
    "funnel", "counters", "sizes", "sft_composition", "rl_splits", "budget_histogram", "balance_summary",
    "compression_by_bin", "compression_fidelity", "judge_pass_rate", "judge_scores", "teacher_pass_rate", "tokens", "cost_throughput",
]


@dataclass
class Query:
    name: str
    sql: str
    title: str = ""
    requires: list[str] = field(default_factory=list)
    notes: str = ""  # the header's other comment lines: what the part means


def _queries_dir():
    return resources.files("bard_data.report") / "queries"


def _parse(name: str, text: str) -> Query:
    title, requires, notes = name.replace("_", " "), [], []
    for line in text.splitlines():
        s = line.strip()
        if not s.startswith("--"):
            if s:
                break
            continue
        body = s[2:].strip()
        if body.lower().startswith("title:"):
            title = body.split(":", 1)[1].strip()
        elif body.lower().startswith("requires:"):
            requires = [r.strip() for r in body.split(":", 1)[1].split(",") if r.strip()]
        elif body:
            notes.append(body)
    return Query(name=name, sql=text, title=title, requires=requires, notes=" ".join(notes))


def load_query(name: str) -> Query:
    """A shipped query by name (the file stem in bard_data/report/queries)."""
    f = _queries_dir() / f"{name}.sql"
    if not f.is_file():
        known = ", ".join(q.name for q in shipped_queries())
        raise BardError(f"no shipped query '{name}'; the queries are: {known}")
    return _parse(name, f.read_text(encoding="utf-8"))


def shipped_queries() -> list[Query]:
    names = sorted(p.name[:-4] for p in _queries_dir().iterdir() if p.name.endswith(".sql"))
    ordered = [n for n in PARTS if n in names] + [n for n in names if n not in PARTS]
    return [_parse(n, (_queries_dir() / f"{n}.sql").read_text(encoding="utf-8")) for n in ordered]


def titles() -> dict[str, str]:
    return {q.name: q.title for q in shipped_queries()}
