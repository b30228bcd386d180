"""SQL views over a run (and over exported / saved datasets) and the built-in stats report.

Every number the report gives is checked against a direct Polars computation over the run's
Parquet parts, on a synthetic run (tests/fixtures_run.py) that needs no model.
"""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest

from bard_data.budget.balance import total_variation
from bard_data.cli import main
from bard_data.errors import BardError
from bard_data.pipeline.store import ArtifactStore
from bard_data.report.catalog import PARTS, shipped_queries
from bard_data.report.sql import NotADatasetError, SQLSyntaxError, UnknownTableError, connect, query, views
from bard_data.report.stats import report
from tests.fixtures_run import EDGES, LABELS, make_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("sqlrun") / "run")


@pytest.fixture(scope="module")
def store(run_dir):
    return ArtifactStore(run_dir)


@pytest.fixture(scope="module")
def rep(run_dir):
    return report(run_dir)


# -- views ---------------------------------------------------------------------------------------


def test_views_of_a_run(run_dir):
    con = connect(run_dir)
    try:
        names = set(views(con))
    finally:
        con.close()
    assert {"problems", "teacher_samples", "gold_chains", "compressions", "judgments", "sft", "rl", "funnel",
            "decontamination", "excluded", "manifest", "tokens", "balance", "tables"} <= names
    assert not any(n.startswith("__") for n in names)


def test_queries_return_exact_counts(run_dir, store):
    assert query(run_dir, "SELECT count(*) AS n FROM sft")["n"][0] == store.read("sft").height
    # teacher_samples is sampled + imported traces together
    n_teacher = store.read("teacher_samples").height + store.read("imported_samples").height
    got = query(run_dir, "SELECT origin, count(*) AS n FROM teacher_samples GROUP BY origin ORDER BY origin")
    assert got["n"].sum() == n_teacher == 32
    assert dict(zip(got["origin"], got["n"])) == {"imported:gsm8k-solutions": 8, "sampled": 24}
    # excluded: every dropped row of every stage, tagged with its stage
    ex = query(run_dir, "SELECT stage, reason, count(*) AS n FROM excluded GROUP BY ALL ORDER BY ALL")
    want = []
    for stage in ("filtered_compressions", "gold_chains", "problems", "rl", "sft"):
        df = store.read_excluded(stage)
        want += [(stage, r, n) for r, n in df.group_by("reason").len().sort("reason").iter_rows()]
    assert list(ex.iter_rows()) == sorted(want)
    # funnel view equals the table
    f = query(run_dir, "SELECT * FROM funnel ORDER BY step, reason NULLS FIRST")
    assert f.height == store.read("funnel").height
    # manifest: one row of scalars; tokens: one row per model
    m = query(run_dir, "SELECT name, recipe_hash, complete, license FROM manifest")
    assert m.rows() == [("synthetic-bard", "0123456789abcdef", True, "mit")]
    t = query(run_dir, "SELECT sum(prompt_tokens) AS p, count(*) AS n FROM tokens")
    assert t.rows() == [(13200, 3)]
    # balance view: one row per bin, in bin order (not the JSON's sorted-key order)
    b = query(run_dir, "SELECT bin, lo, hi FROM balance ORDER BY bin_index")
    assert b["bin"].to_list() == LABELS and b["lo"].to_list() == EDGES[:-1] and b["hi"].to_list() == EDGES[1:]
    sizes = query(run_dir, "SELECT name, rows FROM tables")
    assert dict(sizes.iter_rows())["sft"] == 18


def test_one_line_errors(run_dir, tmp_path):
    with pytest.raises(UnknownTableError) as e:
        query(run_dir, "SELECT * FROM nope")
    msg = str(e.value)
    assert "\n" not in msg and "'nope'" in msg and "sft" in msg and "teacher_samples" in msg
    with pytest.raises(SQLSyntaxError) as e:
        query(run_dir, "SELEC count(*) FROM sft")
    assert "\n" not in str(e.value) and "syntax error" in str(e.value).lower()
    with pytest.raises(NotADatasetError) as e:
        query(tmp_path / "missing-run", "SELECT 1")
    assert "\n" not in str(e.value) and "missing-run" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotADatasetError):
        connect(tmp_path / "empty")
    for exc_type in (UnknownTableError, SQLSyntaxError, NotADatasetError):
        assert issubclass(exc_type, BardError)


