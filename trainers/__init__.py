"""Bundled TRL trainers (SFT, GRPO) and the budget-grid evaluation for published BARD datasets.

Each module has ``main(argv) -> int``; the CLI runs ``bard-data train sft CONFIG [--key value ...]``
as ``trainers.sft.main([CONFIG, ...])``. Configs are YAML files read into TRL's own config classes
with ``TrlParser`` (command-line flags override the file), as open-r1 does.

This module holds what the trainers share: loading one config of a published dataset from a Hub
id or a local folder, argv handling, and CPU defaults.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger(__name__)

__all__ = ["load_published", "config_argv", "cpu_defaults", "DatasetLoadError"]


class DatasetLoadError(ValueError):
    pass


def _parquet_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.parquet")) or sorted(str(p) for p in folder.glob("**/*.parquet"))


def _card_lists_config(root: Path, config: str) -> bool:
    readme = root / "README.md"
    if not readme.exists():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    try:
        import yaml

        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except Exception:
        return False
    return any(isinstance(c, dict) and c.get("config_name") == config for c in meta.get("configs", []) or [])


def load_published(name_or_path: str, config: str, split: str = "train"):
    """One config of a published BARD dataset as a ``datasets.Dataset``.

    Accepts: a Hub id (``load_dataset(id, config)``); a local folder whose README.md lists the
    config in its YAML ``configs:`` metadata (what ``bard-data export`` writes); a local folder
    holding ``<config>/*.parquet`` (a published layout without a card, or a run directory's
    ``<table>/part-*.parquet``); or a parquet file / folder of parquet files of that one config.
    """
    from datasets import load_dataset

    p = Path(os.path.expanduser(str(name_or_path)))
    if p.exists():
        if p.is_file():
            if p.suffix != ".parquet":
                raise DatasetLoadError(f"{p}: expected a .parquet file or a dataset folder")
            return load_dataset("parquet", data_files=[str(p)], split="train")
        if _card_lists_config(p, config):
            return load_dataset(str(p), config, split=split)
        sub = p / config
        files = _parquet_files(sub) if sub.is_dir() else []
        if not files and (p / f"{config}.parquet").exists():
            files = [str(p / f"{config}.parquet")]
        if files:
            return load_dataset("parquet", data_files=files, split="train")
        raise DatasetLoadError(
            f"{p}: no '{config}' config found (no README.md listing it, no {config}/*.parquet)"
        )
    if "/" in str(name_or_path) and not str(name_or_path).startswith((".", "/")):
        return load_dataset(str(name_or_path), config, split=split)
    raise DatasetLoadError(f"dataset {name_or_path!r}: not a local path and not a Hub id (owner/name)")


def config_argv(argv: Optional[Iterable[str]]) -> list[str]:
    """``[CONFIG.yaml, --flag, v, ...]`` -> ``[--config, CONFIG.yaml, --flag, v, ...]`` (the CLI form
    passes the config positionally; TrlParser wants ``--config``)."""
    args = list(argv or [])
    if args and not args[0].startswith("-") and args[0].endswith((".yaml", ".yml")):
        args = ["--config", args[0], *args[1:]]
    return args


def cpu_defaults(parser) -> None:
    """On a machine without CUDA, default to ``use_cpu=True, bf16=False`` (TRL defaults bf16 on);
    the YAML config and command-line flags still override."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        parser.set_defaults(use_cpu=True, bf16=False, fp16=False)


def end_trainer(trainer) -> None:
    """Finish trackers (transformers >= 5.18 has ``Trainer.end``)."""
    end = getattr(trainer, "end", None)
    if callable(end):
        try:
            end()
        except Exception as exc:  # pragma: no cover - best effort
            log.debug("trainer.end(): %s", exc)


def train_main(parse_args, build_trainer, argv=None) -> int:
    """The body of ``bard-data train sft|grpo``: config to trainer, train, save, finish.

    Under ``accelerate launch`` every rank runs this: ``save_model`` is called on every rank (ZeRO-3
    and FSDP gather the weights there; the main process writes), only the main process prints,
    and the ranks wait for each other before the process group is torn down (a rank that got there
    while the main process was still writing could hang on exit over gloo)."""
    import sys

    script_args, training_args, model_args = parse_args(argv if argv is not None else sys.argv[1:])
    trainer = build_trainer(script_args, training_args, model_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    acc = trainer.accelerator
    if acc.is_main_process:
        save_prompt_format(script_args.dataset_name, training_args.output_dir)
        dist = getattr(acc.distributed_type, "value", acc.distributed_type)
        print(f"trained {trainer.state.global_step} steps: world_size={acc.num_processes} "
              f"distributed_type={dist} backend={acc.state.backend}")
        print(f"saved to {training_args.output_dir}")
    acc.wait_for_everyone()
    end_trainer(trainer)
    return 0


def save_prompt_format(dataset_name: str, output_dir: str) -> None:
    """Beside the trained model, the prompt format and budget fidelity of the data it was trained
    on, so ``bard-data eval`` prompts it the way it was trained without being told."""
    import json

    from bard_data.report.published import build_info

    info = build_info(dataset_name)
    if info:
        out = Path(output_dir) / "bard_prompt_format.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**info["prompt_format"], "dataset": str(dataset_name)}, indent=2) + "\n",
                       encoding="utf-8")


def prepare_model_args(script_args, training_args, model_args):
    """Checks the required names, moves the model's loading options into the TRL config's
    ``model_init_kwargs`` (the trainers load the model from its name), and returns the tokenizer
    (with a pad token) that both trainers share."""
    from transformers import AutoTokenizer

    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required")
    if not script_args.dataset_name:
        raise ValueError("dataset_name is required (a Hub id or a local published dataset)")
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = {k: v for k, v in model_init_kwargs.items() if v is not None}
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
