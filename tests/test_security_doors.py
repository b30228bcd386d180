"""The other doors a recipe, a dataset or a model folder could open (README, Security): paths that
climb out of the recipe's folder, code named in engine or Ray settings, the Hub token sent to a
recipe's server, trust settings printed at start, YAML that expands without end, judge output,
the SQL command's file access; and `bard-data recipe`, which turns a published dataset back into
the recipe that rebuilds it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import types
from pathlib import Path

import polars as pl
import pytest
import yaml

from bard_data.cli import main
from bard_data.config import load_recipe
from bard_data.errors import RecipeError
from bard_data.pipeline.store import ArtifactStore
from tests.fixtures_run import make_run
from tests.hub_server import HubServer
from tests.recipes import tiny_recipe, write_recipe

REPO = Path(__file__).resolve().parents[1]


def _err(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# -- paths ---------------------------------------------------------------------------------------------------


@pytest.fixture
def base(tmp_path, tiny_model_dir, shared_data):
    """A recipe folder tmp/recipes with a data file inside it and one beside it (outside)."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    line = (shared_data / "gsm8k" / "train.jsonl").read_text().split("\n", 1)[0] + "\n"
    (folder / "inside.jsonl").write_text(line)
    (tmp_path / "outside.jsonl").write_text(line)
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data, traces=[])
    data["run_dir"] = "runs/x"
    return folder, data


@pytest.mark.parametrize("key", ["sources[0].path", "decontamination.references[0].path", "run_dir",
                                 "student.tokenizer", "teacher.backend.model"])
def test_relative_path_that_climbs_out_is_a_recipe_error(base, key):
    folder, data = base
    data["decontamination"] = {"references": [{"name": "r", "path": "inside.jsonl", "column": "question"}]}
    value = {"run_dir": "../runs/x", "student.tokenizer": "../tiny", "teacher.backend.model": "../tiny"}.get(
        key, "../outside.jsonl")
    if key == "sources[0].path":
        data["sources"][0]["path"] = value
    elif key.startswith("decontamination"):
        data["decontamination"]["references"][0]["path"] = value
    elif key == "run_dir":
        data["run_dir"] = value
    elif key == "student.tokenizer":
        data["student"]["tokenizer"] = value
    else:
        data["teacher"]["backend"]["model"] = value
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(folder, data))
    msg = _err(e)
    assert f"recipe.yaml: {key}: '{value}' leads out of the recipe's folder" in msg
    assert "${recipe_dir}/" + value in msg  # says how to write it on purpose


def test_paths_inside_absolute_home_and_recipe_dir_are_fine(base, tmp_path):
    folder, data = base
    for path in ("inside.jsonl", "./inside.jsonl", "sub/../inside.jsonl", str(tmp_path / "outside.jsonl"),
                 "${recipe_dir}/../outside.jsonl", "${recipe_dir}/inside.jsonl"):
        data["sources"][0]["path"] = path
        r = load_recipe(write_recipe(folder, data))
        assert Path(r.resolve(r.sources[0].path, force=True)).is_file(), path
    data["run_dir"] = "${recipe_dir}/../runs/x"
    r = load_recipe(write_recipe(folder, data))
    assert r.resolve(r.run_dir, force=True) == str(tmp_path / "runs" / "x")


def test_a_symlink_inside_the_folder_that_leads_out_is_refused(base, tmp_path):
    folder, data = base
    (folder / "data").symlink_to(tmp_path)  # e.g. shipped in a cloned recipe repository
    data["sources"][0]["path"] = "data/outside.jsonl"
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(folder, data))
    assert "sources[0].path: 'data/outside.jsonl' leads out of the recipe's folder through a symlink" in _err(e)


@pytest.mark.parametrize("path", ["${HOME}/.ssh/id_rsa.jsonl", "$HOME/x.jsonl", "data/${recipe_dir}/x.jsonl"])
def test_no_other_variable_is_expanded(base, path):
    folder, data = base
    data["sources"][0]["path"] = path
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(folder, data))
    assert "sources[0].path:" in _err(e) and "is not expanded in a recipe path" in _err(e)


def test_shipped_recipes_reach_outside_only_through_recipe_dir():
    for p in sorted((REPO / "recipes").glob("*.yaml")):
        text = p.read_text()
        for line in text.splitlines():
            code = line.split("#", 1)[0]
            assert "../" not in code or "${recipe_dir}/../" in code, f"{p.name}: {line}"


