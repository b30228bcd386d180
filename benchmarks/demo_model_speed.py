"""Speed and rough accuracy of the demo model (SmolLM2-135M-Instruct) on GSM8K, on the CPU.

Generates answers to the first N GSM8K problems with one backend or both -- transformers batched
``generate`` (one batch, left padding) and the vLLM offline engine (one ``chat`` call) -- and prints
start time, wall time, generated tokens per second and how many answers match the ``#### N`` gold.

    python scripts/demo_model.py                      # once: writes .models/SmolLM2-135M-Instruct
    python benchmarks/demo_model_speed.py .models/SmolLM2-135M-Instruct --threads 1 --backend both

``--threads`` sets OMP_NUM_THREADS before torch is imported (the process's own setting wins if
given explicitly). Run each thread setting in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

PROMPT = "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
DEFAULT_DATA = "/work/shared/data/gsm8k/train.jsonl"


def load_problems(path: str, n: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) >= n:
                break
            row = json.loads(line)
            gold = row["answer"].split("####")[-1].strip().replace(",", "")
            rows.append({"question": row["question"], "gold": gold})
    return rows


def _number(text: str) -> float | None:
    text = text.replace(",", "").replace("$", "")
    nums = re.findall(r"-?\d+(?:\.\d+)?", text)
    return float(nums[-1]) if nums else None


def extract_answer(text: str) -> float | None:
    """The last ``\\boxed{...}`` content's last number, else the text's last number."""
    boxed = re.findall(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}", text)
    if boxed:
        value = _number(boxed[-1])
        if value is not None:
            return value
    return _number(text)


def is_correct(text: str, gold: str) -> bool:
    got, want = extract_answer(text), _number(gold)
    return got is not None and want is not None and abs(got - want) < 1e-6


def run_hf(model_dir: str, problems: list[dict], args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    start_s = time.perf_counter() - t0

    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": PROMPT.format(question=p["question"])}],
            tokenize=False, add_generation_prompt=True,
        )
        for p in problems
    ]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=args.max_new_tokens, do_sample=True,
            temperature=args.temperature, top_p=args.top_p, pad_token_id=tok.pad_token_id,
        )
    wall = time.perf_counter() - t1
    gen = out[:, batch["input_ids"].shape[1]:]
    eos = tok.eos_token_id
    outputs, n_tokens = [], 0
    for row in gen.tolist():
        # tokens up to and including the first EOS; the rest is padding after the row finished
        k = row.index(eos) + 1 if eos in row else len(row)
        n_tokens += k
        outputs.append(tok.decode(row[:k], skip_special_tokens=True))
    return {
        "backend": "transformers", "threads": torch.get_num_threads(), "dtype": args.dtype,
        "start_s": start_s, "wall_s": wall, "tokens": n_tokens, "outputs": outputs,
    }


def run_vllm(model_dir: str, problems: list[dict], args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    t0 = time.perf_counter()
    import torch
    from vllm import LLM, SamplingParams

    import_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    llm = LLM(
        model=model_dir, enforce_eager=True, distributed_executor_backend="uni",
        dtype=args.dtype, seed=args.seed, max_model_len=2048,
    )
    start_s = time.perf_counter() - t1
    messages = [
        [{"role": "user", "content": PROMPT.format(question=p["question"])}] for p in problems
    ]
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
    )
    t2 = time.perf_counter()
    results = llm.chat(messages, params, use_tqdm=False)
    wall = time.perf_counter() - t2
    outputs = [r.outputs[0].text for r in results]
    n_tokens = sum(len(r.outputs[0].token_ids) for r in results)
    return {
        "backend": "vllm", "threads": torch.get_num_threads(), "dtype": args.dtype,
        "import_s": import_s, "start_s": start_s, "wall_s": wall, "tokens": n_tokens,
        "outputs": outputs,
    }


def report(res: dict, problems: list[dict], show: int) -> dict:
    correct = sum(is_correct(o, p["gold"]) for o, p in zip(res["outputs"], problems))
    think = sum("<think>" in o or "</think>" in o for o in res["outputs"])
    boxed = sum("\\boxed" in o for o in res["outputs"])
    summary = {k: (round(v, 2) if isinstance(v, float) else v)
               for k, v in res.items() if k != "outputs"}
    summary.update(
        tokens_per_s=round(res["tokens"] / res["wall_s"], 1),
        mean_tokens=round(res["tokens"] / len(problems), 1),
        correct=f"{correct}/{len(problems)}", boxed=boxed, think_tags=think,
    )
    print(json.dumps(summary))
    for o, p in list(zip(res["outputs"], problems))[:show]:
        print(f"--- gold {p['gold']} | extracted {extract_answer(o)}\n{o}\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--backend", choices=["hf", "vllm", "both"], default="both")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (default 1)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=2, help="print this many outputs")
    ap.add_argument("--json-out", help="also write the summaries and outputs here")
    args = ap.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if not Path(args.model_dir, "config.json").is_file():
        print(f"error: no model at {args.model_dir} (python scripts/demo_model.py)", file=sys.stderr)
        return 2
    problems = load_problems(args.data, args.n)
    runs = {"hf": [run_hf], "vllm": [run_vllm], "both": [run_hf, run_vllm]}[args.backend]
    dump = []
    for fn in runs:
        res = fn(args.model_dir, problems, args)
        dump.append({"summary": report(res, problems, args.show), "outputs": res["outputs"]})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dump, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
