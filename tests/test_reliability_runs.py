"""Whole runs under failure: SIGKILL anywhere, Ctrl-C, and a faulty LLM server.

- Kill-anywhere: the demo-shaped recipe on the tiny model runs as ``bard-data run`` in its own
  process and is killed with SIGKILL at 10 points spread over the run (when the run has
  written a target number of shard files + cached completions, then a seeded jitter, so kills
  land mid-generate, mid-write and between stages), resumed each time. The final tables equal an
  uninterrupted run's, every part file reads, none is duplicated, no temporary file is left,
  and no request was sent twice: the requests recorded over all invocations equal the cache rows.
  The first killed invocation and the final one are ``python -m bard_data.cli run``; the other
  nine are the same CLI ``main`` in processes forked from one that imported torch and
  transformers once (``ZYGOTE``), which spares ~8 s of imports per invocation.
- Ctrl-C: SIGINT while the teacher's ``generate`` runs (checked with faulthandler's stack dump
  just before) exits 130 with the resume command, and that command finishes the run with the
  same accounting; Ctrl-C while a batch of openai requests is out stops in about one request's
  time, not the batch's. A second run in a directory that is in use is refused.
- Faulty server: the ``openai`` backend against vLLM's real OpenAI server behind a proxy that drops
  connections, answers 500 and 429, stalls past the client timeout and truncates JSON. The run
  completes; requests still failing after the retries are ``llm_error`` rows with the error in
  ``detail``; the rerun sends exactly those again; a finished run then does nothing.

The vLLM server (shared per session, tests/servers.py) starts when this module starts, so it
warms up while the kill tests run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from bard_data.api import run_recipe
from bard_data.config import load_recipe
from bard_data.pipeline.funnel import check_funnel
from bard_data.pipeline.store import ArtifactStore
from tests.faulty_proxy import KINDS, FaultyProxy
from tests.recipes import tiny_recipe, write_recipe
from tests.servers import SERVED_NAME, RuleServer, shared_vllm_server, vllm_model_dir
from tests.test_pipeline import TABLES, _as_set

REPO = Path(__file__).resolve().parents[1]
N_KILLS = 10


# -- helpers ----------------------------------------------------------------------------------------


def cache_rows(run_dir: Path) -> int:
    p = run_dir / "cache" / "completions.sqlite"
    if not p.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=0.2) as c:
            return c.execute("select count(*) from completions").fetchone()[0]
    except sqlite3.Error:
        return 0


def part_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("*/part-*.parquet")) + sorted(run_dir.glob("excluded/*/part-*.parquet"))


def progress(run_dir: Path) -> int:
    """Shard files written plus completions cached: grows with every step of a run."""
    return sum(1 for _ in run_dir.glob("*/part-*.parquet")) + cache_rows(run_dir)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def llm_totals(run_dir: Path, invocations: slice = slice(None)) -> dict[str, int]:
    out = {"requests_sent": 0, "errors": 0, "cache_hits": 0}
    for inv in manifest(run_dir)["invocations"][invocations]:
        for s in inv.get("llm", {}).values():
            for k in out:
                out[k] += int(s.get(k, 0))
    return out


def frames(run_dir: Path) -> dict[str, pl.DataFrame]:
    store = ArtifactStore(run_dir)
    return {t: store.read(t) for t in TABLES if store.exists(t)}


def assert_same_tables(ref: Path, got: Path) -> int:
    """Equal as sets of rows and in row counts (so nothing is duplicated); returns rows compared."""
    a, b = frames(ref), frames(got)
    assert set(a) == set(b) == set(TABLES)
    n = 0
    for t in TABLES:
        assert a[t].height == b[t].height, t
        assert _as_set(a[t]) == _as_set(b[t]), t
        n += a[t].height
    fa, fb = ArtifactStore(ref).read("funnel"), ArtifactStore(got).read("funnel")
    assert _as_set(fa) == _as_set(fb)
    assert check_funnel(fb) == []
    return n


def assert_parts_whole(run_dir: Path) -> None:
    for p in part_files(run_dir):
        pq.read_metadata(p)  # raises on a partial file


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bard_data.cli", *args]


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO))
    return env


# -- the shared vLLM server starts now, for the faulty-server tests at the end -------------------------


@pytest.fixture(scope="module", autouse=True)
def vllm_server(request, tiny_model_dir, tmp_path_factory, shared_data):
    wanted = any("faulty" in item.name for item in request.session.items if item.module is request.module)
    if not wanted:
        return None
    model = vllm_model_dir(tiny_model_dir, lambda: tmp_path_factory.mktemp("tiny-vllm"), shared_data)
    return shared_vllm_server(model, tmp_path_factory.mktemp("vllm-server"), request.config)


# -- kill anywhere ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, shared_data):
    """An uninterrupted run of the recipe the kill test runs (same file contents, other run dir)."""
    tmp = tmp_path_factory.mktemp("ref")
    recipe = load_recipe(write_recipe(tmp, tiny_recipe(tmp, tiny_model_dir, shared_data)))
    ctx = run_recipe(recipe, quiet=True)
    return ctx.run_dir


# A process that has paid the ~8 s of torch/transformers imports once and forks a child per
# invocation; the child runs the CLI's ``main`` exactly as ``python -m bard_data.cli`` does (its
# own process, its own SIGKILL), only without the import time. Bounded: it serves until stdin closes.
ZYGOTE = r"""
import faulthandler, json, os, signal, sys, traceback
import bard_data.cli, bard_data.api, bard_data.llm.transformers_backend, bard_data.stages.teacher
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 (the import cost, paid here)
# SIGUSR1 prints the main thread's stack to stderr (the child's stderr file after the fork).
faulthandler.register(signal.SIGUSR1, all_threads=False)
print("ready", flush=True)
for line in sys.stdin:
    args, err = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        try:
            code = bard_data.cli.main(args)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    def __init__(self):
        import queue
        import threading

        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=child_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x.strip()) for x in self.proc.stdout], daemon=True).start()
        assert self.lines.get(timeout=120) == "ready"

    def start(self, args: list[str], err: Path) -> "Forked":
        self.proc.stdin.write(json.dumps([args, str(err)]) + "\n")
        self.proc.stdin.flush()
        self.last = Forked(int(self.lines.get(timeout=30)), self.lines)
        return self.last

    def close(self) -> None:
        last = getattr(self, "last", None)
        if last is not None and last.poll() is None:  # a test failed with a child still running
            last.send_signal(signal.SIGKILL)
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Forked:
    """The Popen-like handle of one forked CLI invocation."""

    def __init__(self, pid: int, lines):
        self.pid, self._lines, self.returncode = pid, lines, None

    def poll(self):
        if self.returncode is None and not self._lines.empty():
            self.returncode = int(self._lines.get())
        return self.returncode

    def send_signal(self, sig) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        if self.returncode is None:
            self.returncode = int(self._lines.get(timeout=timeout))
        return self.returncode


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def test_sigkill_at_ten_points_resumes_to_the_same_tables(reference, zygote, tmp_path, tiny_model_dir, shared_data):
    recipe_path = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_model_dir, shared_data))
    run_dir = tmp_path / "run"
    total = progress(reference)
    ref_requests = llm_totals(reference)["requests_sent"]
    assert ref_requests == cache_rows(reference) > 0
    rng = random.Random(20240611)
    # Kill 0 hits `python -m bard_data.cli run` as a user starts it, just after its manifest is
    # written (before any table). Kills 1-9 hit forked CLI invocations (see ZYGOTE) when the run
    # reaches targets spread over it, at least one step after the invocation started, so every
    # kill interrupts work. A seeded jitter after the target moves the kill off the file
    # boundary: into the next generate, a write, the next stage's start. The last target stays
    # well before the end, so that no kill lands after the work is done.
    targets = [None] + [max(1, round(0.8 * total * k / (N_KILLS - 1))) for k in range(1, N_KILLS)]
    kills, log = 0, []
    for k, target in enumerate(targets):
        start = progress(run_dir)
        goal = max(target, start + 1) if target is not None else None
        err_path = tmp_path / f"stderr-{k}.txt"
        if target is None:
            with open(err_path, "wb") as err_f:
                proc = subprocess.Popen(cli("run", str(recipe_path), "-q"), env=child_env(),
                                        stdout=subprocess.DEVNULL, stderr=err_f)
        else:
            proc = zygote.start(["run", str(recipe_path), "-q"], err_path)

        def reached() -> bool:
            if goal is None:
                return (run_dir / "manifest.json").exists()
            return progress(run_dir) >= goal

        deadline = time.monotonic() + 120
        while proc.poll() is None and not reached() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        code = proc.wait(timeout=30)
        assert code in (-signal.SIGKILL, 0), err_path.read_text(errors="replace")
        log.append((goal, progress(run_dir), code))
        # After every kill: each part file is whole (written to a temp name, then renamed).
        assert_parts_whole(run_dir)
    assert kills == N_KILLS, log

    out = subprocess.run(cli("run", str(recipe_path), "-q"), env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "complete" in out.stdout

    rows = assert_same_tables(reference, run_dir)
    assert_parts_whole(run_dir)
    assert not list(run_dir.rglob(".*.tmp")), "temporary files left behind"
    # No request was repeated: every request recorded (also by the killed invocations, whose
    # counters the ledger in the cache kept) produced one cached completion, and as many as
    # the uninterrupted run needed.
    m = manifest(run_dir)
    totals = llm_totals(run_dir)
    assert totals["errors"] == 0
    assert totals["requests_sent"] == cache_rows(run_dir) == ref_requests, (totals, log)
    statuses = [inv["status"] for inv in m["invocations"]]
    assert statuses[-1] == "finished" and set(statuses[:-1]) <= {"killed"}, statuses
    assert m["complete"] is True
    print(f"\n{kills} SIGKILLs at progress {[p for _, p, _ in log]} of {total}; {rows} rows compared; "
          f"{totals['requests_sent']} requests over {len(statuses)} recorded invocations = {ref_requests} "
          "of the uninterrupted run (0 repeated)")


def test_a_second_run_in_the_same_directory_is_refused(tmp_path, tiny_model_dir, shared_data):
    """Two invocations writing one run directory would race on its shards: the second stops with
    one line naming the holder (the lock is ``flock``: a killed holder releases it)."""
    from bard_data.errors import BardError
    from bard_data.pipeline.lock import RunLock

    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_model_dir, shared_data)))
    (tmp_path / "run").mkdir()
    lock = RunLock(tmp_path / "run").acquire()
    try:
        with pytest.raises(BardError) as e:
            run_recipe(recipe, quiet=True)
        assert f"in use by pid {os.getpid()}" in str(e.value) and "\n" not in str(e.value)
        assert list((tmp_path / "run").iterdir()) == [tmp_path / "run" / ".lock"]
    finally:
        lock.release()


