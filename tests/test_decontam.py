"""Decontamination against real benchmark questions (MATH-500, AMC 2023) with planted copies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

from bard_data.config.sources import DecontamConfig, DecontamReference
from bard_data.errors import RecipeError
from bard_data.text.decontam import (
    decontaminate,
    load_references,
    normalize_expr,
    normalize_text,
)


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with path.open() as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


@pytest.fixture(scope="module")
def refs(shared_data) -> dict[str, list[str]]:
    cfg = DecontamConfig(
        references=[
            DecontamReference(name="math500", path="math500/test.jsonl", column="problem"),
            DecontamReference(name="amc23", path="amc23/test.jsonl", column="question"),
        ]
    )
    return load_references(cfg, shared_data)


@pytest.fixture(scope="module")
def gsm(shared_data) -> pl.DataFrame:
    rows = read_jsonl(shared_data / "gsm8k" / "train.jsonl", limit=500)
    return pl.DataFrame(
        {
            "problem_id": [f"gsm-{i:03d}" for i in range(len(rows))],
            "question": [r["question"] for r in rows],
            "source": ["gsm8k"] * len(rows),
        }
    )


def reword(q: str, style: int) -> str:
    """Change only whitespace, case and punctuation."""
    if style == 0:
        return q.upper()
    if style == 1:
        return "   " + re.sub(r"\s+", "\n  ", q) + "  "
    if style == 2:
        return q.replace("$", "").replace(",", " ,").replace(".", "!").lower()
    if style == 3:
        return re.sub(r"([?.!])", r" \1\1 ", q).swapcase()
    return "  ".join(q.split())


MATH_PLANTED = [0, 7, 42, 123, 499, 31]  # 31: "Simplify $\sqrt{242}$." has 3 words, below n
AMC_PLANTED = [0, 5, 17, 39]


def planted_frame(refs) -> pl.DataFrame:
    ids, qs = [], []
    for k, i in enumerate(MATH_PLANTED):
        ids.append(f"plant-math-{i}")
        qs.append(reword(refs["math500"][i], k % 5))
    for k, i in enumerate(AMC_PLANTED):
        ids.append(f"plant-amc-{i}")
        qs.append(reword(refs["amc23"][i], (k + 2) % 5))
    return pl.DataFrame({"problem_id": ids, "question": qs, "source": ["planted"] * len(ids)})


def test_reference_loading(refs):
    assert list(refs) == ["math500", "amc23"]
    assert len(refs["math500"]) == 500 and len(refs["amc23"]) == 40
    assert refs["math500"][31] == "Simplify $\\sqrt{242}$."


def test_planted_caught_clean_kept(refs, gsm):
    planted = planted_frame(refs)
    # Interleave planted rows among the clean ones.
    problems = pl.concat([gsm.head(200), planted, gsm.slice(200)])
    kept, excluded, report = decontaminate(problems, refs, n=8)

    assert kept.height == 500 and excluded.height == 10
    assert kept["problem_id"].to_list() == gsm["problem_id"].to_list()  # input order kept
    assert kept.columns == ["problem_id", "question", "source"]
    assert sorted(excluded["problem_id"].to_list()) == sorted(planted["problem_id"].to_list())
    assert excluded.columns == ["problem_id", "question", "source", "reason", "detail"]
    assert set(excluded["reason"]) == {"contaminated"}
    assert report.to_dicts() == [
        {"reference": "math500", "reference_rows": 500, "overlapping_problems": 6},
        {"reference": "amc23", "reference_rows": 40, "overlapping_problems": 4},
    ]
    details = dict(zip(excluded["problem_id"], excluded["detail"]))
    assert details["plant-math-0"] == "math500: convert the point 0 3 in rectangular coordinates"
    assert details["plant-math-31"] == "math500: simplify sqrt 242"
    assert details["plant-amc-0"] == "amc23: cities a and b are 45 miles apart"
    # The first matching n-gram of the first matching reference, as normalised text.
    for pid, d in details.items():
        ref = "math500" if "math" in pid else "amc23"
        assert d.startswith(ref + ": ")


def test_clean_gsm8k_not_flagged(refs, gsm):
    for n in (8, 13):
        kept, excluded, report = decontaminate(gsm, refs, n=n)
        assert kept.height == 500 and excluded.height == 0
        assert report["overlapping_problems"].to_list() == [0, 0]
        assert excluded.columns == ["problem_id", "question", "source", "reason", "detail"]


def test_embedded_fragment_and_shared_boilerplate(refs, gsm):
    amc0 = refs["amc23"][0]
    problems = pl.DataFrame(
        {
            "problem_id": ["frag", "seven", "amc6", "short-prefix"],
            "question": [
                # 8 consecutive words of an AMC question inside new text: caught.
                "Tom reads a book. Alicia bikes towards B at 18 miles per hour, says Tom.",
                # Only 7 of them: not caught at n=8.
                "Tom reads a book. Alicia bikes towards B at 18 miles, says Tom.",
                refs["amc23"][6],
                # A short problem is never matched against part of a longer reference.
                "Cities A and B are 45 miles?",
            ],
        }
    )
    assert "Alicia bikes towards $B$ at 18 miles per hour" in amc0
    kept, excluded, report = decontaminate(problems, refs, n=8)
    assert kept["problem_id"].to_list() == ["seven", "short-prefix"]
    details = dict(zip(excluded["problem_id"], excluded["detail"]))
    assert details["frag"] == "amc23: alicia bikes towards b at 18 miles per"
    # AMC 2023 #7 ends in MATH-style boilerplate shared with MATH-500: it counts for both
    # references; the detail names the first reference that matches.
    assert details["amc6"] == "math500: m n where m and n are relatively"
    assert report["overlapping_problems"].to_list() == [1, 2]


def test_larger_n_is_stricter(refs):
    problems = pl.DataFrame({"problem_id": ["amc6"], "question": [refs["amc23"][6]]})
    _, _, report = decontaminate(problems, {"math500": refs["math500"]}, n=13)
    assert report["overlapping_problems"].to_list() == [0]


def test_normalize_text():
    assert normalize_text("  Convert the point $(0,3)$ in\n RECTANGULAR coordinates!  ") == (
        "convert the point 0 3 in rectangular coordinates"
    )
    assert normalize_text("What is $\\frac{1}{2}$ of 3.5?") == "what is frac 1 2 of 3 5"
    assert normalize_text("x_1 -- y") == "x 1 y"
    assert normalize_text("") == "" and normalize_text(None) == ""
    assert normalize_text("Ｆｕｌｌwidth") == "fullwidth"  # NFKC
    samples = ["A, b; C!", "$x^2$", "Café au lait", "  ", "tab\tnew\nline", "ÉTÉ"]
    bulk = pl.DataFrame({"q": samples}).select(normalize_expr("q"))["q"].to_list()
    assert bulk == [normalize_text(s) for s in samples]


def test_empty_inputs():
    problems = pl.DataFrame({"problem_id": ["a", "b"], "question": ["", None]})
    kept, excluded, report = decontaminate(problems, {"r": ["some reference question text here for testing"]}, n=3)
    assert kept.height == 2 and excluded.height == 0
    kept, excluded, report = decontaminate(problems, {}, n=8)
    assert kept.height == 2 and report.height == 0
    kept, excluded, report = decontaminate(problems, {"r": []}, n=8)
    assert report.to_dicts() == [{"reference": "r", "reference_rows": 0, "overlapping_problems": 0}]


def test_load_references_formats_and_errors(tmp_path):
    pl.DataFrame({"text": ["What is one plus one", None]}).write_parquet(tmp_path / "ref.parquet")
    (tmp_path / "ref.jsonl").write_text('{"q": "a b c"}\n\n{"q": "d e f"}\n')
    cfg = DecontamConfig(
        references=[
            DecontamReference(name="pq", path="ref.parquet", column="text"),
            DecontamReference(name="js", path=str(tmp_path / "ref.jsonl"), column="q"),
        ]
    )
    assert load_references(cfg, tmp_path) == {"pq": ["What is one plus one"], "js": ["a b c", "d e f"]}
    assert load_references(cfg.model_copy(update={"enabled": False}), tmp_path) == {}

    bad_col = DecontamConfig(references=[DecontamReference(name="pq", path="ref.parquet", column="problem")])
    with pytest.raises(RecipeError, match=r"ref\.parquet: no column 'problem'"):
        load_references(bad_col, tmp_path)
    bad_col_js = DecontamConfig(references=[DecontamReference(name="js", path="ref.jsonl")])
    with pytest.raises(RecipeError, match=r"ref\.jsonl: line 1 has no column 'problem'"):
        load_references(bad_col_js, tmp_path)
    missing = DecontamConfig(references=[DecontamReference(name="x", path="nope.jsonl")])
    with pytest.raises(RecipeError, match=r"nope\.jsonl"):
        load_references(missing, tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"problem": "ok"}\nnot json\n')
    broken = DecontamConfig(references=[DecontamReference(name="b", path="broken.jsonl")])
    with pytest.raises(RecipeError, match=r"broken\.jsonl: line 2 is not JSON"):
        load_references(broken, tmp_path)


@pytest.mark.parametrize("kwargs", [{"ngram": 2}, {"ngram": 51}, {"extra": True}])
def test_config_validation(kwargs):
    with pytest.raises(ValidationError):
        DecontamConfig(**kwargs)


def test_duplicate_reference_names():
    with pytest.raises(ValidationError):
        DecontamConfig(
            references=[DecontamReference(name="a", path="x.jsonl"), DecontamReference(name="a", path="y.jsonl")]
        )
