"""Two copies of a table: the same rows, in the same order, with the same values and types? And
the same funnel totals? Checks that a change to a stage leaves its output as it was, e.g. the
sft table of ``postprocess_scale.py``'s run before and after (run it once with ``BARD_SRC`` set
to the old code, copy ``RUN/sft`` aside, run it again):

    python benchmarks/compare_tables.py OLD_RUN/sft NEW_RUN/sft

The parts are compared too (equal frames, equal file bytes), and reported; they may differ
where a change cuts the table into other parts on purpose. Exits 1 when the tables differ.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import polars as pl


def _funnel_totals(d: Path) -> dict:
    totals: dict = {}
    for p in sorted((d / "_funnel").glob("*.json")):
        rec = json.loads(p.read_text())
        for k in ("rows_in", "rows_out", "added"):
            totals[k] = totals.get(k, 0) + int(rec.get(k) or 0)
        for reason, n in (rec.get("dropped") or {}).items():
            totals[f"dropped {reason}"] = totals.get(f"dropped {reason}", 0) + int(n)
    return totals


def main(argv=None) -> int:
    a, b = (Path(x) for x in (argv or sys.argv[1:]))
    pa_, pb = sorted(a.glob("part-*.parquet")), sorted(b.glob("part-*.parquet"))
    fa, fb = [pl.read_parquet(x) for x in pa_], [pl.read_parquet(x) for x in pb]
    ta, tb = pl.concat(fa, how="vertical_relaxed"), pl.concat(fb, how="vertical_relaxed")
    table = ta.schema == tb.schema and ta.equals(tb)
    funnel = _funnel_totals(a) == _funnel_totals(b)
    frames = sum(x.equals(y) for x, y in zip(fa, fb))
    same = sum(hashlib.sha256(x.read_bytes()).digest() == hashlib.sha256(y.read_bytes()).digest()
               for x, y in zip(pa_, pb))
    print(f"table: {ta.height} and {tb.height} rows, equal (rows, order, values, types): {table}; "
          f"funnel totals equal: {funnel}; parts {len(pa_)} and {len(pb)}: {frames} equal frames, {same} equal files")
    return 0 if table and funnel else 1


if __name__ == "__main__":
    sys.exit(main())
