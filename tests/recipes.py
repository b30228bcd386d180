"""Recipe builders for tests: the demo's shape on the tiny offline model."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_recipe(tmp: Path, model: Path, data: Path, n_problems: int = 8, **overrides) -> dict:
    backend = {"kind": "transformers", "model": str(model), "batch_size": 16}
    sampling = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 24}
    recipe = {
        "name": "tiny-test",
        "run_dir": str(tmp / "run"),
        "seed": 7,
        "shard_size": 4,
        "student": {"tokenizer": str(model)},
        "sources": [{
            "name": "gsm8k", "path": str(data / "gsm8k" / "train.jsonl"), "limit": n_problems,
        }],
        "traces": [{
            "name": "gsm8k-solutions", "path": str(data / "gsm8k" / "train.jsonl"), "limit": n_problems,
            "columns": {"question": "question", "generation": "answer"}, "model": "gsm8k-human",
        }],
        "teacher": {"backend": backend, "sampling": sampling, "samples_per_problem": 2, "seed": 1},
        "compression": {
            "backend": backend, "sampling": {**sampling, "max_tokens": 16}, "seed": 2, "max_retries": 1,
            "budgets": {"mode": "fractions", "fractions": [0.3, 0.6], "floor": 4, "min_spacing": 0.1},
        },
        "judge": {"backend": backend, "sampling": {**sampling, "max_tokens": 16}, "seed": 3,
                  "only_answer_preserved": False},
        "balance": {"n_bins": 3, "standard_ratio": 1.0},
    }
    for k, v in overrides.items():
        if v is None:
            recipe.pop(k, None)
        else:
            recipe[k] = v
    return recipe


def write_recipe(tmp: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return p
