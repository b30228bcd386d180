"""The plan's arithmetic: ranges of counts, the requests of one stage (or part of it), and the
assumptions behind every expected value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# name: (default, what it means). A value measured on the finished part of the run (its tables or
# its cached completions) replaces the default; ``--assume name=value`` replaces both.
DEFAULTS: dict[str, tuple[float, str]] = {
    "teacher_pass_rate": (0.5, "share of sampled traces that verify (gold chains from the teacher)"),
    "retry_rate": (0.5, "share of compression attempts that miss the budget tolerance and are retried"),
    "answer_preserved": (0.8, "share of compressions that keep the gold answer (the judge sees only those "
                              "when judge.only_answer_preserved)"),
    "fill": (0.5, "completion tokens / max_tokens of a teacher or judge request"),
    "compression_fill": (1.0, "completion tokens / target tokens of a compression request"),
}


@dataclass
class Range:
    """A count: at least ``lo``, expected ``exp``, at most ``hi``."""

    lo: float = 0.0
    exp: float = 0.0
    hi: float = 0.0

    @staticmethod
    def of(x: float) -> "Range":
        return Range(x, x, x)

    def add(self, lo: float, exp: float, hi: float) -> None:
        self.lo, self.exp, self.hi = self.lo + lo, self.exp + exp, self.hi + hi

    def __add__(self, o: "Range") -> "Range":
        return Range(self.lo + o.lo, self.exp + o.exp, self.hi + o.hi)

    @property
    def exact(self) -> bool:
        return abs(self.hi - self.lo) < 1e-9

    def as_dict(self, digits: int = 1) -> dict[str, float]:
        return {k: round(v, digits) for k, v in (("lo", self.lo), ("exp", self.exp), ("hi", self.hi))}


@dataclass
class Part:
    """Requests of one stage (or one pass of it): how many, how many the cache answers, and the
    prompt and completion tokens of those still to send (cached requests cost what the cache
    recorded, once, when they were made)."""

    name: str
    requests: Range = field(default_factory=Range)
    cached: int = 0
    prompt: Range = field(default_factory=Range)
    completion: Range = field(default_factory=Range)
    cached_prompt: int = 0
    cached_completion: int = 0
    prompt_counted: bool = True  # with the model's own tokenizer and chat template
    finished: bool = False  # the stage is done: it sends nothing more, whatever the cache holds

    def hit(self, prompt: int, completion: int, certain: bool = True) -> None:
        self.requests.add(1 if certain else 0, 1, 1)
        self.cached += 1
        self.cached_prompt += prompt
        self.cached_completion += completion

    def miss(self, prompt: float, completion: float, max_tokens: int, certain: bool = True) -> None:
        self.uncertain(1 if certain else 0, 1, 1, prompt, completion, max_tokens)

    def uncertain(self, lo: float, exp: float, hi: float, prompt: float, completion: float, max_tokens: int) -> None:
        """``lo`` / ``exp`` / ``hi`` more requests to send, each with about ``prompt`` prompt tokens
        and ``completion`` completion tokens expected (at most ``max_tokens``)."""
        self.requests.add(lo, exp, hi)
        self.prompt.add(lo * prompt, exp * prompt, hi * prompt)
        self.completion.add(0, exp * min(completion, max_tokens), hi * max_tokens)

    @property
    def to_send(self) -> Range:
        if self.finished:
            return Range()
        return Range(max(0.0, self.requests.lo - self.cached), max(0.0, self.requests.exp - self.cached),
                     max(0.0, self.requests.hi - self.cached))

    def nothing_to_send(self) -> None:
        """A finished stage: it runs no more (whatever the cache holds)."""
        self.finished = True
        self.prompt, self.completion = Range(), Range()

    def as_dict(self) -> dict[str, Any]:
        send = self.to_send
        return {"name": self.name, "requests": self.requests.as_dict(), "exact": self.requests.exact,
                "cached": self.cached, "to_send": send.as_dict(),
                "prompt_tokens": self.prompt.as_dict(0), "prompt_counted": "tokenizer" if self.prompt_counted else "estimated",
                "completion_tokens": {"exp": round(self.completion.exp), "hi": round(self.completion.hi)},
                "cached_prompt_tokens": self.cached_prompt, "cached_completion_tokens": self.cached_completion}


def total(parts: list[Part], name: str = "total") -> Part:
    t = Part(name)
    for p in parts:
        t.requests, t.prompt, t.completion = t.requests + p.requests, t.prompt + p.prompt, t.completion + p.completion
        t.cached += p.cached
        t.cached_prompt += p.cached_prompt
        t.cached_completion += p.cached_completion
        t.prompt_counted = t.prompt_counted and p.prompt_counted
    t.finished = bool(parts) and all(p.finished for p in parts)
    return t


class Assumptions:
    """The rates behind expected values, each with where it came from (given, measured, default)."""

    def __init__(self, given: Optional[dict[str, float]] = None):
        unknown = sorted(set(given or {}) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown assumption(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
        self.given = dict(given or {})
        self.values: dict[str, float] = {}
        self.source: dict[str, str] = {}

    def set(self, name: str, measured: Optional[float] = None, n: int = 0) -> float:
        if name in self.given:
            v, src = self.given[name], "given"
        elif measured is not None and n > 0:
            v, src = measured, f"measured over {n}"
        else:
            v, src = DEFAULTS[name][0], "default"
        self.values[name], self.source[name] = float(v), src
        return float(v)

    def as_dict(self) -> dict[str, Any]:
        return {k: {"value": round(v, 4), "source": self.source[k], "meaning": DEFAULTS[k][1]}
                for k, v in self.values.items()}


def geometric(q: float, n: int) -> float:
    """Expected retries after a miss-prone attempt: q + q^2 + ... + q^n."""
    return sum(q ** i for i in range(1, n + 1))
