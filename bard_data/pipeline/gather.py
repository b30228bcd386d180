"""Text columns in another row order, in memory that does not grow with text length.

A stage decides on key columns (ids, token counts, budgets, verdicts) and then needs the text of
the rows it chose in its output's order, which is not the order the text is stored in (the sft
table is sorted by compression_id; compressions are stored by gold chain). Holding the text in
memory to gather it costs all of it (tens of GiB at real lengths and paper scale), so the text
is moved through a scratch file instead, a bucket sort in three passes over bounded pieces:

1. each text column of each input part is read for the byte length of every row the plan takes
   from it: the output is then cut into slices of about ``max_bytes`` of text (the stage's
   output parts);
2. each input part is read again and its taken rows, tagged with their output position, are
   appended to the scratch file a slice's piece at a time (an index keeps where each piece lies);
3. each slice reads its pieces back and puts its rows in order.

Memory: one input part's text columns, or one slice, at a time, plus the plan's keys. The price
is reading the text twice and writing it once more. (DuckDB's ORDER BY and hash join, tried
first, ran out of memory under a 256 MB limit on string payloads: DuckDB 2.0.1, 1.2 GB of text.)
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import polars as pl
import pyarrow.parquet as pq

# Where an output column comes from: per alias, the part files it may point into and, per file,
# the file's column that feeds each output column (``{file: {output column: file column}}``).
Sources = Mapping[str, Mapping[Path, Mapping[str, str]]]


def slice_bounds(row_bytes: np.ndarray, max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive row ranges holding about ``max_bytes`` of text each (a new range starts where
    the running total passes a multiple of ``max_bytes``)."""
    if not len(row_bytes):
        return []
    cut = np.cumsum(row_bytes) // max(max_bytes, 1)
    starts = [0] + (np.flatnonzero(np.diff(cut)) + 1).tolist()
    return list(zip(starts, starts[1:] + [len(row_bytes)]))


@dataclass
class Gathered:
    """The gathered text: ``bounds`` (the slices), ``row_bytes`` (text bytes per output row) and
    ``slices()``, the text of each slice in output order."""

    path: Path
    columns: list[str]
    aliases: dict[str, list[str]]
    bounds: list[tuple[int, int]]
    row_bytes: np.ndarray
    index: dict[tuple[int, str], list[tuple[int, int]]] = field(default_factory=dict)

    def slices(self) -> Iterator[pl.DataFrame]:
        with open(self.path, "rb") as f:
            for k, (a, b) in enumerate(self.bounds):
                frames = []
                for alias, cols in self.aliases.items():
                    pieces = []
                    for off, n in self.index.get((k, alias), []):
                        f.seek(off)
                        pieces.append(pl.read_ipc_stream(io.BytesIO(f.read(n))))
                    got = pl.concat(pieces, how="vertical_relaxed", rechunk=False).sort("_order") if pieces \
                        else pl.DataFrame(schema={"_order": pl.Int64, **{c: pl.Utf8 for c in cols}})
                    del pieces
                    if got.height != b - a:  # rows this source has no text for: nulls
                        got = pl.DataFrame({"_order": np.arange(a, b, dtype=np.int64)}).join(
                            got, on="_order", how="left", maintain_order="left")
                    frames.append(got.drop("_order"))
                    del got
                out = pl.concat(frames, how="horizontal").select(self.columns)
                del frames  # the consumer owns the slice: hold no reference while it works
                yield out
                del out


def gather(plan: pl.DataFrame, sources: Sources, max_bytes: int, scratch: Path) -> Gathered:
    """The text of ``plan``'s rows, in its order, cut into slices of about ``max_bytes``.

    ``plan`` has, per alias of ``sources``, the columns ``{alias}_file`` and ``{alias}_row``
    (``ArtifactStore.read(..., locators=alias)``; null: no row of that source, its columns are
    null). Each output column comes from one alias.
    The scratch folder is replaced, and removed by the caller when the slices are consumed.
    """
    aliases: dict[str, list[str]] = {}
    for alias, files in sources.items():
        cols = list(dict.fromkeys(c for mapping in files.values() for c in mapping))
        aliases[alias] = cols
    columns = [c for cols in aliases.values() for c in cols]
    if len(set(columns)) != len(columns):
        raise ValueError(f"gather: an output column comes from two sources: {aliases}")
    needs = _needs(plan, sources)
    sizes = np.zeros(plan.height, dtype=np.int64)
    for path, wants in needs.items():  # pass 1: the byte length of every taken row, a column at a time
        for alias, orders, rows in wants:
            for src in sources[alias][path].values():
                col = _read(path, {"_": src}).to_series()
                sizes[orders] += col.str.len_bytes().fill_null(0).cast(pl.Int64).gather(rows).to_numpy()
                del col
    bounds = slice_bounds(sizes, max_bytes)
    slice_of = np.repeat(np.arange(len(bounds), dtype=np.int64), [b - a for a, b in bounds])
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    res = Gathered(scratch / "text.arrows", columns, aliases, bounds, sizes)
    with open(res.path, "wb") as f:  # pass 2: the taken rows, appended by slice, a piece at a time
        for path, wants in needs.items():
            for alias, orders, rows in wants:
                df = _read(path, sources[alias][path])
                ks = slice_of[orders]
                by_slice = np.argsort(ks, kind="stable")
                cuts = np.flatnonzero(np.diff(ks[by_slice])) + 1
                for idx in np.split(by_slice, cuts):
                    piece = df.gather(rows.gather(idx)).select(pl.Series("_order", orders[idx]), pl.all())
                    buf = io.BytesIO()
                    piece.write_ipc_stream(buf)
                    res.index.setdefault((int(ks[idx[0]]), alias), []).append((f.tell(), buf.tell()))
                    f.write(buf.getbuffer())
                del df
    return res


def _needs(plan: pl.DataFrame, sources: Sources) -> dict[Path, list[tuple[str, np.ndarray, pl.Series]]]:
    """Per part file: which aliases take which of its rows, to which output positions."""
    out: dict[Path, list] = {}
    known = {str(p): Path(p) for files in sources.values() for p in files}
    for alias in sources:
        loc = plan.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("_order"), f"{alias}_file",
                          f"{alias}_row").filter(pl.col(f"{alias}_file").is_not_null())
        for (name,), grp in loc.partition_by(f"{alias}_file", as_dict=True, maintain_order=True).items():
            if name not in known or Path(name) not in sources[alias]:
                raise ValueError(f"gather: the plan points {alias} rows into {name}, which is not one of its parts")
            out.setdefault(known[name], []).append((alias, grp["_order"].to_numpy(), grp[f"{alias}_row"]))
    return out


def _read(path: Path, mapping: Mapping[str, str]) -> pl.DataFrame:
    """The output columns ``mapping`` takes from one part (a column the part lacks: null)."""
    md = pq.read_metadata(path)
    names = set(md.schema.names)
    df = pl.read_parquet(path, columns=list(dict.fromkeys(c for c in mapping.values() if c in names)))
    return pl.DataFrame([df[src].cast(pl.Utf8).alias(out) if src in names
                         else pl.repeat(None, md.num_rows, dtype=pl.Utf8, eager=True).alias(out)
                         for out, src in mapping.items()])
