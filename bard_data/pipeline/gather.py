"""Text columns in another row order, in memory that does not grow with text length.

A stage decides on key columns (ids, token counts, budgets, verdicts) and then needs the text of
the rows it chose in its output's order, which is not the order the text is stored in (the sft
table is sorted by compression_id; compressions are stored by gold chain). Holding the text in
memory to gather it costs all of it (tens of GiB at real lengths and paper scale), so the text
goes through a scratch file instead, an external merge sort:

1. each input part is read once; the rows the plan takes from it join a buffer, tagged with their
   output position; a full buffer (``RUN_BYTES`` of text) is sorted by output position and its
   text written raw to the scratch file as a *run*, its offsets kept in memory (a few bytes a
   row). The byte length of every output row is known at the end of this pass, and with it the
   slices (the stage's output parts, about ``max_bytes`` of text each);
2. each slice reads, from every run, the contiguous range of output positions it covers (one read
   per run and column) and merges them (Polars string views into what was read: no further copy).

Memory: two input parts' text columns (the next is read while one is sorted), one buffer, or two
slices at a time (the next is read while the consumer works on one), plus the plan's keys and the
runs' offsets. The price is writing the text once more and reading it back. (DuckDB's
ORDER BY and hash join, tried first, ran out of memory under a 256 MB limit on string payloads:
DuckDB 2.0.1, 1.2 GB of text. A first version of this module read every part twice, once for
the lengths, and wrote a piece per part and slice: the pieces grew as parts times slices.)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from bard_data.pipeline.readahead import read_ahead
from bard_data.pipeline.scratch import ScratchFile

# Where an output column comes from: per alias, the part files it may point into and, per file,
# the file's column that feeds each output column (``{file: {output column: file column}}``).
Sources = Mapping[str, Mapping[Path, Mapping[str, str]]]

# Text buffered before it is sorted and written as one run: each slice reads a range from every
# run, so fewer, larger runs mean fewer reads; the buffer is held (and copied once while sorted).
RUN_BYTES = 32 << 20


def slice_bounds(row_bytes: np.ndarray, max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive row ranges holding about ``max_bytes`` of text each (a new range starts where
    the running total passes a multiple of ``max_bytes``)."""
    if not len(row_bytes):
        return []
    cut = np.cumsum(row_bytes) // max(max_bytes, 1)
    starts = [0] + (np.flatnonzero(np.diff(cut)) + 1).tolist()
    return list(zip(starts, starts[1:] + [len(row_bytes)]))


@dataclass
class _Run:
    """One sorted run of an alias: its output positions (ascending) and, per column, where its
    text starts in the scratch file, the offsets into it and which rows are null."""

    orders: np.ndarray
    start: dict[str, int]
    offsets: dict[str, np.ndarray]
    valid: dict[str, np.ndarray | None]


@dataclass
class _Buffer:
    """Rows taken from parts, per alias (views into the parts' columns), not yet in a run."""

    frames: dict[str, list[pl.DataFrame]] = field(default_factory=dict)
    held: int = 0  # bytes of text the frames keep alive


@dataclass
class Gathered:
    """The gathered text: ``bounds`` (the slices), ``row_bytes`` (text bytes per output row) and
    ``slices()``, the text of each slice in output order."""

    file: ScratchFile
    columns: list[str]
    aliases: dict[str, list[str]]
    bounds: list[tuple[int, int]]
    row_bytes: np.ndarray
    runs: dict[str, list[_Run]] = field(default_factory=dict)

    def slices(self) -> Iterator[pl.DataFrame]:
        # The next slice is read on a thread while the consumer works on this one: a slice is
        # many small direct reads (a range of every run), which wait on the disk, not the CPU.
        try:
            yield from read_ahead(self._slice, self.bounds)
        finally:
            self.file.close()

    def _slice(self, bounds: tuple[int, int]) -> pl.DataFrame:
        # Read, not mapped: a string the consumer keeps (a message that is its question
        # unchanged) would keep every mapped page of its slice resident.
        a, b = bounds
        frames = [_read_slice(self.file, self.runs.get(alias, []), cols, a, b) for alias, cols in self.aliases.items()]
        return pl.concat(frames, how="horizontal").select(self.columns)


def gather(plan: pl.DataFrame, sources: Sources, max_bytes: int, scratch: Path,
           run_bytes: int = RUN_BYTES) -> Gathered:
    """The text of ``plan``'s rows, in its order, cut into slices of about ``max_bytes``.

    ``plan`` has, per alias of ``sources``, the columns ``{alias}_file`` and ``{alias}_row``
    (``ArtifactStore.read(..., locators=alias)``; null: no row of that source, its columns are
    null). Each output column comes from one alias.
    The scratch folder is replaced, and removed by the caller when the slices are consumed.
    """
    aliases: dict[str, list[str]] = {}
    for alias, files in sources.items():
        aliases[alias] = list(dict.fromkeys(c for mapping in files.values() for c in mapping))
    columns = [c for cols in aliases.values() for c in cols]
    if len(set(columns)) != len(columns):
        raise ValueError(f"gather: an output column comes from two sources: {aliases}")
    needs = _needs(plan, sources)
    sizes = np.zeros(plan.height, dtype=np.int64)
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    res = Gathered(ScratchFile(scratch / "text.bin"), columns, aliases, [], sizes)
    buf = _Buffer()
    items = list(needs.items())

    def read(k: int) -> pl.DataFrame:
        path, wants = items[k]
        return _read(path, {out: src for alias, _, _ in wants for out, src in sources[alias][path].items()})

    f = res.file
    try:
        _fill(f, buf, items, read, aliases, sizes, res.runs, run_bytes)
    except BaseException:
        f.close()
        raise
    res.bounds = slice_bounds(sizes, max_bytes)
    return res


