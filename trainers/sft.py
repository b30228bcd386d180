"""SFT on the ``sft`` config of a published BARD dataset with TRL's ``SFTTrainer``.

    bard-data train sft trainers/configs/sft_demo.yaml [--learning_rate 1e-5 ...]
    python -m trainers.sft trainers/configs/sft_demo.yaml

The YAML holds the fields of ``SFTScriptArguments`` (dataset), ``trl.SFTConfig`` (training) and
``trl.ModelConfig`` (model, LoRA) in one mapping; flags override it. Defaults that matter:

- ``assistant_only_loss: true``: the loss covers the assistant turn only (thinking and answer),
  never the budget line or the question. It needs a chat template with ``{% generation %}``
  markers; ``build_trainer`` refuses a template without them instead of silently training on
  everything.
- Only the ``messages`` column is kept (TRL's conversational format); ``budget``, ``kind`` and the
  rest are metadata. ``kinds`` can restrict training to ``budget`` or ``standard`` rows.
- LoRA through peft with ``use_peft: true`` (``lora_r``, ``lora_alpha``, ``lora_target_modules``).
- On machines without CUDA, ``use_cpu: true`` and ``bf16: false`` are the defaults.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

from trainers import config_argv, cpu_defaults, load_published, prepare_model_args, train_main

log = logging.getLogger(__name__)


@dataclass
class SFTScriptArguments(ScriptArguments):
    dataset_config: Optional[str] = field(default="sft", metadata={"help": "config of the published dataset"})
    kinds: Optional[list[str]] = field(
        default=None, metadata={"help": "keep only these row kinds ('budget', 'standard'); all when unset"}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "use the first N rows (after filters)"})
    repeat: int = field(default=1, metadata={"help": "repeat the rows N times (smoke tests, tiny datasets)"})


def make_parser() -> TrlParser:
    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))
    cpu_defaults(parser)
    return parser


def parse_args(argv=None):
    """(script_args, training_args, model_args) from ``[CONFIG.yaml, flags...]``."""
    return make_parser().parse_args_and_config(args=config_argv(argv))


def load_sft_dataset(script_args: SFTScriptArguments):
    ds = load_published(script_args.dataset_name, script_args.dataset_config or "sft", script_args.dataset_train_split)
    if "messages" not in ds.column_names:
        raise ValueError(f"{script_args.dataset_name}: the '{script_args.dataset_config}' config has no 'messages' column")
    if script_args.kinds and "kind" in ds.column_names:
        kinds = set(script_args.kinds)
        ds = ds.filter(lambda k: k in kinds, input_columns="kind")
    ds = ds.select_columns(["messages"])
    if script_args.max_train_samples is not None:
        ds = ds.select(range(min(script_args.max_train_samples, len(ds))))
    if script_args.repeat > 1:
        from datasets import concatenate_datasets

        ds = concatenate_datasets([ds] * script_args.repeat)
    if len(ds) == 0:
        raise ValueError(f"{script_args.dataset_name}: no SFT rows left after filtering")
    return ds


def _check_template(tokenizer, training_args) -> None:
    """assistant_only_loss needs {% generation %} markers. TRL swaps in a training template for the
    chat templates it knows (Qwen3 among them); for any other template without markers, fail here
    with one clear line instead of deep inside the trainer."""
    if not training_args.assistant_only_loss:
        return
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    tmpl = tokenizer.chat_template
    if isinstance(tmpl, dict):
        tmpl = tmpl.get("default")
    if tmpl and has_generation_markers(tmpl):
        return
    try:
        get_training_chat_template(tokenizer)
    except Exception:
        raise ValueError(
            "assistant_only_loss needs a chat template with {% generation %} markers; this tokenizer's "
            "template has none and TRL has no training variant of it (set chat_template_path to a template "
            "with the markers, or assistant_only_loss: false)"
        ) from None


def build_trainer(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig):
    """The configured ``SFTTrainer`` (not yet trained)."""
    from trl import SFTTrainer, get_peft_config

    tokenizer = prepare_model_args(script_args, training_args, model_args)
    if not training_args.chat_template_path:
        _check_template(tokenizer, training_args)
    train = load_sft_dataset(script_args)
    return SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )


def main(argv=None) -> int:
    return train_main(parse_args, build_trainer, argv)


if __name__ == "__main__":
    raise SystemExit(main())
