"""The built-in report of a run: the shipped SQL queries (``report.catalog``) over its views.

A part whose views are missing (a run without a judge has no ``judgments``) is left out of the
report rather than failing it. The same report runs on an exported dataset directory (the
published configs), which is how the dataset card gets its numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import polars as pl

from bard_data.pipeline import manifest
from bard_data.report.catalog import PARTS, shipped_queries, titles
from bard_data.report.published import EXPORT_MARKER
from bard_data.report.sql import connect, execute, print_frame, views

__all__ = ["PARTS", "report", "report_to_json", "write_plots", "stats_cli"]

PLOTS = {
    "budget_histogram": "budget_histogram.png",
    "ratio_vs_budget": "ratio_vs_budget.png",
    "deviation_vs_budget": "deviation_vs_budget.png",
}


def report(run_dir: str | Path, con=None) -> dict[str, pl.DataFrame]:
    """Every shipped query whose views exist, in report order: ``{part name: result}``."""
    own = con is None
    con = connect(run_dir) if own else con
    try:
        available = set(views(con))
        out: dict[str, pl.DataFrame] = {}
        for q in shipped_queries():
            if all(r in available for r in q.requires):
                out[q.name] = execute(con, q.sql)
        return out
    finally:
        if own:
            con.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def report_to_json(rep: dict[str, pl.DataFrame]) -> dict[str, Any]:
    t = titles()
    return {
        name: {"title": t.get(name, name), "columns": df.columns,
               "rows": [{k: _jsonable(v) for k, v in row.items()} for row in df.to_dicts()]}
        for name, df in rep.items()
    }


# -- plots -------------------------------------------------------------------------------------


def run_info(path: str | Path) -> dict[str, Any]:
    """The manifest of a run, or the ``bard_run.json`` of an export ({} when neither is there)."""
    if manifest.exists(path):
        return manifest.read_manifest(path)
    p = Path(path) / EXPORT_MARKER
    if p.is_file():
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
    return {}


def _figure(w: float = 6.4, h: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def write_plots(run_dir: str | Path, out_dir: str | Path, rep: Optional[dict[str, pl.DataFrame]] = None,
                con=None) -> dict[str, Path]:
    """PNG plots (matplotlib, no pyplot state): budget histogram before/after balancing, and
    compression ratio and budget deviation against the budget. Returns {plot name: path} for the
    plots the run has data for."""
    out_dir = Path(out_dir)
    own = con is None
    con = connect(run_dir) if own else con
    try:
        rep = rep if rep is not None else report(run_dir, con=con)
        written: dict[str, Path] = {}
        hist = rep.get("budget_histogram")
        if hist is not None and hist.height:
            fig, ax = _figure()
            x = list(range(hist.height))
            w = 0.4
            ax.bar([i - w / 2 for i in x], hist["before"].to_list(), width=w, label="before balancing", color="#9aa5b1")
            ax.bar([i + w / 2 for i in x], hist["after"].to_list(), width=w, label="after balancing", color="#1f6fb2")
            n_after = sum(hist["after"].to_list())
            ax.plot(x, [t * n_after for t in hist["target"].to_list()], "k_", markersize=22, mew=2,
                    label="target (after total)")
            ax.set_xticks(x)
            ax.set_xticklabels(hist["bin"].to_list(), rotation=30, ha="right")
            ax.set_xlabel("budget bin (tokens)")
            ax.set_ylabel("budget-aware SFT rows")
            ax.set_title("Budget histogram before / after balancing")
            ax.legend()
            written["budget_histogram"] = _save(fig, out_dir / PLOTS["budget_histogram"])
        if "compressions" in views(con):
            pts = execute(con, "SELECT budget, ratio, deviation, within_tolerance, answer_preserved FROM compressions "
                               "WHERE budget IS NOT NULL AND budget > 0")
            if pts.height:
                tol = (run_info(run_dir).get("recipe") or {}).get("compression") or {}
                by_bin = rep.get("compression_by_bin")
                for name, col, ylabel in (("ratio_vs_budget", "ratio", "compressed / original tokens"),
                                          ("deviation_vs_budget", "deviation", "(tokens - budget) / budget")):
                    fig, ax = _figure()
                    ok = pts.filter(pl.col("within_tolerance").fill_null(False))
                    miss = pts.filter(~pl.col("within_tolerance").fill_null(False))
                    ax.scatter(ok["budget"].to_list(), ok[col].to_list(), s=14, alpha=0.7, label="within tolerance",
                               color="#1f6fb2")
                    ax.scatter(miss["budget"].to_list(), miss[col].to_list(), s=14, alpha=0.7, marker="x",
                               label="outside tolerance", color="#d1495b")
                    if by_bin is not None and by_bin.height:
                        # The median of each bin, drawn at the bin's geometric middle.
                        rows = [r for r in by_bin.iter_rows(named=True) if r.get("lo") is not None and r.get("hi")]
                        if rows:
                            ax.plot([math.sqrt(max(r["lo"], 1) * r["hi"]) for r in rows], [r[f"{col}_p50"] for r in rows],
                                    "k-o", markersize=4, label="median per bin")
                    if col == "deviation":
                        t = tol.get("tolerance")
                        if isinstance(t, (int, float)):
                            ax.axhline(t, color="grey", ls="--", lw=1)
                            if not tol.get("one_sided"):
                                ax.axhline(-t, color="grey", ls="--", lw=1)
                        ax.axhline(0, color="black", lw=0.6)
                    ax.set_xscale("log")
                    ax.set_xlabel("budget (student tokens)")
                    ax.set_ylabel(ylabel)
                    ax.set_title(f"Compression {col} vs budget")
                    ax.legend(fontsize=8)
                    written[name] = _save(fig, out_dir / PLOTS[name])
        return written
    finally:
        if own:
            con.close()


# -- CLI -----------------------------------------------------------------------------------------


def stats_cli(args) -> int:
    con = connect(args.run_dir)
    try:
        rep = report(args.run_dir, con=con)
        t = titles()
        for name, df in rep.items():
            heading = f"{t.get(name, name)}  [{name}]"
            print(heading)
            print("-" * len(heading))
            if df.height:
                print_frame(df, max_rows=200)
            else:
                print("(no rows yet)")
            print()
        if getattr(args, "json", None):
            p = Path(args.json)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(report_to_json(rep), indent=1, default=str) + "\n", encoding="utf-8")
            print(f"wrote the report to {p}")
        if getattr(args, "plots", None):
            written = write_plots(args.run_dir, args.plots, rep, con=con)
            for p in written.values():
                print(f"wrote {p}")
            if not written:
                print("no plots: the run has no compressions or balance report yet")
    finally:
        con.close()
    return 0
