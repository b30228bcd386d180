"""Reading a model's completion: its assistant text, and how long its reasoning is in tokens
(counted from the text with a tokenizer, or from the generated ids), as the GRPO reward and the
eval measure it."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from bard_data.config.think_tags import ThinkTags
from bard_data.text.reasoning import reasoning_span

__all__ = ["completion_text", "TokenCounter"]


def completion_text(completion: Any) -> str:
    """The assistant text of a completion: a string, or a conversational list of messages (the
    assistant turns' contents joined; content parts of type text are joined too)."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts: list[str] = []
    msgs = list(completion)
    assistant = [m for m in msgs if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
    for m in assistant or msgs:
        content = m.get("content") if isinstance(m, dict) else m
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return "".join(parts)


class _DefaultTags:
    tags = ThinkTags()
    think_open_id: Optional[int] = None
    think_close_id: Optional[int] = None


class _Whitespace:
    """A stand-in tokenizer: one token per whitespace-separated word."""

    all_special_ids: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()


class TokenCounter:
    """Counts reasoning tokens from text (with a tokenizer) or from completion ids (with the
    think tags' ids, taken from the tokenizer or given in the config)."""

    def __init__(self, tokenizer: Any = None, cfg: Any = None):
        """``cfg``: where the tags come from: anything with ``tags`` (a ``ThinkTags``) and
        ``think_open_id`` / ``think_close_id`` (``rewards.RewardConfig``); default ``<think>``."""
        self.cfg = cfg or _DefaultTags()
        if isinstance(tokenizer, str):
            if tokenizer == "whitespace":
                tokenizer = _Whitespace()
            else:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.open_id = self.cfg.think_open_id
        self.close_id = self.cfg.think_close_id
        self._special: set[int] = set()
        self._blank: dict[int, bool] = {}
        if tokenizer is not None and not isinstance(tokenizer, _Whitespace):
            if self.open_id is None:
                self.open_id = _single_token_id(tokenizer, self.cfg.tags.open)
            if self.close_id is None:
                self.close_id = _single_token_id(tokenizer, self.cfg.tags.close)
            self._special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def __getstate__(self):  # picklable (TRL may copy reward functions across processes)
        return self.__dict__

    # -- text path ------------------------------------------------------------------------
    def reasoning_text(self, text: str) -> tuple[str, bool]:
        """(reasoning, closed): the text inside the think block; a missing close tag means the
        reasoning runs to the end (also when there are no tags at all)."""
        return reasoning_span(text, self.cfg.tags)

    def count_texts(self, texts: list[str]) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(
                "counting reasoning tokens needs completion_ids (with the think tag ids) or a tokenizer: "
                "pass tokenizer=<tokenizer or path> (or 'whitespace' for a word count)"
            )
        tok = self.tokenizer
        if hasattr(tok, "__call__") and not isinstance(tok, _Whitespace) and texts:
            try:
                ids = tok(list(texts), add_special_tokens=False)["input_ids"]
                return [len(x) for x in ids]
            except Exception:  # tokenizers without batch __call__
                pass
        return [len(tok.encode(t, add_special_tokens=False)) if t else 0 for t in texts]

    # -- ids path -------------------------------------------------------------------------
    def _is_blank(self, tid: int) -> bool:
        if self.tokenizer is None or isinstance(self.tokenizer, _Whitespace):
            return False
        if tid not in self._blank:
            try:
                self._blank[tid] = self.tokenizer.decode([tid]).strip() == ""
            except Exception:
                self._blank[tid] = False
        return self._blank[tid]

    def count_ids(self, ids: Sequence[int]) -> tuple[int, bool]:
        if self.close_id is None:
            raise ValueError(
                "counting from completion_ids needs the </think> token id: pass a tokenizer or set "
                "think_close_id (and think_open_id) in the reward's config"
            )
        ids = [int(t) for t in ids]
        end = len(ids)
        closed = False
        if self.close_id in ids:
            end = ids.index(self.close_id)
            closed = True
        else:
            while end > 0 and ids[end - 1] in self._special:
                end -= 1
        start = 0
        if self.open_id is not None and self.open_id in ids[:end]:
            start = ids.index(self.open_id) + 1
        span = [t for t in ids[start:end] if t != self.open_id and t != self.close_id]
        lo, hi = 0, len(span)
        while lo < hi and self._is_blank(span[lo]):
            lo += 1
        while hi > lo and self._is_blank(span[hi - 1]):
            hi -= 1
        return hi - lo, closed

    def reasoning_tokens(self, completions: Sequence[Any], completion_ids: Optional[Sequence[Sequence[int]]] = None) -> tuple[list[int], list[bool]]:
        """Reasoning token counts and whether each think block was closed."""
        if completion_ids is not None and self.close_id is not None:
            out = [self.count_ids(ids) for ids in completion_ids]
            return [n for n, _ in out], [c for _, c in out]
        split = [self.reasoning_text(completion_text(c)) for c in completions]
        return self.count_texts([r for r, _ in split]), [c for _, c in split]


def _single_token_id(tokenizer, token: str) -> Optional[int]:
    try:
        ids = tokenizer.encode(token, add_special_tokens=False)
    except Exception:
        return None
    if len(ids) == 1:
        return int(ids[0])
    tid = tokenizer.convert_tokens_to_ids(token) if hasattr(tokenizer, "convert_tokens_to_ids") else None
    unk = getattr(tokenizer, "unk_token_id", None)
    return int(tid) if tid is not None and tid != unk else None