def test_sql_cli(run_dir, tmp_path, capsys):
    assert main(["sql", str(run_dir), "SELECT kind, count(*) AS n FROM sft GROUP BY kind ORDER BY kind"]) == 0
    out = capsys.readouterr().out
    assert "budget" in out and "standard" in out and "(2 rows)" in out
    for suffix in ("csv", "json", "parquet", "jsonl"):
        dest = tmp_path / f"out.{suffix}"
        assert main(["sql", str(run_dir), "SELECT * FROM sft", "--out", str(dest)]) == 0
        assert dest.exists() and dest.stat().st_size > 0
    assert pl.read_parquet(tmp_path / "out.parquet").height == 18
    rows = json.loads((tmp_path / "out.json").read_text())
    assert len(rows) == 18 and isinstance(rows[0]["messages"], list)
    assert pl.read_csv(tmp_path / "out.csv").height == 18  # nested columns written as JSON text
    capsys.readouterr()
    assert main(["sql", str(run_dir), "SELECT * FROM nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown table 'nope'") and "\n" not in err
    assert main(["sql", str(tmp_path / "nowhere"), "SELECT 1"]) == 2
    assert "no such run" in capsys.readouterr().err
    assert main(["sql", str(run_dir), "SELECT 1", "--out", str(tmp_path / "x.xlsx")]) == 2
    # a shipped query by name, and a .sql file
    assert main(["sql", str(run_dir), "@tokens"]) == 0
    assert "total" in capsys.readouterr().out
    (tmp_path / "q.sql").write_text("SELECT count(*) AS n FROM rl")
    assert main(["sql", str(run_dir), str(tmp_path / "q.sql"), "--out", str(tmp_path / "q.json")]) == 0
    assert json.loads((tmp_path / "q.json").read_text()) == [{"n": 8}]


def test_sql_over_dataset_dirs(run_dir, store, tmp_path):
    """Configs as <config>/<split>-*.parquet, data/<config>/..., and save_to_disk folders."""
    import datasets

    pub = tmp_path / "pub"
    (pub / "sft").mkdir(parents=True)
    store.read("sft").write_parquet(pub / "sft" / "train-00000-of-00001.parquet")
    rl = store.read("rl")
    (pub / "data" / "rl").mkdir(parents=True)
    for s in ("train", "test"):
        rl.filter(pl.col("split") == s).write_parquet(pub / "data" / "rl" / f"{s}-00000-of-00001.parquet")
    funnel = store.read("funnel")
    datasets.DatasetDict({"train": datasets.Dataset.from_polars(funnel)}).save_to_disk(str(pub / "funnel"))
    assert query(pub, "SELECT count(*) AS n FROM sft")["n"][0] == 18
    assert query(pub, "SELECT split, count(*) AS n FROM rl GROUP BY split ORDER BY split").rows() == [("test", 2), ("train", 6)]
    assert query(pub, "SELECT sum(dropped) AS d FROM funnel")["d"][0] == funnel["dropped"].sum()
    # a bare save_to_disk DatasetDict: one view per split
    bare = tmp_path / "bare"
    datasets.DatasetDict({"train": datasets.Dataset.from_polars(rl.filter(pl.col("split") == "train")),
                          "test": datasets.Dataset.from_polars(rl.filter(pl.col("split") == "test"))}).save_to_disk(str(bare))
    assert query(bare, "SELECT (SELECT count(*) FROM train) AS a, (SELECT count(*) FROM test) AS b").rows() == [(6, 2)]


# -- the report ------------------------------------------------------------------------------------


def _close(a, b, tol=1e-9):
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) <= tol


def test_sql_over_loose_parquet_files(tmp_path):
    """An eval folder (eval.parquet, samples.parquet) and a single file are queryable."""
    d = tmp_path / "eval-out"
    d.mkdir()
    pl.DataFrame({"method": ["budget", "budget", "no_budget"], "budget": [64, 128, 64],
                  "accuracy": [0.25, 0.5, 0.0]}).write_parquet(d / "eval.parquet")
    pl.DataFrame({"problem_id": ["a", "b"]}).write_parquet(d / "samples.parquet")
    assert {"eval", "samples"} <= set(views(connect(d)))
    got = query(d, "SELECT budget, accuracy FROM eval WHERE method = 'budget' ORDER BY budget")
    assert got.to_dicts() == [{"budget": 64, "accuracy": 0.25}, {"budget": 128, "accuracy": 0.5}]
    assert query(d / "samples.parquet", "SELECT count(*) AS n FROM samples").item() == 2
    with pytest.raises(NotADatasetError):
        connect(d / "eval.json")


