"""Compare two builds: ``bard-data diff RUN_A RUN_B``.

Either side is a run directory or an exported/published dataset folder. The comparison: the
recipe keys that differ; side by side, the funnel, the budget histogram (before and after
balancing), compression fidelity and the judge's pass rate (the shipped report queries on each
side); and the row-level difference of the ``sft`` table by content id (a budget row is its
``compression_id`` and ``copy_index``, a standard row its ``sample_id``): rows added, removed, and
changed (same id, other messages or budget).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from bard_data.report.sql import connect, execute, print_frame, views
from bard_data.report.stats import report, run_info

__all__ = ["diff_builds", "diff_cli"]

PARTS = ("funnel", "budget_histogram", "compression_fidelity", "judge_pass_rate")
SAMPLE_IDS = 5  # ids of added/removed/changed rows shown per kind


def _flat(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{path}.{k}" if path else str(k)))
        return out
    return {path: value}


def recipe_changes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Recipe keys whose values differ (``run_dir`` left out: it always does)."""
    fa, fb = _flat(a), _flat(b)
    out = []
    for key in sorted(set(fa) | set(fb)):
        if key == "run_dir":
            continue
        if fa.get(key) != fb.get(key):
            out.append({"key": key, "a": fa.get(key), "b": fb.get(key)})
    return out


def _sft_keys(root: Path) -> pl.DataFrame | None:
    con = connect(root)
    try:
        if "sft" not in views(con):
            return None
        cols = set(execute(con, "SELECT * FROM sft LIMIT 0").columns)
        copy = "coalesce(copy_index, 0)" if "copy_index" in cols else "0"
        cid = "compression_id" if "compression_id" in cols else "NULL"
        sid = "sample_id" if "sample_id" in cols else "NULL"
        df = execute(con, f"""
            SELECT kind, coalesce({cid}, {sid}, md5(CAST(messages AS VARCHAR))) AS id, {copy} AS copy_index,
                   md5(CAST(messages AS VARCHAR) || '|' || coalesce(CAST(budget AS VARCHAR), '')) AS content
            FROM sft""")
    finally:
        con.close()
    return df


def sft_changes(a: Path, b: Path) -> dict[str, Any]:
    ka, kb = _sft_keys(a), _sft_keys(b)
    if ka is None or kb is None:
        return {"available": False}
    key = ["kind", "id", "copy_index"]
    both = ka.join(kb, on=key, how="full", suffix="_b", coalesce=True)
    added = both.filter(pl.col("content").is_null())
    removed = both.filter(pl.col("content_b").is_null())
    changed = both.filter(pl.col("content").is_not_null() & pl.col("content_b").is_not_null()
                          & (pl.col("content") != pl.col("content_b")))
    same = both.height - added.height - removed.height - changed.height

    def ids(df: pl.DataFrame) -> list[str]:
        return [f"{k}:{i}#{c}" for k, i, c in df.sort(key).select(key).head(SAMPLE_IDS).iter_rows()]

    return {"available": True, "rows_a": ka.height, "rows_b": kb.height, "unchanged": same,
            "added": added.height, "removed": removed.height, "changed": changed.height,
            "added_ids": ids(added), "removed_ids": ids(removed), "changed_ids": ids(changed)}


def diff_builds(a: str | Path, b: str | Path) -> dict[str, Any]:
    """The comparison as plain data (frames for the report parts)."""
    a, b = Path(a), Path(b)
    ra, rb = report(a), report(b)
    return {
        "a": str(a), "b": str(b),
        "recipe": recipe_changes(run_info(a).get("recipe") or {}, run_info(b).get("recipe") or {}),
        "parts": {name: (ra.get(name), rb.get(name)) for name in PARTS},
        "sft": sft_changes(a, b),
    }


def _frame_json(df: pl.DataFrame | None) -> Any:
    return None if df is None else json.loads(df.write_json())


def diff_cli(args) -> int:
    d = diff_builds(args.run_a, args.run_b)
    if getattr(args, "json", False):
        out = {**d, "parts": {k: {"a": _frame_json(x), "b": _frame_json(y)} for k, (x, y) in d["parts"].items()}}
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(f"A: {d['a']}\nB: {d['b']}\n")
    print("recipe keys that differ (A -> B):" if d["recipe"] else "recipes: the same")
    for c in d["recipe"]:
        print(f"  {c['key']}: {json.dumps(c['a'], default=str)} -> {json.dumps(c['b'], default=str)}")
    for name, (x, y) in d["parts"].items():
        if x is None and y is None:
            continue
        print(f"\n{name}:")
        if name == "funnel" and x is not None and y is not None:
            key = ["step", "stage", "reason"]
            side = x.select(*key, "rows_in", "rows_out", "dropped").join(
                y.select(*key, "rows_in", "rows_out", "dropped"), on=key, how="full", suffix="_b", coalesce=True,
                nulls_equal=True).sort("step", "stage", "reason", nulls_last=False)
            print_frame(side.rename({"rows_in": "in_a", "rows_out": "out_a", "dropped": "dropped_a",
                                     "rows_in_b": "in_b", "rows_out_b": "out_b", "dropped_b": "dropped_b"}), 200)
            continue
        for label, df in (("A", x), ("B", y)):
            print(f" {label}:")
            if df is None or df.height == 0:
                print("  (none)")
            else:
                print_frame(df, 50)
    s = d["sft"]
    print("\nsft rows by content id:")
    if not s["available"]:
        print("  (an sft table is missing on one side)")
    else:
        print(f"  A {s['rows_a']} rows, B {s['rows_b']} rows: {s['unchanged']} unchanged, {s['added']} added, "
              f"{s['removed']} removed, {s['changed']} changed")
        for k in ("added", "removed", "changed"):
            if s[f"{k}_ids"]:
                print(f"  {k}: {', '.join(s[f'{k}_ids'])}{' ...' if s[k] > len(s[f'{k}_ids']) else ''}")
    return 0
