"""Training speed of the bundled trainers on a Qwen3-0.6B-shaped model with random weights.

SFT: optimizer steps per second and trained tokens per second (``trainers.sft``'s trainer,
assistant-only loss). GRPO: seconds per step (generation + rewards + update, TRL's own
``step_time``) with the BARD reward set. Nothing is downloaded: the tokenizer is trained locally
(tests.tiny_models), the model is a Qwen3 with Qwen3-0.6B's shape and random weights.

    python benchmarks/train_speed.py                  # CUDA: full size; CPU: reduced (4 layers, seq 256)
    python benchmarks/train_speed.py --size reduced --threads 2 --json out/train_speed.json

Qwen3-0.6B: hidden 1024, intermediate 3072, 28 layers, 16 query / 8 KV heads, head_dim 128,
vocab 151936, tied embeddings. "reduced" keeps the width and the vocabulary and cuts the depth
to 4 layers and sequences to 256 tokens (GRPO completions to 64); at that depth the 151936-entry
LM head is most of the compute (``--vocab small`` measures the body alone). SFT steps are timed
after one warm-up step; GRPO's first step (which includes lazy setup) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=40960)


def build_model(out: Path, layers: int, dtype: str, vocab: str = "full") -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.tiny_models import build_tokenizer

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, DATA if DATA.exists() else None, vocab_size=4096)
    shape = dict(QWEN3_06B, num_hidden_layers=layers)
    if vocab == "small":  # LM head sized to the local tokenizer: measures the transformer body
        shape["vocab_size"] = len(tok)
    cfg = Qwen3Config(**shape, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.save_pretrained(str(out))
    return out


def write_dataset(out: Path, tok, seq: int, rows: int = 64) -> Path:
    """A published-layout dataset whose SFT rows are about ``seq`` tokens long."""
    import polars as pl

    msgs_t = pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8}))
    src = [json.loads(line) for _, line in zip(range(rows * 4), open(DATA, encoding="utf-8"))]
    sft, rl = [], []
    for i in range(rows):
        r = src[i]
        ans = r["answer"].split("####")[-1].strip()
        reasoning = r["answer"].split("####")[0].strip()
        j = i + 1
        while len(tok(reasoning)["input_ids"]) < seq - 96 and j < len(src):
            reasoning += "\n" + src[j]["answer"].split("####")[0].strip()
            j += 1
        ids = tok(reasoning)["input_ids"][: max(seq - 96, 16)]
        reasoning = tok.decode(ids)
        system = {"role": "system", "content": "Thinking budget: 256 tokens."}
        user = {"role": "user", "content": r["question"][:200]}
        sft.append({"messages": [system, user, {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n\\boxed{{{ans}}}"}],
                    "budget": 256, "kind": "budget", "problem_id": f"p{i}", "source": "gsm8k"})
        rl.append({"prompt": [system, user], "budget": 256, "solution": ans, "difficulty": 0.5,
                   "source": "gsm8k", "problem_id": f"p{i}"})
    for name, data, col in (("sft", sft, "messages"), ("rl", rl, "prompt")):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(data, schema_overrides={col: msgs_t}).write_parquet(d / "train-00000-of-00001.parquet")
    return out


class StepTimer:
    def __init__(self):
        self.times: list[float] = []

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter())

        return _CB()


def bench_sft(model_dir: Path, data: Path, out: Path, seq: int, batch: int, steps: int, warmup: int, cuda: bool,
              grad_ckpt: bool) -> dict:
    from trainers.sft import build_trainer, parse_args

    argv = [str(REPO / "trainers" / "configs" / "sft_tiny.yaml"), "--model_name_or_path", str(model_dir),
            "--dataset_name", str(data), "--output_dir", str(out / "sft"), "--max_steps", str(warmup + steps),
            "--per_device_train_batch_size", str(batch), "--max_length", str(seq), "--learning_rate", "1e-5",
            "--logging_steps", str(warmup + steps), "--disable_tqdm", "true", "--repeat", "4"]
    if cuda:
        argv += ["--use_cpu", "false", "--bf16", "true", "--dtype", "bfloat16"]
    if grad_ckpt:
        argv += ["--gradient_checkpointing", "true"]
    trainer = build_trainer(*parse_args(argv))
    timer = StepTimer()
    trainer.add_callback(timer.callback())
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    measured = timer.times[warmup:]
    dt = (measured[-1] - timer.times[warmup - 1]) if warmup > 0 else (timer.times[-1] - t0)
    n_steps = len(measured) if warmup > 0 else len(timer.times)
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"][: batch * n_steps])
    return {"steps_per_s": n_steps / dt, "s_per_step": dt / n_steps, "tokens_per_s": tokens / dt,
            "measured_steps": n_steps, "batch": batch, "seq": seq, "wall_s_incl_warmup": total}


def bench_grpo(model_dir: Path, data: Path, out: Path, completion: int, gens: int, batch: int, steps: int,
               cuda: bool, vllm: bool) -> dict:
    from trainers.grpo import build_trainer, parse_args

    argv = [str(REPO / "trainers" / "configs" / "grpo_tiny.yaml"), "--model_name_or_path", str(model_dir),
            "--dataset_name", str(data), "--output_dir", str(out / "grpo"), "--max_steps", str(steps + 1),
            "--num_generations", str(gens), "--per_device_train_batch_size", str(batch),
            "--max_completion_length", str(completion), "--disable_tqdm", "true", "--learning_rate", "1e-6"]
    if cuda:
        argv += ["--use_cpu", "false", "--bf16", "true", "--dtype", "bfloat16"]
    if vllm:
        argv += ["--use_vllm", "true", "--vllm_mode", "colocate", "--vllm_gpu_memory_utilization", "0.3"]
    trainer = build_trainer(*parse_args(argv))
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    st = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    lens = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    later = st[1:] or st
    return {"s_per_step": sum(later) / len(later), "first_step_s": st[0] if st else None,
            "completions_per_step": batch, "num_generations": gens, "max_completion_length": completion,
            "mean_completion_tokens": sum(lens) / len(lens) if lens else None,
            "generated_tokens_per_s": (sum(lens[1:] or lens) / len(lens[1:] or lens)) * batch / (sum(later) / len(later)) if lens else None,
            "wall_s_incl_first": total, "use_vllm": vllm}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["auto", "reduced", "full"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS (CPU)")
    p.add_argument("--sft-steps", type=int, default=None)
    p.add_argument("--grpo-steps", type=int, default=None)
    p.add_argument("--vocab", choices=["full", "small"], default="full",
                   help="full: Qwen3's 151936-entry LM head (it dominates at 4 layers); small: the local tokenizer's 4k")
    p.add_argument("--vllm", action="store_true", help="GRPO generation with vLLM (GPU)")
    p.add_argument("--skip", choices=["sft", "grpo"], default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    size = a.size if a.size != "auto" else ("full" if cuda else "reduced")
    if size == "full":
        layers, seq, completion, batch, gens = 28, 2048, 512, 8, 8
        sft_steps, grpo_steps = a.sft_steps or 20, a.grpo_steps or 5
    else:
        layers, seq, completion, batch, gens = 4, 256, 64, 4, 4
        sft_steps, grpo_steps = a.sft_steps or 3, a.grpo_steps or 2
    work = Path(a.workdir or tempfile.mkdtemp(prefix="train_speed_"))
    t0 = time.perf_counter()
    model_dir = build_model(work / f"qwen3-0.6b-shape-{layers}l-{a.vocab}", layers, "float32", a.vocab)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = write_dataset(work / "data", tok, seq)
    n_params = sum(v.numel() for v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(next(model_dir.glob("*.safetensors")))).values())
    info = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "size": size, "layers": layers, "vocab": a.vocab,
            "params_M": round(n_params / 1e6, 1), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "setup_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(info))
    res: dict = {"info": info}
    if a.skip != "sft":
        res["sft"] = bench_sft(model_dir, data, work, seq, batch, sft_steps, warmup=1, cuda=cuda, grad_ckpt=size == "full")
        print("SFT ", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res["sft"].items()}))
    if a.skip != "grpo":
        res["grpo"] = bench_grpo(model_dir, data, work, completion, gens, batch, grpo_steps, cuda, a.vllm)
        print("GRPO", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res["grpo"].items()}))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
