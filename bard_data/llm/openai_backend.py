"""Any OpenAI-compatible chat server (vLLM or SGLang serve, llama.cpp server, hosted APIs).

Requests go out concurrently (``concurrency`` at a time) through the ``openai`` client with its
own retries off: this backend retries itself, so it can honour ``Retry-After``, log each retry and
turn a request that still fails into an error completion for that row (``finish_reason="error"``,
never cached) instead of failing the run. Retried: connection errors, timeouts, 408, 429 (waiting
``Retry-After`` seconds, at most 60), 5xx, and responses that cannot be parsed or lack a message.
Not retried: other 4xx (a bad request stays bad).

A server that never answered (every request of a batch refused before any request ever
succeeded) stops the run with ``BackendError`` rather than filling a table with error rows.
Ctrl-C while a batch is out drops the queued requests and starts no retry, so the run stops in
about one request's time, not the whole batch's.

The API key is read from the environment variable the config names and never appears in an error
message or log line (it is scrubbed from every message this module produces).
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Optional

from bard_data.errors import BackendError
from bard_data.llm.base import LLM, ChatRequest, Completion, SamplingConfig, request_seed

log = logging.getLogger(__name__)

RETRY_AFTER_CAP_S = 60.0
"""Longest wait honoured from a server's Retry-After header (and the cap of the backoff)."""


class _Malformed(Exception):
    """The server answered 2xx with something that is not a usable chat completion."""


