"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real OpenAI-compatible server.

It forwards each request to the upstream server, except where its seeded schedule says to
misbehave instead. The schedule is a pure function of (seed, request body, how many times that
body was seen), so it does not depend on the order concurrent requests arrive in:

- a *persistent* fault hits every attempt of a request body (the client's retries cannot save
  it, so its row ends up as ``llm_error``); ``persistent_rate`` of the bodies get one;
- a *transient* fault hits only the first attempt; ``transient_rate`` of the bodies get one.

Faults: ``drop`` (close the connection without an answer), ``500``, ``429`` (with
``Retry-After: 1``), ``stall`` (hold the connection ``stall_s``, longer than the client's timeout,
then close it), ``truncated`` (forward, then answer 200 with the first half of the JSON body).
Transient faults cycle through the kinds in order, so five faulted requests cover all of them.

Bounded: one thread per connection (daemon), a stall waits on an event that ``close`` sets, no
loop runs without a limit, and only 127.0.0.1 is listened on or forwarded to.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import Optional

from tests.servers import QuietHTTPServer

KINDS = ("drop", "500", "429", "stall", "truncated")
HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding"}


def _uniform(seed: int, *parts: object) -> float:
    h = hashlib.sha256(json.dumps([seed, *map(str, parts)]).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


class FaultyProxy:
    def __init__(self, upstream: str, seed: int = 0, transient_rate: float = 0.3, persistent_rate: float = 0.1,
                 persistent_kinds: tuple[str, ...] = ("500", "truncated", "429"), stall_s: float = 2.0,
                 upstream_timeout_s: float = 60.0):
        u = urllib.parse.urlsplit(upstream)
        if u.hostname != "127.0.0.1":
            raise ValueError("the faulty proxy only forwards to 127.0.0.1")
        self.upstream_host, self.upstream_port = u.hostname, u.port or 80
        self.seed = seed
        self.transient_rate, self.persistent_rate = transient_rate, persistent_rate
        self.persistent_kinds = persistent_kinds
        self.stall_s, self.upstream_timeout_s = stall_s, upstream_timeout_s
        self.enabled = True
        self.counts: Counter = Counter()  # what happened, by kind ("forwarded" for the good ones)
        self.persistent_bodies: set[str] = set()
        self._seen: Counter = Counter()
        self._transient_n = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                proxy._handle(self, b"")

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("content-length", 0))
                proxy._handle(self, self.rfile.read(n) if n else b"")

            def log_message(self, *a):
                pass

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}{u.path or ''}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # -- schedule ----------------------------------------------------------------------------
    def fault_for(self, body: bytes) -> Optional[str]:
        """The fault this attempt gets (None: forward it). Updates the per-body attempt count."""
        key = hashlib.sha256(body).hexdigest()
        with self._lock:
            attempt = self._seen[key]
            self._seen[key] += 1
            if not self.enabled or not body:
                return None
            if _uniform(self.seed, "persistent", key) < self.persistent_rate:
                self.persistent_bodies.add(key)
                kinds = self.persistent_kinds
                return kinds[int(_uniform(self.seed, "kind", key) * len(kinds))]
            if attempt == 0 and _uniform(self.seed, "transient", key) < self.transient_rate:
                kind = KINDS[self._transient_n % len(KINDS)]
                self._transient_n += 1
                return kind
        return None

    # -- one request --------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        fault = self.fault_for(body) if h.command == "POST" else None
        with self._lock:
            self.counts[fault or "forwarded"] += 1
        if fault == "drop":
            h.close_connection = True
            return
        if fault == "stall":
            self._closing.wait(self.stall_s)
            h.close_connection = True
            return
        if fault in ("500", "429"):
            code = int(fault)
            data = json.dumps({"error": {"message": f"injected {code}", "type": "injected"}}).encode()
            h.send_response(code)
            if code == 429:
                h.send_header("Retry-After", "1")
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        status, headers, data = self._forward(h, body)
        if fault == "truncated":
            status, data = 200, data[: max(1, len(data) // 2)]
        h.send_response(status)
        for k, v in headers:
            if k.lower() not in HOP_HEADERS:
                h.send_header(k, v)
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.upstream_timeout_s)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_HEADERS}
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        except Exception as exc:  # upstream trouble: a 502 the client will retry
            data = json.dumps({"error": {"message": f"proxy: upstream failed: {type(exc).__name__}"}}).encode()
            return 502, [("content-type", "application/json")], data
        finally:
            conn.close()

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)

    def __exit__(self, *exc) -> None:
        self.close()
