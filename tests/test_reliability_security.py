"""Security: no token in anything a run writes or prints; no remote code unless asked; model
output is never executed; answer verification cannot hang on a pathological expression."""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from bard_data.cli import main
from bard_data.config import load_recipe
from bard_data.errors import BackendError, RecipeError
from bard_data.text.answers import verify
from tests.recipes import tiny_recipe, write_recipe
from tests.servers import RuleServer

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-bard-SECRET-api-7f3a9c0e2b41d8"
HF_TOKEN = "hf_bardSECRETtoken5c2e8a1f90d3b7"


def _texts_of(path: Path) -> list[str]:
    """Everything a file holds, decompressed: raw bytes, Parquet cells, SQLite rows."""
    raw = path.read_bytes()
    out = [raw.decode("utf-8", errors="replace"), raw.decode("latin-1")]
    if path.suffix == ".parquet":
        out.append(json.dumps(pl.read_parquet(path).to_dicts(), default=str))
    if path.name.endswith(".sqlite") or raw.startswith(b"SQLite format 3\x00"):
        with sqlite3.connect(path) as con:
            out.extend(con.iterdump())
    return out


def _leaks(root: Path, secrets: list[str]) -> list[str]:
    found = set()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            for text in _texts_of(p):
                for s in secrets:
                    if s in text:
                        found.add(f"{p}: {s[:8]}...")
    return sorted(found)


def test_the_scanner_finds_a_token_in_compressed_files(tmp_path):
    pl.DataFrame({"detail": ["x" * 1000 + API_KEY]}).write_parquet(tmp_path / "a.parquet", compression="zstd")
    with sqlite3.connect(tmp_path / "c.sqlite") as con:
        con.execute("create table t (v text)")
        con.execute("insert into t values (?)", (HF_TOKEN,))
    assert API_KEY in _texts_of(tmp_path / "a.parquet")[2]  # found in the decoded cells
    assert sorted(_leaks(tmp_path, [API_KEY, HF_TOKEN])) == [f"{tmp_path / 'a.parquet'}: {API_KEY[:8]}...",
                                                             f"{tmp_path / 'c.sqlite'}: {HF_TOKEN[:8]}..."]


def test_tokens_never_reach_files_cards_manifests_logs_or_errors(tmp_path, tiny_model_dir, shared_data, monkeypatch,
                                                                  caplog, capsys):
    """A run with the openai backend and the key in OPENAI_API_KEY (and a Hub token in the
    environment), verbose logging, a server that echoes the key back in its 401 errors for some
    requests (they become llm_error rows whose detail is the error), then status, stats and
    export: no file, card, manifest, log line or error message holds either secret."""
    def fail(body, headers):
        prompt = "\n".join(m["content"] for m in body["messages"])
        if "Natalia" in prompt and "Rewrite" not in prompt and "logically" not in prompt:
            return 401, f"Incorrect API key provided: {headers.get('Authorization') or headers.get('authorization')}"
        return None

    env = dict(os.environ, OPENAI_API_KEY=API_KEY, HF_TOKEN=HF_TOKEN, HUGGING_FACE_HUB_TOKEN=HF_TOKEN,
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    for k, v in (("OPENAI_API_KEY", API_KEY), ("HF_TOKEN", HF_TOKEN), ("HUGGING_FACE_HUB_TOKEN", HF_TOKEN)):
        monkeypatch.setenv(k, v)
    with RuleServer(fail=fail) as srv:
        backend = {"kind": "openai", "model": "rules", "base_url": srv.base_url, "max_retries": 1, "backoff_s": 0.01}
        data = tiny_recipe(tmp_path, tiny_model_dir, shared_data, n_problems=4)
        data["teacher"]["backend"] = backend
        data["compression"].update(backend=backend)
        data["budget"] = {"tolerance": 1000.0}
        data["judge"]["backend"] = backend
        recipe = write_recipe(tmp_path, data)
        run_dir = tmp_path / "run"
        # The run as a user starts it (its own process, verbose logging)...
        run = subprocess.run([sys.executable, "-m", "bard_data.cli", "-v", "run", str(recipe)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        outs = [(run.stdout, run.stderr)]
    # ...then the commands that read it, in this process (every log record captured too).
    for args in (["status", str(run_dir)], ["stats", str(run_dir), "--json", str(tmp_path / "stats.json")],
                 ["export", str(run_dir), str(tmp_path / "export"), "--allow-incomplete"]):
        with caplog.at_level(logging.DEBUG):
            assert main(["-v", *args]) == 0
        o = capsys.readouterr()
        outs.append((o.out, o.err + caplog.text))
        caplog.clear()
    # The key was really used, and the server really echoed it into errors...
    assert f"Bearer {API_KEY}" in srv.auth
    store_ex = pl.read_parquet(run_dir / "excluded" / "teacher_samples" / "part-00000.parquet")
    details = store_ex.filter(pl.col("reason") == "llm_error")["detail"].to_list()
    assert details and all(d.startswith("AuthenticationError:") and "***" in d for d in details)
    # ...yet it is nowhere: not in the run, the stats, the exported dataset and card, nor any output.
    assert (tmp_path / "export" / "README.md").exists()
    assert "llm_error" in "".join(out for out, _ in outs)
    assert _leaks(tmp_path, [API_KEY, HF_TOKEN]) == []
    for out, err in outs:
        assert API_KEY not in out + err and HF_TOKEN not in out + err
    # The recipe records where the key comes from, never the key.
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["recipe"]["teacher"]["backend"]["api_key_env"] == "OPENAI_API_KEY"


# -- remote code -------------------------------------------------------------------------------------------


def test_trust_remote_code_is_off_unless_the_recipe_sets_it(tmp_path, tiny_model_dir, shared_data):
    from bard_data.config.llm import TransformersBackendConfig, VLLMBackendConfig
    from bard_data.config.stages import StudentConfig

    assert StudentConfig(tokenizer="x").trust_remote_code is False
    assert TransformersBackendConfig(kind="transformers", model="x").trust_remote_code is False
    assert VLLMBackendConfig(kind="vllm", model="x").trust_remote_code is False
    r = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_model_dir, shared_data)))
    assert r.student.trust_remote_code is False
    assert all(getattr(r, s).backend.trust_remote_code is False for s in ("teacher", "compression", "judge"))


