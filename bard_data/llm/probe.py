"""Cheap checks that a backend can start, without starting it (an engine holds a GPU)."""

from __future__ import annotations

import os
from pathlib import Path

from bard_data.errors import BackendError


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_backend(cfg, resolve=lambda p: p, probe_timeout_s: float = 10.0) -> None:
    """Cheap checks that a backend can start, without starting it (an engine holds a GPU):

    - ``openai``: a TCP connection to the server opens (skipped behind an HTTP proxy);
    - ``vllm``/``transformers``: the model is a local folder, or the Hub can be reached, or
      it is in the local Hugging Face cache.
    """
    if cfg.kind == "openai":
        import socket
        import urllib.parse
        import urllib.request

        u = urllib.parse.urlsplit(cfg.base_url)
        host = u.hostname
        if not host or u.scheme not in ("http", "https"):
            raise BackendError(f"openai backend: base_url {cfg.base_url!r} is not an http(s) URL")
        if urllib.request.getproxies().get(u.scheme) and not urllib.request.proxy_bypass(host):
            return  # the proxy, not we, reaches the server
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=min(cfg.timeout_s, probe_timeout_s)):
                pass
        except OSError as exc:
            msg = " ".join(str(exc).split())
            raise BackendError(f"openai backend: cannot reach {cfg.base_url}: {type(exc).__name__}: {msg}") from None
        return
    path = resolve(cfg.model)
    if Path(path).expanduser().exists() or not _offline():
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.model, "config.json")
    except Exception:
        cached = None
    if isinstance(cached, str):
        return
    raise BackendError(
        f"{cfg.kind} backend: cannot load model '{cfg.model}': no such local folder, the Hugging Face Hub is "
        "offline (HF_HUB_OFFLINE) and the model is not in the local cache"
    )
