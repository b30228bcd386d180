"""Fingerprints: what a stage's table was built from, so an edited recipe recomputes exactly the
stages it changes (and their descendants) and leaves the others alone.

A stage's fingerprint hashes its name and code ``version``, the recipe sections it declares
(``Stage.sections``), the fingerprints of the tables it reads, and the content of the local files
those sections name (problem sources, trace files, decontamination references). Settings that
cannot change an output are left out of every fingerprint (``OUTSIDE_FINGERPRINTS``, with why),
as distilabel leaves runtime parameters out of its signature.

Source files are fingerprinted by content (sha256); size and mtime are compared first, so a
touched but unchanged file is not hashed again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from bard_data.config import Recipe
from bard_data.pipeline.stage import Stage

# Recipe keys no stage's output depends on (a key path; "*" matches any one level). Whatever the
# value, the same inputs give the same tables, so changing them recomputes nothing.
OUTSIDE_FINGERPRINTS: dict[str, str] = {
    "executor": "where shards run (local or Ray), not what they compute",
    "cache_dir": "where completions are cached, not what they are",
    "shard_size": "how rows are grouped into shards; every output row depends on its own input row only",
    "*.backend.batch_size": "rows per generate() call (throughput)",
    "*.backend.concurrency": "requests in flight (throughput)",
    "*.backend.timeout_s": "how long to wait for a server",
    "*.backend.max_retries": "how often to retry a failed request",
    "*.backend.backoff_s": "how long to wait between retries",
    "*.backend.gpu_memory_utilization": "engine memory, not sampling",
    "*.backend.api_key_env": "where the key is read from",
    "*.backend.price": "what requests cost, not what they return",
}

FULL_HASH_MAX_BYTES = 256 << 20
"""Source files up to this size are hashed whole; larger ones by their size, first and last 16 MiB."""


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= FULL_HASH_MAX_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(str(size).encode())
            h.update(f.read(16 << 20))
            f.seek(size - (16 << 20))
            h.update(f.read(16 << 20))
    return h.hexdigest()


def source_files(recipe: Recipe, before: dict[str, Any]) -> dict[str, Any]:
    """Content fingerprints of the local files the recipe reads, by recipe key (``sources[gsm8k]``,
    ``traces[x]``, ``decontamination[math500]``): path, size, mtime and sha256."""
    out: dict[str, Any] = {}
    hashed: dict[str, str] = {}  # one file may be a source and a trace source
    items = [(f"sources[{s.name}]", s.path, s.format in ("jsonl", "parquet", "datasets")) for s in recipe.sources]
    items += [(f"traces[{t.name}]", t.path, t.format in ("jsonl", "parquet", "datasets")) for t in recipe.traces]
    if recipe.decontamination is not None:
        items += [(f"decontamination[{r.name}]", r.path, True) for r in recipe.decontamination.references]
    for key, raw, force in items:
        path = Path(recipe.resolve(raw, force=force))
        if not path.is_file():
            continue
        st = path.stat()
        rec = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        old = before.get(key)
        if old and old.get("path") == rec["path"] and old.get("size") == rec["size"] and old.get("mtime_ns") == rec["mtime_ns"] and old.get("sha256"):
            rec["sha256"] = old["sha256"]
        else:
            if str(path) not in hashed:
                hashed[str(path)] = _file_sha256(path)
            rec["sha256"] = hashed[str(path)]
        out[key] = rec
    return out


def _outside(path: tuple[str, ...]) -> bool:
    for pattern in OUTSIDE_FINGERPRINTS:
        parts = tuple(pattern.split("."))
        if len(parts) == len(path) and all(p in ("*", q) for p, q in zip(parts, path)):
            return True
    return False


def _strip(value: Any, path: tuple[str, ...] = ()) -> Any:
    """``value`` without the keys of ``OUTSIDE_FINGERPRINTS``."""
    path = tuple(p for p in path if not p.isdigit())  # "traces.0.path" is matched as "traces.path"
    if isinstance(value, dict):
        return {k: _strip(v, (*path, k)) for k, v in value.items() if not _outside((*path, k))}
    if isinstance(value, list):
        return [_strip(v, path) for v in value]
    return value


def _get(data: Any, path: str) -> Any:
    for key in path.split("."):
        if isinstance(data, list) and key.isdigit():
            data = data[int(key)] if int(key) < len(data) else None
        else:
            data = data.get(key) if isinstance(data, dict) else None
    return data


def section_values(recipe_dict: dict[str, Any], sections: Iterable[str]) -> dict[str, Any]:
    """The recipe values a stage's output depends on: its sections (a top-level key, or a dotted
    path to a part of one), outside keys removed."""
    return {s: _strip(_get(recipe_dict, s), tuple(s.split("."))) for s in sections}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def stage_basis(stage: Stage, recipe: Recipe, recipe_dict: dict[str, Any], inputs: dict[str, str],
                files: dict[str, Any]) -> dict[str, Any]:
    """What a stage's fingerprint hashes: its version, its sections' values, its inputs'
    fingerprints and the content hashes of the files its sections name."""
    secs = stage.sections_for(recipe)
    roots = {sec.split(".", 1)[0] for sec in secs}
    return {
        "stage": stage.name,
        "version": stage.version,
        "sections": section_values(recipe_dict, secs),
        "inputs": dict(sorted(inputs.items())),
        "files": {k: v.get("sha256") for k, v in sorted(files.items()) if k.split("[", 1)[0] in roots},
    }


def stage_fingerprints(stages: Sequence[Stage], recipe: Recipe, files: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For stages in dependency order: ``{name: {"fingerprint": ..., "basis": ...}}``."""
    data = recipe.resolved_dict()
    out: dict[str, dict[str, Any]] = {}
    for stage in stages:
        inputs = {t: out[t]["fingerprint"] for t in stage.reads_for(recipe) if t in out}
        basis = stage_basis(stage, recipe, data, inputs, files)
        out[stage.name] = {"fingerprint": _digest(basis), "basis": basis}
    return out


def _flatten(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{path}.{k}" if path else str(k)))
        return out or {path: {}}
    return {path: value}


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Key paths whose value differs between two nested values (``balance.n_bins: 3 -> 4``)."""
    a, b = _flatten(old, prefix), _flatten(new, prefix)
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            out.append(f"{k}: {_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))}")
    return out


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def why_recompute(old: Optional[dict[str, Any]], new: dict[str, Any], recomputed: set[str]) -> list[str]:
    """Why a stage built from basis ``old`` must be rebuilt for basis ``new`` (empty: it need not)."""
    if old is None:
        return ["built by an earlier bard_data without a fingerprint"]
    out: list[str] = []
    if old.get("version") != new["version"]:
        out.append(f"code version {old.get('version')} -> {new['version']}")
    for sec in new["sections"]:
        out += changed_keys((old.get("sections") or {}).get(sec), new["sections"][sec], sec)
    for key in sorted(set(old.get("files") or {}) | set(new["files"])):
        if (old.get("files") or {}).get(key) != new["files"].get(key):
            out.append(f"{key}: file content changed")
    for t in sorted(new["inputs"]):
        if (old.get("inputs") or {}).get(t) != new["inputs"][t]:
            out.append(f"its input '{t}' is rebuilt" if t in recomputed else f"its input '{t}' changed")
    return out
