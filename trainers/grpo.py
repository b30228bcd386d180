"""GRPO on the ``rl`` config of a published BARD dataset with TRL's ``GRPOTrainer``.

    bard-data train grpo trainers/configs/grpo_demo.yaml [--learning_rate 1e-6 ...]
    python -m trainers.grpo trainers/configs/grpo_demo.yaml

The YAML holds the fields of ``GRPOScriptArguments`` (dataset, rewards), ``trl.GRPOConfig``
(training, generation, vLLM) and ``trl.ModelConfig`` (model, LoRA) in one mapping.

Rewards by name from ``bard_data.rewards.REWARDS`` (``reward_funcs: [bard, accuracy, budget]``).
TRL only sums weighted rewards, so the multiplicative R_acc x R_bud is its own function
(``bard``); list the components after it with weight 0 (``reward_weights: [1, 0, 0]``) and they are
still computed and logged (``rewards/accuracy/mean``, ``rewards/budget/mean``). When
``reward_weights`` is unset the first listed reward gets weight 1 and the others 0 (a plain sum of
``bard`` and its own components would be neither the BARD reward nor the additive ablation; for
the ablation list ``additive``).

Budget fidelity is logged next to the rewards through TRL's ``log_metric`` hook, from the first
reward function: ``budget/deviation_mean`` (mean |n-b|/b), ``budget/within_tolerance`` (share with
|n-b|/b <= tolerance), ``budget/overshoot``, ``budget/undershoot``, ``budget/reasoning_tokens_mean``,
``budget/think_closed``.

Prompts can be filtered by teacher pass rate (``difficulty_min``/``difficulty_max`` on the
``difficulty`` column; rows with no difficulty kept unless ``keep_unknown_difficulty: false``).
vLLM generation is GRPOConfig's ``use_vllm``: ``vllm_mode: colocate`` (inside each training process)
or ``server`` (a ``trl vllm-serve`` process on its own GPUs; ``configs/grpo_paper_server.yaml``); it
is off in the CPU configs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser

from trainers import config_argv, cpu_defaults, load_published, prepare_model_args, train_main

log = logging.getLogger(__name__)


@dataclass
class GRPOScriptArguments(ScriptArguments):
    dataset_config: Optional[str] = field(default="rl", metadata={"help": "config of the published dataset"})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["bard", "accuracy", "budget"],
        metadata={"help": "reward names from bard_data.rewards.REWARDS: bard, accuracy, budget, additive"},
    )
    reward_tolerance: Optional[float] = field(
        default=None, metadata={"help": "R_bud = 1 within this relative deviation (default: the dataset's budget.tolerance)"})
    reward_alpha: float = field(default=1.0, metadata={"help": "R_bud decay rate beyond the tolerance"})
    reward_one_sided: Optional[bool] = field(
        default=None, metadata={"help": "only overshoot is penalized (default: the dataset's budget.one_sided)"})
    reward_shape: str = field(default="linear", metadata={"help": "R_bud decay: linear or exp"})
    log_budget_metrics: bool = field(default=True, metadata={"help": "log budget/* fidelity metrics"})
    difficulty_min: Optional[float] = field(default=None, metadata={"help": "keep rows with difficulty >= this"})
    difficulty_max: Optional[float] = field(default=None, metadata={"help": "keep rows with difficulty <= this"})
    keep_unknown_difficulty: bool = field(default=True, metadata={"help": "keep rows whose difficulty is null"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "use the first N rows (after filters)"})


def make_parser() -> TrlParser:
    parser = TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig))
    cpu_defaults(parser)
    return parser


def parse_args(argv=None):
    """(script_args, training_args, model_args) from ``[CONFIG.yaml, flags...]``."""
    return make_parser().parse_args_and_config(args=config_argv(argv))


def filter_difficulty(ds, lo: Optional[float], hi: Optional[float], keep_unknown: bool = True):
    if (lo is None and hi is None) or "difficulty" not in ds.column_names:
        if lo is not None or hi is not None:
            log.warning("difficulty filter set but the dataset has no 'difficulty' column; not filtered")
        return ds

    def keep(d) -> bool:
        if d is None or (isinstance(d, float) and math.isnan(d)):
            return keep_unknown
        return (lo is None or d >= lo) and (hi is None or d <= hi)

    return ds.filter(keep, input_columns="difficulty")


def load_rl_dataset(script_args: GRPOScriptArguments):
    ds = load_published(script_args.dataset_name, script_args.dataset_config or "rl", script_args.dataset_train_split)
    missing = [c for c in ("prompt",) if c not in ds.column_names]
    if missing:
        raise ValueError(f"{script_args.dataset_name}: the '{script_args.dataset_config}' config lacks {missing}")
    if "solution" not in ds.column_names and "answer" in ds.column_names:
        ds = ds.rename_column("answer", "solution")
    n0 = len(ds)
    ds = filter_difficulty(ds, script_args.difficulty_min, script_args.difficulty_max, script_args.keep_unknown_difficulty)
    if len(ds) != n0:
        log.info("difficulty filter kept %d of %d prompts", len(ds), n0)
    if script_args.max_train_samples is not None:
        ds = ds.select(range(min(script_args.max_train_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"{script_args.dataset_name}: no RL prompts left after filtering")
    return ds


def build_rewards(script_args: GRPOScriptArguments, tokenizer) -> list:
    """The configured rewards; budget fidelity (tolerance, one-sided), the budget statement and the
    think tags are the dataset's (what it was built and filtered with) unless the config overrides them."""
    from bard_data.report.published import budget_config, build_info, format_config, think_tags
    from bard_data.rewards import get_reward

    if not script_args.reward_funcs:
        raise ValueError("reward_funcs is empty")
    if script_args.reward_shape not in ("linear", "exp"):
        raise ValueError(f"reward_shape must be linear or exp, got {script_args.reward_shape!r}")
    info = build_info(script_args.dataset_name)
    if not info:
        log.warning("%s: no bard_data build information; the reward uses the default tolerance and budget "
                    "statement", script_args.dataset_name)
    bud = budget_config(info, tolerance=script_args.reward_tolerance, one_sided=script_args.reward_one_sided)
    fmt = format_config(info)
    cfg = dict(
        tolerance=bud.tolerance,
        alpha=script_args.reward_alpha,
        one_sided=bud.one_sided,
        shape=script_args.reward_shape,
        budget_template=fmt.budget_template,
        budget_placement=fmt.budget_placement,
        # What the dataset's SFT rows delimit reasoning with: R_bud counts it, R_acc reads the answer after it.
        think_open=think_tags(info).open,
        think_close=think_tags(info).close,
    )
    log.info("R_bud: tolerance %s, one_sided %s (%s)", bud.tolerance, bud.one_sided, info.get("source", "defaults"))
    return [
        get_reward(name, tokenizer=tokenizer, log_budget_metrics=script_args.log_budget_metrics and i == 0, **cfg)
        for i, name in enumerate(script_args.reward_funcs)
    ]


def build_trainer(script_args: GRPOScriptArguments, training_args: GRPOConfig, model_args: ModelConfig,
                  reward_funcs: Optional[list] = None):
    """The configured ``GRPOTrainer`` (not yet trained). ``reward_funcs`` replaces the configured
    rewards (tests wrap them)."""
    from trl import GRPOTrainer, get_peft_config

    tokenizer = prepare_model_args(script_args, training_args, model_args)
    if reward_funcs is None:
        reward_funcs = build_rewards(script_args, tokenizer)
    if training_args.reward_weights is None and len(reward_funcs) > 1:
        training_args.reward_weights = [1.0] + [0.0] * (len(reward_funcs) - 1)
        log.info("reward_weights unset: %s trains, the others are logged only", getattr(reward_funcs[0], "__name__", "?"))
    if training_args.use_vllm:
        try:
            import torch

            if not torch.cuda.is_available():
                log.warning("use_vllm is on without CUDA; TRL's vLLM generation is meant for GPUs")
        except Exception:  # pragma: no cover
            pass
    train = load_rl_dataset(script_args)
    return GRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )


def main(argv=None) -> int:
    return train_main(parse_args, build_trainer, argv)


if __name__ == "__main__":
    raise SystemExit(main())