def test_report_parts(rep):
    assert list(rep) == [p for p in PARTS if p in rep]
    assert set(rep) == set(PARTS)  # the synthetic run has every table
    assert {q.name for q in shipped_queries()} == set(PARTS)


def test_report_funnel_and_sizes(rep, store):
    f = store.read("funnel").filter(~pl.col("reason").fill_null("").str.starts_with("note:"))
    f = f.sort("step", "stage", pl.col("reason").fill_null(""))
    got = rep["funnel"]
    assert got.select("step", "stage", "rows_in", "added", "rows_out", "reason", "dropped").rows() == \
        f.select("step", "stage", "rows_in", "added", "rows_out", "reason", "dropped").rows()
    assert rep["counters"].rows() == [(4, "compressions", "needed_retry", 9)]
    sizes = dict(rep["sizes"].iter_rows())
    for t in ("sft", "rl", "compressions", "judgments", "gold_chains", "funnel", "problems"):
        assert sizes[t] == store.read(t).height


def test_report_budget_histogram(rep, store):
    bal = store.read("balance")  # the sft stage's balance report, one row per bin
    info = {"before": dict(zip(bal["bin"], bal["before"])), "after": dict(zip(bal["bin"], bal["after"]))}
    target = bal["target"].to_list()
    info["tv_before"] = total_variation(bal["before"].to_list(), target)
    info["tv_after"] = total_variation(bal["after"].to_list(), target)
    h = rep["budget_histogram"]
    assert h["bin"].to_list() == LABELS
    assert h["before"].to_list() == [info["before"][lab] for lab in LABELS]
    assert h["after"].to_list() == [info["after"][lab] for lab in LABELS]
    sft = store.read("sft").filter(pl.col("kind") == "budget")
    assert h["sft_rows"].to_list() == [int((sft["budget_bin"] == lab).sum()) for lab in LABELS]
    comp = store.read("compressions")
    counts = []
    for i in range(len(LABELS)):
        lo, hi = EDGES[i], EDGES[i + 1]
        last = i == len(LABELS) - 1
        counts.append(comp.filter((pl.col("budget") >= lo) & ((pl.col("budget") < hi) | (last & (pl.col("budget") <= hi)))).height)
    assert h["compressions"].to_list() == counts
    s = rep["balance_summary"].row(0, named=True)
    assert s["rows_before"] == sum(info["before"].values()) and s["rows_after"] == sum(info["after"].values())
    assert _close(s["tv_before"], info["tv_before"]) and _close(s["tv_after"], info["tv_after"])


def test_report_compression_numbers(rep, store):
    comp = store.read("compressions")
    binned = comp.with_columns(pl.col("budget").map_elements(
        lambda b: next((LABELS[i] for i in range(len(LABELS))
                        if EDGES[i] <= b < EDGES[i + 1] or (i == len(LABELS) - 1 and b == EDGES[-1])), "outside"),
        return_dtype=pl.Utf8).alias("bin"))
    got = {r["bin"]: r for r in rep["compression_by_bin"].iter_rows(named=True)}
    assert set(got) == set(binned["bin"].unique())
    for lab, g in binned.group_by("bin"):
        r = got[lab[0]]
        assert r["n"] == g.height
        for col in ("ratio", "deviation"):
            assert _close(r[f"{col}_mean"], g[col].mean())
            assert _close(r[f"{col}_p50"], g[col].quantile(0.5, "linear"))
            assert _close(r[f"{col}_p90"], g[col].quantile(0.9, "linear"))
        assert _close(r["within_tolerance_rate"], g["within_tolerance"].mean())
        assert _close(r["answer_preserved_rate"], g["answer_preserved"].mean())
    o = rep["compression_fidelity"].row(0, named=True)
    assert o["compressions"] == comp.height and o["chains"] == comp["sample_id"].n_unique()
    assert _close(o["within_tolerance_rate"], comp["within_tolerance"].mean())
    assert _close(o["answer_preserved_rate"], comp["answer_preserved"].mean())
    assert _close(o["both_rate"], (comp["within_tolerance"] & comp["answer_preserved"]).mean())
    assert _close(o["retried_rate"], (comp["attempts"] > 1).mean())
    assert _close(o["abs_deviation_p50"], comp["deviation"].abs().quantile(0.5, "linear"))