def test_sigint_inside_generate_exits_130_and_resumes(zygote, tmp_path, tiny_model_dir, shared_data):
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data, n_problems=4, shard_size=2, compression=None,
                       judge=None)
    # Long generations, so that the teacher's generate is where the run spends its time.
    data["teacher"]["sampling"]["max_tokens"] = 600
    data["teacher"]["samples_per_problem"] = 1
    recipe_path = write_recipe(tmp_path, data)
    run_dir = tmp_path / "run"
    err_path = tmp_path / "stderr.txt"
    proc = zygote.start(["run", str(recipe_path), "-q"], err_path)

    def last_stack() -> str:
        return err_path.read_text(errors="replace").rsplit("Stack (most recent call first):", 1)[-1]

    # Ask where the main thread is (SIGUSR1: faulthandler, see ZYGOTE) until it is inside the
    # model's generate (transformers' generation loop), then interrupt it there.
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.02)
        stack = last_stack()
        # generate's own frame: loading the model passes through generation/utils.py too.
        if "transformers/generation/utils.py" in stack and "in generate" in stack:
            break
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    err = err_path.read_text(errors="replace")
    assert code == 130, err
    assert "in generate" in last_stack()
    assert "Traceback (most recent call last)" not in err  # no Python traceback, just the message
    msg = [line for line in err.splitlines() if line.startswith("interrupted:")]
    hint = f"resume with: bard-data run {recipe_path} --run-dir {run_dir}"
    assert len(msg) == 1 and msg[0].endswith(hint), err
    assert_parts_whole(run_dir)
    assert manifest(run_dir)["invocations"][-1]["status"] == "interrupted"
    assert not (run_dir / "teacher_samples" / "_SUCCESS").exists()

    # The command it printed resumes the run.
    command = hint.split("resume with: bard-data ", 1)[1].split() + ["-q"]
    resumed = zygote.start(command, tmp_path / "stderr-resume.txt")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "stderr-resume.txt").read_text()
    assert manifest(run_dir)["complete"] is True
    assert llm_totals(run_dir)["requests_sent"] == cache_rows(run_dir)
    assert ArtifactStore(run_dir).read("teacher_samples").height == 4


