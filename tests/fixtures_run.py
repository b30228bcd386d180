"""A small synthetic run directory with every table a real run writes, for SQL/stats/publish tests.

Built with the store's writes only (no LLM, no tokenizer), so the tests of the
read-side (SQL views, the stats report, export and push) do not depend on the pipeline. Numbers
are deterministic and chosen so that every report part has something to count: two sources, a
`test` split in ``rl``, compressions that miss the tolerance or change the answer, judge
rejections and an unparsable verdict, a balanced-away row, imported and sampled teacher traces.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from bard_data.budget.balance import balance_table
from bard_data.pipeline.funnel import build_funnel
from bard_data.pipeline.store import ArtifactStore, atomic_write_json

EDGES = [8, 32, 128, 512]
LABELS = ["[8,32)", "[32,128)", "[128,512]"]
MSG = pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8}))

TEACHER_MODEL = "transformers:tiny-teacher"
COMPRESSOR = "tiny-compressor"
JUDGE = "tiny-judge"


def _bin(budget: int) -> str | None:
    for i in range(len(EDGES) - 1):
        lo, hi = EDGES[i], EDGES[i + 1]
        last = i == len(EDGES) - 2
        if lo <= budget < hi or (last and budget == hi):
            return LABELS[i]
    return None


def _funnel(stage: str, rows_in: int, kept: pl.DataFrame, excluded: pl.DataFrame | None, added: int = 0,
            counters: dict | None = None) -> dict:
    dropped: dict[str, int] = {}
    if excluded is not None:
        for reason, n in excluded.group_by("reason").len().iter_rows():
            dropped[reason] = int(n)
    return {"stage": stage, "shard": 0, "rows_in": rows_in, "rows_out": kept.height, "added": added,
            "dropped": dropped, "counters": counters or {}}


def _write(store: ArtifactStore, table: str, df: pl.DataFrame, excluded: pl.DataFrame | None, funnel: dict) -> None:
    """One stage's table as the runner writes it: one part with its funnel record, then done."""
    store.write_shard(table, 0, df, excluded, funnel)
    store.mark_done(table, {"shards": 1, "rows": df.height})


