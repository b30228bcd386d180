"""Export and push: the Hub layout, the card, and a real round trip through the Hub protocol.

The Hub is tests/hub_server.py on 127.0.0.1. Pushing and loading run the real `huggingface_hub`
and `datasets` clients in subprocesses with HF_ENDPOINT pointing at it (both libraries read
their endpoint and offline settings at import time, and this test session imported them with
HF_HUB_OFFLINE=1); the in-process tests pass the endpoint explicitly and patch those constants.
A planted token must reach the server (writes are refused without it) and appear nowhere on disk.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from bard_data.pipeline.store import ArtifactStore
from bard_data.report.publish import CONFIGS, PublishError, export, push, sanitize
from bard_data.report.sql import query
from bard_data.report.stats import report
from tests.fixtures_run import make_run
from tests.hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "planted-secret-token-xyz"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("pubrun") / "run")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    srv = HubServer(tmp_path_factory.mktemp("hub") / "storage", expected_token=TOKEN).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def hub_env(hub, tmp_path_factory):
    home = tmp_path_factory.mktemp("hfhome")
    env = dict(os.environ)
    env.update({
        "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0", "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
    })
    env.pop("HUGGING_FACE_HUB_TOKEN", None)
    return env


@pytest.fixture
def inproc_hub(hub, monkeypatch, tmp_path):
    """The in-process huggingface_hub pointed at the test hub (constants read at import patched)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    return hub


def _canon(rows) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)


def _card_table(card_text: str, heading: str) -> list[list[str]]:
    """The markdown table under a '### heading' of the card, as rows of cells (header dropped)."""
    sec = card_text.split(f"### {heading}", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(sec) if ln.startswith("|"))
    block = []
    for ln in sec[start:]:
        if not ln.startswith("|"):
            break
        block.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return block[2:]


def _num(cell: str):
    return None if cell == "" else float(cell)


def _assert_no_token(*roots: Path) -> None:
    needle = TOKEN.encode()
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file():
                assert needle not in p.read_bytes(), f"token found in {p}"


# -- export ------------------------------------------------------------------------------------