def test_sigint_during_openai_requests_exits_promptly(zygote, tmp_path, tiny_model_dir, shared_data):
    """Ctrl-C while a batch of requests is out: the queued requests are dropped and no retry
    starts, so the run stops in about one request's time, not the whole batch's."""
    with RuleServer(delay_s=2.0) as srv:
        data = tiny_recipe(tmp_path, tiny_model_dir, shared_data, n_problems=4, shard_size=8, compression=None,
                           judge=None)
        data["teacher"]["backend"] = {"kind": "openai", "model": "rules", "base_url": srv.base_url,
                                      "api_key_env": "BARD_TEST_NO_KEY", "concurrency": 2}
        recipe_path = write_recipe(tmp_path, data)
        err_path = tmp_path / "stderr.txt"
        proc = zygote.start(["run", str(recipe_path), "-q"], err_path)
        deadline = time.monotonic() + 60
        while not srv.requests:
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.01)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        took = time.monotonic() - t0
    err = err_path.read_text()
    assert code == 130 and "resume with: bard-data run" in err, err
    # 8 requests, 2 at a time, 2 s each: 8 s if the batch ran to the end.
    assert took < 4.5, took
    assert len(srv.requests) <= 4, len(srv.requests)


# -- a faulty OpenAI-compatible server ------------------------------------------------------------------


