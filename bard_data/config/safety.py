"""What a recipe may reach: its paths, and the settings that make the process run someone's code or
send a key somewhere. Recipes are shared and run by people who did not write them.

Paths. A relative path resolves against the recipe's folder and must stay inside it: ``..``
that climbs out, or a symlink inside the folder that leads out, is a recipe error naming the key.
A path that means to reach outside says so where a reader sees it: it is absolute, starts with
``~``, or starts with ``${recipe_dir}`` (the recipe's folder: ``${recipe_dir}/../data/x.jsonl``).
No other ``${...}`` is expanded.

Trust. ``trust_remote_code`` (off unless a recipe sets it), vLLM ``engine_kwargs``, the API-key
variable and server of every OpenAI-compatible backend, and a Ray cluster address are printed when
a run starts (:func:`trust_notes`). Engine and Ray settings that name Python code to import or
install, and an API key taken from the Hugging Face token variables, are refused outright.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from bard_data.config.base import looks_like_path

if TYPE_CHECKING:  # pragma: no cover
    from bard_data.config.recipe import Recipe

__all__ = ["RECIPE_DIR", "expand_recipe_dir", "recipe_paths", "path_problem", "trust_notes", "engine_kwargs_problem",
           "ray_init_kwargs_problem", "HUB_TOKEN_VARS"]

RECIPE_DIR = "${recipe_dir}"
_VAR = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_]\w*")

# The Hugging Face token: read by huggingface_hub for the Hub only, never sent elsewhere.
HUB_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")


def expand_recipe_dir(p: str, base_dir: str) -> str:
    if p == RECIPE_DIR or p.startswith(RECIPE_DIR + "/"):
        return base_dir + p[len(RECIPE_DIR):]
    return p


def recipe_paths(recipe: "Recipe") -> Iterator[tuple[str, str, bool]]:
    """Every local path a recipe names, as (key, value as written, must_exist). Hub ids and
    served model names are not paths and are left out."""
    yield "run_dir", recipe.run_dir, False
    for i, s in enumerate(recipe.sources):
        if s.format in ("jsonl", "parquet", "datasets") or (s.format == "auto" and looks_like_path(s.path)):
            yield f"sources[{i}].path", s.path, True
    for i, t in enumerate(recipe.traces):
        if t.format in ("jsonl", "parquet", "datasets") or (t.format == "auto" and looks_like_path(t.path)):
            yield f"traces[{i}].path", t.path, True
    if recipe.decontamination is not None:
        for i, r in enumerate(recipe.decontamination.references):
            yield f"decontamination.references[{i}].path", r.path, True
    if looks_like_path(recipe.student.tokenizer):
        yield "student.tokenizer", recipe.student.tokenizer, True
    for section in ("teacher", "compression", "judge"):
        cfg = getattr(recipe, section)
        backend = getattr(cfg, "backend", None)
        if backend is not None and backend.kind != "openai" and looks_like_path(backend.model):
            yield f"{section}.backend.model", backend.model, True


def _written_outside(p: str) -> bool:
    """Written so a reader sees it may leave the recipe's folder: absolute, ``~`` or ``${recipe_dir}``."""
    return p.startswith(("/", "~", RECIPE_DIR)) or bool(re.match(r"^[A-Za-z]:[\\/]", p))


def path_problem(p: str, base_dir: str) -> str | None:
    """Why a recipe path breaks the rule, or None."""
    other = [v for v in _VAR.findall(p) if v != RECIPE_DIR]
    if other or (RECIPE_DIR in p and not (p == RECIPE_DIR or p.startswith(RECIPE_DIR + "/"))):
        what = other[0] if other else RECIPE_DIR
        return (f"{what!s} is not expanded in a recipe path; only a leading {RECIPE_DIR} (the recipe's folder) is, "
                "so write an absolute path or one relative to the recipe")
    if _written_outside(p):
        return None
    base = Path(base_dir).resolve()
    target = Path(base_dir, p).expanduser().resolve()
    if target == base or base in target.parents:
        return None
    lexical = Path(os.path.normpath(base / p))
    how = "through a symlink" if lexical == base or base in lexical.parents else "with '..'"
    return (f"{p!r} leads out of the recipe's folder {how} (to {target}); a relative path must stay inside "
            f"{base}: write it absolute ({target}) or as '{RECIPE_DIR}/{p}' if it is meant to be relative to "
            "the recipe")


