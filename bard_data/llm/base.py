"""The one LLM interface every stage uses: a batch of chat requests in, completions out.

Backends implement ``_generate`` over a whole batch (a batch engine must never be called one row
at a time); ``CachedLLM`` wraps any backend so that each completion is looked up in, and stored to,
the persistent completion cache before the backend is asked.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from bard_data.config.llm import SamplingConfig

Message = dict[str, str]


def chat_messages(system_prompt: str | None, user: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": user}]


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to make. ``sample_index`` tells apart the k samples of one prompt."""

    messages: tuple[tuple[str, str], ...]
    sample_index: int = 0
    # Structured output (a JSON schema) where the backend supports it; part of the cache key.
    json_schema: Optional[str] = None

    @staticmethod
    def of(messages: list[Message], sample_index: int = 0, json_schema: dict | None = None) -> "ChatRequest":
        return ChatRequest(
            messages=tuple((m["role"], m["content"]) for m in messages),
            sample_index=sample_index,
            json_schema=json.dumps(json_schema, sort_keys=True) if json_schema else None,
        )

    def message_dicts(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # "stop", "length", or "error" (then ``error`` says why; errors are never cached).
    finish_reason: str = "stop"
    error: Optional[str] = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def request_key(model: str, request: ChatRequest, sampling: SamplingConfig, seed: int) -> str:
    """Cache key of one completion.

    It holds what changes the output (model, messages, sampling parameters, seed, sample index,
    output schema) and leaves out what does not (batch size, concurrency, timeouts, progress
    display), as distilabel's signature does, so tuning throughput never invalidates the cache.
    """
    payload = {
        "model": model,
        "messages": request.messages,
        "sampling": sampling.model_dump(mode="json"),
        "seed": seed,
        "sample_index": request.sample_index,
        "json_schema": request.json_schema,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def request_seed(key_seed: int, request: ChatRequest) -> int:
    """A per-request seed derived from the run seed and the request itself (not its position)."""
    blob = json.dumps([key_seed, request.messages, request.sample_index], ensure_ascii=False)
    return int(hashlib.sha256(blob.encode("utf-8")).hexdigest()[:8], 16)


@dataclass
class LLMStats:
    requests_sent: int = 0
    cache_hits: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generate_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


ProgressFn = Callable[[int, int], None]
"""``progress(requests, completion_tokens)``: that many more requests of a batch finished."""


class LLM:
    """Base class of the backends. Subclasses implement ``_generate`` for a whole batch, and may
    call ``_report`` as requests of the batch finish (live figures); what they leave unreported
    is reported when the batch returns."""

    kind: str = "base"
    # Set by ``CachedLLM`` for the duration of one batch.
    progress: Optional[ProgressFn] = None

    def __init__(self, model: str):
        self.model = model
        self.stats = LLMStats()

    def _report(self, requests: int, completion_tokens: int = 0) -> None:
        if self.progress is not None and (requests or completion_tokens):
            self.progress(requests, completion_tokens)

    def _generate(self, requests: list[ChatRequest], sampling: SamplingConfig, seed: int) -> list[Completion]:
        raise NotImplementedError

    def generate(
        self, requests: list[ChatRequest], sampling: SamplingConfig, seed: int = 0
    ) -> list[Completion]:
        if not requests:
            return []
        t0 = time.perf_counter()
        out = self._generate(requests, sampling, seed)
        self.stats.generate_seconds += time.perf_counter() - t0
        self.stats.requests_sent += len(requests)
        for c in out:
            self.stats.prompt_tokens += c.prompt_tokens
            self.stats.completion_tokens += c.completion_tokens
            self.stats.errors += 0 if c.ok else 1
        return out

    def close(self) -> None:  # engines with processes or servers release them here
        pass


@dataclass
class CachedLLM:
    """A backend behind the persistent completion cache.

    Only the misses go to the backend, all in one batch; successful completions are stored as
    soon as the batch returns, so a run killed afterwards never pays for them again.
    """

    backend: LLM
    cache: "Any"  # bard_data.llm.cache.CompletionCache
    stats: LLMStats = field(default_factory=LLMStats)
    # ``on_progress(requests=, cache_hits=, completion_tokens=)`` as requests finish (live figures).
    on_progress: Optional[Callable[..., None]] = None

    @property
    def model(self) -> str:
        return self.backend.model

    def generate(
        self, requests: list[ChatRequest], sampling: SamplingConfig, seed: int = 0
    ) -> list[Completion]:
        keys = [request_key(self.backend.model, r, sampling, seed) for r in requests]
        found = self.cache.get_many(keys)
        miss_idx: list[int] = []
        seen: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in found and k not in seen:
                seen[k] = i
                miss_idx.append(i)
        self.stats.cache_hits += len(requests) - len(miss_idx)
        self._progress(cache_hits=len(requests) - len(miss_idx))
        fresh: dict[str, Completion] = {}
        if miss_idx:
            before = self.backend.stats.requests_sent
            results = self._send([requests[i] for i in miss_idx], sampling, seed)
            self.stats.requests_sent += self.backend.stats.requests_sent - before
            good = {}
            for i, c in zip(miss_idx, results):
                fresh[keys[i]] = c
                self.stats.prompt_tokens += c.prompt_tokens
                self.stats.completion_tokens += c.completion_tokens
                if c.ok:
                    good[keys[i]] = c
                else:
                    self.stats.errors += 1
            self.cache.put_many(self.backend.model, good)
        out = []
        for k in keys:
            if k in found:
                c = found[k]
                c.cached = True
                out.append(c)
            else:
                out.append(fresh[k])
        return out

    def _send(self, requests: list[ChatRequest], sampling: SamplingConfig, seed: int) -> list[Completion]:
        """The backend's batch, timed (wall seconds inside its ``generate``: ``generate_seconds``),
        with its progress forwarded; what it did not report is reported when it returns."""
        done = [0, 0]

        def forward(n: int, tokens: int) -> None:
            done[0] += n
            done[1] += tokens
            self._progress(requests=n, completion_tokens=tokens)

        self.backend.progress = forward if self.on_progress is not None else None
        t0 = time.perf_counter()
        try:
            results = self.backend.generate(requests, sampling, seed)
        finally:
            self.stats.generate_seconds += time.perf_counter() - t0
            self.backend.progress = None
        tokens = sum(c.completion_tokens for c in results)
        self._progress(requests=max(0, len(results) - done[0]), completion_tokens=max(0, tokens - done[1]))
        return results

    def _progress(self, **counts: int) -> None:
        if self.on_progress is not None and any(counts.values()):
            self.on_progress(**counts)

    def close(self) -> None:
        self.backend.close()

