"""The bundled TRL trainers on the tiny model: SFT learns and masks the prompt, GRPO wires the
BARD rewards (columns per completion, component metrics logged). Plumbing, not quality."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "trainers" / "configs"
MSGS = pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8}))

CARD = """---
configs:
- config_name: sft
  data_files:
  - split: train
    path: sft/train-*.parquet
- config_name: rl
  data_files:
  - split: train
    path: rl/train-*.parquet
---
# test dataset
"""


def write_published(out: Path, shared_data: Path, n: int = 6, card: bool = True) -> Path:
    """The layout `bard-data export` publishes: <config>/train-00000-of-00001.parquet + card."""
    rows = []
    with open(shared_data / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= n:
                break
    sft, rl = [], []
    for i, r in enumerate(rows):
        work, ans = r["answer"].split("####")
        ans = ans.strip()
        budget = [32, 64, None][i % 3]
        system = [{"role": "system", "content": f"Thinking budget: {budget} tokens."}] if budget else []
        user = {"role": "user", "content": r["question"][:160]}
        reasoning = work.strip().splitlines()[0][:120]
        sft.append({
            "messages": system + [user, {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\nThe answer is \\boxed{{{ans}}}."}],
            "budget": budget, "kind": "budget" if budget else "standard", "problem_id": f"p{i}", "source": "gsm8k",
        })
        b = budget or 48
        rl.append({
            "prompt": [{"role": "system", "content": f"Thinking budget: {b} tokens."}, user],
            "budget": b, "solution": ans, "difficulty": round(i / n, 3), "source": "gsm8k", "problem_id": f"p{i}",
        })
    for name, data, col in (("sft", sft, "messages"), ("rl", rl, "prompt")):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(data, schema_overrides={col: MSGS, "budget": pl.Int64}).write_parquet(d / "train-00000-of-00001.parquet")
    if card:
        (out / "README.md").write_text(CARD, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def published(tmp_path_factory, shared_data) -> Path:
    return write_published(tmp_path_factory.mktemp("pub") / "bard-test", shared_data)


def _sft_args(tiny_model_dir, published, out, *extra):
    return [str(CONFIGS / "sft_tiny.yaml"), "--model_name_or_path", str(tiny_model_dir),
            "--dataset_name", str(published), "--output_dir", str(out), *extra]


# ------------------------------------------------------------------------------------- loading


def test_load_published_card_and_bare_folder(published, shared_data, tmp_path):
    from trainers import DatasetLoadError, load_published

    with_card = load_published(str(published), "sft")
    bare = load_published(str(write_published(tmp_path / "bare", shared_data, card=False)), "sft")
    assert with_card.column_names == bare.column_names == ["messages", "budget", "kind", "problem_id", "source"]
    assert with_card["problem_id"] == bare["problem_id"]
    rl = load_published(str(published), "rl")
    assert rl[0]["budget"] == 32 and rl[0]["solution"] == "72" and rl[0]["prompt"][0]["role"] == "system"
    with pytest.raises(DatasetLoadError):
        load_published(str(published), "judgments")


def test_configs_parse():
    """The shipped YAMLs read into TRL's classes; flags override the file."""
    from trainers import grpo, sft

    s, t, m = sft.parse_args([str(CONFIGS / "sft_demo.yaml"), "--learning_rate", "2e-5"])
    assert s.dataset_config == "sft" and t.assistant_only_loss and t.learning_rate == 2e-5
    assert m.model_name_or_path == "Qwen/Qwen3-0.6B"
    s, t, m = grpo.parse_args([str(CONFIGS / "grpo_tiny.yaml"), "--reward_alpha", "2.0"])
    assert s.reward_funcs == ["bard", "accuracy", "budget"] and s.reward_alpha == 2.0
    assert t.reward_weights == [1.0, 0.0, 0.0] and t.use_cpu and not t.bf16 and not t.use_vllm
    s, t, m = grpo.parse_args([str(CONFIGS / "grpo_demo.yaml")])
    assert t.use_vllm and s.difficulty_min == 0.1 and s.difficulty_max == 0.9
    # The README's CPU flow on the demo's exported dataset.
    s, t, m = sft.parse_args([str(CONFIGS / "sft_cpu_demo.yaml")])
    assert s.dataset_name == "out/demo-published" and t.assistant_only_loss and t.use_cpu
    assert t.chat_template_path == "trainers/templates/chatml_generation.jinja"
    s, t, m = grpo.parse_args([str(CONFIGS / "grpo_cpu_demo.yaml")])
    assert m.model_name_or_path == "out/sft-demo" and not t.use_vllm and s.reward_funcs[0] == "bard"


# ------------------------------------------------------------------------------------------ SFT


