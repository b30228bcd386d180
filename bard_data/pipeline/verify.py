"""``bard-data verify RUN_DIR``: recompute a random sample of a finished run's LLM rows and say
whether they match.

Rows (always, no request sent): for each LLM stage built under the run's recipe, a seeded random
sample of its rows is recomputed by the stage itself (``process_shard`` on the input rows that
produced them) with every completion served from the completion cache by its key, and compared
with the stored rows column by column. A mismatch means the stored table is not what the recipe,
the cache and this bard_data give (edited files, a changed code path, a damaged cache); a row
whose completion is not in the cache cannot be recomputed and is reported as such.

Requests (``resample``, never by default): up to N of the cached requests behind the sampled rows
are sent again to the stage's backend (one batch per stage: a vLLM engine starts, a server is
called) and the texts compared with the cached ones. Texts that differ mean the backend does not
reproduce its samples with these settings (no per-request seeds, a server that ignores ``seed``,
logits that depend on the batch): the stage is then recorded ``reproducible: false`` in the
manifest (``bard_data.llm.repro.with_verification``).

Results are appended to the manifest (``verifications``) unless a run holds the directory.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import polars as pl

from bard_data.config import Recipe, parse_recipe
from bard_data.errors import BardError
from bard_data.llm import make_backend
from bard_data.llm.base import ChatRequest, Completion, SamplingConfig, request_key
from bard_data.llm.repro import with_verification
from bard_data.pipeline import manifest as mf
from bard_data.pipeline.context import RunContext
from bard_data.pipeline.lock import RunLock
from bard_data.pipeline.stage import ShardedStage, Stage
from bard_data.pipeline.store import ArtifactStore

# The input columns that identify an output row of each LLM stage (they are carried into the row).
ROW_KEYS: dict[str, tuple[str, ...]] = {
    "teacher_samples": ("problem_id", "sample_index"),
    "compressions": ("sample_id", "budget_rank"),
    "judgments": ("compression_id",),
}
NOT_CACHED = "not in the completion cache"


@dataclass
class _Recorded:
    request: ChatRequest
    sampling: SamplingConfig
    seed: int
    text: str


@dataclass
class CacheOnlyLLM:
    """What a stage sees as its LLM during verification: completions from the cache by key,
    never a request; a miss is an error completion. Records the requests it served."""

    model: str
    cache: Any
    served: list[_Recorded] = field(default_factory=list)
    misses: int = 0

    def generate(self, requests: list[ChatRequest], sampling: SamplingConfig, seed: int = 0) -> list[Completion]:
        keys = [request_key(self.model, r, sampling, seed) for r in requests]
        found = self.cache.get_many(keys)
        out = []
        for r, k in zip(requests, keys):
            c = found.get(k)
            if c is None:
                self.misses += 1
                out.append(Completion(text="", finish_reason="error", error=NOT_CACHED))
            else:
                c.cached = True
                self.served.append(_Recorded(r, sampling, seed, c.text))
                out.append(c)
        return out

    def close(self) -> None:
        pass


class _VerifyContext(RunContext):
    """A run context whose LLM is the cache, for the stage being checked."""

    current: Optional[CacheOnlyLLM] = None

    def llm(self, stage_cfg):  # type: ignore[override]
        if self.current is None or self.current.model != stage_cfg.backend.model:
            self.current = CacheOnlyLLM(stage_cfg.backend.model, self.cache)
        return self.current


def load_run_recipe(run_dir: Path, m: dict[str, Any]) -> Recipe:
    """The recipe the run was last built from, as its manifest records it (paths resolved
    against the recipe's folder, as when it ran)."""
    if not m.get("recipe"):
        raise BardError(f"{run_dir}: not a run directory (no manifest.json with a recipe)")
    source = m.get("recipe_file") or "<manifest>"
    base = m.get("recipe_dir") or str(Path(source).resolve().parent)
    return parse_recipe(m["recipe"], source, base)


def _norm(v: Any) -> str:
    if isinstance(v, pl.Series):
        v = v.to_list()
    return json.dumps(v, default=str, sort_keys=True)


def _rows_by_key(df: pl.DataFrame, key: Sequence[str]) -> dict[str, dict]:
    return {_norm([r[c] for c in key]): r for r in df.iter_rows(named=True)}


def _stage_config(recipe: Recipe, table: str):
    for section, t in mf.LLM_STAGES.items():
        if t == table:
            return getattr(recipe, section, None)
    return None


def check_rows(ctx: _VerifyContext, stage: ShardedStage, stored: pl.DataFrame, n: int,
               rng: random.Random) -> dict[str, Any]:
    """Recompute ``n`` random rows of ``stored`` (the stage's table) from the cache."""
    key = ROW_KEYS[stage.name]
    picks = sorted(rng.sample(range(stored.height), min(n, stored.height)))
    sample = stored[picks]
    inputs = stage.inputs(ctx)
    todo = inputs.join(sample.select(key).unique(), on=list(key), how="semi")
    ctx.current = None
    res = stage.process_shard(ctx, todo, 0) if todo.height else None
    llm = ctx.current
    produced = _rows_by_key(res.kept, key) if res is not None else {}
    out: dict[str, Any] = {"rows_checked": sample.height, "rows_matched": 0, "rows_differ": 0,
                           "not_cached": llm.misses if llm else 0, "examples": []}
    for k, row in _rows_by_key(sample, key).items():
        got = produced.get(k)
        if got is None:
            out["rows_differ"] += 1
            why = "not recomputed (its completion is not in the cache)" if llm and llm.misses else "not recomputed"
            out["examples"].append({"key": json.loads(k), "why": why})
            continue
        cols = [c for c in stored.columns if _norm(row.get(c)) != _norm(got.get(c))]
        if cols:
            out["rows_differ"] += 1
            out["examples"].append({"key": json.loads(k), "why": f"columns differ: {', '.join(cols)}"})
        else:
            out["rows_matched"] += 1
    out["examples"] = out["examples"][:5]
    out["_served"] = llm.served if llm else []
    return out


def resample(recipe: Recipe, table: str, served: list[_Recorded], n: int, rng: random.Random,
             backends: dict[str, Any]) -> dict[str, Any]:
    """Send ``n`` of the ``served`` requests again (one batch) and compare the texts."""
    cfg = _stage_config(recipe, table)
    picks = rng.sample(served, min(n, len(served)))
    out: dict[str, Any] = {"resampled": len(picks), "texts_matched": 0, "resample_errors": 0, "text_examples": []}
    if not picks:
        return out
    bkey = cfg.backend.model_dump_json()
    if bkey not in backends:
        for k in list(backends):  # one engine at a time (vLLM holds the accelerator)
            backends.pop(k).close()
        backends[bkey] = make_backend(cfg.backend, resolve=recipe.resolve)
    backend = backends[bkey]
    groups: dict[tuple, list[_Recorded]] = {}
    for p in picks:  # a stage uses one sampling and seed; grouped anyway
        groups.setdefault((p.sampling.model_dump_json(), p.seed), []).append(p)
    for group in groups.values():
        fresh = backend.generate([p.request for p in group], group[0].sampling, group[0].seed)
        for p, c in zip(group, fresh):
            if not c.ok:
                out["resample_errors"] += 1
                out["text_examples"].append({"why": f"error: {c.error}"})
            elif c.text == p.text:
                out["texts_matched"] += 1
            else:
                at = next((i for i, (a, b) in enumerate(zip(c.text, p.text)) if a != b), min(len(c.text), len(p.text)))
                out["text_examples"].append({"why": f"texts differ from character {at}", "cached": p.text[:80],
                                             "resent": c.text[:80]})
    out["text_examples"] = out["text_examples"][:5]
    return out


def verify_run(run_dir: str | Path, stages: Sequence[Stage], sample: int = 5, resample_n: int = 0,
               seed: int = 0, record: bool = True, quiet: bool = True) -> dict[str, Any]:
    """Check a random sample of each LLM stage's rows (and with ``resample_n`` re-send requests);
    returns ``{"stages": {table: {...}}, ...}`` and appends it to the manifest's ``verifications``."""
    rd = Path(run_dir).resolve()
    if not mf.exists(rd):
        raise BardError(f"{rd}: not a run directory (no manifest.json)")
    m = mf.read_manifest(rd)
    recipe = load_run_recipe(rd, m)
    # The cache: the recipe's cache_dir as the run had it (--cache-dir included), else RUN_DIR/cache
    # (so a moved or copied run directory checks against its own cache).
    fps = m.get("fingerprints") or {}
    store = ArtifactStore(rd)
    ctx = _VerifyContext(recipe, rd, quiet=quiet)
    rng = random.Random(seed)
    report: dict[str, Any] = {"time": time.time(), "sample": sample, "resample": resample_n, "seed": seed,
                              "stages": {}}
    backends: dict[str, Any] = {}
    try:
        for stage in stages:
            if not isinstance(stage, ShardedStage) or stage.name not in ROW_KEYS or not stage.enabled(recipe):
                continue
            entry: dict[str, Any] = {"fingerprint": fps.get(stage.name)}
            if not store.is_built(stage.name) or store.done_info(stage.name).get("fingerprint") != fps.get(stage.name):
                entry["skipped"] = "not finished under the run's recipe"
                report["stages"][stage.name] = entry
                continue
            stored = store.read(stage.name)
            entry.update(check_rows(ctx, stage, stored, max(sample, resample_n), rng))
            served = entry.pop("_served")
            if resample_n:
                entry.update(resample(recipe, stage.name, served, resample_n, rng, backends))
            report["stages"][stage.name] = entry
    finally:
        for b in backends.values():
            b.close()
        ctx.close()
    report["reproducibility"] = {t: (m.get("reproducibility") or {}).get(t) for t in report["stages"]}
    report["ok"] = all(
        not e.get("rows_differ") and not e.get("not_cached")
        and e.get("texts_matched", 0) + e.get("resample_errors", 0) == e.get("resampled", 0)
        for e in report["stages"].values()
    )
    if record:
        report["recorded"] = _record(rd, report)
    return report


def _record(rd: Path, report: dict[str, Any]) -> bool:
    """Append the result to the manifest (and update the stages' reproducibility); not while a
    run holds the directory."""
    try:
        lock = RunLock(rd).acquire()
    except BardError:
        return False
    try:
        m = mf.read_manifest(rd)
        keep = ("fingerprint", "rows_checked", "rows_matched", "rows_differ", "not_cached", "resampled",
                "texts_matched", "resample_errors")
        rec = {"time": report["time"], "sample": report["sample"], "resample": report["resample"],
               "seed": report["seed"],
               "stages": {t: {k: e[k] for k in keep if k in e} for t, e in report["stages"].items() if "skipped" not in e}}
        m["verifications"] = list(m.get("verifications") or []) + [rec]
        repro = m.get("reproducibility") or {}
        for t, e in rec["stages"].items():
            if t in repro and e.get("fingerprint") == (m.get("fingerprints") or {}).get(t):
                repro[t] = with_verification(repro[t], {"time": rec["time"], **e})
        m["reproducibility"] = repro
        from bard_data.pipeline.store import atomic_write_json

        atomic_write_json(mf.path(rd), m)
        return True
    finally:
        lock.release()


def format_report(report: dict[str, Any]) -> str:
    """The per-stage table ``bard-data verify`` prints, and the examples of what differs."""
    head = ["stage", "rows", "matched", "differ", "not cached", "resent", "same text", "other text", "errors",
            "reproducible"]
    lines = []
    rows = []
    for t, e in report["stages"].items():
        repro = (report.get("reproducibility") or {}).get(t) or {}
        r = repro.get("reproducible")
        rtxt = {True: "true", False: "false"}.get(r, str(r) if r is not None else "?")
        if "skipped" in e:
            rows.append([t, "-", "-", "-", "-", "-", "-", "-", "-", f"skipped: {e['skipped']}"])
            continue
        res = e.get("resampled")
        other = (res - e.get("texts_matched", 0) - e.get("resample_errors", 0)) if res is not None else None
        rows.append([t, e["rows_checked"], e["rows_matched"], e["rows_differ"], e["not_cached"],
                     "-" if res is None else res, "-" if res is None else e["texts_matched"],
                     "-" if other is None else other, "-" if res is None else e["resample_errors"], rtxt])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) if i in (0, len(r) - 1) else str(x).rjust(w)  # noqa: E731
                              for i, (x, w) in enumerate(zip(r, widths))).rstrip()
    lines.append(fmt(head))
    lines += [fmt(r) for r in rows]
    for t, e in report["stages"].items():
        for ex in e.get("examples", []):
            lines.append(f"  {t} row {ex['key']}: {ex['why']}")
        for ex in e.get("text_examples", []):
            extra = f": cached {ex['cached']!r} / re-sent {ex['resent']!r}" if "cached" in ex else ""
            lines.append(f"  {t} re-sent request: {ex['why']}{extra}")
    verdict = "all sampled rows match" if report["ok"] else "MISMATCH"
    if report.get("resample"):
        verdict += " (re-sent requests included)" if report["ok"] else ""
    lines.append(verdict)
    if report.get("recorded") is False:
        lines.append("(not recorded in manifest.json: a run holds the directory)")
    return "\n".join(lines)