# -- YAML ------------------------------------------------------------------------------------------------------


def test_yaml_alias_bomb_is_a_quick_one_line_error(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("name: bomb")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "expands to more than" in _err(e) and time.perf_counter() - t0 < 5


def test_yaml_python_tags_are_not_constructed(tmp_path):
    marker = tmp_path / "INJECTED"
    p = tmp_path / "tagged.yaml"
    p.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "malformed YAML" in _err(e) and not marker.exists()


# -- trust settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,expect", [
    ({"trust_remote_code": True}, "engine_kwargs: trust_remote_code: set the backend's own trust_remote_code"),
    ({"worker_extension_cls": "mypkg.Ext"}, "engine_kwargs: worker_extension_cls: names Python code"),
    ({"reasoning_parser_plugin": "./evil.py"}, "engine_kwargs: reasoning_parser_plugin: names Python code"),
    ({"logits_processors": ["os.system"]}, "engine_kwargs: logits_processors: names Python code"),
    ({"distributed_executor_backend": "evil.Executor"}, "engine_kwargs: distributed_executor_backend: only"),
    ({"compilation_config": {"backend": "os.system"}}, "engine_kwargs: compilation_config.backend:"),
    ({"kv_transfer_config": {"kv_connector_module_path": "evil"}},
     "engine_kwargs: kv_transfer_config.kv_connector_module_path: names Python code"),
    ({"hf_overrides": {"auto_map": {"AutoConfig": "x.Y"}}}, "engine_kwargs: hf_overrides: names Python code"),
])
def test_vllm_engine_kwargs_that_name_code_are_refused(tmp_path, tiny_model_dir, shared_data, kwargs, expect):
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    data["judge"]["backend"] = {"kind": "vllm", "model": str(tiny_model_dir), "engine_kwargs": kwargs}
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, data))
    assert f"judge.backend.{expect}" in _err(e)


def test_plain_engine_kwargs_pass(tmp_path, tiny_model_dir, shared_data):
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    kw = {"enable_prefix_caching": False, "max_num_seqs": 8, "distributed_executor_backend": "uni",
          "compilation_config": {"level": 0}}
    data["judge"]["backend"] = {"kind": "vllm", "model": str(tiny_model_dir), "engine_kwargs": kw}
    assert load_recipe(write_recipe(tmp_path, data)).judge.backend.engine_kwargs == kw


@pytest.mark.parametrize("var", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "hf_token"])
def test_the_hub_token_is_never_an_api_key(tmp_path, tiny_model_dir, shared_data, var):
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    data["judge"]["backend"] = {"kind": "openai", "model": "m", "base_url": "http://example.invalid/v1",
                                "api_key_env": var}
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, data))
    assert f"judge.backend.api_key_env: {var} is the Hugging Face token" in _err(e)


@pytest.mark.parametrize("key", ["runtime_env", "job_config", "dashboard_host", "_system_config"])
def test_ray_init_kwargs_that_install_or_run_code_are_refused(tmp_path, tiny_model_dir, shared_data, key):
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    data["executor"] = {"kind": "ray", "init_kwargs": {key: {"pip": ["evil"]}}}
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, data))
    assert f"executor.init_kwargs: {key}: not allowed in a recipe" in _err(e)


def test_ray_workers_do_not_get_the_hub_token(monkeypatch):
    from bard_data.config.executor import ExecutorConfig
    from bard_data.pipeline import executors

    seen = {}
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: seen.update(kw))
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_secretsecretsecret")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    executors.RayExecutor(ExecutorConfig(kind="ray", address="auto"))
    env = seen["runtime_env"]["env_vars"]
    assert env.get("HF_HUB_OFFLINE") == "1" and "HF_TOKEN" not in env and "HUGGING_FACE_HUB_TOKEN" not in env


def test_trust_settings_are_printed_when_a_run_starts(tmp_path, tiny_model_dir, shared_data, capsys):
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data, n_problems=2)
    data["student"]["trust_remote_code"] = True
    data["judge"]["backend"] = {"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
                                "api_key_env": "MY_SERVER_KEY"}
    recipe = write_recipe(tmp_path, data)
    assert main(["run", str(recipe), "-q", "--until", "problems"]) == 0
    err = capsys.readouterr().err
    assert f"{recipe}: student.trust_remote_code is on" in err
    assert f"{recipe}: judge.backend sends $MY_SERVER_KEY (when set) as its API key to http://127.0.0.1:9/v1" in err
    assert "teacher.backend.trust_remote_code" not in err  # off unless the recipe sets it
    assert err.index("trust_remote_code is on") < err.index("judge.backend sends")


