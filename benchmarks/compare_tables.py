"""Two copies of a table, part by part: the same frames, the same file bytes, the same funnel
records? Checks that a change to a stage leaves its output as it was, e.g. the sft table of
``postprocess_scale.py``'s run before and after (run it once with ``BARD_SRC`` set to the old
code, copy ``RUN/sft`` aside, run it again):

    python benchmarks/compare_tables.py OLD_RUN/sft NEW_RUN/sft
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import polars as pl


def main(argv=None) -> int:
    a, b = (Path(x) for x in (argv or sys.argv[1:]))
    pa_, pb = sorted(a.glob("part-*.parquet")), sorted(b.glob("part-*.parquet"))
    frames = sum(pl.read_parquet(x).equals(pl.read_parquet(y)) for x, y in zip(pa_, pb))
    same = sum(hashlib.sha256(x.read_bytes()).digest() == hashlib.sha256(y.read_bytes()).digest()
               for x, y in zip(pa_, pb))
    funnels = [[p.read_text() for p in sorted((d / "_funnel").glob("*.json"))] for d in (a, b)]
    print(f"parts {len(pa_)} and {len(pb)}: {frames} equal frames, {same} equal files; "
          f"funnel records equal: {funnels[0] == funnels[1]}")
    return 0 if len(pa_) == len(pb) == frames == same and funnels[0] == funnels[1] else 1


if __name__ == "__main__":
    sys.exit(main())
