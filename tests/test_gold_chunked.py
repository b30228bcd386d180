"""Gold selection on key columns, text attached a part at a time and written in several shards
(large runs), gives the rows one ``select_gold`` over all samples gives, through the runner's
one write path."""

from __future__ import annotations

from types import SimpleNamespace

import polars as pl

from bard_data.pipeline.build import run_whole
from bard_data.pipeline.store import ArtifactStore
from bard_data.stages import gold


def _samples(n_problems: int, per: int, origin: str, offset: int) -> pl.DataFrame:
    rows = []
    for p in range(n_problems):
        for k in range(per):
            i = p * per + k
            rows.append({
                "sample_id": f"{origin}-{i:05d}", "problem_id": f"p-{p:04d}", "source": "synthetic",
                "origin": origin, "model": "m", "sample_index": k, "gold_answer": str(p),
                "reasoning": "step " * (5 + (i * 7 + offset) % 23), "response": f"#### {p}",
                "predicted_answer": str(p) if (i + offset) % 3 else "wrong",
                "is_correct": bool((i + offset) % 3), "reasoning_tokens": 5 + (i * 7 + offset) % 23,
            })
    return pl.DataFrame(rows)


def _run(tmp_path, name, chunk_bytes, monkeypatch, policy, read_bytes=1 << 30):
    store = ArtifactStore(tmp_path / name)
    problems = pl.DataFrame({"problem_id": [f"p-{p:04d}" for p in range(60)], "question": [f"q{p}" for p in range(60)]})
    store.write_table("problems", problems)
    teacher = _samples(60, 3, "sampled", 0)
    # Shards that each hold a range of problems, and one that spans all of them.
    for s, part in enumerate([teacher.slice(0, 70), teacher.slice(70, 70), teacher.slice(140)]):
        store.write_shard("teacher_samples", s, part)
    store.write_shard("imported_samples", 0, _samples(60, 1, "imported", 1))
    store.write_shard("imported_samples", 1, _samples(1, 1, "imported", 1).clear())  # a part with no rows
    monkeypatch.setattr(gold, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(gold, "READ_BYTES", read_bytes)
    teacher_cfg = SimpleNamespace(gold_policy=policy, min_reasoning_tokens=8, max_reasoning_tokens=25)
    ctx = SimpleNamespace(recipe=SimpleNamespace(teacher=teacher_cfg), store=store, on_shard_written=lambda t, i: None)
    run_whole(ctx, gold.GoldStage())
    return store


def test_chunked_selection_equals_one_pass(tmp_path, monkeypatch):
    for policy in ("shortest", "first", "all"):
        one = _run(tmp_path, f"one-{policy}", 1 << 30, monkeypatch, policy)
        many = _run(tmp_path, f"many-{policy}", 2_000, monkeypatch, policy)
        assert len(one.parts("gold_chains")) == 1
        assert len(many.parts("gold_chains")) > 3  # really chunked
        # The reference: one select_gold over every sample, every column.
        ref = gold.select_gold(gold.all_samples(one), one.read("problems"), policy, 8, 25)
        a, b = one.read("gold_chains"), many.read("gold_chains")
        assert a.height > 0
        assert ref.kept.equals(a)  # same rows, columns and order
        # The same rows; each part holds the chains of its group of sample parts, in that order.
        assert a.sort("sample_id").equals(b.sort("sample_id"))
        for part in many.parts("gold_chains"):
            chunk = pl.read_parquet(part)
            assert chunk.equals(chunk.sort("problem_id", maintain_order=True))
        assert ref.excluded.equals(one.read_excluded("gold_chains"))  # one shard: the very same frame
        ea, eb = one.read_excluded("gold_chains"), many.read_excluded("gold_chains")
        key = ["sample_id", "origin"]
        assert ea.sort(key).equals(eb.sort(key).select(ea.columns))
        fa = one.shard_funnels("gold_chains")
        fb = many.shard_funnels("gold_chains")
        assert sum(f["rows_in"] for f in fa) == sum(f["rows_in"] for f in fb) == 240


def test_parts_read_a_slice_of_rows_at_a_time_give_the_same_table(tmp_path, monkeypatch):
    """Large sample parts are decoded a slice of rows at a time (READ_BYTES): the same gold
    chains and excluded rows, part for part, as whole parts read at once."""
    scans = []
    scan = pl.scan_parquet
    monkeypatch.setattr(gold.pl, "scan_parquet", lambda *a, **k: scans.append(a) or scan(*a, **k))
    for policy in ("shortest", "all"):
        whole = _run(tmp_path, f"whole-{policy}", 2_000, monkeypatch, policy)
        assert not scans
        sliced = _run(tmp_path, f"sliced-{policy}", 2_000, monkeypatch, policy, read_bytes=300)
        assert len(scans) > 20  # really sliced
        scans.clear()
        pa_, pb = whole.parts("gold_chains"), sliced.parts("gold_chains")
        assert len(pa_) == len(pb) > 3
        for x, y in zip(pa_, pb):
            assert pl.read_parquet(x).equals(pl.read_parquet(y))
        assert whole.read_excluded("gold_chains").equals(sliced.read_excluded("gold_chains"))