def faulty_recipe(tmp: Path, model: Path, data: Path, base_url: str) -> dict:
    backend = {"kind": "openai", "model": SERVED_NAME, "base_url": base_url, "api_key_env": "BARD_TEST_NO_KEY",
               "concurrency": 4, "timeout_s": 1.5, "max_retries": 2, "backoff_s": 0.05}
    r = tiny_recipe(tmp, model, data, n_problems=6)
    r["teacher"]["backend"] = backend
    r["teacher"]["sampling"]["max_tokens"] = 12
    # No sampled chain can be gold (a retried teacher row must not create new work downstream).
    r["teacher"]["min_reasoning_tokens"] = 20
    r["compression"].update(backend=backend, max_retries=0)
    r["budget"] = {"tolerance": 1000.0}
    r["judge"]["backend"] = backend
    return r


def llm_error_rows(run_dir: Path) -> pl.DataFrame:
    store = ArtifactStore(run_dir)
    frames_ = []
    for t in ("teacher_samples", "compressions", "judgments"):
        ex = store.read_excluded(t)
        if ex is not None:
            frames_.append(ex.filter(pl.col("reason") == "llm_error").select(
                pl.lit(t).alias("table"), "reason", "detail"))
    return pl.concat(frames_) if frames_ else pl.DataFrame(schema={"table": pl.Utf8, "reason": pl.Utf8, "detail": pl.Utf8})