class OpenAICompatLLM(LLM):
    kind = "openai"

    def __init__(self, cfg, client: Any = None):
        super().__init__(cfg.model)
        self.cfg = cfg
        self.base_url = cfg.base_url
        self._api_key = os.environ.get(cfg.api_key_env) or "EMPTY"
        self._reached = False  # has the server ever answered (any HTTP response)?
        self._lock = threading.Lock()
        self._cancel = threading.Event()  # set when the caller stops waiting (Ctrl-C): no new attempts
        if client is None:
            try:
                import openai
            except Exception as exc:
                raise BackendError(f"openai backend: cannot import the openai client: {_one_line(exc)}") from None
            client = openai.OpenAI(
                base_url=cfg.base_url, api_key=self._api_key, timeout=cfg.timeout_s, max_retries=0
            )
        self.client = client

    def __repr__(self) -> str:  # no key in reprs
        return f"OpenAICompatLLM(model={self.model!r}, base_url={self.base_url!r})"

    # -- one request --------------------------------------------------------------------------
    def request_kwargs(self, req: ChatRequest, sampling: SamplingConfig, seed: int) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            model=self.cfg.model,
            messages=req.message_dicts(),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=request_seed(seed, req),
            n=1,
        )
        if sampling.stop:
            kw["stop"] = list(sampling.stop)
        extra: dict[str, Any] = {}
        # Not in OpenAI's API: only sent when they change something (hosted APIs reject them).
        if sampling.top_k > 0:
            extra["top_k"] = sampling.top_k
        if sampling.repetition_penalty != 1.0:
            extra["repetition_penalty"] = sampling.repetition_penalty
        if extra:
            kw["extra_body"] = extra
        if req.json_schema and self.cfg.use_structured_output:
            kw["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "verdict", "schema": json.loads(req.json_schema)},
            }
        return kw

    def _one(self, req: ChatRequest, sampling: SamplingConfig, seed: int) -> tuple[Completion, bool]:
        """Returns the completion and whether its final failure was "server unreachable"."""
        attempts = self.cfg.max_retries + 1
        last: Optional[BaseException] = None
        unreachable = False
        for attempt in range(attempts):
            if self._cancel.is_set():
                return Completion(text="", finish_reason="error", error="cancelled"), False
            try:
                kw = self.request_kwargs(req, sampling, seed)
            except Exception as exc:  # e.g. a schema that is not JSON: this row only
                return self._error(exc), False
            try:
                resp = self.client.chat.completions.create(**kw)
                with self._lock:
                    self._reached = True
                return _to_completion(resp), False
            except Exception as exc:
                last = exc
                retry, wait, unreachable = self._classify(exc, attempt)
                if not retry or attempt + 1 >= attempts:
                    break
                log.warning(
                    "openai backend: %s; retry %d/%d in %.1fs",
                    self._scrub(_one_line(exc, 300)), attempt + 1, self.cfg.max_retries, wait,
                )
                self._cancel.wait(wait)
        assert last is not None
        return self._error(last), unreachable

    def _classify(self, exc: BaseException, attempt: int) -> tuple[bool, float, bool]:
        """(retry?, seconds to wait, is it a connection failure?)"""
        import openai

        backoff = min(self.cfg.backoff_s * (2 ** attempt), RETRY_AFTER_CAP_S)
        if isinstance(exc, openai.APITimeoutError):  # subclass of APIConnectionError
            with self._lock:
                self._reached = True  # something accepted the connection
            return True, backoff, False
        if isinstance(exc, openai.APIConnectionError):
            return True, backoff, True
        if isinstance(exc, openai.APIStatusError):
            with self._lock:
                self._reached = True
            code = exc.status_code
            if code == 429:
                ra = _retry_after(exc)
                return True, (min(ra, RETRY_AFTER_CAP_S) if ra is not None else backoff), False
            if code == 408 or code >= 500:
                return True, backoff, False
            return False, 0.0, False
        if isinstance(exc, (_Malformed, openai.APIResponseValidationError, ValueError)):
            with self._lock:
                self._reached = True
            return True, backoff, False  # unparsable / truncated body (JSONDecodeError is a ValueError)
        return False, 0.0, False

    def _scrub(self, text: str) -> str:
        if self._api_key and self._api_key != "EMPTY":
            text = text.replace(self._api_key, "***")
        return text

    def _error(self, exc: BaseException) -> Completion:
        return Completion(text="", finish_reason="error", error=self._scrub(_one_line(exc)))

    # -- a batch --------------------------------------------------------------------------------
    def _generate(self, requests: list[ChatRequest], sampling: SamplingConfig, seed: int) -> list[Completion]:
        from tqdm.auto import tqdm

        results: list[Optional[Completion]] = [None] * len(requests)
        unreachable = [False] * len(requests)
        workers = max(1, min(self.cfg.concurrency, len(requests)))
        self._cancel.clear()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bard-openai")
        try:
            with tqdm(total=len(requests), desc=f"{self.model} (openai)", unit="req", disable=None, leave=False) as bar:
                futs = {pool.submit(self._one, r, sampling, seed): i for i, r in enumerate(requests)}
                for fut in as_completed(futs):
                    i = futs[fut]
                    try:
                        results[i], unreachable[i] = fut.result()
                    except Exception as exc:  # a bug in this module: still one row, not the run
                        results[i] = self._error(exc)
                    bar.update(1)
                    self._report(1, results[i].completion_tokens)
        except BaseException:
            # Ctrl-C (or any error) while requests are out: drop the queued ones and stop retries,
            # instead of waiting for the whole batch; requests in flight end with their timeout.
            self._cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        if not self._reached and all(unreachable):
            first = next(r for r in results if r is not None)
            raise BackendError(f"openai backend: cannot reach {self.base_url}: {first.error}")
        return [r for r in results]  # type: ignore[misc]

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


def _to_completion(resp: Any) -> Completion:
    choices = getattr(resp, "choices", None)
    if not choices:
        raise _Malformed("response has no choices")
    choice = choices[0]
    msg = getattr(choice, "message", None)
    if msg is None:
        raise _Malformed("response choice has no message")
    content = msg.content
    # Servers started with a reasoning parser split the chain off the answer; put it back in the
    # <think> block every stage parses.
    reasoning = getattr(msg, "reasoning_content", None) or getattr(msg, "reasoning", None)
    extra = getattr(msg, "model_extra", None) or {}
    reasoning = reasoning or extra.get("reasoning_content") or extra.get("reasoning")
    if content is None and not reasoning:
        raise _Malformed("response message has no content")
    text = content or ""
    if reasoning:
        text = f"<think>{reasoning}</think>{text}"
    finish = "length" if choice.finish_reason == "length" else "stop"
    usage = getattr(resp, "usage", None)
    return Completion(
        text=text,
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        finish_reason=finish,
    )


def _retry_after(exc: Any) -> Optional[float]:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    val = headers.get("retry-after")
    if not val:
        return None
    try:
        return max(0.0, float(val))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(val)
            return max(0.0, when.timestamp() - time.time())
        except Exception:
            return None


def _one_line(exc: BaseException, limit: int = 500) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