def _fill(f: ScratchFile, buf: _Buffer, items, read, aliases, sizes, runs, run_bytes) -> None:
    """Pass 1: every part read once, its taken rows buffered, full buffers written as runs."""
    for (path, wants), df in zip(items, read_ahead(read, range(len(items)))):
        part_bytes = int(df.select(pl.sum_horizontal(pl.all().str.len_bytes().fill_null(0).sum())).item())
        taken = []
        for alias, orders, rows in wants:
            piece = df.select(aliases[alias]).gather(rows)
            row_bytes = piece.select(pl.sum_horizontal(pl.all().str.len_bytes().fill_null(0))).to_series()
            sizes[orders] += row_bytes.cast(pl.Int64).to_numpy()
            taken.append((alias, piece.with_columns(pl.Series("_order", orders)), int(row_bytes.sum())))
        del df
        if sum(t for _, _, t in taken) * 2 < part_bytes:
            # A few rows of a large part: copy them out, or the whole part stays alive.
            taken = [(alias, pl.from_arrow(piece.to_arrow()), t) for alias, piece, t in taken]
            buf.held += sum(t for _, _, t in taken)
        else:
            buf.held += part_bytes
        for alias, piece, _ in taken:
            buf.frames.setdefault(alias, []).append(piece)
        del taken
        if buf.held >= run_bytes:
            _flush(f, buf, runs)
    _flush(f, buf, runs)


def _flush(f: ScratchFile, buf: _Buffer, runs: dict[str, list[_Run]]) -> None:
    """Sort each alias's buffered rows by output position and append their text to the scratch
    file as one run."""
    for alias, frames in buf.frames.items():
        if not frames:
            continue
        df = pl.concat(frames, how="vertical_relaxed", rechunk=False).sort("_order")
        frames.clear()
        run = _Run(df["_order"].to_numpy().copy(), {}, {}, {})
        for c in (c for c in df.columns if c != "_order"):
            arr = df[c].to_arrow(compat_level=pl.CompatLevel.oldest())  # contiguous: the one copy
            if isinstance(arr, pa.ChunkedArray):
                arr = arr.combine_chunks()
            arr = arr.cast(pa.large_string())
            validity, offsets, data = arr.buffers()
            off = np.frombuffer(offsets, dtype=np.int64, count=len(arr) + 1, offset=arr.offset * 8)
            run.offsets[c] = off - off[0]
            run.valid[c] = None if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
            run.start[c] = f.write(memoryview(data)[off[0]:off[-1]] if data is not None else b"")
            del arr, validity, offsets, data
        runs.setdefault(alias, []).append(run)
        del df
    buf.held = 0


def _read_slice(f: ScratchFile, runs: list[_Run], cols: list[str], a: int, b: int) -> pl.DataFrame:
    """Output rows ``a..b`` of one alias's columns: a range from each run, merged by position;
    rows no run holds are null."""
    pieces = []
    for run in runs:
        lo, hi = (int(x) for x in np.searchsorted(run.orders, [a, b]))
        if hi == lo:
            continue
        data = {"_order": run.orders[lo:hi]}
        for c in cols:
            off = run.offsets[c][lo:hi + 1]
            valid = run.valid[c]
            mask = None if valid is None else pa.py_buffer(np.packbits(valid[lo:hi], bitorder="little"))
            text = f.read(run.start[c] + int(off[0]), int(off[-1] - off[0]))
            data[c] = pl.from_arrow(pa.LargeStringArray.from_buffers(hi - lo, pa.py_buffer(off - off[0]), text, mask))
        pieces.append(pl.DataFrame(data))
    got = pl.concat(pieces, how="vertical_relaxed", rechunk=False).sort("_order") if pieces \
        else pl.DataFrame(schema={"_order": pl.Int64, **{c: pl.Utf8 for c in cols}})
    del pieces
    if got.height != b - a:  # rows this alias has no text for: nulls
        got = pl.DataFrame({"_order": np.arange(a, b, dtype=np.int64)}).join(
            got, on="_order", how="left", maintain_order="left")
    return got.drop("_order")


def _needs(plan: pl.DataFrame, sources: Sources) -> dict[Path, list[tuple[str, np.ndarray, np.ndarray]]]:
    """Per part file: which aliases take which of its rows, to which output positions."""
    out: dict[Path, list] = {}
    known = {str(p): Path(p) for files in sources.values() for p in files}
    for alias in sources:
        loc = plan.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("_order"), f"{alias}_file",
                          f"{alias}_row").filter(pl.col(f"{alias}_file").is_not_null())
        for (name,), grp in loc.partition_by(f"{alias}_file", as_dict=True, maintain_order=True).items():
            if name not in known or Path(name) not in sources[alias]:
                raise ValueError(f"gather: the plan points {alias} rows into {name}, which is not one of its parts")
            out.setdefault(known[name], []).append(
                (alias, grp["_order"].to_numpy(), grp[f"{alias}_row"].cast(pl.Int64).to_numpy()))
    return out


def _read(path: Path, mapping: Mapping[str, str]) -> pl.DataFrame:
    """The output columns ``mapping`` takes from one part (a column the part lacks: null)."""
    md = pq.read_metadata(path)
    names = set(md.schema.names)
    df = pl.read_parquet(path, columns=list(dict.fromkeys(c for c in mapping.values() if c in names)))
    return pl.DataFrame([df[src].cast(pl.Utf8).alias(out) if src in names
                         else pl.repeat(None, md.num_rows, dtype=pl.Utf8, eager=True).alias(out)
                         for out, src in mapping.items()])
