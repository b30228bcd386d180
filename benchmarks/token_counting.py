"""Token counting: the stages' ``RunContext.count_tokens`` against raw ``tokenizers`` batch encoding.

Both count the same texts with the same tokenizer (the tiny test tokenizer, and the demo model's
SmolLM2 tokenizer when ``.models/SmolLM2-135M-Instruct`` exists): ``count_tokens`` goes through
``transformers``' fast tokenizer (``tokenizer(texts, add_special_tokens=False)``), the baseline calls
``tokenizers.Tokenizer.encode_batch(texts, add_special_tokens=False)`` on the same ``tokenizer.json``
and takes ``len(enc.ids)``. The texts are reasoning-like (random GSM8K words) of 500..8000 tokens
at full length (~2..32 KB each, the budgets' range). Counts must agree exactly; the figure is
count_tokens wall / raw wall (target <= 1.2). Each side runs ``--repeat`` times, best taken.

    python benchmarks/token_counting.py [--texts 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 1.2


def make_texts(n: int, seed: int = 0) -> list[str]:
    import _synth
    import numpy as np

    rng = np.random.default_rng(seed)
    tm = _synth.TextMaker(rng)
    tokens = np.exp(rng.uniform(np.log(500), np.log(8000), size=n))
    return tm.make(np.round(tokens * 4)).to_list()


def ctx_for(tokenizer_dir: Path):
    from bard_data.config import parse_recipe
    from bard_data.pipeline.context import RunContext

    data = {"name": "tok-bench", "run_dir": "/tmp/tok-bench-run", "student": {"tokenizer": str(tokenizer_dir)},
            "sources": [{"name": "g", "path": str(Path(__file__).resolve().parents[2] / "shared/data/gsm8k/train.jsonl")}]}
    recipe = parse_recipe(data, "<bench>", ".")
    return RunContext(recipe, Path("/tmp/tok-bench-run"), quiet=True)


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(tokenizer_dir: Path, texts: list[str], repeat: int) -> dict:
    from tokenizers import Tokenizer

    ctx = ctx_for(tokenizer_dir)
    _ = ctx.tokenizer  # loading is not part of the figure
    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    t_raw, n_raw = best_of(lambda: [len(e.ids) for e in raw.encode_batch(texts, add_special_tokens=False)], repeat)
    t_ctx, n_ctx = best_of(lambda: ctx.count_tokens(texts), repeat)
    chars = sum(len(t) for t in texts)
    return {
        "tokenizer": tokenizer_dir.name, "texts": len(texts), "chars": chars, "tokens": int(sum(n_raw)),
        "counts_equal": n_raw == n_ctx, "raw_s": round(t_raw, 3), "count_tokens_s": round(t_ctx, 3),
        "ratio": round(t_ctx / t_raw, 3), "raw_mtok_s": round(sum(n_raw) / t_raw / 1e6, 2),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="RAYON_NUM_THREADS for the tokenizers library")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    import _synth
    from _measure import fmt_table, load_average, machine

    work = _synth.work_dir(args.work_dir)
    tokenizers = [_synth.tiny_model(work)]
    smol = Path(__file__).resolve().parents[1] / ".models" / "SmolLM2-135M-Instruct"
    if (smol / "tokenizer.json").exists():
        tokenizers.append(smol)
    texts = make_texts(args.texts)
    results = [bench(t, texts, args.repeat) for t in tokenizers]
    print(f"# Token counting  ({machine()}; {load_average()}; TOKENIZERS_PARALLELISM="
          f"{os.environ.get('TOKENIZERS_PARALLELISM')}, RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'all')})")
    print(f"# {len(texts)} texts of 500..8000 tokens-equivalent (~2..32 KB), best of {args.repeat}")
    print(fmt_table(["tokenizer", "texts", "tokens", "counts equal", "raw encode_batch s", "count_tokens s",
                     "ratio (target <= 1.2)", "raw Mtok/s"],
                    [[r["tokenizer"], r["texts"], r["tokens"], r["counts_equal"], r["raw_s"], r["count_tokens_s"],
                      r["ratio"], r["raw_mtok_s"]] for r in results]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["counts_equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