def test_export_layout_and_card(run_dir, tmp_path):
    from huggingface_hub import DatasetCard

    out = tmp_path / "export"
    res = export(run_dir, out, repo_id="bard-tester/synthetic")
    store = ArtifactStore(run_dir)
    assert list(res.configs) == CONFIGS
    for config, files in res.configs.items():
        table = store.read(config)
        assert sum(f["rows"] for f in files) == table.height
        for f in files:
            assert re.fullmatch(rf"{config}/\w+-00000-of-00001\.parquet", f["path"])
            assert pl.read_parquet(out / f["path"]).height == f["rows"]
    assert [f["split"] for f in res.configs["rl"]] == ["train", "test"]
    for name in ("budget_histogram", "ratio_vs_budget", "deviation_vs_budget"):
        assert (out / "assets" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    public = json.loads((out / "bard_run.json").read_text())
    assert "run_dir" not in public["recipe"] and "recipe_file" not in public and "invocations" not in public
    assert str(run_dir) not in (out / "bard_run.json").read_text()

    text = (out / "README.md").read_text()
    card = DatasetCard(text)
    meta = card.data.to_dict()
    assert meta["license"] == "mit" and meta["task_categories"] == ["text-generation"]
    assert set(meta["tags"]) >= {"reasoning", "distillation", "budget-aware", "bard"}
    assert meta["size_categories"] == ["n<1K"]
    cfgs = {c["config_name"]: c for c in meta["configs"]}
    assert list(cfgs) == CONFIGS and cfgs["sft"].get("default") is True
    assert [d["split"] for d in cfgs["rl"]["data_files"]] == ["train", "test"]
    # how it was built: recipe, models, sampling, prompts
    for s in ("0123456789abcdef", "tiny-teacher", "tiny-compressor", "tiny-judge", "Rewrite to about",
              "load_dataset(\"bard-tester/synthetic\", \"sft\"", "bard-data train sft", "## Limitations",
              "assets/budget_histogram.png", "assets/ratio_vs_budget.png", "assets/deviation_vs_budget.png"):
        assert s in text, s
    assert "127.0.0.1:9" in text or "openai" in text

    # every number in the card is the SQL's: funnel rows, config sizes, judge and compression stats
    funnel = query(run_dir, "SELECT step, stage, rows_in, added, rows_out, reason, dropped FROM funnel "
                            "WHERE reason IS NULL OR reason NOT LIKE 'note:%' ORDER BY step, stage, reason NULLS FIRST")
    rows = _card_table(text, "Funnel")
    assert [[int(r[0]), r[1], int(r[2]), int(r[3]), int(r[4]), r[5] or None, int(r[6])] for r in rows] == \
        [list(r) for r in funnel.iter_rows()]
    conf_rows = {r[0].strip("`"): int(r[2]) for r in _card_table(text.replace("## Configs", "### Configs"), "Configs")}
    for config in CONFIGS:
        assert conf_rows[config] == query(run_dir, f"SELECT count(*) AS n FROM {config}")["n"][0]
    judge = query(run_dir, "SELECT count(*) AS judged, sum(passed::INT) AS passed, avg(passed::DOUBLE) AS pass_rate "
                           "FROM judgments").row(0, named=True)
    jrow = _card_table(text, "Judge (logical completeness): pass rate")[0]
    assert int(jrow[0]) == judge["judged"] and int(jrow[1]) == judge["passed"]
    assert abs(float(jrow[2]) - judge["pass_rate"]) < 5e-5
    by_bin = report(run_dir)["compression_by_bin"]
    card_bins = _card_table(text, "Compression ratio and budget deviation per budget bin")
    assert [r[0] for r in card_bins] == by_bin["bin"].to_list()
    for cells, row in zip(card_bins, by_bin.iter_rows()):
        for cell, v in zip(cells[1:], row[1:]):
            assert abs(_num(cell) - float(v)) < 5e-5
    hist = _card_table(text, "Budget histogram")
    assert [(r[1], int(r[5]), int(r[6])) for r in hist] == \
        query(run_dir, "SELECT bin, before, after FROM balance ORDER BY bin_index").rows()
    tok = _card_table(text, "LLM tokens")
    assert tok[-1][0] == "total" and int(tok[-1][3]) == query(
        run_dir, "SELECT sum(prompt_tokens + completion_tokens) AS n FROM tokens")["n"][0]
    assert "Teacher pass rate per source" in text and "not published" in text

    # the folder itself loads with datasets through the card's configs
    import datasets

    rl_test = datasets.load_dataset(str(out), "rl", split="test", cache_dir=str(tmp_path / "cache"))
    assert rl_test.num_rows == 2 and set(rl_test["split"]) == {"test"}

    # the report over the export equals the report over the run for the published tables
    a, b = report(run_dir), report(out)
    for part in b:
        if part != "sizes":
            assert a[part].equals(b[part]), part


def test_export_refusals(run_dir, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(PublishError, match="not empty"):
        export(run_dir, busy)
    with pytest.raises(PublishError, match="no such run"):
        export(tmp_path / "nope", tmp_path / "o1")
    inc = make_run(tmp_path / "inc")
    m = json.loads((inc / "manifest.json").read_text())
    m["complete"] = False
    (inc / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PublishError, match="incomplete"):
        export(inc, tmp_path / "o2")
    res = export(inc, tmp_path / "o2", allow_incomplete=True)
    assert "incomplete run" in res.card_path.read_text()
    # re-exporting over an earlier export replaces it
    res2 = export(inc, tmp_path / "o2", allow_incomplete=True)
    assert res2.out_dir == (tmp_path / "o2").resolve()


def test_sanitize_drops_secrets_and_local_paths():
    s = sanitize({"backend": {"api_key": "sk-x", "api_key_env": "OPENAI_API_KEY", "hf_token": "hf_abc",
                              "base_url": "https://user:pw@host/v1", "model": "/home/me/models/m1"},
                  "sampling": {"max_tokens": 5}})
    assert s == {"backend": {"api_key_env": "OPENAI_API_KEY", "base_url": "https://host/v1", "model": "models/m1"},
                 "sampling": {"max_tokens": 5}}


# -- push: the real clients against the local hub ----------------------------------------------------


LOAD_SCRIPT = r"""
import json, sys
import datasets
from huggingface_hub import DatasetCard
repo, out = sys.argv[1], sys.argv[2]
result = {}
for config, splits in json.loads(sys.argv[3]).items():
    for split in splits:
        ds = datasets.load_dataset(repo, config, split=split)
        result[f"{config}/{split}"] = ds.to_list()
result["__card__"] = str(DatasetCard.load(repo, repo_type="dataset"))
default = datasets.load_dataset(repo, split="train")
result["__default_rows__"] = default.num_rows
result["__streamed__"] = [r for r in datasets.load_dataset(repo, "rl", split="test", streaming=True)]
with open(out, "w") as f:
    json.dump(result, f)
"""


def test_push_and_load_roundtrip(run_dir, hub, hub_env, tmp_path):
    from huggingface_hub import DatasetCard

    repo = "bard-tester/synthetic"
    before_auth = hub.authorized_requests
    p = subprocess.run([sys.executable, "-m", "bard_data.cli", "push", str(run_dir), "--repo", repo],
                       env=hub_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"/datasets/{repo}" in p.stdout and TOKEN not in p.stdout + p.stderr
    assert hub.authorized_requests > before_auth  # the token was sent, and it was the right one
    assert not hub.unhandled, hub.unhandled

    store = ArtifactStore(run_dir)
    splits = {c: ["train"] for c in CONFIGS}
    splits["rl"] = ["train", "test"]
    out = tmp_path / "loaded.json"
    p = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, repo, str(out), json.dumps(splits)],
                       env=hub_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not hub.unhandled, hub.unhandled
    loaded = json.loads(out.read_text())
    for config, ss in splits.items():
        table = store.read(config)
        for split in ss:
            want = table.filter(pl.col("split") == split) if "split" in table.columns else table
            got = loaded[f"{config}/{split}"]
            assert len(got) == want.height, (config, split)
            assert _canon(got) == _canon(want.to_dicts()), (config, split)
    assert loaded["__default_rows__"] == store.read("sft").height  # sft is the default config
    assert _canon(loaded["__streamed__"]) == _canon(loaded["rl/test"]) and len(loaded["__streamed__"]) == 2

    card = DatasetCard(loaded["__card__"])
    assert [c["config_name"] for c in card.data.to_dict()["configs"]] == CONFIGS
    sft_rows = query(run_dir, "SELECT count(*) AS n FROM sft")["n"][0]
    assert f"| `sft` | train | {sft_rows} |" in loaded["__card__"]
    funnel = query(run_dir, "SELECT stage, reason, dropped FROM funnel WHERE reason IS NOT NULL "
                            "AND reason NOT LIKE 'note:%'")
    for stage, reason, dropped in funnel.iter_rows():
        assert re.search(rf"\| {stage} \|[^\n]*\| {reason} \| {dropped} \|", loaded["__card__"]), (stage, reason)

    # the token is nowhere: run dir, server storage, HF home (client caches), this test's files
    _assert_no_token(run_dir, Path(hub.state.root), Path(hub_env["HF_HOME"]), tmp_path)


def test_push_in_process_branch_replace_and_scrubbed_errors(run_dir, inproc_hub, tmp_path):
    hub = inproc_hub
    repo = "bard-tester/inproc"
    res = push(run_dir, repo)
    state = hub.state.repo("dataset", repo)
    files = state["commits"][state["branches"]["main"]]["files"]
    assert {"README.md", "bard_run.json", "sft/train-00000-of-00001.parquet", "rl/test-00000-of-00001.parquet",
            "assets/budget_histogram.png"} <= set(files)
    assert res.commit_oid == state["branches"]["main"]

    # a later push of a run without judgments removes that config from the repo
    smaller = tmp_path / "smaller"
    import shutil

    shutil.copytree(run_dir, smaller)
    shutil.rmtree(smaller / "judgments")
    push(smaller, repo)
    files = state["commits"][state["branches"]["main"]]["files"]
    assert not any(p.startswith("judgments/") for p in files)
    assert "judgments" not in hub.state.blob(files["README.md"]["sha256"]).decode().split("---")[1]

    # a branch
    push(run_dir, repo, revision="dev")
    assert "dev" in state["branches"] and state["branches"]["dev"] != state["branches"]["main"]

    # a Hub error that echoes the credentials: one line, token scrubbed
    with pytest.raises(PublishError) as e:
        push(run_dir, "bard-tester/explode-now")
    msg = str(e.value)
    assert TOKEN not in msg and "\n" not in msg and "***" in msg and "explode-now" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__

    # a wrong token is refused by the hub, and the wrong token is not shown either
    with pytest.raises(PublishError) as e:
        push(run_dir, "bard-tester/other", token="wrong-token-abcdef")
    assert "wrong-token-abcdef" not in str(e.value)

    _assert_no_token(run_dir, Path(hub.state.root), smaller)


def test_push_refusals(run_dir, inproc_hub, monkeypatch):
    with pytest.raises(PublishError, match="namespace/name"):
        push(run_dir, "no-namespace")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match="no Hugging Face token"):
        push(run_dir, "bard-tester/x")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        push(run_dir, "bard-tester/x", token=TOKEN)


def test_export_copies_parts_one_at_a_time(tmp_path):
    """A config is written part by part (memory of one part, not of the table): its rows, order
    and schema are those of the table read whole, split by the ``split`` column; a part whose
    column is all null (typed Null) takes the table's type."""
    import pyarrow.parquet as pq

    from bard_data.report import publish

    store = ArtifactStore(tmp_path / "run")
    store.write_shard("t", 0, pl.DataFrame({"id": [1, 2, 3], "text": ["a", "b", "c"], "split": ["train", "test", "train"]}))
    store.write_shard("t", 1, pl.DataFrame({"id": [4], "text": [None], "split": ["train"]}))
    store.write_shard("t", 2, pl.DataFrame({"id": [5, 6], "text": ["e", "f"], "split": ["test", "bad name!"]}))
    store.write_shard("t", 3, pl.DataFrame({"id": [], "text": [], "split": []}, schema={"id": pl.Int64, "text": pl.Utf8,
                                                                                        "split": pl.Utf8}))
    files = publish._write_config(store.parts("t"), tmp_path / "out" / "t", "t")
    assert [(f["split"], f["rows"]) for f in files] == [("train", 3), ("test", 2), ("bad_name", 1)]
    whole = store.read("t")
    for f in files:
        got = pl.read_parquet(tmp_path / "out" / f["path"])
        want = whole.filter(pl.col("split").map_elements(publish._split_name, return_dtype=pl.Utf8) == f["split"])
        assert got.equals(want)
        assert pq.read_schema(tmp_path / "out" / f["path"]).field("text").type == "string"
    assert publish._write_config(store.parts("nothing"), tmp_path / "out" / "n", "n") == []
