"""SQL and resume at paper scale: each shipped stats query, and rerunning a finished run.

Works on the synthetic run directories of ``postprocess_scale.py`` (generated there if missing,
and brought to "finished" by one post-processing pass here if the tables are not all written):

1. SQL: for every shipped query (bard_data/queries/*.sql), one fresh DuckDB connection over the
   run (``bard_data.report.sql.connect``, the views ``bard-data sql`` has) and the query executed into a
   Polars frame, ``--repeat`` times; the best and the first (cold OS cache aside, same process)
   wall times are printed. Connecting is timed on its own. Target: <= 1 s per query at 1.3M rows.
2. Resume: ``run_recipe`` on the finished run in a fresh process (every stage finds its
   ``_SUCCESS`` marker and checks its shards' input hashes, nothing recomputed), timed in-process,
   and the whole ``bard-data run RECIPE`` command wall (Python start-up and imports included).
   Target: <= 2 s.

    python benchmarks/sql_resume.py                     # 1.3M rows
    python benchmarks/sql_resume.py --sizes 130000 1300000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _measure import REPO, fmt_table, load_average, machine, run_child  # noqa: E402

SQL_TARGET_S = 1.0
RESUME_TARGET_S = 2.0


def _finished(run: Path) -> bool:
    return all((run / t / "_SUCCESS").exists() for t in ("problems", "gold_chains", "sft", "rl"))


def child_sql(out: Path, repeat: int) -> dict:
    import polars  # noqa: F401  (import time is not query time)

    from bard_data.report.catalog import shipped_queries
    from bard_data.report.sql import connect, execute, views

    run = out / "run"
    t0 = time.perf_counter()
    con = connect(run)
    connect_s = time.perf_counter() - t0
    available = set(views(con))
    con.close()
    res = {}
    for q in shipped_queries():
        if not all(r in available for r in q.requires):
            res[q.name] = {"skipped": f"needs {q.requires}"}
            continue
        walls = []
        rows = None
        for _ in range(repeat):
            con = connect(run)  # a fresh connection each time, as a CLI call has
            t0 = time.perf_counter()
            df = execute(con, q.sql)
            walls.append(time.perf_counter() - t0)
            con.close()
            rows = df.height
        res[q.name] = {"first_s": round(walls[0], 3), "best_s": round(min(walls), 3), "result_rows": rows}
    return {"connect_s": round(connect_s, 3), "queries": res}


def child_resume(out: Path) -> dict:
    import _synth

    from bard_data.api import run_recipe

    recipe = _synth.load_recipe(out)
    t0 = time.perf_counter()
    run_recipe(recipe, out / "run", quiet=True)
    return {"resume_s": round(time.perf_counter() - t0, 3)}


def ensure_finished(work: Path, rows: int, text_scale: float) -> Path:
    import postprocess_scale

    out, _ = postprocess_scale.ensure_run(work, rows, text_scale)
    if not _finished(out / "run"):
        print(f"post-processing the {rows}-row run once ...", file=sys.stderr, flush=True)
        run_child([str(Path(__file__).parent / "postprocess_scale.py"), "--child", str(out), "--no-stats"],
                  env={"OMP_NUM_THREADS": "1"})
    return out


def cli_resume(out: Path) -> float:
    """Wall of the whole ``bard-data run`` command on the finished run (a fresh interpreter)."""
    rec = out / "recipe.json"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "bard_data.cli", "run", str(rec), "--run-dir", str(out / "run"), "--quiet"],
                       capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-4000:])
        raise RuntimeError(f"bard-data run failed with exit code {p.returncode}")
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_300_000])
    ap.add_argument("--text-scale", type=float, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child-sql", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-resume", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_sql:
        print(json.dumps(child_sql(Path(args.child_sql), args.repeat)))
        return 0
    if args.child_resume:
        print(json.dumps(child_resume(Path(args.child_resume))))
        return 0

    import _synth

    work = _synth.work_dir(args.work_dir)
    results = []
    for rows in args.sizes:
        out = ensure_finished(work, rows, args.text_scale)
        load = load_average()
        sql = run_child([__file__, "--child-sql", str(out), "--repeat", str(args.repeat)])
        resume = run_child([__file__, "--child-resume", str(out)], env={"OMP_NUM_THREADS": "1"})
        cli = cli_resume(out)
        results.append({"rows": rows, "load": load, "sql": sql, "resume": resume, "cli_resume_s": round(cli, 3)})

    print(f"# SQL and resume at paper scale ({machine()})")
    for r in results:
        print(f"\n## {r['rows']} compression rows ({r['load']} before)")
        print(f"connect (views over every table): {r['sql']['connect_s']:.3f} s")
        body = []
        for name, q in r["sql"]["queries"].items():
            if "skipped" in q:
                body.append([name, "-", "-", "-", q["skipped"]])
            else:
                ok = "ok" if q["best_s"] <= SQL_TARGET_S else "MISSED"
                body.append([name, q["first_s"], q["best_s"], q["result_rows"], ok])
        print(fmt_table(["query", "first s", f"best of {args.repeat} s", "rows", f"<= {SQL_TARGET_S:g} s"], body))
        rs = r["resume"]["resume_s"]
        print(f"resume of the finished run: run_recipe {rs:.3f} s "
              f"({'ok' if rs <= RESUME_TARGET_S else 'MISSED'}, target <= {RESUME_TARGET_S:g} s); "
              f"whole `bard-data run` command {r['cli_resume_s']:.3f} s (interpreter start-up and imports included)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