@pytest.mark.parametrize("trust", [False, True])
def test_backends_and_tokenizer_pass_trust_remote_code_through(monkeypatch, tmp_path, tiny_model_dir, shared_data,
                                                               trust):
    import transformers

    from bard_data.config.llm import TransformersBackendConfig, VLLMBackendConfig
    from bard_data.llm.transformers_backend import TransformersLLM
    from bard_data.llm.vllm_settings import engine_kwargs_for
    from bard_data.pipeline.context import RunContext

    seen = []

    class Stop(Exception):
        pass

    def record(name):
        def from_pretrained(path, *a, **kw):
            seen.append((name, kw.get("trust_remote_code", "absent")))
            raise Stop()
        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("model"))
    cfg = TransformersBackendConfig(kind="transformers", model=str(tiny_model_dir), trust_remote_code=trust)
    with pytest.raises(BackendError, match="Stop"):
        TransformersLLM(cfg.model, cfg.model, trust_remote_code=cfg.trust_remote_code)
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data)
    data["student"]["trust_remote_code"] = trust
    ctx = RunContext(load_recipe(write_recipe(tmp_path, data)), tmp_path / "run")
    with pytest.raises(RecipeError, match="cannot load tokenizer"):
        ctx.tokenizer
    assert seen == [("tokenizer", trust), ("tokenizer", trust)]
    vcfg = VLLMBackendConfig(kind="vllm", model="x", trust_remote_code=trust)
    assert engine_kwargs_for("x", vcfg, on_cpu=True)["trust_remote_code"] is trust


# -- model output is data, never code -----------------------------------------------------------------------


def test_no_eval_or_exec_in_the_package():
    call = re.compile(r"(?<![\w.])(eval|exec|compile|__import__)\s*\(")
    hits = []
    for root in ("bard_data", "trainers"):
        for p in sorted((REPO / root).rglob("*.py")):
            for n, line in enumerate(p.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if call.search(code):
                    hits.append(f"{p.relative_to(REPO)}:{n}: {line.strip()}")
    assert hits == []


PATHOLOGICAL = ["9^{9^{9^{9}}}", "\\boxed{9^{9^{9^{9}}}}", "10^{10^{10^{10^{10}}}}", "(10^{100})!",
                "2^{2^{2^{2^{2^{2^{2}}}}}}", "9**9**9**9", "\\frac{1}{0}^{9^{9^{9}}}"]


def _verify_all(golds: list[str]) -> float:
    t0 = time.perf_counter()
    for pred, gold in zip(PATHOLOGICAL, golds):
        assert verify(pred, gold) is False
    return time.perf_counter() - t0


def test_pathological_answers_verify_quickly_on_and_off_the_main_thread():
    # Distinct golds per call, so no cache inside the verifier can make the second pass fast.
    took_main = _verify_all([str(100 + i) for i in range(len(PATHOLOGICAL))])
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("s", _verify_all([str(200 + i) for i in range(len(PATHOLOGICAL))])),
                         daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "verification hung off the main thread"
    assert took_main < 20 and result["s"] < 20, (took_main, result)
