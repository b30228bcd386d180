"""pipeline.gather: text moved into another row order through a scratch file gives what an
in-memory join gives, row for row, whatever the slice and run sizes; the slices follow the byte
rule."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bard_data.pipeline.gather import gather, slice_bounds
from bard_data.pipeline.store import ArtifactStore


def _tables(tmp_path):
    rng = np.random.default_rng(7)
    store = ArtifactStore(tmp_path / "run")
    words = ["alpha", "beta", "γάμμα", "delta", "ε", ""]
    a = pl.DataFrame({"a_id": [f"a{i:03d}" for i in range(40)],
                      "q": [" ".join(rng.choice(words, size=int(rng.integers(0, 9)))) for _ in range(40)],
                      "long": ["x" * int(rng.integers(0, 300)) for _ in range(40)]})
    a = a.with_columns(pl.when(pl.col("a_id") == "a005").then(None).otherwise(pl.col("q")).alias("q"))
    b = pl.DataFrame({"b_id": [f"b{i:03d}" for i in range(25)], "text": [f"b-text-{i}-" + "y" * i for i in range(25)]})
    for i, k in enumerate(range(0, 40, 15)):
        store.write_shard("a", i, a.slice(k, 15))
    store.write_shard("b", 0, b.slice(0, 10))
    store.write_shard("b", 1, b.clear())  # a part without rows
    store.write_shard("b", 2, b.slice(10))
    return store, a, b, rng


@pytest.mark.parametrize("run_bytes", [1, 300, 1 << 30])
@pytest.mark.parametrize("max_bytes", [1, 50, 400, 1 << 30])
def test_gather_equals_an_in_memory_join(tmp_path, max_bytes, run_bytes):
    store, a, b, rng = _tables(tmp_path)
    la, lb = store.read("a", ["a_id"], locators="a"), store.read("b", ["b_id"], locators="b")
    assert la["a_id"].to_list() == a["a_id"].to_list() and lb["b_id"].to_list() == b["b_id"].to_list()
    # Output rows in an order of their own, with repeats (upsampled copies) and rows that have
    # no b text (null locator).
    keys = pl.DataFrame({"a_id": rng.choice(a["a_id"].to_numpy(), size=70),
                         "b_id": [None if rng.random() < 0.3 else f"b{int(rng.integers(0, 25)):03d}" for _ in range(70)]})
    plan = (keys.join(la, on="a_id", how="left", maintain_order="left")
            .join(lb, on="b_id", how="left", maintain_order="left"))
    sources = {"a": {p: {"question": "q", "reasoning": "long"} for p in store.parts("a")},
               "b": {p: {"extra": "text"} for p in store.parts("b")}}
    got = gather(plan, sources, max_bytes, tmp_path / "scratch", run_bytes=run_bytes)
    # A run per part read (or one per alias): every slice merges ranges of several runs.
    assert len(got.runs["a"]) == (1 if run_bytes > 1000 else 3)
    want = (keys.join(a, on="a_id", how="left", maintain_order="left")
            .join(b, on="b_id", how="left", maintain_order="left")
            .select(pl.col("q").alias("question"), pl.col("long").alias("reasoning"), pl.col("text").alias("extra")))
    sizes = want.select(pl.sum_horizontal(pl.all().str.len_bytes().fill_null(0).cast(pl.Int64))).to_series().to_numpy()
    assert got.row_bytes.tolist() == sizes.tolist()
    assert got.bounds == slice_bounds(sizes, max_bytes)
    assert len(got.bounds) > (5 if max_bytes <= 50 else 0)
    slices = list(got.slices())
    assert [s.height for s in slices] == [b_ - a_ for a_, b_ in got.bounds]
    assert pl.concat(slices).equals(want)


def test_slice_bounds_cut_where_the_running_total_passes_a_multiple():
    assert slice_bounds(np.array([3, 3, 3, 3]), 5) == [(0, 1), (1, 3), (3, 4)]
    assert slice_bounds(np.array([], dtype=np.int64), 5) == []
    assert slice_bounds(np.array([10, 0, 0]), 100) == [(0, 3)]


def test_a_locator_outside_the_sources_is_refused(tmp_path):
    store, a, _, _ = _tables(tmp_path)
    plan = store.read("a", ["a_id"], locators="a").head(3).with_columns(pl.lit("/elsewhere/part.parquet").alias("a_file"))
    with pytest.raises(ValueError, match="not one of its parts"):
        gather(plan, {"a": {p: {"question": "q"} for p in store.parts("a")}}, 100, tmp_path / "scratch")


@pytest.mark.parametrize("direct", [True, False])
def test_scratch_file_gives_back_what_was_written(tmp_path, monkeypatch, direct):
    from bard_data.pipeline import scratch

    if not direct:  # the page-cache path, as on a file system that refuses O_DIRECT
        monkeypatch.setattr(scratch, "DIRECT", 0)
    monkeypatch.setattr(scratch, "STAGE_BYTES", 8192)  # records longer than the staging buffer
    f = scratch.ScratchFile(tmp_path / "s.bin")
    rng = np.random.default_rng(1)
    records = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in (0, 1, 4095, 4096, 4097, 20000, 3)]
    starts = [f.write(r) for r in records]
    assert all(s % scratch.ALIGN == 0 for s in starts)
    for s, r in zip(starts, records):
        assert f.read(s, len(r)).to_pybytes() == r
        if len(r) > 10:
            assert f.read(s + 7, len(r) - 9).to_pybytes() == r[7:-2]
    f.close()
