"""Publish a run: the Hub layout (one dataset config per table, a rendered card, plots) and push.

``export(run_dir, out_dir)`` writes, locally::

    out_dir/
      README.md                                  the dataset card (YAML metadata + text)
      bard_run.json                              sanitized manifest: recipe, models, tokens, balance
      sft/train-00000-of-00001.parquet           one folder per config (table) ...
      rl/train-00000-of-00001.parquet            ... one file per split (the table's `split`
      rl/test-00000-of-00001.parquet                 column where it has one, else train)
      compressions/ judgments/ gold_chains/ funnel/
      assets/budget_histogram.png ratio_vs_budget.png deviation_vs_budget.png

The card's ``configs`` metadata maps every config to its files, so ``load_dataset(repo, "sft")``
works on the Hub and on the folder itself. Every statistic in the card is ``stats.report`` run on
the exported folder (the data being pushed); the teacher pass rates, whose samples are not
published, come from the same report on the run.

``push(run_dir, repo)`` exports to a temporary folder, creates the dataset repo and uploads the
folder in one commit. The token is huggingface_hub's own (``HF_TOKEN`` or the saved login, or the
``token`` argument); it is never written anywhere and is scrubbed from error messages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from bard_data.errors import PublishError
from bard_data.pipeline import manifest as mf
from bard_data.pipeline.store import ArtifactStore
from bard_data.report.card import RUN_ONLY_PARTS, render_card
from bard_data.report.catalog import PARTS
from bard_data.report.published import EXPORT_MARKER, prompt_format
from bard_data.report.rebuild import local_path_keys
from bard_data.report.stats import report, write_plots

__all__ = ["CONFIGS", "ExportResult", "PushResult", "PublishError", "export", "push", "export_cli", "push_cli",
           "sanitize"]

# Tables published as dataset configs, in card order (the first is the default config).
CONFIGS = ["sft", "rl", "compressions", "judgments", "gold_chains", "funnel"]
_SPLIT_OK = re.compile(r"^\w+(\.\w+)*$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass
class ExportResult:
    out_dir: Path
    configs: dict[str, list[dict[str, Any]]]  # config -> [{split, path, rows}]
    report: dict[str, pl.DataFrame]
    plots: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)  # config -> why not exported

    @property
    def card_path(self) -> Path:
        return self.out_dir / "README.md"


@dataclass
class PushResult:
    repo_id: str
    url: str
    commit_oid: Optional[str]
    commit_url: Optional[str]
    revision: str
    export: ExportResult


# -- sanitizing what goes public ---------------------------------------------------------------

_SECRET_KEY = re.compile(r"(^|_)(api_?key|apikey|token|secret|password|passwd|authorization|auth|credentials?)$",
                         re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def _short_path(value: str) -> str:
    """A local absolute path, shortened to its last two parts (no home or user folders in public)."""
    parts = [p for p in re.split(r"[\\/]+", value) if p]
    return "/".join(parts[-2:]) if parts else value


def _looks_local_path(value: str) -> bool:
    return (value.startswith(("/", "~")) and not value.startswith("//")) or bool(re.match(r"^[A-Za-z]:[\\/]", value))


def sanitize(obj: Any) -> Any:
    """The recipe/manifest as safe to publish: secret-looking keys dropped, URL credentials and
    local absolute paths shortened. (Recipes hold environment variable *names*, never keys.)"""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and _SECRET_KEY.search(k) and not k.endswith("_env"):
                continue
            # Keys can be model names too (the manifest's token counts): shorten local paths there.
            out[sanitize(k) if isinstance(k, str) else k] = sanitize(v)
        return out
    if isinstance(obj, list):
        return [sanitize(v) for v in obj]
    if isinstance(obj, str):
        s = _URL_USERINFO.sub(lambda m: m.group("scheme"), obj)
        if "\n" not in s:
            m = re.match(r"^(\w+):(/(?!/).*|~.*)$", s)  # "transformers:/home/me/models/x" (manifest models)
            if m:
                s = f"{m.group(1)}:{_short_path(m.group(2))}"
            elif _looks_local_path(s):
                s = _short_path(s)
        return s
    return obj


def _scrub(text: str, secrets: list[Optional[str]]) -> str:
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    text = re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", text)
    return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else ""


# -- writing configs ---------------------------------------------------------------------------


def _standard_type(t: pa.DataType) -> pa.DataType:
    """large_string/large_list (what Polars writes) as string/list, what `datasets` writes itself."""
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return pa.list_(pa.field("item", _standard_type(t.value_type)))
    if pa.types.is_list(t):
        return pa.list_(pa.field("item", _standard_type(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _standard_type(f.type), f.nullable) for f in t])
    if pa.types.is_null(t):
        return pa.string()
    return t


def _split_name(value: Optional[str]) -> str:
    s = (value or "train").strip() or "train"
    return s if _SPLIT_OK.match(s) else (re.sub(r"\W+", "_", s).strip("_") or "train")


def _write_config(parts: list[Path], config_dir: Path, config: str) -> list[dict[str, Any]]:
    """One Parquet file per split (the ``split`` column, else ``train``), copied from the table's
    parts one part at a time, so a table of any size costs the memory of its largest part. Every
    part is cast to the table's schema (what reading the parts together gives), then to the types
    `datasets` writes itself. Nothing is written for a table without rows or columns ([])."""
    parts = [p for p in parts if pq.read_metadata(p).num_rows]
    template = pl.concat([pl.DataFrame(schema=pl.read_parquet_schema(p)) for p in parts], how="diagonal_relaxed") \
        if parts else pl.DataFrame()
    if not template.width:
        return []
    arrow_schema = template.to_arrow().schema
    schema = pa.schema([pa.field(f.name, _standard_type(f.type), f.nullable) for f in arrow_schema])
    by_split = "split" in template.columns and template.schema["split"] == pl.Utf8
    config_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[str, pq.ParquetWriter] = {}
    rows: dict[str, int] = {}
    try:
        for p in parts:
            df = pl.concat([template, pl.read_parquet(p)], how="diagonal_relaxed")
            names = df["split"].map_elements(_split_name, return_dtype=pl.Utf8, skip_nulls=False) if by_split \
                else pl.Series(["train"] * df.height, dtype=pl.Utf8)
            for split in names.unique(maintain_order=True).to_list():
                chunk = df.filter(names == split)
                if split not in writers:
                    writers[split] = pq.ParquetWriter(config_dir / f"{split}-00000-of-00001.parquet", schema,
                                                      compression="zstd")
                writers[split].write_table(chunk.to_arrow().cast(schema))
                rows[split] = rows.get(split, 0) + chunk.height
    finally:
        for w in writers.values():
            w.close()
    order = {"train": 0, "validation": 1, "test": 2}
    return [{"split": s, "path": f"{config}/{s}-00000-of-00001.parquet", "rows": rows[s]}
            for s in sorted(rows, key=lambda g: (order.get(g, 3), g))]


# -- export --------------------------------------------------------------------------------------


def _prepare_out_dir(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise PublishError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
            raise PublishError(f"{out}: folder is not empty and is not an earlier export; choose another output folder")


def export(run_dir: str | Path, out_dir: str | Path, *, repo_id: Optional[str] = None,
           allow_incomplete: bool = False, template: Optional[str | Path] = None) -> ExportResult:
    """Write the publishable layout of a run to ``out_dir`` (replacing an earlier export there)."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise PublishError(f"{root}: no such run directory")
    if not mf.exists(root):
        raise PublishError(f"{root}: not a run directory (no manifest.json)")
    manifest = mf.read_manifest(root)
    if not manifest:
        raise PublishError(f"{mf.path(root)}: not valid JSON") from None
    if not manifest.get("complete") and not allow_incomplete:
        raise PublishError(f"{root}: the run is incomplete; finish it (bard-data run) or pass --allow-incomplete")
    store = ArtifactStore(root)
    if not store.exists("sft"):
        raise PublishError(f"{root}: the run has no sft table; nothing to publish")
    out = Path(out_dir).expanduser().resolve()
    _prepare_out_dir(out)
    if out == root.resolve() or root.resolve() in out.parents:
        raise PublishError(f"{out}: the export folder must be outside the run directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        configs: dict[str, list[dict[str, Any]]] = {}
        skipped: dict[str, str] = {}
        for table in CONFIGS:
            if not store.exists(table):
                skipped[table] = "not in this run"
                continue
            files = _write_config(store.parts(table), staging / table, table)
            if not files:
                skipped[table] = "empty"
                continue
            configs[table] = files
        balance = store.read("balance").to_dicts() if store.exists("balance") else []
        public = sanitize({k: v for k, v in manifest.items() if k not in ("invocations", "recipe_file", "timings")})
        if isinstance(public.get("recipe"), dict):
            public["recipe"].pop("run_dir", None)
        public["license"] = (manifest.get("recipe") or {}).get("license") or "other"
        public["balance"] = balance
        public["prompt_format"] = prompt_format(manifest.get("recipe") or {})
        public["local_paths"] = local_path_keys(manifest.get("recipe") or {})  # for `bard-data recipe`
        public["configs"] = configs
        (staging / EXPORT_MARKER).write_text(json.dumps(public, indent=2, sort_keys=True, default=str) + "\n",
                                             encoding="utf-8")
        # The report over what is being published; parts that need unpublished tables from the run.
        rep = report(staging)
        run_rep = report(root)
        for name in RUN_ONLY_PARTS:
            if name in run_rep and name not in rep:
                rep[name] = run_rep[name]
        rep = {n: rep[n] for n in [*PARTS, *[k for k in rep if k not in PARTS]] if n in rep}
        written = write_plots(staging, staging / "assets", rep)
        plots = {k: f"assets/{p.name}" for k, p in written.items()}
        card = render_card(public, rep, configs, plots, repo_id=repo_id, template=template)
        (staging / "README.md").write_text(card, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    configs = {c: [{**f} for f in files] for c, files in configs.items()}
    return ExportResult(out_dir=out, configs=configs, report=rep, plots=plots, skipped=skipped)


# -- push ------------------------------------------------------------------------------------------


def _resolved_token(token: Optional[str]) -> Optional[str]:
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no token is a state, not an error, here
        return None


def _assert_no_secret(folder: Path, secret: Optional[str]) -> None:
    if not secret or len(secret) < 4:
        return
    needle = secret.encode("utf-8")
    for p in folder.rglob("*"):
        if p.is_file() and needle in p.read_bytes():
            raise PublishError(f"{p.relative_to(folder)}: the export contains the Hub token; refusing to upload it")


def push(run_dir: str | Path, repo: str, private: bool = False, revision: Optional[str] = None,
         token: Optional[str] = None, *, allow_incomplete: bool = False, template: Optional[str | Path] = None,
         commit_message: Optional[str] = None) -> PushResult:
    """Export the run and upload it as the dataset repo ``repo`` (created if missing) in one commit.

    The Hub endpoint is ``HF_ENDPOINT`` (read now, not at import); the token is ``token`` or
    huggingface_hub's default (``HF_TOKEN``, then the saved login).
    """
    if not _REPO_ID.match(repo or ""):
        raise PublishError(f"'{repo}': a Hub dataset id is 'namespace/name'")
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE is set: unset it to push to the Hub")
    secret = _resolved_token(token)
    if not secret:
        raise PublishError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    with tempfile.TemporaryDirectory(prefix="bard-push-") as tmp:
        res = export(run_dir, Path(tmp) / "dataset", repo_id=repo, allow_incomplete=allow_incomplete, template=template)
        _assert_no_secret(res.out_dir, secret)
        info = json.loads((res.out_dir / EXPORT_MARKER).read_text(encoding="utf-8"))
        message = commit_message or f"bard-data push: {info.get('name')} (recipe {info.get('recipe_hash')})"
        stage = "create the repo"
        try:
            api = HfApi(endpoint=endpoint, token=token)
            url = api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
            if revision and revision != "main":
                stage = f"create branch {revision}"
                api.create_branch(repo, branch=revision, repo_type="dataset", exist_ok=True)
            stage = "upload"
            commit = api.upload_folder(
                repo_id=repo, folder_path=str(res.out_dir), repo_type="dataset", revision=revision,
                commit_message=message,
                # A config or plot that this export no longer has must not linger from an earlier push.
                delete_patterns=[f"{c}/*.parquet" for c in CONFIGS] + ["assets/*.png"],
            )
        except Exception as exc:  # noqa: BLE001 - every Hub/network failure becomes one scrubbed line
            # The whole message on one line (the Hub puts its reason after the first line), capped.
            detail = " ".join(str(exc).split())
            detail = detail if len(detail) <= 600 else detail[:600] + " ..."
            msg = f"push to {repo} failed ({stage}): {type(exc).__name__}: {detail}"
            raise PublishError(_scrub(msg, [secret, token])) from None
        # The export dir is temporary: keep the result's paths meaningful by pointing at the repo.
        result = PushResult(
            repo_id=repo, url=str(url), commit_oid=getattr(commit, "oid", None),
            commit_url=getattr(commit, "commit_url", None), revision=revision or "main", export=res,
        )
    return result


# -- CLI -------------------------------------------------------------------------------------------


def _print_export(res: ExportResult) -> None:
    for c, files in res.configs.items():
        splits = ", ".join(f"{f['split']} ({f['rows']} rows)" for f in files)
        print(f"  {c:<14} {splits}")
    for c, why in res.skipped.items():
        print(f"  {c:<14} skipped: {why}")


def export_cli(args) -> int:
    res = export(args.run_dir, args.out_dir, repo_id=getattr(args, "repo", None),
                 allow_incomplete=getattr(args, "allow_incomplete", False), template=getattr(args, "template", None))
    print(f"exported {len(res.configs)} configs to {res.out_dir}")
    _print_export(res)
    print(f"  card: {res.card_path}")
    return 0


def push_cli(args) -> int:
    res = push(args.run_dir, args.repo, private=bool(getattr(args, "private", False)),
               revision=getattr(args, "revision", None), allow_incomplete=getattr(args, "allow_incomplete", False),
               template=getattr(args, "template", None), commit_message=getattr(args, "message", None))
    print(f"pushed {len(res.export.configs)} configs to {res.url} (revision {res.revision}, commit {res.commit_oid})")
    _print_export(res.export)
    return 0
