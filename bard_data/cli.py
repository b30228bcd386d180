"""The ``bard-data`` command. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from bard_data.errors import BardError


def _resume_hint(a, rd) -> str:
    return f"bard-data run {a.recipe} --run-dir {rd}"


def _cmd_run(a) -> int:
    from bard_data.api import load_recipe, plan_run, resolve_run_dir, run_recipe, run_status

    rd = None
    try:
        recipe = load_recipe(a.recipe)
        if a.cache_dir:
            recipe = recipe.model_copy(update={"cache_dir": str(Path(a.cache_dir).resolve())})
        rd = resolve_run_dir(recipe, a.run_dir)
        plan = plan_run(recipe, rd)
        if a.dry_run:
            for p in plan.plans:
                why = f": {'; '.join(p.reasons)}" if p.reasons else ""
                print(f"{p.action:<9} {p.name}{why}")
            return 0
        for line in plan.lines():
            if line.startswith("recompute"):
                print(line, file=sys.stderr)
        executor = None
        if a.executor or a.ray_address:
            update = {"kind": a.executor or "ray"}
            if a.ray_address:
                update["address"] = a.ray_address
            if a.workers:
                update["num_workers"] = a.workers
            executor = recipe.executor.model_copy(update=update)
        run_recipe(recipe, rd, quiet=a.quiet, until=a.until, executor=executor)
    except KeyboardInterrupt:
        if rd is None:
            print("\ninterrupted before the run started; nothing was written", file=sys.stderr)
        else:
            print(f"\ninterrupted: finished shards are saved in {rd}; resume with: {_resume_hint(a, rd)}",
                  file=sys.stderr)
        return 130
    _print_status(rd)
    errors = {t: s["llm_errors"] for t, s in run_status(rd).items() if s.get("llm_errors")}
    if errors:
        n = sum(errors.values())
        where = ", ".join(f"{t} {k}" for t, k in errors.items())
        print(f"{n} LLM request(s) still failed after retries ({where}; funnel reason llm_error, the error in "
              f"`detail`); rerun to retry only those: {_resume_hint(a, rd)}", file=sys.stderr)
    return 0


def _print_status(run_dir: Path) -> None:
    from bard_data.api import funnel_frame, read_manifest, run_status
    from bard_data.pipeline import manifest

    if not manifest.exists(run_dir):
        raise BardError(f"{run_dir}: not a run directory (no manifest.json)")
    m = read_manifest(run_dir)
    print(f"run {run_dir} ({m.get('name')}, recipe {m.get('recipe_hash')}): {'complete' if m.get('complete') else 'incomplete'}")
    for table, s in run_status(run_dir).items():
        planned = s["shards_planned"] if s["shards_planned"] is not None else "?"
        state = "done" if s["done"] else ("retry" if s.get("llm_errors") else "pending")
        extra = f"  ({s['llm_errors']} llm_error rows to retry)" if s.get("llm_errors") else ""
        print(f"  {table:<18} {state:<8} shards {s['shards_written']}/{planned}{extra}")
    f = funnel_frame(run_dir)
    if f is not None:
        import polars as pl

        with pl.Config(tbl_rows=200, tbl_hide_dataframe_shape=True, tbl_width_chars=120, fmt_str_lengths=40):
            print(f.drop("count").filter(~pl.col("reason").fill_null("").str.starts_with("note:")))
    tok = m.get("tokens", {})
    for model, t in tok.items():
        print(f"  llm {model}: sent {t['requests_sent']} requests, {t['cache_hits']} cache hits, "
              f"{t['prompt_tokens']} prompt + {t['completion_tokens']} completion tokens")


def _cmd_plan(a) -> int:
    from bard_data.plan import plan_cli

    return plan_cli(a)


def _cmd_status(a) -> int:
    _print_status(Path(a.run_dir))
    return 0


def _cmd_sql(a) -> int:
    from bard_data.report.sql import run_sql_cli

    return run_sql_cli(a)


def _cmd_stats(a) -> int:
    from bard_data.report.stats import stats_cli

    return stats_cli(a)


def _cmd_push(a) -> int:
    from bard_data.report.publish import push_cli

    return push_cli(a)


def _cmd_export(a) -> int:
    from bard_data.report.publish import export_cli

    return export_cli(a)


def _cmd_diff(a) -> int:
    from bard_data.report.diff import diff_cli

    return diff_cli(a)


def _cmd_recipe(a) -> int:
    from bard_data.report.rebuild import recipe_cli

    return recipe_cli(a)


def _cmd_verify(a) -> int:
    import json

    from bard_data.api import verify
    from bard_data.pipeline.verify import format_report

    if a.sample < 1 or a.resample < 0:
        raise BardError("verify: --sample must be >= 1 and --resample >= 0")
    rep = verify(a.run_dir, sample=a.sample, resample=a.resample, seed=a.seed)
    print(json.dumps(rep, indent=2, default=str) if a.json else format_report(rep))
    return 0 if rep["ok"] else 1


def _cmd_train(a) -> int:
    if a.kind == "sft":
        from trainers.sft import main as sft_main

        return sft_main([a.config, *a.rest])
    from trainers.grpo import main as grpo_main

    return grpo_main([a.config, *a.rest])


def _cmd_eval(a) -> int:
    from trainers.evaluate import main as eval_main

    return eval_main(a.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bard-data", description="Build budget-aware reasoning distillation datasets.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run or resume a recipe")
    r.add_argument("recipe")
    r.add_argument("--run-dir", default=None, help="overrides the recipe's run_dir")
    r.add_argument("--until", default=None, help="stop after this table (e.g. teacher_samples)")
    r.add_argument("--executor", choices=["local", "ray"], default=None, help="overrides the recipe's executor.kind")
    r.add_argument("--ray-address", default=None, help="Ray cluster to join ('auto', 'HOST:PORT'); implies --executor ray")
    r.add_argument("--workers", type=int, default=None, help="Ray actors per LLM stage")
    r.add_argument("--cache-dir", default=None, help="a completion cache shared by several runs (overrides the "
                   "recipe's cache_dir; default: RUN_DIR/cache)")
    r.add_argument("--dry-run", action="store_true", help="print which stages would be built, recomputed (and why) "
                   "or kept, and stop")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.set_defaults(fn=_cmd_run)

    pl_ = sub.add_parser("plan", help="what a recipe will ask of its LLMs (requests, tokens, time, cost), "
                         "without starting an engine")
    pl_.add_argument("recipe")
    pl_.add_argument("--run-dir", default=None, help="a partly or fully built run: count what is finished and cached")
    pl_.add_argument("--cache-dir", default=None, help="the completion cache to count hits in (as bard-data run)")
    pl_.add_argument("--throughput", default=None, help="completion tokens/s per stage for the expected time, e.g. "
                     "teacher=2500,compression=9000,judge=9000; or a run directory whose manifest measured them")
    pl_.add_argument("--assume", default=None, help="override expected rates, e.g. teacher_pass_rate=0.3,retry_rate=0.4 "
                     "(names: teacher_pass_rate, retry_rate, answer_preserved, fill, compression_fill)")
    pl_.add_argument("--fresh", action="store_true", help="as if the run directory were empty (still compares with "
                     "what its manifest says was spent)")
    pl_.add_argument("--json", action="store_true", help="the plan as JSON")
    pl_.set_defaults(fn=_cmd_plan)

    s = sub.add_parser("status", help="per-stage progress and the funnel of a run")
    s.add_argument("run_dir")
    s.set_defaults(fn=_cmd_status)

    q = sub.add_parser("sql", help="DuckDB SQL over a run or a published dataset directory")
    q.add_argument("run_dir")
    q.add_argument("query")
    q.add_argument("--out", default=None, help="write the result to .csv, .parquet or .json")
    q.add_argument("--max-rows", type=int, default=50)
    q.set_defaults(fn=_cmd_sql)

    st = sub.add_parser("stats", help="the built-in report of a run")
    st.add_argument("run_dir")
    st.add_argument("--plots", default=None, help="write PNG plots to this folder")
    st.add_argument("--json", default=None, help="also write the report as JSON")
    st.set_defaults(fn=_cmd_stats)

    pu = sub.add_parser("push", help="publish a run to the Hugging Face Hub")
    pu.add_argument("run_dir")
    pu.add_argument("--repo", required=True)
    pu.add_argument("--private", action="store_true")
    pu.add_argument("--revision", default=None)
    pu.add_argument("--message", default=None, help="commit message")
    pu.add_argument("--template", default=None, help="card template (jinja2) instead of the bundled one")
    pu.add_argument("--allow-incomplete", action="store_true", help="publish a run whose stages did not all finish")
    pu.set_defaults(fn=_cmd_push)

    ex = sub.add_parser("export", help="write the publishable layout (parquet configs + card) locally")
    ex.add_argument("run_dir")
    ex.add_argument("out_dir")
    ex.add_argument("--repo", default=None, help="Hub id shown in the card's usage examples")
    ex.add_argument("--template", default=None, help="card template (jinja2) instead of the bundled one")
    ex.add_argument("--allow-incomplete", action="store_true", help="export a run whose stages did not all finish")
    ex.set_defaults(fn=_cmd_export)

    df = sub.add_parser("diff", help="compare two builds (run directories or exported datasets)")
    df.add_argument("run_a")
    df.add_argument("run_b")
    df.add_argument("--json", action="store_true", help="the comparison as JSON")
    df.set_defaults(fn=_cmd_diff)


    rc = sub.add_parser("recipe", help="the recipe a published dataset was built with, to rebuild it")
    rc.add_argument("dataset", help="a dataset folder (export or download), a run directory, or a Hub dataset id")
    rc.add_argument("-o", "--out", default=None, help="write the recipe here (default: print it)")
    rc.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    rc.add_argument("--force", action="store_true", help="replace an existing --out file")
    rc.set_defaults(fn=_cmd_recipe)

    ve = sub.add_parser("verify", help="recompute a random sample of a run's LLM rows from the cache (and with "
                        "--resample, re-send requests) and say whether they match")
    ve.add_argument("run_dir")
    ve.add_argument("--sample", type=int, default=5, help="rows per LLM stage recomputed from the cache (default 5)")
    ve.add_argument("--resample", type=int, default=0, metavar="N", help="also re-send N of their requests per "
                    "stage to the backend and compare the texts (default 0: no request is sent)")
    ve.add_argument("--seed", type=int, default=0, help="seed of the random sample")
    ve.add_argument("--json", action="store_true", help="the result as JSON")
    ve.set_defaults(fn=_cmd_verify)

    tr = sub.add_parser("train", help="bundled TRL trainers")
    tr.add_argument("kind", choices=["sft", "grpo"])
    tr.add_argument("config")
    tr.add_argument("rest", nargs=argparse.REMAINDER)
    tr.set_defaults(fn=_cmd_train)

    ev = sub.add_parser("eval", help="budget-grid evaluation", add_help=False)
    ev.add_argument("rest", nargs=argparse.REMAINDER)
    ev.set_defaults(fn=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        # argparse will not hand `--flags` to a REMAINDER positional: the evaluation has its own parser.
        from trainers.evaluate import main as eval_main

        try:
            return int(eval_main(argv[1:]) or 0)
        except BardError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.fn(args) or 0)
    except BardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
