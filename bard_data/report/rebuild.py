"""``bard-data recipe``: the recipe a published dataset was built with, as YAML to run again.

A dataset exported or pushed by bard_data carries its resolved recipe in ``bard_run.json``
(sanitized: secret-looking keys dropped, local absolute paths shortened to their last two parts,
the run directory left out). :func:`rebuild_recipe` turns that back into a recipe:

- the run directory becomes ``runs/<name>`` beside the written recipe (a new run);
- the executor is left out (where a build runs is the user's choice; it changes no output);
- every local path the build read (``local_paths`` in ``bard_run.json``; for older exports, any
  path-looking value) stays as published, written so it is read as a local path, and each one
  that does not exist here, relative to the written recipe, is listed with its key for the user
  to point at their copy; ``bard-data run`` refuses the recipe until they exist.

Running the result gives the same tables when the models, sources, seeds and package versions
are the same (``bard_run.json`` records them); the completion cache of the original run, copied
into the new run directory, makes the rerun send no request at all.

The source is a dataset folder (an export, or a download of a pushed dataset), a run directory,
or a Hub dataset id (``bard_run.json`` fetched with ``huggingface_hub.hf_hub_download``, with
the user's own Hub login, from ``HF_ENDPOINT``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from bard_data.config.base import looks_like_path
from bard_data.config.recipe import Recipe, format_validation_error
from bard_data.config.safety import path_problem, recipe_paths, trust_notes
from bard_data.errors import BardError
from bard_data.pipeline import manifest as mf
from bard_data.report.published import EXPORT_MARKER

__all__ = ["RebuiltRecipe", "rebuild_recipe", "local_path_keys", "recipe_cli"]


@dataclass
class RebuiltRecipe:
    recipe: dict[str, Any]
    source: str  # where the recipe was read
    recipe_hash: str
    missing: list[tuple[str, str, str]] = field(default_factory=list)  # (key, value, why)
    notes: list[str] = field(default_factory=list)  # trust notes of the recipe
    yaml_text: str = ""


def local_path_keys(recipe: dict[str, Any]) -> list[str]:
    """The keys of a resolved recipe (a manifest's) that name local files or folders (the run
    directory aside), for ``bard_run.json``: which published values were local paths."""
    try:
        r = Recipe.model_validate(recipe)
    except ValidationError:
        return []
    return [key for key, _, _ in recipe_paths(r) if key != "run_dir"]


_KEY_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parts(key: str) -> list:
    return [int(i) if i else name for name, i in _KEY_PART.findall(key)]


def _get(d: Any, key: str) -> Any:
    for p in _parts(key):
        try:
            d = d[p]
        except (KeyError, IndexError, TypeError):
            return None
    return d


def _set(d: Any, key: str, value: Any) -> None:
    parts = _parts(key)
    for p in parts[:-1]:
        d = d[p]
    d[parts[-1]] = value


def _read_info(name_or_path: str, revision: Optional[str]) -> tuple[dict[str, Any], str, bool]:
    """(info, source, from_run): ``bard_run.json`` of a dataset folder or the Hub, or a run's manifest."""
    p = Path(os.path.expanduser(name_or_path))
    if p.exists():
        folder = p if p.is_dir() else p.parent
        if (folder / EXPORT_MARKER).is_file():
            src = folder / EXPORT_MARKER
            try:
                info = json.loads(src.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise BardError(f"{src}: not valid JSON") from None
            return (info if isinstance(info, dict) else {}), str(src), False
        if mf.exists(folder):
            return mf.read_manifest(folder), str(mf.path(folder)), True
        raise BardError(f"{p}: neither a dataset folder with {EXPORT_MARKER} nor a run directory")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name_or_path):
        raise BardError(f"{name_or_path}: no such folder, and not a Hub dataset id (namespace/name)")
    try:
        from huggingface_hub import hf_hub_download

        # HF_ENDPOINT read now (as push does), not when huggingface_hub was imported; the token is
        # huggingface_hub's own (HF_TOKEN or the saved login), sent to that endpoint only.
        endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
        local = hf_hub_download(name_or_path, EXPORT_MARKER, repo_type="dataset", revision=revision, endpoint=endpoint)
    except Exception as exc:  # noqa: BLE001 - every Hub failure is one line
        detail = " ".join(str(exc).split())[:300]
        raise BardError(f"{name_or_path}: cannot download {EXPORT_MARKER} from the Hub: "
                        f"{type(exc).__name__}: {detail}") from None
    try:
        info = json.loads(Path(local).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise BardError(f"{name_or_path}/{EXPORT_MARKER}: not valid JSON") from None
    return (info if isinstance(info, dict) else {}), f"{name_or_path}/{EXPORT_MARKER}", False


def rebuild_recipe(name_or_path: str, out_dir: str | Path = ".", revision: Optional[str] = None) -> RebuiltRecipe:
    """The recipe ``name_or_path`` was built with, for a recipe file written in ``out_dir``."""
    info, source, from_run = _read_info(name_or_path, revision)
    recipe = info.get("recipe")
    if not isinstance(recipe, dict) or not recipe:
        raise BardError(f"{source}: holds no recipe (not built by bard_data, or by a version that did not record it)")
    recipe = json.loads(json.dumps(recipe))  # a copy
    name = str(recipe.get("name") or "rebuilt")
    recipe.pop("executor", None)
    recipe["run_dir"] = f"runs/{re.sub(r'[^A-Za-z0-9_.-]+', '-', name).strip('-.') or 'rebuilt'}"
    keys = info.get("local_paths")
    if not isinstance(keys, list):  # a run's manifest, or an older export: the path-looking keys
        keys = local_path_keys({**recipe})
    for key in keys:
        v = _get(recipe, key)
        # A local path shortened on publish ("models/tiny") would read as a Hub id: keep it local.
        if isinstance(v, str) and not looks_like_path(v) and not from_run:
            _set(recipe, key, f"./{v}")
    out_dir = Path(out_dir).resolve()
    res = RebuiltRecipe(recipe=recipe, source=source, recipe_hash=str(info.get("recipe_hash") or ""))
    try:
        r = Recipe.model_validate(recipe)
    except ValidationError as exc:
        raise BardError(format_validation_error(source, exc)) from None
    r.base_dir = str(out_dir)
    for key, value, must_exist in recipe_paths(r):
        if key == "run_dir":
            continue
        problem = path_problem(value, str(out_dir))
        if problem:
            res.missing.append((key, value, problem))
        elif must_exist and not Path(r.resolve(value, force=True)).exists():
            res.missing.append((key, value, f"not found here ({r.resolve(value, force=True)})"))
    res.notes = trust_notes(r)
    res.yaml_text = _yaml(res, info)
    return res


def _yaml(res: RebuiltRecipe, info: dict[str, Any]) -> str:
    versions = info.get("versions") or {}
    head = [f"# The recipe of {res.source}"
            + (f" (recipe hash {res.recipe_hash}" + (f", bard_data {versions['bard_data']}" if versions.get("bard_data")
                                                     else "") + ")" if res.recipe_hash else ""),
            "# written by `bard-data recipe`; run it with `bard-data run THIS_FILE`.",
            "# run_dir is a new run directory beside this file; the executor is left out (local)."]
    if res.missing:
        head.append("# Paths to point at your copies (the published recipe names them; they are not here):")
        head += [f"#   {key}: {value}" for key, value, _ in res.missing]
    body = yaml.safe_dump(res.recipe, sort_keys=False, allow_unicode=True, width=100)
    return "\n".join(head) + "\n" + body


def recipe_cli(args) -> int:
    out = getattr(args, "out", None)
    out_path = Path(out).expanduser() if out else None
    if out_path is not None and out_path.exists() and not getattr(args, "force", False):
        raise BardError(f"{out_path}: exists; choose another file or pass --force")
    res = rebuild_recipe(args.dataset, out_path.parent if out_path else ".", revision=getattr(args, "revision", None))
    if out_path is None:
        sys.stdout.write(res.yaml_text)
        say = sys.stderr
        target = "it"
    else:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(res.yaml_text, encoding="utf-8")
        say = sys.stdout
        target = str(out_path)
        print(f"wrote the recipe of {res.source} to {out_path}", file=say)
    for note in res.notes:
        print(f"  note: {note}", file=say)
    if res.missing:
        print(f"{len(res.missing)} path(s) the build read are not on this machine; point each at your copy in "
              f"{target}, then run it:", file=say)
        for key, value, why in res.missing:
            print(f"  {key}: {value}: {why}", file=say)
    cmd = f"bard-data run {out_path}" if out_path else "bard-data run RECIPE.yaml"
    print(f"{'then' if res.missing else 'rebuild with'}: {cmd}", file=say)
    return 0