def test_faulty_server_run_records_errors_and_rerun_retries_only_them(vllm_server, tmp_path, tiny_model_dir,
                                                                      shared_data):
    srv = vllm_server.wait_ready()
    with FaultyProxy(srv.base_url, seed=3, transient_rate=0.3, persistent_rate=0.1, stall_s=2.0) as proxy:
        recipe = load_recipe(write_recipe(tmp_path, faulty_recipe(tmp_path, tiny_model_dir, shared_data,
                                                                  proxy.base_url)))
        t0 = time.perf_counter()
        ctx = run_recipe(recipe, quiet=True)
        first_s = time.perf_counter() - t0
        run_dir = ctx.run_dir
        store = ArtifactStore(run_dir)
        m = manifest(run_dir)

        # The run completed: every table is there and the funnel adds up.
        assert all(store.exists(t) for t in TABLES)
        assert check_funnel(store.read("funnel")) == []
        # Every kind of fault happened, and some requests failed for good.
        assert all(proxy.counts[k] > 0 for k in KINDS), proxy.counts
        errors = llm_error_rows(run_dir)
        assert errors.height > 0, proxy.counts
        # ...and each is a row with its error, never lost: funnel, excluded rows and counters agree.
        assert errors["detail"].str.contains(r"^(InternalServerError|RateLimitError|APIConnectionError|"
                                             r"APITimeoutError|JSONDecodeError|APIResponseValidationError|"
                                             r"_Malformed)").all(), errors["detail"].to_list()
        funnel = store.read("funnel")
        assert funnel.filter(pl.col("reason") == "llm_error")["dropped"].sum() == errors.height
        assert m["llm_errors"] == {t: n for t, n in errors.group_by("table").len().iter_rows() if n}
        assert llm_totals(run_dir)["errors"] == errors.height
        # Not final while errors remain: those stages (and the ones after) run again next time.
        assert m["complete"] is False
        first_table = next(t for t in TABLES if t in m["llm_errors"])
        assert not store.is_done(first_table) and store.done_info(first_table).get("provisional")
        assert all(store.is_done(t) for t in TABLES[: TABLES.index(first_table)])
        assert llm_totals(run_dir)["requests_sent"] == cache_rows(run_dir) + errors.height

        # The server heals; the rerun sends exactly the failed requests again -- plus, for each
        # compression that now exists, its judge request (it could not be judged before) -- and
        # nothing else: every good row comes from the cache.
        proxy.enabled = False
        before, rows_before = proxy.counts["forwarded"], cache_rows(run_dir)
        run_recipe(recipe, quiet=True)
        recovered_compressions = errors.filter(pl.col("table") == "compressions").height
        expected = errors.height + recovered_compressions
        last = llm_totals(run_dir, slice(-1, None))
        assert last["requests_sent"] == expected, (last, errors.group_by("table").len())
        assert last["errors"] == 0
        assert proxy.counts["forwarded"] - before == expected
        assert cache_rows(run_dir) - rows_before == expected
        assert llm_error_rows(run_dir).height == 0
        m = manifest(run_dir)
        assert m["complete"] is True and not m.get("llm_errors")
        assert all(store.is_done(t) for t in TABLES)
        assert check_funnel(store.read("funnel")) == []
        assert llm_totals(run_dir)["requests_sent"] == cache_rows(run_dir) + errors.height

        # A finished run with no errors does nothing.
        parts = {p: p.stat().st_mtime_ns for p in part_files(run_dir) if "funnel" not in p.parts}
        run_recipe(recipe, quiet=True)
        assert llm_totals(run_dir, slice(-1, None))["requests_sent"] == 0
        assert {p: p.stat().st_mtime_ns for p in part_files(run_dir) if "funnel" not in p.parts} == parts
    by_table = dict(errors.group_by("table").len().iter_rows())
    print(f"\nfaulty run: {first_s:.1f}s, proxy {dict(proxy.counts)}; llm_error rows {by_table}; "
          f"the rerun sent {expected} requests ({errors.height} failed + {recovered_compressions} judge requests "
          "for recovered compressions)")
