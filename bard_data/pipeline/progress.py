"""Live figures of one LLM stage, on the postfix of its shard bar: requests done / planned, cache
hits, completion tokens per second and an ETA from the requests left.

The LLM layer reports as requests finish (``CachedLLM.on_progress``: cache hits at once, sent
requests one by one for the OpenAI-compatible backend, per batch for transformers, per finished
request inside vLLM's one ``chat`` call); under Ray the driver adds each worker's counter delta
when its shard comes back. "Planned" counts one request per input row that needs one (the first
compression pass, not its retries): retries push the done count past it, and the plan grows with
them, so the ETA counts only requests still planned.
"""

from __future__ import annotations

import time
from typing import Any, Optional


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class StageProgress:
    def __init__(self, bar: Any, planned: int, clock=time.monotonic, name: str = ""):
        self.bar, self.planned, self.clock, self.name = bar, max(0, int(planned)), clock, name
        self.sent = self.hits = self.tokens = 0
        self.started = clock()  # rates are over the stage's wall time, engine start included
        self._shown = 0.0

    @property
    def done(self) -> int:
        return self.sent + self.hits

    @property
    def total(self) -> int:
        return max(self.planned, self.done)

    def add(self, requests: int = 0, cache_hits: int = 0, completion_tokens: int = 0) -> None:
        """``requests`` sent (and finished), ``cache_hits`` answered by the cache."""
        now = self.clock()
        self.sent += max(0, int(requests))
        self.hits += max(0, int(cache_hits))
        self.tokens += max(0, int(completion_tokens))
        if now - self._shown >= 0.5 or self.done >= self.total:  # at most two redraws a second
            self._shown = now
            self.show(now)

    def figures(self, now: Optional[float] = None) -> dict[str, Any]:
        now = self.clock() if now is None else now
        elapsed = now - self.started
        left = self.total - self.done
        rate = self.sent / elapsed if elapsed > 0 else 0.0
        return {"done": self.done, "total": self.total, "cache_hits": self.hits, "completion_tokens": self.tokens,
                "tok_per_s": self.tokens / elapsed if elapsed > 0 else 0.0,
                "eta_s": (left / rate) if rate > 0 else (0.0 if left == 0 else None)}

    def postfix(self, now: Optional[float] = None) -> str:
        f = self.figures(now)
        eta = "?" if f["eta_s"] is None else _duration(f["eta_s"])
        return (f"req {f['done']}/{f['total']}, {f['tok_per_s']:.0f} tok/s, {f['cache_hits']} cached, "
                f"ETA {eta}")

    def show(self, now: Optional[float] = None) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(now), refresh=True)
