"""Synthetic paper-scale run directories for the post-processing, SQL and resume benchmarks.

``make_run(out_dir, compressions=N, text_scale=S)`` writes what a paper-scale build (recipes/paper.yaml:
4 teacher samples per problem, shortest gold policy, log-uniform budgets, 3 per chain, shard size
2048) has on disk just before its post-processing stages run:

- ``source.parquet``: the problem source (question, answer, one extra column that lands in
  ``meta``), with 0.05% of its questions planted from math500/amc23 (caught by decontamination)
  and 0.2% exact duplicates (dropped as ``duplicate``);
- ``run/teacher_samples``: 4 samples per problem, sharded as the teacher stage shards
  (2048 rows a part, a funnel record per part, ``_layout.json``, ``_SUCCESS``);
- ``run/compressions``: 3 budgets per gold chain (N rows), sharded the same way;
- ``run/judgments``: a verdict per answer-preserved compression, sharded the same way;
- ``recipe.json``: the recipe (paper.yaml's numbers; LLM backends point at a tiny local model that
  is never called because those stages are finished).

Row counts follow from N: G = N / 3 gold chains, P = G / 0.85 problems (15% unsolved), 4P samples.

Text lengths. Real reasoning is 500..16000 tokens (~4 characters a token); here every text is
``tokens * 4 / text_scale`` characters of random words (English words from GSM8K, so Parquet
compresses it about as much as real text). ``text_scale=32`` (the default) is 1 character per 8
tokens: a 1.3M-row run holds ~3 GB of text instead of ~100 GB. Token counts, budgets and ids are
at full scale. Problem ids are the real content ids (so the problems stage links up).

The ids of samples, chains and compressions are random (what produced them does not matter here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
SHARD = 2048
SAMPLES_PER_PROBLEM = 4
SOLVED = 0.85
MAX_REASONING = 12000
FORMAT_VERSION = 5  # bump when the generated data changes
WRAP = 1 << 20  # longest text, in characters


def _pool(rng: np.random.Generator, chars: int = 48_000_000) -> bytes:
    """ASCII text of random GSM8K words, ``chars`` long."""
    words: dict[str, int] = {}
    with open(SHARED_DATA / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for w in (row["question"] + " " + row["answer"]).split():
                if w.isascii() and "\\" not in w:
                    words[w] = words.get(w, 0) + 1
    vocab = np.array(list(words), dtype=object)
    p = np.array(list(words.values()), dtype=np.float64)
    p /= p.sum()
    out = []
    n = 0
    while n < chars:
        chunk = " ".join(rng.choice(vocab, size=1_000_000, p=p).tolist())
        out.append(chunk)
        n += len(chunk) + 1
    return (" ".join(out)).encode("ascii")[:chars]


class TextMaker:
    """Distinct texts of given lengths: consecutive cuts of a tiled random-word pool."""

    def __init__(self, rng: np.random.Generator):
        self.pool = np.frombuffer(_pool(rng), dtype=np.uint8)
        self.pos = 0

    def make(self, lengths: np.ndarray):
        import polars as pl
        import pyarrow as pa

        lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
        total = int(lengths.sum())
        pieces, need, pos = [], total, self.pos
        while need:  # the pool from pos on, wrapping around (slices are views: no index arrays)
            take = min(need, len(self.pool) - pos)
            pieces.append(self.pool[pos:pos + take])
            need -= take
            pos = (pos + take) % len(self.pool)
        data = np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()
        self.pos = pos
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        arr = pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(data))
        return pl.from_arrow(arr).cast(pl.Utf8)

    def reserve(self, lengths: np.ndarray) -> np.ndarray:
        """Where in the pool each text ``make(lengths)`` would give starts, without building the
        texts (``at`` builds them later, a shard at a time: a paper-scale run's text does not
        fit in memory at full length)."""
        lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        starts = (self.pos + offsets) % len(self.pool)
        self.pos = int((self.pos + lengths.sum()) % len(self.pool))
        return starts

    def at(self, starts: np.ndarray, lengths: np.ndarray):
        """The texts ``reserve`` placed at ``starts`` (the same strings ``make`` would give)."""
        import polars as pl
        import pyarrow as pa

        lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
        if getattr(self, "_wrapped", None) is None:  # the pool plus its head: no text wraps around
            self._wrapped = np.concatenate([self.pool, self.pool[:WRAP]])
        if len(lengths) and lengths.max() > WRAP:
            raise ValueError(f"a text of {lengths.max()} characters is longer than {WRAP}")
        data = np.concatenate([self._wrapped[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())]) \
            if len(lengths) else np.zeros(0, dtype=np.uint8)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        arr = pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(data))
        return pl.from_arrow(arr).cast(pl.Utf8)


def _hex_ids(prefix: str, n: int, rng: np.random.Generator) -> list[str]:
    vals = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
    vals = np.unique(vals)
    while len(vals) < n:  # collisions are astronomically unlikely; keep the count exact anyway
        vals = np.unique(np.concatenate([vals, rng.integers(0, 2**63 - 1, size=n - len(vals), dtype=np.int64)]))
    vals = rng.permutation(vals)[:n]
    return [f"{prefix}-{v:016x}" for v in vals.tolist()]


def _log_uniform(rng, lo, hi, n):
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))


def recipe_dict(out: Path, tiny_model: Path) -> dict:
    backend = {"kind": "transformers", "model": str(tiny_model)}
    return {
        "name": "bench-paper-scale",
        "run_dir": str(out / "run"),
        "seed": 0,
        "shard_size": SHARD,
        "license": "apache-2.0",
        "student": {"tokenizer": str(tiny_model)},
        "sources": [{"name": "synth", "path": str(out / "source.parquet"), "answer_format": "number"}],
        "decontamination": {"ngram": 8, "references": [
            {"name": "math500", "path": str(SHARED_DATA / "math500" / "test.jsonl"), "column": "problem"},
            {"name": "amc23", "path": str(SHARED_DATA / "amc23" / "test.jsonl"), "column": "question"},
        ]},
        "teacher": {"backend": backend, "sampling": {"temperature": 0.6, "top_p": 0.95, "max_tokens": 16384},
                    "samples_per_problem": SAMPLES_PER_PROBLEM, "seed": 0, "gold_policy": "shortest",
                    "max_reasoning_tokens": MAX_REASONING},
        "compression": {"backend": backend, "sampling": {"temperature": 0.7, "top_p": 0.8, "max_tokens": 10000},
                        "seed": 1, "budgets": {"mode": "log_uniform", "per_chain": 3, "floor": 256, "min_spacing": 0.3},
                        "max_retries": 2},
        "budget": {"tolerance": 0.15},
        "judge": {"backend": backend, "sampling": {"temperature": 0.0, "max_tokens": 1024}, "seed": 2, "min_score": 0.7},
        "balance": {"n_bins": 8, "target": "uniform", "upsample": True, "max_upsample": 2.0, "keep_groups": False,
                    "standard_ratio": 0.9},
        "format": {"budget_template": "Thinking budget: {{ budget }} tokens.",
                   "rl": {"difficulty_min": 0.1, "difficulty_max": 0.9}},
    }


def load_recipe(out: Path):
    from bard_data.config import parse_recipe

    data = json.loads((out / "recipe.json").read_text())
    return parse_recipe(data, str(out / "recipe.json"), out)


def tiny_model(work: Path) -> Path:
    from tests.tiny_models import build_tiny_model

    return build_tiny_model(work / "tiny-model", SHARED_DATA / "gsm8k" / "train.jsonl")


def _write_sharded(store, table: str, df, counters_fn=None, fill=None) -> int:
    """``df`` in shards as a stage writes them; ``fill(part)``: the part as written (its text
    built a shard at a time)."""
    from bard_data.pipeline.store import atomic_write_json

    n = max(1, math.ceil(df.height / SHARD))
    layout = {"shard_size": SHARD, "shards": n, "rows": df.height}
    atomic_write_json(store.table_dir(table) / "_layout.json", layout)
    for i in range(n):
        part = df.slice(i * SHARD, SHARD)
        part = fill(part) if fill else part
        funnel = {"stage": table, "shard": i, "rows_in": part.height, "rows_out": part.height, "added": 0,
                  "dropped": {}, "counters": counters_fn(part) if counters_fn else {}}
        store.write_shard(table, i, part, None, funnel)
    store.mark_done(table, layout)
    return n


def is_ready(out: Path, compressions: int, text_scale: float) -> bool:
    p = out / "synth.json"
    if not p.exists():
        return False
    info = json.loads(p.read_text())
    return info.get("compressions") == compressions and info.get("text_scale") == text_scale and \
        info.get("version") == FORMAT_VERSION


def make_run(out: str | Path, compressions: int, text_scale: float = 32, seed: int = 0, work: Path | None = None) -> dict:
    import polars as pl

    from bard_data.pipeline.store import ArtifactStore
    from bard_data.text.ids import content_id, normalize_question

    out = Path(out)
    if is_ready(out, compressions, text_scale):
        return json.loads((out / "synth.json").read_text())
    t0 = time.perf_counter()
    import shutil

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = tiny_model(Path(work) if work else out.parent)
    rng = np.random.default_rng(seed)
    texts = TextMaker(rng)
    cpt = 4.0 / text_scale  # characters per token, scaled

    G = compressions // 3
    P = int(round(G / SOLVED))
    # -- problems -------------------------------------------------------------------------
    qlen = rng.integers(150, 600, size=P)
    qbody = texts.make(qlen)
    questions = [f"{b} (problem {i})" for i, b in enumerate(qbody.to_list())]
    answers_i = np.floor(_log_uniform(rng, 1, 10000, P)).astype(np.int64)
    answers = [str(a) for a in answers_i.tolist()]
    refs = []
    for name, col in (("math500", "problem"), ("amc23", "question")):
        with open(SHARED_DATA / name / "test.jsonl", encoding="utf-8") as f:
            refs += [json.loads(line)[col] for line in f if line.strip()]
    n_cont = max(2, int(P * 0.0005))
    cont_idx = rng.choice(P, size=n_cont, replace=False)
    for j, i in enumerate(cont_idx.tolist()):
        questions[i] = refs[j % len(refs)]
    contaminated = np.zeros(P, dtype=bool)
    contaminated[cont_idx] = True
    n_dup = int(P * 0.002)
    dup_of = rng.choice(np.flatnonzero(~contaminated), size=n_dup, replace=False)
    src_q = questions + [questions[i] for i in dup_of.tolist()]
    src_a = answers + [answers[i] for i in dup_of.tolist()]
    tags = rng.choice(["olympiads", "amc_aime", "cn_k12", "synthetic_math", "orca_math"], size=len(src_q)).tolist()
    pl.DataFrame({"question": src_q, "answer": src_a, "origin": tags}).write_parquet(out / "source.parquet")
    # The real content id (normalized question + normalized gold; integers normalize to themselves).
    pids = [content_id("p", normalize_question(q), a) for q, a in zip(questions, answers)]

    # -- teacher samples ------------------------------------------------------------------
    live = np.flatnonzero(~contaminated)
    gold_probs = rng.choice(live, size=G, replace=False)
    has_gold = np.zeros(P, dtype=bool)
    has_gold[gold_probs] = True
    k = SAMPLES_PER_PROBLEM
    S = len(live) * k
    s_prob = np.repeat(live, k)
    s_idx = np.tile(np.arange(k), len(live))
    tokens = np.round(_log_uniform(rng, 600, 16000, S)).astype(np.int64)
    n_correct = np.where(has_gold[live], rng.integers(1, k + 1, size=len(live)), 0)
    correct = s_idx < np.repeat(n_correct, k)
    # Every gold problem's sample 0 is correct and the shortest correct one (the gold chain, R1
    # long: 6000..12000 tokens); its other correct samples are longer.
    first_of_gold = correct & (s_idx == 0)
    gold_len = np.repeat(np.round(_log_uniform(rng, 6000, MAX_REASONING, len(live))).astype(np.int64), k)
    tokens = np.where(first_of_gold, gold_len, tokens)
    tokens = np.where(correct & (s_idx > 0), np.round(gold_len * rng.uniform(1.01, 2.0, size=S)), tokens).astype(np.int64)
    r_chars = np.round(tokens * cpt).astype(np.int64)
    r_start = texts.reserve(r_chars)
    gold_ans = np.array(answers, dtype=object)[s_prob]
    pred = np.where(correct, gold_ans, (answers_i[s_prob] + 1).astype(str).astype(object))
    response = [f"So the final answer is $\\boxed{{{p}}}$." for p in pred.tolist()]
    prompt_q = [questions[i] for i in s_prob.tolist()]
    teacher = pl.DataFrame({
        "sample_id": _hex_ids("s", S, rng),
        "problem_id": [pids[i] for i in s_prob.tolist()],
        "source": ["synth"] * S,
        "origin": ["sampled"] * S,
        "model": ["deepseek-ai/DeepSeek-R1"] * S,
        "sample_index": s_idx,
        "prompt": prompt_q,
        "_start": r_start,
        "_chars": r_chars,
        "response": response,
        "predicted_answer": pred.tolist(),
        "gold_answer": gold_ans.tolist(),
        "is_correct": correct,
        "reasoning_tokens": tokens,
        "completion_tokens": tokens + 20,
    }).with_columns(
        pl.concat_str(pl.lit('[{"role": "user", "content": "'), pl.col("prompt"),
                      pl.lit('\\n\\nPlease reason step by step, and put your final answer within \\\\boxed{}."}]')).alias("prompt"),
        pl.lit(True).alias("think_closed"),
        pl.when(pl.col("reasoning_tokens") >= 16000).then(pl.lit("length")).otherwise(pl.lit("stop")).alias("finish_reason"),
    )
    from bard_data.stages.teacher import SAMPLE_COLUMNS

    def teacher_text(part):  # the reasoning and the completion holding it, a shard at a time
        part = part.with_columns(texts.at(part["_start"].to_numpy(), part["_chars"].to_numpy()).alias("reasoning"))
        return part.with_columns(pl.format("<think>\n{}\n</think>\n\n{}", "reasoning", "response").alias("completion")) \
            .select(SAMPLE_COLUMNS)

    teacher = teacher.sort("problem_id", "sample_index")
    store = ArtifactStore(out / "run")
    n_teacher_parts = _write_sharded(store, "teacher_samples", teacher, fill=teacher_text)

    # -- gold chains as the gold stage will choose them (shortest correct within the limit) ---
    gold = (
        teacher.filter(pl.col("is_correct") & (pl.col("reasoning_tokens") <= MAX_REASONING))
        .select("sample_id", "problem_id", "reasoning_tokens", "gold_answer")
        .sort("problem_id", "reasoning_tokens", "sample_id")
        .unique("problem_id", keep="first", maintain_order=True)
        .sort("sample_id")
    )
    del teacher
    # -- compressions: 3 log-uniform budgets per chain, below the chain's length -------------
    Gr = gold.height
    r = gold["reasoning_tokens"].to_numpy()
    # One budget in each third of [256, min(0.95 r, 8192)] on a log scale: spread over the whole
    # range (what balancing needs to keep most rows, as in the paper) and below the chain's length.
    u = (np.arange(3)[None, :] + rng.uniform(0, 1, size=(Gr, 3))) / 3
    lo = math.log(256)
    hi = np.log(np.minimum(0.95 * r, 8192))[:, None]
    budgets = np.round(np.exp(lo + u * (hi - lo))).astype(np.int64)
    budgets = np.maximum.accumulate(budgets + np.arange(3)[None, :], axis=1)  # strictly increasing
    n = Gr * 3
    dev0 = rng.normal(0.0, 0.1, size=n)
    b = budgets.reshape(-1)
    ctoks = np.maximum(1, np.round(b * (1 + dev0))).astype(np.int64)
    dev = (ctoks - b) / b
    within = np.abs(dev) <= 0.15
    preserved = rng.random(n) < 0.9
    attempts = np.where(within, 1, rng.integers(2, 4, size=n))
    orig = np.repeat(r, 3)
    gold_a = np.repeat(gold["gold_answer"].to_numpy(), 3)
    comp = pl.DataFrame({
        "compression_id": _hex_ids("c", n, rng),
        "sample_id": np.repeat(gold["sample_id"].to_numpy(), 3),
        "problem_id": np.repeat(gold["problem_id"].to_numpy(), 3),
        "group_id": np.repeat(np.array(_hex_ids("g", Gr, rng), dtype=object), 3),
        "budget_rank": np.tile(np.arange(3, dtype=np.int32), Gr),
        "budget": b,
        "target_tokens": b,
        "attempts": attempts,
        "model": ["Qwen/Qwen3-32B"] * n,
        "_start": texts.reserve(np.round(ctoks * cpt)),
        "_chars": np.round(ctoks * cpt).astype(np.int64),
        "compressed_tokens": ctoks,
        "reasoning_tokens": orig,
        "deviation": dev,
        "within_tolerance": within,
        "predicted_answer": np.where(preserved, gold_a, "0"),
        "gold_answer": gold_a,
        "answer_preserved": preserved,
        "finish_reason": ["stop"] * n,
    }).with_columns((pl.col("compressed_tokens") / pl.col("reasoning_tokens")).alias("ratio"))
    comp = comp.sort("sample_id", "budget_rank")
    comp_columns = [c if c != "_start" else "compressed_reasoning" for c in comp.columns if c != "_chars"]

    def comp_text(part):
        return part.with_columns(texts.at(part["_start"].to_numpy(), part["_chars"].to_numpy())
                                 .alias("compressed_reasoning")).select(comp_columns)

    n_comp_parts = _write_sharded(store, "compressions", comp, lambda part: {
        "retried_requests": int((part["attempts"] - 1).sum()), "needed_retry": int((part["attempts"] > 1).sum())},
        fill=comp_text)

    # -- judgments on the answer-preserved compressions ---------------------------------------
    jd = comp.filter(pl.col("answer_preserved")).select("compression_id").sort("compression_id")
    m = jd.height
    score = np.round(1 - 0.5 * rng.random(m) ** 2, 2)  # 77% reach the paper's min_score 0.7
    unparsable = rng.random(m) < 0.01
    complete = rng.random(m) < 0.9
    jd = jd.with_columns(
        pl.lit("Qwen/Qwen3-32B").alias("model"),
        pl.when(pl.Series(unparsable)).then(None).otherwise(pl.Series(complete)).alias("complete"),
        pl.when(pl.Series(unparsable)).then(None).otherwise(pl.Series(score)).alias("score"),
        pl.Series("_miss", rng.integers(0, 20, size=m)),
        pl.when(pl.Series(unparsable)).then(pl.lit("no JSON object in the output")).otherwise(pl.lit(None, pl.Utf8))
        .alias("parse_error"),
    ).with_columns(
        pl.when(pl.col("complete").fill_null(True)).then(pl.lit([], dtype=pl.List(pl.Utf8)))
        .otherwise(pl.concat_list(pl.format("step {} (the substitution)", "_miss"))).alias("missing_steps"),
        pl.when(pl.col("parse_error").is_not_null()).then(pl.lit("I think the compressed solution is fine"))
        .otherwise(pl.concat_str(pl.lit('{"complete": '), pl.col("complete").cast(pl.Utf8).str.to_lowercase(),
                                 pl.lit(', "score": '), pl.col("score").cast(pl.Utf8), pl.lit(', "missing_steps": []}')))
        .alias("raw_output"),
        ((pl.col("score").fill_null(-1.0) >= 0.7) & pl.col("complete").fill_null(False)).alias("passed"),
        pl.when(pl.col("parse_error").is_not_null()).then(pl.lit("unparsable"))
        .when(pl.col("score").fill_null(-1.0) >= 0.7).then(
            pl.when(pl.col("complete").fill_null(False)).then(pl.lit("pass")).otherwise(pl.lit("incomplete")))
        .otherwise(pl.lit("low_score")).alias("verdict"),
    ).select("compression_id", "model", "complete", "score", "missing_steps", "parse_error", "raw_output",
             "passed", "verdict")
    n_judge_parts = _write_sharded(store, "judgments", jd)

    info = {
        "version": FORMAT_VERSION, "compressions": compressions, "text_scale": text_scale,
        "problems_source_rows": len(src_q), "problems": P, "contaminated_planted": int(n_cont), "duplicates_planted": n_dup,
        "teacher_samples": S, "gold_chains": Gr, "compression_rows": n, "judgments": m,
        "parts": {"teacher_samples": n_teacher_parts, "compressions": n_comp_parts, "judgments": n_judge_parts},
        "generate_s": round(time.perf_counter() - t0, 1),
        "disk_bytes": sum(f.stat().st_size for f in (out / "run").rglob("*") if f.is_file()),
    }
    (out / "recipe.json").write_text(json.dumps(recipe_dict(out, model), indent=1))
    (out / "synth.json").write_text(json.dumps(info, indent=1))
    return info


# Tables the post-processing stages write (removed before a timed run).
POST_TABLES = ["problems", "decontamination", "gold_chains", "filtered_compressions", "sft", "balance", "rl", "funnel"]


def reset_post(out: Path) -> None:
    import shutil

    run = Path(out) / "run"
    for t in POST_TABLES:
        shutil.rmtree(run / t, ignore_errors=True)
        shutil.rmtree(run / "excluded" / t, ignore_errors=True)
    (run / "manifest.json").unlink(missing_ok=True)


def work_dir(arg: str | None = None) -> Path:
    return Path(arg or os.environ.get("BARD_BENCH_DIR") or "/tmp/bard_bench").resolve()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, required=True, help="compression rows")
    ap.add_argument("--text-scale", type=float, default=32)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args(argv)
    info = make_run(args.out, args.rows, args.text_scale, work=work_dir(args.work_dir))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