def make_run(root: str | Path) -> Path:
    root = Path(root)
    store = ArtifactStore(root)

    # -- problems (12 kept, 1 contaminated, 1 duplicate) -----------------------------------
    probs = []
    for i in range(12):
        src = "gsm8k" if i < 8 else "math"
        probs.append({
            "problem_id": f"p-{i:02d}", "source": src, "question": f"What is {i} + {i + 1}?",
            "answer": str(2 * i + 1), "raw_answer": f"#### {2 * i + 1}", "domain": "math",
            "split": "test" if i in (3, 9) else "train", "meta": "{}", "source_row": i, "source_id": None,
        })
    problems = pl.DataFrame(probs, schema_overrides={"source_id": pl.Utf8})
    prob_ex = pl.DataFrame([
        {"source": "gsm8k", "source_row": 12, "question": "contaminated question", "raw_answer": "1",
         "reason": "contaminated", "detail": "math500: some eight word ngram"},
        {"source": "math", "source_row": 13, "question": "What is 0 + 1?", "raw_answer": "1",
         "reason": "duplicate", "detail": "same question as an earlier row (p-00)"},
    ])
    _write(store, "problems", problems, prob_ex, _funnel("problems", 14, problems, prob_ex))
    store.write_table("decontamination", pl.DataFrame({
        "reference": ["math500", "amc23"], "reference_rows": [500, 40], "overlapping_problems": [1, 0]}))

    # -- teacher samples: 2 per problem; imported: 1 per gsm8k problem ---------------------
    samples, imported = [], []
    for p in probs:
        i = int(p["problem_id"][2:])
        for k in range(2):
            correct = (i + k) % 3 != 0
            n_tok = 40 + 23 * i + 7 * k
            samples.append({
                "sample_id": f"s-{i:02d}{k}", "problem_id": p["problem_id"], "source": p["source"],
                "origin": "sampled", "model": TEACHER_MODEL, "sample_index": k,
                "prompt": json.dumps([{"role": "user", "content": p["question"]}]),
                "completion": f"<think>r{i}{k}</think> \\boxed{{{p['answer'] if correct else 0}}}",
                "reasoning": f"r{i}{k}", "response": f"\\boxed{{{p['answer'] if correct else 0}}}",
                "think_closed": True, "predicted_answer": p["answer"] if correct else "0",
                "gold_answer": p["answer"], "is_correct": correct, "reasoning_tokens": n_tok,
                "completion_tokens": n_tok + 5, "finish_reason": "stop",
            })
        if p["source"] == "gsm8k":
            imported.append({
                "sample_id": f"i-{i:02d}", "problem_id": p["problem_id"], "source": p["source"],
                "origin": "imported:gsm8k-solutions", "model": "gsm8k-human", "sample_index": 0,
                "prompt": None, "completion": f"step {i}\n\n{p['answer']}", "reasoning": f"step {i}",
                "response": p["answer"], "think_closed": False, "predicted_answer": p["answer"],
                "gold_answer": p["answer"], "is_correct": True, "reasoning_tokens": 30 + 11 * i,
                "completion_tokens": None, "finish_reason": "imported", "source_flag": None,
                "flag_disagrees": False, "source_row": i,
            })
    teacher = pl.DataFrame(samples)
    _write(store, "teacher_samples", teacher, None, _funnel("teacher_samples", teacher.height, teacher, None))
    imp = pl.DataFrame(imported, schema_overrides={"prompt": pl.Utf8, "completion_tokens": pl.Int64,
                                                    "source_flag": pl.Boolean})
    _write(store, "imported_samples", imp, None, _funnel("imported_samples", imp.height, imp, None))

    # -- gold chains: the shortest correct sample per problem ------------------------------
    alls = pl.concat([teacher, imp], how="diagonal_relaxed")
    rates = alls.group_by("problem_id").agg(
        pl.len().alias("n_samples"), pl.col("is_correct").sum().cast(pl.Int64).alias("n_correct"),
    ).with_columns((pl.col("n_correct") / pl.col("n_samples")).alias("pass_rate"))
    ok = alls.filter(pl.col("is_correct")).join(problems.select("problem_id", "question"), on="problem_id")
    ok = ok.join(rates, on="problem_id").sort("problem_id", "reasoning_tokens", "sample_id")
    first = pl.int_range(pl.len()).over("problem_id") == 0
    gold = ok.filter(first).select(
        "sample_id", "problem_id", "source", "origin", "model", "question", "gold_answer", "reasoning",
        "response", "predicted_answer", "reasoning_tokens", "n_samples", "n_correct", "pass_rate")
    gold_ex = pl.concat([
        alls.filter(~pl.col("is_correct")).with_columns(pl.lit("teacher_wrong").alias("reason"), pl.lit("").alias("detail")),
        ok.filter(~first).drop("question", "n_samples", "n_correct", "pass_rate").with_columns(
            pl.lit("not_selected").alias("reason"), pl.lit("gold policy shortest").alias("detail")),
    ], how="diagonal_relaxed")
    _write(store, "gold_chains", gold, gold_ex, _funnel("gold_chains", alls.height, gold, gold_ex))

    # -- compressions: three budgets per gold chain ----------------------------------------
    comps = []
    for g in gold.iter_rows(named=True):
        n = g["reasoning_tokens"]
        for rank, frac in enumerate((0.25, 0.5, 0.8)):
            b = max(8, int(round(n * frac)))
            j = len(comps)
            off = [-0.1, 0.05, 0.3, -0.6, 0.15, 0.0, 0.45][j % 7]
            ct = max(1, int(round(b * (1 + off))))
            dev = (ct - b) / b
            comps.append({
                "compression_id": f"c-{j:03d}", "sample_id": g["sample_id"], "problem_id": g["problem_id"],
                "group_id": f"g-{g['sample_id']}", "budget_rank": rank, "budget": b, "target_tokens": b,
                "attempts": 1 + (j % 4 == 3), "model": COMPRESSOR, "compressed_reasoning": f"short {j}",
                "compressed_tokens": ct, "reasoning_tokens": n, "deviation": dev,
                "within_tolerance": abs(dev) <= 0.2, "predicted_answer": g["gold_answer"] if j % 5 else "0",
                "gold_answer": g["gold_answer"], "answer_preserved": j % 5 != 0, "finish_reason": "stop",
                "ratio": ct / n,
            })
    comp = pl.DataFrame(comps)
    _write(store, "compressions", comp, None, _funnel("compressions", comp.height, comp, None,
                                                          counters={"needed_retry": int((comp["attempts"] > 1).sum())}))

    # -- judgments on answer-preserved compressions ----------------------------------------
    judg = []
    for r in comp.filter(pl.col("answer_preserved")).iter_rows(named=True):
        j = int(r["compression_id"][2:])
        if j % 11 == 7:
            judg.append({"compression_id": r["compression_id"], "model": JUDGE, "complete": None, "score": None,
                         "missing_steps": None, "parse_error": "no JSON object", "raw_output": "hmm",
                         "passed": False, "verdict": "unparsable"})
            continue
        score = round(((j * 37) % 100) / 100, 2)
        complete = j % 6 != 1
        passed = score >= 0.3 and complete
        verdict = "pass" if passed else ("incomplete" if score >= 0.3 else "low_score")
        judg.append({"compression_id": r["compression_id"], "model": JUDGE, "complete": complete, "score": score,
                     "missing_steps": [] if complete else [f"step {j}"], "parse_error": None,
                     "raw_output": json.dumps({"complete": complete, "score": score}), "passed": passed,
                     "verdict": verdict})
    jd = pl.DataFrame(judg, schema_overrides={"complete": pl.Boolean, "score": pl.Float64,
                                              "missing_steps": pl.List(pl.Utf8), "parse_error": pl.Utf8})
    _write(store, "judgments", jd, None, _funnel("judgments", jd.height, jd, None))

    # -- filtered compressions, then sft: bin, drop one row of the fullest bin (balanced away),
    # add standard --------------------------------------------------------------------------
    f = comp.join(jd.select("compression_id", "verdict"), on="compression_id", how="left")
    reason = (pl.when(~pl.col("answer_preserved")).then(pl.lit("answer_changed"))
              .when(~pl.col("within_tolerance")).then(pl.lit("over_budget"))
              .when(pl.col("verdict").is_null()).then(pl.lit("judge_error"))
              .when(pl.col("verdict") == "unparsable").then(pl.lit("judge_unparsable"))
              .when(pl.col("verdict") != "pass").then(pl.lit("judge_rejected")))
    f = f.with_columns(reason.alias("reason"),
                       pl.col("budget").map_elements(_bin, return_dtype=pl.Utf8).alias("budget_bin"))
    passed = f.filter(pl.col("reason").is_null()).sort("compression_id")
    before = {lab: int((passed["budget_bin"] == lab).sum()) for lab in LABELS}
    fullest = max(LABELS, key=lambda lab: before[lab])
    drop_id = passed.filter(pl.col("budget_bin") == fullest)["compression_id"][0]
    kept = passed.filter(pl.col("compression_id") != drop_id)
    after = {lab: int((kept["budget_bin"] == lab).sum()) for lab in LABELS}
    filt_ex = f.filter(pl.col("reason").is_not_null()).with_columns(pl.lit("").alias("detail")).drop(
        "verdict", "budget_bin", "compressed_reasoning")
    filtered = passed.drop("verdict", "reason", "budget_bin", "compressed_reasoning")
    _write(store, "filtered_compressions", filtered, filt_ex, _funnel("filtered_compressions", comp.height, filtered,
                                                                     filt_ex))
    sft_ex = passed.filter(pl.col("compression_id") == drop_id).with_columns(
        pl.lit("balanced_away").alias("reason"), pl.lit("").alias("detail")).drop("verdict", "compressed_reasoning")
    kept = kept.join(gold.select("sample_id", "question", "response", "source"), on="sample_id", how="left")

    def msgs(q, reasoning, resp, budget):
        system = [{"role": "system", "content": f"Thinking budget: {budget} tokens."}] if budget is not None else []
        return system + [{"role": "user", "content": q},
                         {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{resp}"}]

    rows = [{"messages": msgs(r["question"], r["compressed_reasoning"], r["response"], r["budget"]),
             "budget": r["budget"], "budget_bin": r["budget_bin"], "kind": "budget", "problem_id": r["problem_id"],
             "source": r["source"], "sample_id": r["sample_id"], "compression_id": r["compression_id"],
             "group_id": r["group_id"]} for r in kept.iter_rows(named=True)]
    rows += [{"messages": msgs(r["question"], r["reasoning"], r["response"], None), "budget": None,
              "budget_bin": None, "kind": "standard", "problem_id": r["problem_id"], "source": r["source"],
              "sample_id": r["sample_id"], "compression_id": None, "group_id": None}
             for r in gold.iter_rows(named=True)]
    sft = pl.DataFrame(rows, schema={"messages": MSG, "budget": pl.Int64, "budget_bin": pl.Utf8, "kind": pl.Utf8,
                                     "problem_id": pl.Utf8, "source": pl.Utf8, "sample_id": pl.Utf8,
                                     "compression_id": pl.Utf8, "group_id": pl.Utf8})
    n_bud = sum(after.values())
    k = len(LABELS)
    total = sum(before.values())
    report = {
        "edges": EDGES, "labels": LABELS, "before": before, "after": after,
        "target": {lab: 1 / k for lab in LABELS}, "quota": after,
        "tv_before": 0.5 * sum(abs(before[lab] / total - 1 / k) for lab in LABELS),
        "tv_after": 0.5 * sum(abs(after[lab] / n_bud - 1 / k) for lab in LABELS),
        "rows_in": total, "rows_kept": n_bud, "rows_upsampled": 0, "outside_bins": 0,
        "total_requested": n_bud, "keep_groups": False,
    }
    _write(store, "sft", sft, sft_ex, _funnel("sft", filtered.height + gold.height, sft, sft_ex))
    store.write_table("balance", balance_table(report))

    # -- rl ---------------------------------------------------------------------------------
    rl_df = problems.join(rates.select("problem_id", pl.col("pass_rate").alias("difficulty")), on="problem_id",
                          how="left").sort("problem_id")
    too_easy = rl_df.filter(pl.col("difficulty") >= 1.0)
    rl_df = rl_df.filter(pl.col("difficulty") < 1.0)
    budgets = [16 + 37 * i for i in range(rl_df.height)]
    rl = pl.DataFrame({
        "prompt": pl.Series([[{"role": "system", "content": f"Thinking budget: {b} tokens."},
                              {"role": "user", "content": q}] for b, q in zip(budgets, rl_df["question"])], dtype=MSG),
        "budget": pl.Series(budgets, dtype=pl.Int64), "solution": rl_df["answer"], "difficulty": rl_df["difficulty"],
        "source": rl_df["source"], "problem_id": rl_df["problem_id"], "split": rl_df["split"],
    })
    rl_ex = too_easy.with_columns(pl.lit("too_easy").alias("reason"), pl.lit("pass rate 1.0").alias("detail"))
    _write(store, "rl", rl, rl_ex, _funnel("rl", problems.height, rl, rl_ex))

    stages = ["problems", "teacher_samples", "imported_samples", "gold_chains", "compressions", "judgments",
              "filtered_compressions", "sft", "rl"]
    store.write_table("funnel", build_funnel(store, stages))

    recipe = {
        "name": "synthetic-bard", "description": "A synthetic run for tests.", "run_dir": str(root), "seed": 7,
        "shard_size": 32, "license": "mit", "student": {"tokenizer": "tiny-student", "trust_remote_code": False},
        "sources": [{"name": "gsm8k", "path": "/data/gsm8k.jsonl"}, {"name": "math", "path": "/data/math.jsonl"}],
        "teacher": {"backend": {"kind": "transformers", "model": "tiny-teacher"},
                    "sampling": {"temperature": 0.6, "top_p": 0.95, "top_k": -1, "max_tokens": 256,
                                 "repetition_penalty": 1.0, "stop": []},
                    "seed": 1, "system_prompt": None, "samples_per_problem": 2,
                    "prompt_template": "{{ question }}\n\nPlease reason step by step."},
        "compression": {"backend": {"kind": "openai", "model": COMPRESSOR, "base_url": "http://127.0.0.1:9/v1",
                                    "api_key_env": "OPENAI_API_KEY"},
                        "sampling": {"temperature": 0.3, "top_p": 0.95, "max_tokens": 160}, "seed": 2,
                        "max_retries": 1,
                        "budgets": {"mode": "fractions", "fractions": [0.25, 0.5, 0.8]},
                        "prompt_template": "Rewrite to about {{ target }} tokens:\n{{ reasoning }}"},
        "judge": {"backend": {"kind": "vllm", "model": JUDGE}, "sampling": {"temperature": 0.0, "max_tokens": 96},
                  "seed": 3, "min_score": 0.3, "require_complete": True,
                  "prompt_template": "Is it complete?\n{{ compressed }}"},
        "budget": {"tolerance": 0.2, "one_sided": False},
        "balance": {"n_bins": 3, "target": "uniform", "standard_ratio": 1.0},
        "format": {"budget_template": "Thinking budget: {{ budget }} tokens.", "budget_placement": "system"},
    }
    manifest = {
        "name": "synthetic-bard", "recipe": recipe, "recipe_file": str(root / "recipe.yaml"),
        "recipe_hash": "0123456789abcdef", "versions": {"python": "3.11.7", "bard_data": "0.1.0"},
        "models": {"student_tokenizer": "tiny-student", "teacher": TEACHER_MODEL,
                   "compression": f"openai:{COMPRESSOR}", "judge": f"vllm:{JUDGE}"},
        "seeds": {"recipe": 7, "teacher": 1, "compression": 2, "judge": 3},
        "stages": stages, "invocations": [], "timings": {"problems": 0.1},
        "tokens": {
            "tiny-teacher": {"prompt_tokens": 1200, "completion_tokens": 3400, "requests_sent": 24, "cache_hits": 0},
            COMPRESSOR: {"prompt_tokens": 5000, "completion_tokens": 900, "requests_sent": 40, "cache_hits": 3},
            JUDGE: {"prompt_tokens": 7000, "completion_tokens": 800, "requests_sent": 28, "cache_hits": 0},
        },
        "complete": True,
    }
    atomic_write_json(root / "manifest.json", manifest)
    return root