# -- trust -------------------------------------------------------------------------------------------


# vLLM engine arguments that name Python code for vLLM to import or run, or switch on remote code.
_ENGINE_CODE_SUFFIXES = ("_cls", "_class", "_plugin", "_module_path", "_qualname")
_ENGINE_CODE_KEYS = {"trust_remote_code", "logits_processors", "model_class_overrides", "hf_overrides"}
_KNOWN_EXECUTOR_BACKENDS = {"ray", "mp", "uni", "external_launcher"}


def engine_kwargs_problem(kwargs: Any, prefix: str = "") -> str | None:
    """Why vLLM engine arguments may not come from a recipe (the key relative to engine_kwargs), or None."""
    if not isinstance(kwargs, dict):
        return None
    for k, v in kwargs.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        name = str(k)
        if name == "trust_remote_code":
            return f"{key}: set the backend's own trust_remote_code instead (it is printed when a run starts)"
        if name in _ENGINE_CODE_KEYS or name.endswith(_ENGINE_CODE_SUFFIXES):
            return f"{key}: names Python code for vLLM to import or run; not allowed in a recipe"
        if name == "distributed_executor_backend" and v not in _KNOWN_EXECUTOR_BACKENDS:
            return f"{key}: only {sorted(_KNOWN_EXECUTOR_BACKENDS)} in a recipe (a class path imports code)"
        if (name == "backend" or name.endswith("_backend")) and isinstance(v, str) and "." in v:
            return f"{key}: {v!r} looks like a Python path for vLLM to import; not allowed in a recipe"
        if isinstance(v, dict):
            inner = engine_kwargs_problem(v, key)
            if inner:
                return inner
    return None


# ray.init arguments a recipe may not set: they install or run code (runtime_env: pip packages,
# working_dir, setup hooks), or expose the cluster (dashboard_host).
_RAY_REFUSED = {"runtime_env", "job_config", "dashboard_host"}


def ray_init_kwargs_problem(kwargs: dict[str, Any]) -> str | None:
    for k in kwargs:
        if k in _RAY_REFUSED or str(k).startswith("_"):
            return (f"{k}: not allowed in a recipe (it can install or run code, or open the cluster); "
                    "set it where you start the cluster (ray start)")
    return None


def trust_notes(recipe: "Recipe") -> list[str]:
    """One line each for what a user must trust to run this recipe (printed when a run starts)."""
    notes = []
    if recipe.student.trust_remote_code:
        notes.append(f"student.trust_remote_code is on: Python code in the tokenizer folder "
                     f"({recipe.student.tokenizer}) runs in this process")
    for section in ("teacher", "compression", "judge"):
        cfg = getattr(recipe, section)
        if cfg is None or getattr(cfg, "enabled", True) is False:
            continue
        b = cfg.backend
        if getattr(b, "trust_remote_code", False):
            notes.append(f"{section}.backend.trust_remote_code is on: Python code in the model folder ({b.model}) "
                         "runs in this process")
        if b.kind == "vllm" and b.engine_kwargs:
            notes.append(f"{section}.backend.engine_kwargs go to vllm.LLM as written: {', '.join(sorted(b.engine_kwargs))}")
        if b.kind == "openai":
            notes.append(f"{section}.backend sends ${b.api_key_env} (when set) as its API key to {b.base_url}")
    ex = recipe.executor
    if ex.kind == "ray":
        where = f"the Ray cluster at {ex.address}" if ex.address else "a Ray cluster started here"
        notes.append(f"executor: LLM shards run on {where}, which runs this build's code and sends results back "
                     "(join only clusters you run)")
    return notes