# -- model output ------------------------------------------------------------------------------------------


def test_judge_output_is_parsed_never_run(tmp_path):
    from bard_data.text.verdict import parse_verdict

    marker = tmp_path / "INJECTED"
    for text in (f"{{'complete': __import__('os').system('touch {marker}'), 'score': 1}}",
                 f"```json\n{{\"complete\": true, \"score\": (lambda: __import__('os').system('touch {marker}'))()}}\n```",
                 "{'complete': True, 'score': 0.9, 'missing_steps': [" + "[" * 5000 + "]" * 5000 + "]}",
                 "{" * 200_000):
        t0 = time.perf_counter()
        verdict, error = parse_verdict(text)
        assert time.perf_counter() - t0 < 5
        assert verdict is None or verdict.score == 0.9
    assert not marker.exists()


# -- SQL --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from bard_data.report.publish import export

    root = tmp_path_factory.mktemp("sqlrun")
    run = make_run(root / "run")
    export(run, root / "export")
    return root / "export"


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('{secret}')",
    "SELECT * FROM read_text('{secret}')",
    "SELECT * FROM glob('{secret_dir}/*')",
    "COPY (SELECT 1 AS x) TO '{marker}'",
    "COPY sft TO '{marker}' (FORMAT parquet)",
    "ATTACH '{marker}' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
])
def test_sql_on_a_dataset_cannot_touch_other_files(exported, tmp_path, capsys, sql):
    secret = tmp_path / "secret.csv"
    secret.write_text("s\nSECRET-VALUE\n")
    marker = tmp_path / "INJECTED.csv"
    q = sql.format(secret=secret, secret_dir=tmp_path, marker=marker)
    assert main(["sql", str(exported), q]) == 2
    o = capsys.readouterr()
    lines = [ln for ln in o.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), o.err
    assert "SECRET-VALUE" not in o.out + o.err and not marker.exists()


def test_sql_still_reads_the_dataset_also_through_symlinks(exported, tmp_path, capsys):
    # A Hub cache snapshot is a folder of symlinks into blobs/ beside it.
    snap, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    blobs.mkdir(parents=True)
    for f in exported.rglob("*"):
        if f.is_file():
            blob = blobs / f"{abs(hash(str(f)))}"
            shutil.copy(f, blob)
            (snap / f.relative_to(exported)).parent.mkdir(parents=True, exist_ok=True)
            (snap / f.relative_to(exported)).symlink_to(blob)
    for root in (exported, snap):
        assert main(["sql", str(root), "SELECT count(*) AS n FROM sft JOIN rl USING (problem_id)"]) == 0
        assert main(["sql", str(root), "SELECT name, rows FROM tables ORDER BY name"]) == 0
    out = capsys.readouterr().out
    assert "funnel" in out and "(1 row)" in out


# -- bard-data recipe --------------------------------------------------------------------------------------------


def _rows(store: ArtifactStore, table: str) -> list[str]:
    df = store.read(table) if store.exists(table) else pl.DataFrame()
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in df.to_dicts())


TABLES = ["problems", "teacher_samples", "imported_samples", "gold_chains", "compressions", "judgments",
          "filtered_compressions", "sft", "rl", "funnel", "balance", "decontamination"]


