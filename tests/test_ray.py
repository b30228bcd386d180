"""The same recipe on a Ray cluster: same tables as a local run, and a killed driver resumes.

A real local Ray cluster (``ray start --head``, 2 CPUs) is started for the module; runs connect
to it by address, as a user connects to an existing cluster.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bard_data.api import run_recipe
from bard_data.config import load_recipe
from tests.recipes import tiny_recipe, write_recipe
from tests.test_pipeline import TABLES, _as_set, _cache_rows, _frames


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address", "127.0.0.1",
             "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
             "--temp-dir", str(tmp)]
    out = subprocess.run(start, capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    address = f"127.0.0.1:{port}"
    yield address
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True, env=env, timeout=120)


def _recipe(tmp, tiny_model_dir, shared_data, **extra):
    r = tiny_recipe(tmp, tiny_model_dir, shared_data, n_problems=6)
    r.update(extra)
    return r


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model_dir, shared_data):
    tmp = tmp_path_factory.mktemp("local")
    recipe = load_recipe(write_recipe(tmp, _recipe(tmp, tiny_model_dir, shared_data)))
    run_recipe(recipe, quiet=True)
    return tmp / "run"


def _ray_executor(address):
    return {"kind": "ray", "address": address, "num_workers": 2, "num_cpus_per_worker": 1}


def test_ray_run_equals_local_run(ray_cluster, local_run, tmp_path, tiny_model_dir, shared_data, monkeypatch):
    from bard_data.pipeline import build
    from bard_data.pipeline.progress import StageProgress

    bars: list[StageProgress] = []

    class Recorder(StageProgress):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            bars.append(self)

    monkeypatch.setattr(build, "StageProgress", Recorder)
    recipe = load_recipe(write_recipe(tmp_path, _recipe(tmp_path, tiny_model_dir, shared_data,
                                                        executor=_ray_executor(ray_cluster))))
    run_recipe(recipe, quiet=True)
    a, b = _frames(local_run), _frames(tmp_path / "run")
    assert set(a) == set(b) == set(TABLES)
    for t in TABLES:
        assert _as_set(a[t]) == _as_set(b[t]), t
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    inv = m["invocations"][-1]["llm"]
    # token counts and requests of the workers are aggregated on the driver
    assert sum(s["requests_sent"] for s in inv.values()) == _cache_rows(tmp_path / "run")
    assert sum(s["completion_tokens"] for s in inv.values()) > 0
    # per stage, from the workers' deltas: generation seconds measured there, live figures on the driver
    for stage in ("teacher_samples", "compressions", "judgments"):
        (s,) = m["llm_stages"][stage].values()
        assert s["generate_seconds"] > 0 and s["requests_sent"] > 0
        (bar,) = [b for b in bars if b.name == stage]
        assert (bar.sent, bar.hits, bar.tokens) == (s["requests_sent"], s["cache_hits"], s["completion_tokens"])
    # the recipe hash does not depend on where it runs: a local rerun of the Ray run does nothing
    local_again = load_recipe(write_recipe(tmp_path, _recipe(tmp_path, tiny_model_dir, shared_data), "again.yaml"))
    assert local_again.hash() == recipe.hash()


def test_killed_ray_driver_resumes_without_repeating_calls(ray_cluster, local_run, tmp_path, tiny_model_dir, shared_data):
    p = write_recipe(tmp_path, _recipe(tmp_path, tiny_model_dir, shared_data, executor=_ray_executor(ray_cluster)))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "bard_data.cli", "run", str(p), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    # kill the driver once the compression stage has written a shard (mid-run, LLM stages done in part)
    while time.time() < deadline and proc.poll() is None:
        if list((run_dir / "compressions").glob("part-*.parquet")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    cached_before = _cache_rows(run_dir)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads((run_dir / "manifest.json").read_text())
    sent = sum(s["requests_sent"] for s in m["invocations"][-1]["llm"].values())
    assert sent == _cache_rows(run_dir) - cached_before  # no cached completion asked for again
    a, b = _frames(local_run), _frames(run_dir)
    for t in TABLES:
        assert _as_set(a[t]) == _as_set(b[t]), t