def test_report_judge_teacher_tokens(rep, store, run_dir):
    j = store.read("judgments")
    r = rep["judge_pass_rate"].row(0, named=True)
    assert r["judged"] == j.height and r["passed"] == int(j["passed"].sum())
    assert _close(r["pass_rate"], j["passed"].mean()) and _close(r["score_mean"], j["score"].mean())
    assert r["unparsable"] == j["parse_error"].is_not_null().sum()
    assert r["incomplete"] == int((j["complete"] == False).sum())  # noqa: E712
    scores = rep["judge_scores"]
    assert scores["n"].sum() == j.height
    assert dict(zip(scores["score"], scores["n"]))["none"] == j["score"].is_null().sum()
    expect = j.filter(pl.col("score").is_not_null()).with_columns(
        (pl.col("score") * 10).floor().clip(0, 9).cast(pl.Int64).alias("b")).group_by("b").len()
    got = scores.filter(pl.col("score") != "none")
    assert sorted(got["n"].to_list()) == sorted(expect["len"].to_list())

    samples = pl.concat([store.read("teacher_samples"), store.read("imported_samples")], how="diagonal_relaxed")
    t = {(r["source"], r["origin"]): r for r in rep["teacher_pass_rate"].iter_rows(named=True)}
    for (src, origin), g in samples.group_by("source", "origin"):
        r = t[(src, origin)]
        assert r["samples"] == g.height and r["correct"] == int(g["is_correct"].sum())
        assert r["problems"] == g["problem_id"].n_unique()
        assert _close(r["pass_rate"], g["is_correct"].mean())

    manifest = json.loads((run_dir / "manifest.json").read_text())
    tok = {r["model"]: r for r in rep["tokens"].iter_rows(named=True)}
    for model, v in manifest["tokens"].items():
        assert tok[model]["prompt_tokens"] == v["prompt_tokens"]
        assert tok[model]["total_tokens"] == v["prompt_tokens"] + v["completion_tokens"]
    assert tok["total"]["completion_tokens"] == sum(v["completion_tokens"] for v in manifest["tokens"].values())

    comp = rep["sft_composition"]
    sft = store.read("sft")
    assert comp["rows"].sum() == sft.height
    assert rep["rl_splits"].group_by("split").agg(pl.col("rows").sum()).sort("split").rows() == [("test", 2), ("train", 6)]


def test_report_skips_parts_without_their_tables(run_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    shutil.rmtree(partial / "judgments")
    shutil.rmtree(partial / "teacher_samples")
    shutil.rmtree(partial / "imported_samples")
    rep = report(partial)
    assert "judge_pass_rate" not in rep and "judge_scores" not in rep and "teacher_pass_rate" not in rep
    assert "funnel" in rep and "compression_by_bin" in rep


def test_compression_bins_without_a_balance_report(run_dir, store, tmp_path):
    """Before balancing (or when no compression survived), bins are powers of two."""
    early = tmp_path / "early"
    shutil.copytree(run_dir, early)
    shutil.rmtree(early / "balance")
    rep = report(early)
    assert rep["budget_histogram"].height == 0 and rep["balance_summary"].height == 0
    by_bin = rep["compression_by_bin"]
    comp = store.read("compressions")
    assert by_bin["n"].sum() == comp.height and "outside" not in by_bin["bin"].to_list()
    for r in by_bin.iter_rows(named=True):
        assert r["hi"] == 2 * r["lo"] and r["bin"] == f"[{r['lo']},{r['hi']})"
        assert r["n"] == comp.filter((pl.col("budget") >= r["lo"]) & (pl.col("budget") < r["hi"])).height


def test_stats_cli_plots_and_json(run_dir, tmp_path, capsys):
    plots, js = tmp_path / "plots", tmp_path / "report.json"
    assert main(["stats", str(run_dir), "--plots", str(plots), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "[funnel]" in out and "[budget_histogram]" in out and "[judge_pass_rate]" in out
    for name in ("budget_histogram.png", "ratio_vs_budget.png", "deviation_vs_budget.png"):
        p = plots / name
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    data = json.loads(js.read_text())
    assert set(data) == set(PARTS)
    assert data["judge_pass_rate"]["rows"][0]["judged"] == 28
    assert main(["stats", str(tmp_path / "nope")]) == 2
