"""The funnel: for every stage, rows in, rows out and rows dropped by reason.

Every part the runner writes gets a record (``shard_record``) beside it; the funnel table is
built from those records (``build_funnel``), so it reflects what is on disk, also after resumes.
Invariant, asserted by tests: rows_in + added = rows_out + sum(dropped) per stage.
"""

from __future__ import annotations

from typing import Optional

import polars as pl

from bard_data.pipeline.stage import ShardResult

SCHEMA = {
    "step": pl.Int64, "stage": pl.Utf8, "rows_in": pl.Int64, "rows_out": pl.Int64, "added": pl.Int64,
    "reason": pl.Utf8, "dropped": pl.Int64,
}


def shard_record(stage: str, shard: int, result: ShardResult, rows_in: int,
                 input_hash: Optional[str] = None) -> dict:
    """The funnel record of one written part. ``rows_in``: the part's input rows, unless the
    result states its own (``result.rows_in``)."""
    dropped: dict[str, int] = {}
    if result.excluded is not None and result.excluded.height:
        for reason, n in result.excluded.group_by("reason").len().iter_rows():
            dropped[str(reason)] = int(n)
    rec = {
        "stage": stage,
        "shard": shard,
        "rows_in": int(result.rows_in if result.rows_in is not None else rows_in),
        "rows_out": int(result.kept.height),
        "added": int(result.added),
        "dropped": dropped,
        "counters": result.counters,
    }
    if input_hash is not None:
        rec["input_hash"] = input_hash
    return rec


def build_funnel(store, stages: list[str]) -> pl.DataFrame:
    rows = []
    for step, table in enumerate(stages):
        shards = store.shard_funnels(table)
        if not shards:
            continue
        rows_in = sum(s["rows_in"] for s in shards)
        rows_out = sum(s["rows_out"] for s in shards)
        added = sum(s.get("added", 0) for s in shards)
        dropped: dict[str, int] = {}
        for s in shards:
            for reason, n in s["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + n
        counters: dict[str, float] = {}
        for s in shards:
            for k, v in s.get("counters", {}).items():
                counters[k] = counters.get(k, 0) + v
        base = {"step": step, "stage": table, "rows_in": rows_in, "rows_out": rows_out, "added": added}
        if not dropped:
            rows.append({**base, "reason": None, "dropped": 0})
        for reason in sorted(dropped):
            rows.append({**base, "reason": reason, "dropped": dropped[reason]})
        # Counters (e.g. compressions that needed retries) ride along as reason-less notes.
        for k in sorted(counters):
            rows.append({**base, "reason": f"note:{k}", "dropped": 0, "_note": int(counters[k])})
    df = pl.DataFrame([{k: r.get(k) for k in [*SCHEMA, "_note"]} for r in rows],
                      schema={**SCHEMA, "_note": pl.Int64})
    return df.rename({"_note": "count"})


def check_funnel(funnel: pl.DataFrame) -> list[str]:
    """Stages whose counts do not add up (empty list when the bookkeeping is exact)."""
    bad = []
    for stage, g in funnel.group_by("stage", maintain_order=True):
        first = g.row(0, named=True)
        dropped = int(g.filter(~pl.col("reason").fill_null("").str.starts_with("note:"))["dropped"].sum())
        if first["rows_in"] + first["added"] != first["rows_out"] + dropped:
            bad.append(f"{stage[0]}: in {first['rows_in']} + added {first['added']} != out {first['rows_out']} + dropped {dropped}")
    return bad