def test_recipe_from_an_export_rebuilds_the_same_tables(tmp_path, tiny_model_dir, shared_data, capsys):
    """Build a tiny run, export it, `bard-data recipe` the export, point the paths that are not
    on this machine at the real files (what a user does), run it in a new run directory with the
    first run's completion cache, and get the same tables row for row without a single request."""
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data, n_problems=4)
    data["decontamination"] = {"references": [{"name": "math500", "column": "problem",
                                               "path": str(shared_data / "math500" / "test.jsonl")}]}
    first = tmp_path / "run"
    assert main(["run", str(write_recipe(tmp_path, data)), "-q"]) == 0
    assert main(["export", str(first), str(tmp_path / "published")]) == 0
    card = (tmp_path / "published" / "README.md").read_text()
    assert "bard-data recipe YOUR_NAMESPACE/tiny-test -o recipe.yaml" in card
    capsys.readouterr()

    user = tmp_path / "elsewhere"
    out = user / "recipe.yaml"
    assert main(["recipe", str(tmp_path / "published"), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    text = out.read_text()
    rebuilt = yaml.safe_load(text)
    published = json.loads((tmp_path / "published" / "bard_run.json").read_text())
    assert "student.tokenizer" in published["local_paths"]
    assert rebuilt["student"]["tokenizer"] == "./" + published["recipe"]["student"]["tokenizer"]  # not a Hub id
    assert rebuilt["run_dir"] == "runs/tiny-test" and "executor" not in rebuilt
    assert "rebuild" in said or "then: bard-data run" in said
    # Every local path the build read is listed (with its key), as published: shortened.
    listed = {ln.split(":", 1)[0].strip() for ln in said.splitlines() if ln.startswith("  ") and ": " in ln
              and not ln.strip().startswith("note:")}
    want = {"sources[0].path", "traces[0].path", "decontamination.references[0].path", "student.tokenizer",
            "teacher.backend.model", "compression.backend.model", "judge.backend.model"}
    assert listed == want, said
    for key in want:
        assert f"#   {key}: " in text
    with pytest.raises(RecipeError):  # not runnable until the user points them somewhere
        load_recipe(out)

    # The user points each listed path at their copy.
    fix = {"sources": str(shared_data / "gsm8k" / "train.jsonl"), "traces": str(shared_data / "gsm8k" / "train.jsonl"),
           "references": str(shared_data / "math500" / "test.jsonl")}
    rebuilt["sources"][0]["path"] = fix["sources"]
    rebuilt["traces"][0]["path"] = fix["traces"]
    rebuilt["decontamination"]["references"][0]["path"] = fix["references"]
    rebuilt["student"]["tokenizer"] = str(tiny_model_dir)
    for s in ("teacher", "compression", "judge"):
        rebuilt[s]["backend"]["model"] = str(tiny_model_dir)
    out.write_text(yaml.safe_dump(rebuilt, sort_keys=False))
    second = user / "runs" / "tiny-test"
    second.mkdir(parents=True)
    shutil.copytree(first / "cache", second / "cache")
    assert main(["run", str(out), "-q"]) == 0

    a, b = ArtifactStore(first), ArtifactStore(second)
    for table in TABLES:
        assert _rows(a, table) == _rows(b, table), table
    assert _rows(a, "sft") and _rows(a, "compressions")
    tokens = json.loads((second / "manifest.json").read_text())["tokens"]
    assert tokens and all(t["requests_sent"] == 0 for t in tokens.values()), tokens


def test_recipe_without_out_prints_yaml_and_refuses_to_overwrite(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["recipe", str(run)]) == 0
    o = capsys.readouterr()
    assert yaml.safe_load(o.out)["name"] == "synthetic-bard"
    assert "sources[0].path: /data/gsm8k.jsonl: not found here" in o.err
    (tmp_path / "r.yaml").write_text("mine")
    assert main(["recipe", str(run), "-o", str(tmp_path / "r.yaml")]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "r.yaml").read_text() == "mine"
    assert main(["recipe", str(tmp_path / "nowhere")]) == 2
    assert main(["recipe", "not-a-hub-id"]) == 2


HUB_TOKEN = "planted-secret-token-rebuild"


def test_recipe_from_a_hub_id(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from bard_data.report.publish import push

    srv = HubServer(tmp_path / "hub", expected_token=HUB_TOKEN).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
        # constants.ENDPOINT left as imported: hf_hub_url swaps it for the endpoint we pass.
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        push(make_run(tmp_path / "run"), "bard-tester/rebuild-me")
        out = tmp_path / "rebuilt" / "recipe.yaml"
        assert main(["recipe", "bard-tester/rebuild-me", "-o", str(out)]) == 0
        said = capsys.readouterr().out
        r = yaml.safe_load(out.read_text())
        assert r["name"] == "synthetic-bard" and r["sources"][0]["path"] == "data/gsm8k.jsonl"  # shortened on push
        assert "bard-tester/rebuild-me/bard_run.json" in said and "sources[0].path: data/gsm8k.jsonl: not found" in said
        assert "compression.backend sends $OPENAI_API_KEY" in said  # the trust notes, before running it
        assert main(["recipe", "bard-tester/no-such-dataset"]) == 2
        assert "cannot download bard_run.json" in capsys.readouterr().err
        for p in tmp_path.rglob("*"):
            if p.is_file() and "hub" not in p.parts:
                assert HUB_TOKEN.encode() not in p.read_bytes(), p
    finally:
        srv.stop()
