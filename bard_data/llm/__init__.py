"""LLM backends behind one interface (see ``base.LLM``) and the factory that builds them."""

from __future__ import annotations

from bard_data.llm.base import LLM, CachedLLM, ChatRequest, Completion, SamplingConfig, request_key

__all__ = ["LLM", "CachedLLM", "ChatRequest", "Completion", "SamplingConfig", "request_key", "make_backend"]


def make_backend(cfg, resolve=lambda p: p) -> LLM:
    """Build the backend a stage config names. ``resolve`` turns recipe paths into absolute ones.

    The cache key uses ``cfg.model`` as written in the recipe (not the resolved path), so moving
    a checkout does not invalidate the cache.
    """
    if cfg.kind == "transformers":
        from bard_data.llm.transformers_backend import TransformersLLM

        return TransformersLLM(
            cfg.model, resolve(cfg.model), dtype=cfg.dtype, device=cfg.device,
            batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code,
        )
    if cfg.kind == "vllm":
        from bard_data.llm.vllm_backend import VLLMEngine

        return VLLMEngine(cfg.model, resolve(cfg.model), cfg)
    if cfg.kind == "openai":
        from bard_data.llm.openai_backend import OpenAICompatLLM

        return OpenAICompatLLM(cfg)
    raise ValueError(f"unknown backend kind {cfg.kind!r}")
