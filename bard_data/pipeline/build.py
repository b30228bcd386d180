"""Building one stage's table: the whole-table write path (a stage that yields its parts) and the
shard loop (a sharded stage, resumable), both through the store, with a funnel record per part.
The run loop (``pipeline.runner``) decides which stages to build; this module builds one."""

from __future__ import annotations

import itertools
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import polars as pl
from tqdm.auto import tqdm

from bard_data.pipeline.context import RunContext
from bard_data.pipeline.executors import make_executor
from bard_data.pipeline.funnel import shard_record
from bard_data.pipeline.progress import StageProgress
from bard_data.pipeline.stage import ShardedStage, Stage
from bard_data.pipeline.store import ArtifactStore, input_hash

log = logging.getLogger(__name__)


# Parts of a whole-table stage written at once, and the memory their frames may hold together:
# encoding is the slow half of writing a part and one core's work, so a second small part
# compresses beside the first; a large part is written alone.
WRITES_IN_FLIGHT = 2
WRITE_AHEAD_BYTES = 64 << 20


class BackgroundWriter:
    """Runs writes on background threads so that the next part is prepared while the previous
    ones are compressed (Polars releases the GIL while it encodes Parquet): at most
    ``in_flight`` writes at once, and a second one only while the frames pending stay within
    ``max_bytes``. ``submit`` waits until its write may start; leaving the ``with`` block waits
    for them all, and a write's exception is raised there (or at a later ``submit``)."""

    def __init__(self, in_flight: int = 1, max_bytes: int = 0):
        self._pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="bard-writer")
        self._in_flight, self._max_bytes = in_flight, max_bytes
        self._pending: list = []  # (future, bytes)

    def submit(self, fn: Callable, *args, nbytes: int = 0) -> None:
        while self._pending and (len(self._pending) >= self._in_flight
                                 or sum(b for _, b in self._pending) + nbytes > self._max_bytes):
            self._pending.pop(0)[0].result()
        self._pending.append((self._pool.submit(fn, *args), nbytes))

    def wait(self) -> None:
        while self._pending:
            self._pending.pop(0)[0].result()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _write_reports(store: ArtifactStore, reports: dict[str, pl.DataFrame]) -> None:
    for name, df in reports.items():
        store.write_table(name, df)


def run_whole(ctx: RunContext, stage: Stage, fingerprint: Optional[dict] = None) -> None:
    """A stage that yields its table's parts: each written as part i with its funnel record,
    then the table is marked done (with ``fingerprint``). The table is rebuilt whole; the old one
    is removed only once the stage has produced its first part, so an input the stage refuses
    (a broken source file) costs nothing already written."""
    store, name = ctx.store, stage.name
    parts = iter(stage.run(ctx))
    first = next(parts, None)
    if first is None:
        raise RuntimeError(f"stage '{name}' yielded no part")
    store.clear_table(name)
    n = rows = 0
    # A whole-table stage's parts are independent files, and the table counts only once
    # finish_table marks it done, so the order in which their writes complete does not matter.
    with BackgroundWriter(WRITES_IN_FLIGHT, WRITE_AHEAD_BYTES) as writer:
        for i, res in enumerate(itertools.chain([first], parts)):
            if res.rows_in is None:
                raise RuntimeError(f"stage '{name}': a part of a whole-table stage must state rows_in")
            _write_reports(store, res.reports)
            rec = shard_record(name, i, res, res.rows_in)
            size = res.kept.estimated_size() + (res.excluded.estimated_size() if res.excluded is not None else 0)
            writer.submit(store.write_shard, name, i, res.kept, res.excluded, rec, nbytes=size)
            ctx.on_shard_written(name, i)
            n, rows = n + 1, rows + res.kept.height
    store.finish_table(name, {"shards": n, "rows": rows}, fingerprint)


def run_sharded(ctx: RunContext, stage: ShardedStage, executor, fingerprint: Optional[dict] = None) -> None:
    """Split the stage's inputs (already in a deterministic order) into shards; run the ones not
    finished.

    A shard is finished when its files are whole and its funnel record carries the hash of the
    very input rows it was computed from (``store.shard_problem``), so a shard whose input
    changed (an upstream stage was redone, or the shard size changed) is recomputed and a
    damaged one is recomputed with a warning; its LLM calls are in the cache, so that is cheap.
    Shards with rows dropped as ``llm_error`` are redone on every new invocation: the rows that
    worked come back from the cache, only the failed requests are sent again. Shards beyond the
    current count (a larger shard size before) are removed. A shard computed under another
    ``fingerprint`` (an edited recipe) is recomputed, so a rebuild killed half way resumes.
    """
    fp = (fingerprint or {}).get("fingerprint")
    store, name = ctx.store, stage.name
    inputs = stage.inputs(ctx)
    store.unmark_done(name)  # from here on, a kill leaves the table unfinished (its shards resume)
    size = ctx.recipe.shard_size
    n = max(1, math.ceil(inputs.height / size))
    layout = {"shard_size": size, "shards": n, "rows": inputs.height}
    store.start_table(name, layout)
    shards = [inputs.slice(i * size, size) for i in range(n)]
    hashes = [input_hash(sh) for sh in shards]
    todo = []
    for i in range(n):
        why = store.shard_problem(name, i, hashes[i], retry_errors=True, fingerprint=fp)
        if why is not None:
            todo.append(i)
            if why == "llm_error":
                log.info("%s shard %d: retrying the rows whose LLM call failed", name, i)
    bar = tqdm(total=n, initial=n - len(todo), desc=name, unit="shard", disable=ctx.quiet)
    ctx.progress = StageProgress(bar, sum(stage.planned_requests(shards[i]) for i in todo), name=name)
    try:
        for i, res in executor.map_shards(ctx, stage, [(i, shards[i]) for i in todo]):
            _write_reports(store, res.reports)
            rec = shard_record(name, i, res, shards[i].height, hashes[i])
            if fp is not None:
                rec["fingerprint"] = fp
            store.write_shard(name, i, res.kept, res.excluded, rec)
            ctx.on_shard_written(name, i)
            bar.update(1)
            ctx.progress.show()
    finally:
        ctx.progress = None
        bar.close()
    store.mark_done(name, {**layout, **(fingerprint or {})})


def run_stage(ctx: RunContext, stage: Stage, executor=None, fingerprint: Optional[dict] = None) -> None:
    """Build (or finish) one stage's table in ``ctx``'s run directory; its inputs must be there.
    ``executor``: where the shards of a sharded stage run (default: here); ``fingerprint``:
    ``{"fingerprint", "basis"}`` recorded with the table."""
    if isinstance(stage, ShardedStage):
        run_sharded(ctx, stage, executor or make_executor(None), fingerprint)
    else:
        run_whole(ctx, stage, fingerprint)
