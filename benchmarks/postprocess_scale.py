"""Paper-scale post-processing: wall time and peak RSS per step at 130K, 650K and 1.3M compressions.

For each size a synthetic run directory (benchmarks/_synth.py: problems source, teacher samples,
compressions, judgments as a paper.yaml build leaves them, text at 1/``--text-scale`` of real
length) is generated once under ``--work-dir`` (default $BARD_BENCH_DIR or /tmp/bard_bench), then
a fresh process runs ``run_recipe`` on it -- the LLM stages are finished, so it runs exactly the
post-processing: problems (loading, answers, ids, dedupe, decontamination against math500 and
amc23), gold selection, SFT (filters, balancing, standard mix, formatting), RL, funnel -- and then
the built-in stats report and ``export`` (every config, the card and its plots). Each step's
wall time and sampled peak RSS are printed, plus the process's peak RSS (getrusage).

    python benchmarks/postprocess_scale.py                       # 130K, 650K, 1.3M
    python benchmarks/postprocess_scale.py --sizes 130000 --json out.json
    python benchmarks/postprocess_scale.py --sizes 130000 --text-scale 32 4 1   # RSS against text length

Targets (2-core machine): listed steps <= 60 s and peak RSS <= 4 GiB at 1.3M rows, cost linear
in rows; at 1/4 of real text length, listed steps <= 120 s and peak RSS <= 4 GiB at 1.3M rows;
peak RSS at 1/4 length within 10% of 1/32, at full length within 20%. Export is timed on its
own line, not in the listed steps; its memory counts in the process's peak. The problems stage's loading part (answer normalization with math-verify) is reported
on its own line and not counted in the target (it is not one of the listed post-processing steps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# BARD_SRC: measure another copy of the package (e.g. the code before a change) on the same data.
sys.path.insert(0, os.environ.get("BARD_SRC") or str(Path(__file__).resolve().parents[1]))

from _measure import GiB, RSSSampler, Timer, fmt_table, load_average, machine, max_rss_bytes, run_child  # noqa: E402

DEFAULT_SIZES = [130_000, 650_000, 1_300_000]
TARGET_S = {32: 60.0, 4: 120.0}  # listed steps at 1.3M rows, per text scale
TARGET_RSS_GIB = 4.0
# Steps that count toward the target (top-level), and the part of "problems" that does not.
LOADING = "problems/build_problems"


def child(out: Path, with_stats: bool = True) -> dict:
    """Runs in a fresh process: reset the post-processing tables, run them, time them."""
    import _synth

    _synth.reset_post(out)
    import polars  # noqa: F401  (imports are not part of the timings)

    from bard_data.api import run_recipe
    from bard_data.pipeline import runner
    from bard_data.report.publish import export
    from bard_data.report.stats import report
    from bard_data.stages import filter as filter_stage
    from bard_data.stages import problems, rl, sft

    sampler = RSSSampler().start()
    rss_start = sampler.proc.memory_info().rss
    timer = Timer(sampler)
    stage_run = runner.run_stage

    def timed_stage(ctx, stage, *args, **kwargs):  # one step per stage, named after its table
        with timer.step(stage.name):
            return stage_run(ctx, stage, *args, **kwargs)

    runner.run_stage = timed_stage
    timer.wrap(problems, "build_problems", "/build_problems")
    timer.wrap(problems, "decontaminate", "/decontaminate")
    timer.wrap(filter_stage, "filter_compressions", "/filter_compressions")
    timer.wrap(sft, "balance", "/balance")
    timer.wrap(sft, "mix_standard", "/mix_standard")
    timer.wrap(sft, "messages_column", "/messages")
    timer.wrap(rl, "messages_column", "/messages")
    timer.wrap(runner, "build_funnel", "funnel")
    recipe = _synth.load_recipe(out)
    t0 = time.perf_counter()
    with timer.step("run_recipe"):
        run_recipe(recipe, out / "run", quiet=True)
    run_s = time.perf_counter() - t0
    stats_s = None
    if with_stats:
        with timer.step("stats"):
            rep = report(out / "run")
        stats_s = timer.wall["stats"]
        with timer.step("export"):
            export(out / "run", out / "export")
    sampler.stop()
    steps = timer.result()
    loading = steps.get(LOADING, {}).get("wall_s", 0.0)
    return {
        "rows": json.loads((out / "synth.json").read_text())["compressions"],
        "steps": steps,
        "run_recipe_s": round(run_s, 3),
        "stats_s": None if stats_s is None else round(stats_s, 3),
        "export_s": timer.wall.get("export"),
        "loading_s": loading,
        "target_total_s": round(run_s - loading + (stats_s or 0.0), 3),
        "target_total_cpu_s": round(steps["run_recipe"]["cpu_s"] - steps.get(LOADING, {}).get("cpu_s", 0.0)
                                    + steps.get("stats", {}).get("cpu_s", 0.0), 3),
        "peak_rss_gib": round(max_rss_bytes() / GiB, 3),
        "rss_at_start_gib": round(rss_start / GiB, 3),
        "report_parts": len(rep) if with_stats else None,
    }


def ensure_run(work: Path, rows: int, text_scale: float) -> tuple[Path, dict]:
    # One folder per (rows, text scale): the full-length point must not overwrite the 1/32 one.
    out = work / (f"pp-{rows}" if text_scale == 32 else f"pp-{rows}-t{text_scale:g}")
    import _synth

    if not _synth.is_ready(out, rows, text_scale):
        t0 = time.perf_counter()
        print(f"generating the synthetic {rows}-row run in {out} ...", file=sys.stderr, flush=True)
        run_child([str(Path(__file__).parent / "_synth.py"), "--rows", str(rows), "--text-scale", str(text_scale),
                   "--out", str(out), "--work-dir", str(work)])
        print(f"  generated in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out, json.loads((out / "synth.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="compression rows per size")
    ap.add_argument("--text-scale", type=float, nargs="+", default=[32],
                    help="texts are 1/N of real length (default 32); several: one run each, then RSS against N")
    ap.add_argument("--keep", action="store_true", help="keep each run's export folder")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-stats", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child), not args.no_stats)))
        return 0

    import _synth

    work = _synth.work_dir(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    all_results = []
    for scale in args.text_scale:
        results = []
        for rows in args.sizes:
            out, info = ensure_run(work, rows, scale)
            print(f"measuring {rows} rows at text scale 1/{scale:g} ...", file=sys.stderr, flush=True)
            load = load_average()
            res = run_child([__file__, "--child", str(out)], env={"OMP_NUM_THREADS": "1"})
            res["load"] = f"{rows}: {load} before, {load_average()} after"
            res["synth"] = info
            res["text_scale"] = scale
            results.append(res)
            if not args.keep:  # the export is a second copy of the run's tables
                shutil.rmtree(out / "export", ignore_errors=True)
        _print_scale(results, scale)
        all_results += results
    if len(args.text_scale) > 1:
        _print_rss_vs_scale(all_results)
    if args.json:
        Path(args.json).write_text(json.dumps(all_results, indent=1))
    return 0


def _print_scale(results: list[dict], scale: float) -> None:
    print(f"# Paper-scale post-processing  ({machine()}; {', '.join(r['load'] for r in results)})")
    print(f"# text scale 1/{scale:g}: every text is tokens * 4 / {scale:g} characters "
          f"(token counts, budgets and row counts are full scale)")
    print("# rows per size: " + "; ".join(
        f"{r['rows']}: {r['synth']['problems_source_rows']} source problems, {r['synth']['teacher_samples']} teacher samples, "
        f"{r['synth']['gold_chains']} gold chains, {r['synth']['judgments']} judgments, "
        f"{r['synth']['disk_bytes'] / GiB:.2f} GiB on disk" for r in results))
    names = []
    for r in results:
        for n in r["steps"]:
            if n not in names and n != "run_recipe":
                names.append(n)
    header = ["step"]
    for r in results:
        k = f"{r['rows'] // 1000}K"
        header += [f"{k} wall s", f"{k} cpu s", f"{k} GiB"]
    rows = []
    for n in names:
        row = [n]
        for r in results:
            st = r["steps"].get(n, {})
            row += [st.get("wall_s", ""), st.get("cpu_s", ""), st.get("peak_rss_gib", "")]
        rows.append(row)
    rows.append(["run_recipe (all of it)"] + sum(([r["run_recipe_s"], r["steps"]["run_recipe"]["cpu_s"], ""]
                                                  for r in results), []))
    rows.append(["TOTAL listed steps (run_recipe - loading + stats)"]
                + sum(([r["target_total_s"], r["target_total_cpu_s"], r["peak_rss_gib"]] for r in results), []))
    print(fmt_table(header, rows))
    print()
    base = results[0]
    for r in results:
        per = r["target_total_s"] / r["rows"] * 1e6
        lin = (r["target_total_s"] / base["target_total_s"]) / (r["rows"] / base["rows"]) if base["target_total_s"] else 0
        target = f" (target <= {TARGET_S[scale]:.0f} s at 1.3M)" if scale in TARGET_S else ""
        print(f"{r['rows']:>9} rows: listed steps {r['target_total_s']:7.1f} s{target}"
              f"  {per:6.1f} us/row  growth vs {base['rows']}: {lin:.2f}x linear"
              f"  peak RSS {r['peak_rss_gib']:.2f} GiB (target <= {TARGET_RSS_GIB:.0f})"
              f"  problem loading {r['loading_s']:.1f} s (not in target)  export {r['export_s'] or 0:.1f} s")
    print()


def _print_rss_vs_scale(results: list[dict]) -> None:
    """Peak RSS against text length, per row count: the ratio to the 1/32 point (or the shortest)."""
    print("# Peak RSS against text length (targets: 1/4 within 10% of 1/32, full length within 20%)")
    header = ["rows", "text scale", "text GiB on disk", "listed steps s", "sft GiB", "gold GiB", "peak RSS GiB",
              "vs shortest"]
    rows = []
    for n in sorted({r["rows"] for r in results}):
        mine = sorted((r for r in results if r["rows"] == n), key=lambda r: -r["text_scale"])
        base = mine[0]["peak_rss_gib"]
        for r in mine:
            rows.append([n, f"1/{r['text_scale']:g}", f"{r['synth']['disk_bytes'] / GiB:.2f}", r["target_total_s"],
                         r["steps"].get("sft", {}).get("peak_rss_gib", ""),
                         r["steps"].get("gold_chains", {}).get("peak_rss_gib", ""), r["peak_rss_gib"],
                         f"{(r['peak_rss_gib'] / base - 1) * 100:+.0f}%"])
    print(fmt_table(header, rows))


if __name__ == "__main__":
    sys.exit(main())
