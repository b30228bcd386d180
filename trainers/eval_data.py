"""The evaluation set of ``bard-data eval``: ``PATH[:key=col,...]`` to rows of problem id,
source, question and normalized gold answer (see ``trainers.evaluate``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

QUESTION_KEYS = ("question", "problem", "prompt")
ANSWER_KEYS = ("answer", "solution", "gold")
ID_KEYS = ("unique_id", "problem_id", "id")


# ---------------------------------------------------------------------------------------------
# data


def parse_data_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``PATH[:key=col,...]`` -> (PATH, mapping)."""
    path, mapping = spec, {}
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        if "=" in tail and head:
            path = head
            for part in tail.split(","):
                if not part.strip():
                    continue
                if "=" not in part:
                    raise ValueError(f"--data mapping {part!r}: expected key=column")
                k, v = part.split("=", 1)
                k, v = k.strip(), v.strip()
                if k not in ("question", "answer", "id", "format"):
                    raise ValueError(f"--data mapping key {k!r}: use question, answer, id or format")
                mapping[k] = v
    return path, mapping


def _read_rows(path: Path) -> list[dict]:
    import polars as pl

    if path.is_dir():
        for name in ("test.jsonl", "test.parquet"):
            if (path / name).exists():
                return _read_rows(path / name)
        files = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.parquet")) + sorted(path.glob("*.json"))
        if len(files) != 1:
            raise ValueError(f"{path}: expected one .jsonl/.parquet file (or test.jsonl), found {len(files)}")
        return _read_rows(files[0])
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else data.get("data", [])
    if path.suffix == ".parquet":
        return pl.read_parquet(path).to_dicts()
    raise ValueError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")


def load_eval_set(spec: str, limit: Optional[int] = None) -> list[dict]:
    """Rows of {problem_id, source, question, gold} from a data spec (see the module docstring)."""
    from bard_data.text.answers import normalize_gold

    path_s, mapping = parse_data_spec(spec)
    path = Path(path_s).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    cols = set(rows[0])

    def pick(key: str, candidates) -> Optional[str]:
        if key in mapping:
            if mapping[key] not in cols:
                raise ValueError(f"{path}: no column {mapping[key]!r} (have {sorted(cols)})")
            return mapping[key]
        return next((c for c in candidates if c in cols), None)

    q_col, a_col, id_col = pick("question", QUESTION_KEYS), pick("answer", ANSWER_KEYS), pick("id", ID_KEYS)
    if q_col is None or a_col is None:
        raise ValueError(f"{path}: cannot find question/answer columns in {sorted(cols)}; map them: PATH:question=...,answer=...")
    fmt = mapping.get("format", "auto")
    source = (path.parent.name if path.is_file() else path.name) or path.stem
    out, unusable = [], 0
    for i, r in enumerate(rows):
        gold = normalize_gold(r.get(a_col), fmt=fmt)
        if gold is None:
            unusable += 1
        out.append({
            "problem_id": str(r.get(id_col, i)) if id_col else str(i),
            "source": source,
            "question": str(r.get(q_col) or ""),
            "gold": gold,
        })
        if limit is not None and len(out) >= limit:
            break
    if unusable:
        log.warning("%s: %d gold answers could not be normalized; those rows score 0", path, unusable)
    return out
