"""What the stages of one run share while it is live: the store, the completion cache, the LLM
backends and the student tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from bard_data.config import Recipe
from bard_data.errors import RecipeError
from bard_data.llm import CachedLLM, make_backend
from bard_data.llm.cache import CompletionCache, LedgerView
from bard_data.pipeline.store import ArtifactStore


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    quiet: bool = False
    store: ArtifactStore = field(init=False)
    # The invocation's id: LLM counters are recorded in the cache's ledger under it.
    invocation: str = ""
    # Ledger slots of this context's LLMs; Ray workers get their own prefix (see executors).
    slot_prefix: str = ""
    shard_hooks: list[Callable[[str, int], None]] = field(default_factory=list, init=False)
    # The live figures of the LLM stage running now (``pipeline.progress.StageProgress``), set by the runner.
    progress: Any = field(default=None, init=False)
    _cache: Optional[CompletionCache] = field(default=None, init=False)
    _llms: dict[str, CachedLLM] = field(default_factory=dict, init=False)
    _tokenizer: Any = field(default=None, init=False)
    _remote: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.store = ArtifactStore(self.run_dir)

    @property
    def cache_path(self) -> Path:
        """``cache_dir``/completions.sqlite when the recipe shares a cache, else the run's own."""
        folder = self.recipe.resolve(self.recipe.cache_dir, force=True) if self.recipe.cache_dir else self.run_dir / "cache"
        return Path(folder) / "completions.sqlite"

    @property
    def cache(self) -> CompletionCache:
        if self._cache is None:
            self._cache = CompletionCache(self.cache_path)
        return self._cache

    def llm(self, stage_cfg) -> CachedLLM:
        """The cached backend a stage config names; stages naming the same backend share it."""
        key = stage_cfg.backend.model_dump_json()
        if key not in self._llms:
            if stage_cfg.backend.kind == "vllm":
                # One vLLM engine at a time holds the accelerator: stages run one after another,
                # so an engine another stage configured differently is released first.
                for k in [k for k, cached in self._llms.items() if cached.backend.kind == "vllm"]:
                    self._llms.pop(k).close()
            backend = make_backend(stage_cfg.backend, resolve=lambda p: self.recipe.resolve(p))
            llm = CachedLLM(backend, self.cache, on_progress=self._llm_progress)
            if self.invocation:
                llm.cache = LedgerView(self.cache, self.invocation, f"{self.slot_prefix}{len(self._llms)}", llm)
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
                raise RecipeError(f"{self.recipe.source_file}: student.tokenizer: cannot load tokenizer '{name}': "
                                  f"{type(exc).__name__}: {first}") from None
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
        """A Ray worker's counter delta for one shard: into the totals and the live figures."""
        for model, s in stats.items():
            d = self._remote.setdefault(model, {"backend": s.get("backend", "?")})
            for k, v in s.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    d[k] = d.get(k, 0) + v
            self._llm_progress(requests=int(s.get("requests_sent", 0)), cache_hits=int(s.get("cache_hits", 0)),
                               completion_tokens=int(s.get("completion_tokens", 0)))

    def _llm_progress(self, **counts: int) -> None:
        if self.progress is not None:
            self.progress.add(**counts)

    def close(self) -> None:
        for llm in self._llms.values():
            llm.close()
        self._llms.clear()
        if self._cache is not None:
            self._cache.close()
            self._cache = None
