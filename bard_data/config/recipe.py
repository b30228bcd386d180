"""Recipes: one YAML file describes one dataset build, validated into typed objects.

Relative paths in a recipe (sources, references, local models, the run directory) are resolved
against the folder of the recipe file, so a recipe means the same thing from any working
directory, and must stay inside that folder; a path that reaches outside is written absolute,
with ``~`` or from ``${recipe_dir}`` (see ``config.safety``). A string that is not a relative or
absolute path (``org/name``) is a Hub id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from bard_data.config.base import Strict, looks_like_path
from bard_data.config.budget import BalanceConfig, BudgetConfig
from bard_data.config.executor import ExecutorConfig
from bard_data.config.safety import expand_recipe_dir, path_problem, recipe_paths
from bard_data.config.sources import DecontamConfig, ProblemSource, TraceSource
from bard_data.config.stages import CompressionConfig, FormatConfig, JudgeConfig, StudentConfig, TeacherConfig
from bard_data.errors import RecipeError

# Where a build runs and where its completions are cached cannot change what it produces.
NOT_IN_HASH = ("executor", "cache_dir")


class Recipe(Strict):
    name: str
    description: str = ""
    run_dir: str
    cache_dir: Optional[str] = Field(None, description="the completion cache's folder, shareable by several runs "
                                     "(default: RUN_DIR/cache); not part of any fingerprint")
    seed: int = 0
    shard_size: int = Field(32, gt=0, description="rows per shard of an LLM stage")
    license: str = "other"
    student: StudentConfig
    sources: list[ProblemSource] = Field(default_factory=list, description="problem sets (or traces with problems_from)")
    teacher: Optional[TeacherConfig] = None
    traces: list[TraceSource] = Field(default_factory=list, description="imported teacher traces")
    decontamination: Optional[DecontamConfig] = None
    compression: Optional[CompressionConfig] = None
    judge: Optional[JudgeConfig] = None
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    balance: BalanceConfig = Field(default_factory=BalanceConfig)
    format: FormatConfig = Field(default_factory=FormatConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description="where LLM shards run (not in the hash)")

    # Resolved at load time, not part of the YAML.
    base_dir: str = Field("", exclude=True)
    source_file: str = Field("", exclude=True)

    @field_validator("sources", "traces")
    @classmethod
    def _unique_names(cls, v: list, info):
        names = [s.name for s in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            what = "source" if info.field_name == "sources" else "trace source"
            raise ValueError(f"{what} names must be unique; repeated: {sorted(dup)}")
        return v

    @model_validator(mode="after")
    def _some_problems(self) -> "Recipe":
        own = [t.name for t in self.traces if t.problems_from]
        if not self.sources and not own:
            raise ValueError("no problems: list `sources`, or set `problems_from: true` on a trace source")
        clash = sorted({s.name for s in self.sources} & set(own))
        if clash:
            raise ValueError(f"a source and a trace source with problems_from share the name(s) {clash}: problems "
                             "carry their source's name, so rename one")
        return self

    def resolve(self, p: str, force: bool = False) -> str:
        """A recipe path made absolute against the recipe's folder; Hub ids pass through."""
        if not force and not looks_like_path(p):
            return p
        path = Path(expand_recipe_dir(p, self.base_dir)).expanduser()
        if not path.is_absolute():
            path = Path(self.base_dir) / path
        return str(path.resolve())

    def resolved_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """Hash of what the build produces; where it runs (the executor) is left out, so a run
        started locally can resume on a Ray cluster and the other way round."""
        data = self.resolved_dict()
        for key in NOT_IN_HASH:
            data.pop(key, None)
        blob = json.dumps(data, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _format_loc(loc: tuple) -> str:
    parts: list[str] = []
    for x in loc:
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif x in ("transformers", "vllm", "openai") and parts:
            continue  # discriminated-union tag, noise in a path the user wrote
        else:
            parts.append(("." if parts else "") + str(x))
    return "".join(parts) or "(top level)"


def format_validation_error(source: str, exc: ValidationError) -> str:
    errs = exc.errors()
    first = errs[0]
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "missing required key"
    elif first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    inp = first.get("input")
    shown = "" if first["type"] in ("missing", "extra_forbidden") or isinstance(inp, (dict, list)) else f" (got {inp!r})"
    more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
    return f"{source}: {_format_loc(first['loc'])}: {msg}{shown}{more}"


def parse_recipe(data: Any, source: str = "<recipe>", base_dir: str | Path = ".") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(source, exc)) from None
    recipe.base_dir = str(Path(base_dir).resolve())
    recipe.source_file = source
    _check_paths(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{path}{where}: malformed YAML: {problem}") from None
    _check_size(data, path)
    if isinstance(data, dict) and overrides:
        data = {**data, **overrides}
    return parse_recipe(data, str(path), path.parent)


# YAML anchors and aliases can make a small file a huge value (each alias level multiplies it):
# a recipe holds a few hundred values; this many is an attack or an accident.
MAX_RECIPE_NODES = 100_000


def _check_size(data: Any, path: Path) -> None:
    seen = 0
    stack = [data]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_RECIPE_NODES:
            raise RecipeError(f"{path}: the recipe expands to more than {MAX_RECIPE_NODES} values (YAML aliases?)")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _check_paths(recipe: Recipe) -> None:
    src = recipe.source_file
    for key, value, _ in recipe_paths(recipe):
        problem = path_problem(value, recipe.base_dir)
        if problem:
            raise RecipeError(f"{src}: {key}: {problem}")
    for i, s in enumerate(recipe.sources):
        if s.format == "hub" or (s.format == "auto" and not looks_like_path(s.path)):
            continue
        if not Path(recipe.resolve(s.path, force=True)).exists():
            raise RecipeError(f"{src}: sources[{i}].path: file not found: {recipe.resolve(s.path, force=True)}")
    models = [("student.tokenizer", recipe.student.tokenizer)]
    if recipe.teacher:
        models.append(("teacher.backend.model", recipe.teacher.backend.model))
    for section in ("compression", "judge"):
        cfg = getattr(recipe, section)
        if cfg is not None and getattr(cfg, "backend", None) is not None:
            models.append((f"{section}.backend.model", cfg.backend.model))
    for key, m in models:
        if looks_like_path(m) and not Path(recipe.resolve(m)).exists():
            raise RecipeError(f"{src}: {key}: model folder not found: {recipe.resolve(m)}")
    for i, t in enumerate(recipe.traces):
        p = getattr(t, "path", None)
        fmt = getattr(t, "format", "auto")
        if p and fmt != "hub" and looks_like_path(p) and not Path(recipe.resolve(p)).exists():
            raise RecipeError(f"{src}: traces[{i}].path: file not found: {recipe.resolve(p)}")
    dec = recipe.decontamination
    if dec is not None:
        for i, r in enumerate(getattr(dec, "references", [])):
            if not Path(recipe.resolve(r.path)).exists():
                raise RecipeError(f"{src}: decontamination.references[{i}].path: file not found: {recipe.resolve(r.path)}")
