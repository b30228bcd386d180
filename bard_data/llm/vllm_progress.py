"""Live progress out of one ``vllm.LLM.chat`` call, without a second progress bar.

vLLM runs a whole batch in one blocking call; its only window on progress is ``use_tqdm``, which
also takes a callable standing in for tqdm. ``progress_bar(report)`` is such a callable: it hands
vLLM an object that looks enough like a tqdm bar (``update``, ``postfix``, ``format_dict``, ``n``,
``refresh``, ``close``) and draws nothing, and calls ``report(requests, completion_tokens)`` as
requests finish.

vLLM 0.32's ``_run_engine`` sets ``postfix = "est. speed input: X toks/s, output: Y toks/s"`` with
Y = total output tokens / ``format_dict["elapsed"]`` before each ``update(n)``: with ``elapsed``
pinned at 1.0, Y is the running total of output tokens. A vLLM that writes another postfix only
loses the live token count (``CachedLLM`` reports the batch's tokens when the call returns).
"""

from __future__ import annotations

import re
from typing import Any, Callable

_OUTPUT = re.compile(r"output:\s*([0-9.]+)")


class _Bar:
    def __init__(self, report: Callable[[int, int], None], total: int | None = None):
        self.report, self.total, self.n = report, total, 0
        self.postfix: Any = None
        self.format_dict = {"elapsed": 1.0}
        self._tokens = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        tokens = self._tokens
        m = _OUTPUT.search(str(self.postfix or ""))
        if m:
            try:
                tokens = max(tokens, int(round(float(m.group(1)))))
            except ValueError:
                pass
        self.report(n, tokens - self._tokens)
        self._tokens = tokens

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(report: Callable[[int, int], None]) -> Callable[..., Any]:
    """A ``use_tqdm`` callable for ``vllm.LLM.chat`` that reports finished requests and tokens."""

    def make(iterable=None, *args, total: int | None = None, **kwargs):
        if iterable is not None:  # "Rendering conversations": pass the items through, silently
            return iterable
        return _Bar(report, total)

    return make
