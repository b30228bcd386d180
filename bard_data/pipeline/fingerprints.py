"""Fingerprints of a run's inputs: the local source files a table was built from.

A source file that changed under a finished table is an error, not a silent mix of old and new
rows. Size and mtime are compared first; only when they differ is the file hashed again, so a
touched but unchanged file passes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from bard_data.config import Recipe
from bard_data.errors import DataError
from bard_data.pipeline.store import ArtifactStore

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


def check_sources(recipe: Recipe, store: ArtifactStore, before: dict[str, Any]) -> dict[str, Any]:
    """Fingerprints of the local source files; a file that changed since the table built from it
    was written is an error (the run's tables would silently disagree with the file).

    Size and mtime are compared first; only when they differ is the file hashed again, so a
    touched but unchanged file passes.
    """
    out: dict[str, Any] = {}
    hashed: dict[str, str] = {}  # one file may be a source and a trace source
    items = [(f"sources[{s.name}]", s, "problems") for s in recipe.sources]
    items += [(f"traces[{t.name}]", t, "imported_samples") for t in recipe.traces]
    for key, src, table in items:
        path = Path(recipe.resolve(src.path, force=src.format in ("jsonl", "parquet", "datasets")))
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
        built = (store.table_dir(table) / "_SUCCESS").exists()
        if built and old and old.get("sha256") and old["sha256"] != rec["sha256"]:
            raise DataError(
                f"{recipe.source_file}: {key} {path} changed since this run directory built '{table}' from it "
                f"(sha256 {old['sha256'][:12]} -> {rec['sha256'][:12]}, {old.get('size')} -> {rec['size']} bytes); "
                "restore the file or use another --run-dir"
            )
        out[key] = rec
    return out
