"""The dataset card (README.md): YAML metadata, then the card template rendered with the run's
sanitized manifest and the report over the exported data (every number in it comes from there)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import polars as pl

from bard_data.errors import PublishError
from bard_data.report.catalog import shipped_queries
from bard_data.text.templates import SandboxEnvironment, template_error, unsafe_reference

__all__ = ["CONFIG_DESCRIPTIONS", "RUN_ONLY_PARTS", "render_card", "card_metadata", "md_table", "default_template_path"]

CONFIG_DESCRIPTIONS = {
    "sft": "SFT rows in TRL's conversational format (`messages`); `kind` is `budget` (a compressed chain "
           "with its budget stated in the prompt) or `standard` (a full gold chain, no budget).",
    "rl": "GRPO prompts (`prompt` messages with a budget), the gold `solution`, the teacher pass rate "
          "as `difficulty`.",
    "compressions": "Every compression of every gold chain to every budget, with its token count, ratio, "
                    "deviation from the budget and whether it kept the gold answer (before filtering).",
    "judgments": "The logical-completeness judge's verdict, score and missing steps per compression.",
    "gold_chains": "The verified-correct teacher chains the compressions start from, with per-problem "
                   "pass rates.",
    "funnel": "Rows in, out and dropped by reason for every stage of the build.",
}
# Report parts that need tables a push does not publish: taken from the report on the run.
RUN_ONLY_PARTS = ("teacher_pass_rate",)
PLOT_AFTER = {
    "budget_histogram": ["budget_histogram"],
    "compression_by_bin": ["ratio_vs_budget", "deviation_vs_budget"],
}

def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                         (1_000_000_000, "100M<n<1B")):
        if n < limit:
            return label
    return "n>1T" if n > 1_000_000_000_000 else "1B<n<10B"


# -- the card ----------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "NaN"
        return f"{v:.4f}"
    if isinstance(v, (list, dict)):
        v = json.dumps(v, ensure_ascii=False)
    s = str(v).replace("\n", " ").replace("|", "\\|")
    return s


def md_table(df: pl.DataFrame, columns: Optional[list[str]] = None) -> str:
    """A GitHub-markdown table; floats with 4 decimals, nulls empty."""
    cols = columns or df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for row in df.select(cols).iter_rows():
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def default_template_path() -> Path:
    return Path(str(resources.files("bard_data.report") / "card" / "README.md.j2"))


def _yaml_metadata(meta: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000).strip()


def card_metadata(info: dict[str, Any], configs: dict[str, list[dict[str, Any]]], sizes: pl.DataFrame) -> dict[str, Any]:
    rows = max((int(r) for r in sizes["rows"].to_list()), default=0) if sizes is not None and sizes.height else 0
    cfgs = []
    for i, (name, files) in enumerate(configs.items()):
        entry: dict[str, Any] = {"config_name": name}
        if i == 0:
            entry["default"] = True
        entry["data_files"] = [{"split": f["split"], "path": f"{name}/{f['split']}-*.parquet"} for f in files]
        cfgs.append(entry)
    return {
        "license": str(info.get("license") or "other"),
        "pretty_name": f"{info.get('name') or 'BARD'} (budget-aware reasoning distillation data)",
        "task_categories": ["text-generation"],
        "tags": ["reasoning", "distillation", "budget-aware", "bard"],
        "size_categories": [_size_category(rows)],
        "configs": cfgs,
    }


def _stage_settings(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Per LLM stage: model, sampling parameters, seed, prompts (for the card's 'how it was built')."""
    out = []
    for stage in ("teacher", "compression", "judge"):
        cfg = recipe.get(stage)
        if not isinstance(cfg, dict):
            continue
        backend = cfg.get("backend") or {}
        extra = {}
        for k in ("samples_per_problem", "gold_policy", "max_reasoning_tokens", "max_retries",
                  "budgets", "min_score", "require_complete", "only_answer_preserved", "structured_output"):
            if k in cfg:
                extra[k] = cfg[k]
        out.append({
            "stage": stage, "model": backend.get("model"), "backend": backend.get("kind"),
            "sampling": cfg.get("sampling") or {}, "seed": cfg.get("seed"), "settings": extra,
            "system_prompt": cfg.get("system_prompt"), "prompt_template": cfg.get("prompt_template"),
        })
    return out


