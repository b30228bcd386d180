"""What the plan runs the stages' own code with: a context whose tables are the finished ones of the
run directory plus the ones the plan computed in memory, and whose LLM answers from the completion
cache only (read-only) and records every request a stage makes. Nothing starts an engine, calls a
server or writes a file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import polars as pl

from bard_data.config import Recipe
from bard_data.errors import BardError
from bard_data.llm.base import ChatRequest, Completion, SamplingConfig, request_key
from bard_data.llm.cache import lookup
from bard_data.pipeline.context import RunContext
from bard_data.pipeline.store import ArtifactStore

log = logging.getLogger(__name__)

NOT_CACHED = "not cached (the plan sends nothing)"


class OverlayStore:
    """Tables for the stages' ``inputs``: those the plan computed (``put``) first, then the run
    directory's finished ones (``done``); a table in neither does not exist."""

    def __init__(self, run_dir: Optional[Path], done: set[str]):
        self._disk = ArtifactStore(run_dir) if run_dir is not None else None
        self._done = set(done)
        self._mem: dict[str, pl.DataFrame] = {}

    def put(self, table: str, df: pl.DataFrame) -> None:
        self._mem[table] = df

    def on_disk(self, table: str) -> bool:
        return self._disk is not None and table in self._done and self._disk.exists(table)

    def exists(self, table: str) -> bool:
        return table in self._mem or self.on_disk(table)

    def read(self, table: str, columns: Optional[list[str]] = None) -> pl.DataFrame:
        if table in self._mem:
            df = self._mem[table]
            return df.select(columns) if columns else df
        if self.on_disk(table):
            return self._disk.read(table, columns)
        raise FileNotFoundError(f"plan: table '{table}' is neither finished nor computable without an LLM")


@dataclass
class Seen:
    """One request a stage made through the replay LLM."""

    request: ChatRequest
    key: str
    hit: Optional[Completion]
    max_tokens: int
    pos: int  # its position in the batch (the stage's row order)
    dup: bool = False  # a repeat of an uncached request of the same batch: CachedLLM sends it once, counts a hit


class ReplayLLM:
    """Stands in for ``CachedLLM``: cached completions come back as they are, every other request
    comes back as an error completion (``NOT_CACHED``); ``seen`` lists them all while ``recording``.
    ``texts=False``: which requests are cached, and their token counts, but every completion comes
    back as ``NOT_CACHED`` (a finished stage whose outputs the plan reads from its table)."""

    def __init__(self, model: str, cache_path: Optional[Path]):
        self.model, self.cache_path = model, cache_path
        self.seen: list[Seen] = []
        self.recording = True
        self.texts = True

    def generate(self, requests: list[ChatRequest], sampling: SamplingConfig, seed: int = 0) -> list[Completion]:
        keys = [request_key(self.model, r, sampling, seed) for r in requests]
        found = lookup(self.cache_path, keys, self.texts) if self.cache_path is not None else {}
        out = []
        fresh: set[str] = set()
        for pos, (r, k) in enumerate(zip(requests, keys)):
            hit = found.get(k)
            if self.recording:
                self.seen.append(Seen(r, k, hit, sampling.max_tokens, pos, dup=hit is None and k in fresh))
                if hit is None:
                    fresh.add(k)
            out.append(Completion(text=hit.text, prompt_tokens=hit.prompt_tokens,
                                  completion_tokens=hit.completion_tokens, finish_reason=hit.finish_reason,
                                  cached=True) if hit is not None and self.texts
                       else Completion(text="", finish_reason="error", error=NOT_CACHED))
        return out


class PlanContext(RunContext):
    """A ``RunContext`` for the plan: the overlay store, the student tokenizer, and per stage
    config a ``ReplayLLM`` instead of a backend."""

    def __init__(self, recipe: Recipe, run_dir: Path, store: OverlayStore, cache_path: Optional[Path]):
        super().__init__(recipe, run_dir, quiet=True)
        self.store = store  # type: ignore[assignment]
        self._cache_file = cache_path
        self._replays: dict[str, ReplayLLM] = {}
        self._counters: dict[str, PromptCounter] = {}

    def counter(self, backend_cfg) -> "PromptCounter":
        """The prompt counter of a backend config, built once."""
        key = backend_cfg.model_dump_json()
        if key not in self._counters:
            self._counters[key] = PromptCounter(self, backend_cfg)
        return self._counters[key]

    def llm(self, stage_cfg) -> ReplayLLM:  # type: ignore[override]
        key = stage_cfg.backend.model_dump_json()
        if key not in self._replays:
            self._replays[key] = ReplayLLM(stage_cfg.backend.model, self._cache_file)
        return self._replays[key]

    @property
    def cache(self):  # type: ignore[override]
        raise BardError("plan: the completion cache is read through ReplayLLM only")

    def close(self) -> None:
        self._replays.clear()


# -- prompt tokens ------------------------------------------------------------------------------

COUNT_AT_MOST = 20_000
"""Prompts counted one by one; beyond it a spread sample is counted and scaled by characters."""


class PromptCounter:
    """Prompt tokens of chat requests as the backend would see them: the model's own tokenizer and
    chat template where the model is a local folder (``exact``), else the student tokenizer over
    the message texts plus a few tokens of chat framing per message (an estimate)."""

    def __init__(self, ctx: RunContext, backend_cfg: Any):
        self.ctx, self.exact, self._tok = ctx, False, None
        if backend_cfg.kind in ("vllm", "transformers"):
            path = Path(str(ctx.recipe.resolve(backend_cfg.model))).expanduser()
            student = Path(str(ctx.recipe.resolve(ctx.recipe.student.tokenizer))).expanduser()
            if path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
                try:
                    if path.resolve() == student.resolve():
                        self._tok = ctx.tokenizer  # loaded once (a tokenizer load costs seconds)
                    else:
                        from transformers import AutoTokenizer

                        self._tok = AutoTokenizer.from_pretrained(
                            str(path), trust_remote_code=getattr(backend_cfg, "trust_remote_code", False))
                    self.exact = getattr(self._tok, "chat_template", None) is not None
                except Exception as exc:  # an unreadable tokenizer: estimate instead
                    log.warning("plan: cannot load the tokenizer of %s (%s); estimating", backend_cfg.model, exc)

    def count(self, requests: list[ChatRequest]) -> list[int]:
        if not requests:
            return []
        if len(requests) <= COUNT_AT_MOST:
            return self._count(requests)
        step = len(requests) / COUNT_AT_MOST
        idx = [int(i * step) for i in range(COUNT_AT_MOST)]
        sample = self._count([requests[i] for i in idx])
        chars = [sum(len(c) for _, c in r.messages) + 1 for r in requests]
        per_char = sum(sample) / max(1, sum(chars[i] for i in idx))
        return [int(round(c * per_char)) for c in chars]

    def _count(self, requests: list[ChatRequest]) -> list[int]:
        if self.exact:
            texts = [self._tok.apply_chat_template(r.message_dicts(), tokenize=False, add_generation_prompt=True)
                     for r in requests]
            enc = self._tok(texts, add_special_tokens=False)["input_ids"]
            return [len(x) for x in enc]
        flat = [c for r in requests for _, c in r.messages]
        counts = iter(self.ctx.count_tokens(flat))
        return [sum(next(counts) + 4 for _ in r.messages) + 3 for r in requests]