def test_sft_labels_only_on_assistant_turn(tiny_model_dir, published, tmp_path):
    from transformers import AutoTokenizer

    from trainers.sft import build_trainer, parse_args

    trainer = build_trainer(*parse_args(_sft_args(tiny_model_dir, published, tmp_path / "o")))
    assert list(trainer.train_dataset.column_names)[0] == "messages"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Independent reference: the prompt rendered with the generation prompt is a prefix of the
    # full conversation; the assistant span runs from there through <|im_end|> (the template's
    # trailing newline is outside the generation block).
    expected = {}
    for row in published.joinpath("sft").glob("*.parquet"):
        for msgs in pl.read_parquet(row)["messages"].to_list():
            full = tok.apply_chat_template(msgs, tokenize=False)
            prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            assert full.startswith(prompt)
            full_ids = tok(full, add_special_tokens=False)["input_ids"]
            p = len(tok(prompt, add_special_tokens=False)["input_ids"])
            assert full_ids[len(full_ids) - 2] == tok.convert_tokens_to_ids("<|im_end|>")
            expected[tuple(full_ids)] = set(range(p, len(full_ids) - 1))
    seen = 0
    for batch in trainer.get_train_dataloader():
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            keep = mask.bool()
            ids, labels = ids[keep].tolist(), labels[keep].tolist()
            assert tuple(ids) in expected
            on = {i for i, lab in enumerate(labels) if lab != -100}
            assert on == expected[tuple(ids)]
            assert all(labels[i] == ids[i] for i in on)
            seen += 1
    assert seen == len(expected)


def test_sft_loss_decreases(tiny_model_dir, published, tmp_path):
    from trainers.sft import build_trainer, parse_args

    args = _sft_args(tiny_model_dir, published, tmp_path / "o", "--max_steps", "12", "--repeat", "4",
                     "--learning_rate", "5e-3")
    trainer = build_trainer(*parse_args(args))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, losses


def test_sft_cli_saves_model_and_lora(tiny_model_dir, published, tmp_path):
    from bard_data.cli import main as cli_main
    from trainers.sft import build_trainer, parse_args

    out = tmp_path / "cli"
    args = _sft_args(tiny_model_dir, published, out, "--max_steps", "2")
    assert cli_main(["train", "sft", *args]) == 0
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    # LoRA: only adapter weights train
    trainer = build_trainer(*parse_args(_sft_args(tiny_model_dir, published, tmp_path / "lora", "--use_peft",
                                                  "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj")))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_sft_kind_filter(published):
    from trainers.sft import SFTScriptArguments, load_sft_dataset

    ds = load_sft_dataset(SFTScriptArguments(dataset_name=str(published), kinds=["standard"]))
    assert ds.column_names == ["messages"] and len(ds) == 2
    assert all(m[0]["role"] == "user" for m in ds["messages"])


# ----------------------------------------------------------------------------------------- GRPO


def test_difficulty_filter(published):
    from trainers.grpo import GRPOScriptArguments, load_rl_dataset

    ds = load_rl_dataset(GRPOScriptArguments(dataset_name=str(published), difficulty_min=0.1, difficulty_max=0.6))
    assert sorted(ds["difficulty"]) == [0.167, 0.333, 0.5]


class Spy:
    """Wraps a reward function, keeping its name, and records what TRL handed it."""

    def __init__(self, fn):
        self.fn, self.__name__, self.calls = fn, fn.__name__, []

    def __call__(self, prompts, completions, completion_ids=None, **kw):
        self.calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kw})
        return self.fn(prompts, completions, completion_ids, **kw)


def test_grpo_wires_rewards_and_logs_components(tiny_model_dir, published, tmp_path):
    from transformers import AutoTokenizer

    from trainers.grpo import build_rewards, build_trainer, parse_args

    s, t, m = parse_args([str(CONFIGS / "grpo_tiny.yaml"), "--model_name_or_path", str(tiny_model_dir),
                          "--dataset_name", str(published), "--output_dir", str(tmp_path / "g")])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    spies = [Spy(f) for f in build_rewards(s, tok)]
    assert [sp.__name__ for sp in spies] == ["bard", "accuracy", "budget"]
    trainer = build_trainer(s, t, m, reward_funcs=spies)
    trainer.train()

    rows = {json.dumps(r["prompt"]): r for r in trainer.train_dataset}
    for spy in spies:
        assert spy.calls, spy.__name__
        for call in spy.calls:
            n = len(call["completions"])
            assert n == 4  # per_device_train_batch_size completions per step
            assert len(call["budget"]) == len(call["solution"]) == len(call["completion_ids"]) == n
            assert isinstance(call["completions"][0], list) and call["completions"][0][0]["role"] == "assistant"
            for prompt, b, sol in zip(call["prompts"], call["budget"], call["solution"]):
                row = rows[json.dumps(prompt)]
                assert (b, sol) == (row["budget"], row["solution"])
                assert f"Thinking budget: {b} tokens." == prompt[0]["content"]

    logs = [h for h in trainer.state.log_history if "rewards/bard/mean" in h]
    assert len(logs) == 2
    for h in logs:
        for key in ("rewards/accuracy/mean", "rewards/budget/mean", "budget/deviation_mean",
                    "budget/within_tolerance", "budget/overshoot", "budget/reasoning_tokens_mean"):
            assert key in h, key
        # weights [1, 0, 0]: the trained reward is the product alone
        assert h["reward"] == pytest.approx(h["rewards/bard/mean"])
        assert 0.0 <= h["rewards/budget/mean"] <= 1.0