def render_card(info: dict[str, Any], rep: dict[str, pl.DataFrame], configs: dict[str, list[dict[str, Any]]],
                plots: dict[str, str], repo_id: Optional[str] = None, template: Optional[str | Path] = None,
                run_only: tuple[str, ...] = RUN_ONLY_PARTS) -> str:
    """The README.md text: YAML metadata, then the template rendered with the report."""
    import jinja2

    path = Path(template) if template else default_template_path()
    if not path.is_file():
        raise PublishError(f"{path}: card template not found")
    # The sandbox every template gets (text.templates): a card template is as much data as a prompt.
    # The loader serves only files beside the template (jinja2 refuses '..' in template names).
    env = SandboxEnvironment(loader=jinja2.FileSystemLoader(str(path.parent)), undefined=jinja2.StrictUndefined,
                             autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["table"] = md_table
    env.filters["fmt"] = _fmt
    env.filters["raw"] = lambda v: "" if v is None else (json.dumps(v) if isinstance(v, (bool, list, dict)) else str(v))
    env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False, sort_keys=True)
    queries = {q.name: q for q in shipped_queries()}
    recipe = info.get("recipe") or {}
    sizes = rep.get("sizes", pl.DataFrame({"table": [], "rows": []}, schema={"table": pl.Utf8, "rows": pl.Int64}))
    size_of = dict(zip(sizes["table"].to_list(), sizes["rows"].to_list())) if sizes.height else {}
    meta = card_metadata(info, configs, sizes)
    parts = [{"name": n, "title": queries[n].title if n in queries else n, "notes": queries[n].notes if n in queries else "",
              "df": df, "run_only": n in run_only, "plots": [(p, plots[p]) for p in PLOT_AFTER.get(n, []) if p in plots]}
             for n, df in rep.items() if n != "sizes" and df.height]
    ctx = {
        "metadata": _yaml_metadata(meta),
        "meta": meta,
        "name": info.get("name") or "bard",
        "description": recipe.get("description") or info.get("description") or "",
        "repo_id": repo_id or f"YOUR_NAMESPACE/{info.get('name') or 'bard-data'}",
        "recipe_hash": info.get("recipe_hash") or "",
        "recipe": recipe,
        "license": meta["license"],
        "models": info.get("models") or {},
        "versions": info.get("versions") or {},
        "seeds": info.get("seeds") or {},
        "stages": _stage_settings(recipe),
        "format": recipe.get("format") or {},
        "budget": recipe.get("budget") or {},
        "balance": recipe.get("balance") or {},
        "student": recipe.get("student") or {},
        "sources": recipe.get("sources") or [],
        "traces": recipe.get("traces") or [],
        "configs": [{"name": c, "files": files, "splits": [f["split"] for f in files],
                     "rows": size_of.get(c, sum(f["rows"] for f in files)),
                     "description": CONFIG_DESCRIPTIONS.get(c, "")} for c, files in configs.items()],
        "parts": parts,
        "report": rep,
        "plots": plots,
        "complete": info.get("complete"),
    }
    try:
        tpl = env.get_template(path.name)
        bad = unsafe_reference(path.read_text(encoding="utf-8"))
        if bad:
            raise PublishError(f"{path}: card template error: {bad}")
        body = tpl.render(**ctx)
    except PublishError:
        raise
    except Exception as exc:  # noqa: BLE001 - SecurityError, undefined names, errors the template raised
        raise PublishError(f"{path}: card template error: {template_error(exc)}") from None
    return body
