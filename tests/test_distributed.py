"""The trainers under `accelerate launch` with two processes on this CPU (DDP over gloo), and the
shipped launcher configs (trainers/accelerate/*.yaml) against the installed accelerate.

On a CPU, `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's simple
launcher; several CPU ranks need mpirun), so the two-rank run goes through the shipped DDP config
(torchrun) with `--num_processes 2 --mixed_precision no`; the trainer configs set `use_cpu`, which
makes accelerate's state MULTI_CPU over gloo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_trainers import published  # noqa: F401  (the module-scoped published-dataset fixture)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "trainers" / "configs"
LAUNCH_CONFIGS = REPO / "trainers" / "accelerate"
SHIPPED = ("ddp.yaml", "fsdp.yaml", "zero3.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(module: str, args: list[str], timeout: int = 180) -> str:
    """`accelerate launch --config_file ddp.yaml --num_processes 2 -m MODULE ARGS` from the repo
    root; stdout and stderr of both ranks together."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
           "--config_file", str(LAUNCH_CONFIGS / "ddp.yaml"), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(_free_port()), "-m", module, *args]
    # The output goes to a file, not a pipe: a rank that outlives the launcher cannot block the
    # test by holding a pipe open. On a timeout the whole process tree goes (the launcher's own
    # process group, and any rank that started a session of its own).
    import tempfile

    import psutil

    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = psutil.Process(p.pid).children(recursive=True)
            os.killpg(p.pid, signal.SIGKILL)
            for child in tree:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            p.wait(timeout=60)
            log.seek(0)
            pytest.fail(f"{module} ran past {timeout} s:\n{log.read()[-6000:]}")
        log.seek(0)
        out = log.read()
    assert p.returncode == 0, f"{module} exited {p.returncode}:\n{out[-6000:]}"
    return out


def _assert_two_ranks(out: str, output_dir: Path) -> None:
    # Rank 0 alone reports, from the trainer's accelerator: two processes trained two steps.
    assert "trained 2 steps: world_size=2 distributed_type=MULTI_CPU backend=gloo" in out, out[-4000:]
    assert out.count(f"saved to {output_dir}") == 1, out[-4000:]
    assert out.count("world_size=") == 1, out[-4000:]


def test_sft_then_grpo_on_two_cpu_ranks(tiny_model_dir, published, tmp_path):  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM

    sft_out, grpo_out = tmp_path / "sft", tmp_path / "grpo"
    out = _launch("trainers.sft", [str(CONFIGS / "sft_tiny.yaml"), "--model_name_or_path", str(tiny_model_dir),
                                   "--dataset_name", str(published), "--output_dir", str(sft_out), "--max_steps", "2"])
    _assert_two_ranks(out, sft_out)
    # GRPO from the SFT model the two ranks saved.
    out = _launch("trainers.grpo", [str(CONFIGS / "grpo_tiny.yaml"), "--model_name_or_path", str(sft_out),
                                    "--dataset_name", str(published), "--output_dir", str(grpo_out), "--max_steps", "2"])
    _assert_two_ranks(out, grpo_out)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sft = AutoModelForCausalLM.from_pretrained(sft_out)
    grpo = AutoModelForCausalLM.from_pretrained(grpo_out)
    ref = base.state_dict()
    assert sft.state_dict().keys() == grpo.state_dict().keys() == ref.keys()
    assert any(not torch.equal(v, ref[k]) for k, v in sft.state_dict().items()), "SFT saved untrained weights"
    ids = torch.tensor([[1, 2, 3]])
    assert grpo(ids).logits.shape == (1, 3, base.config.vocab_size)


# ---------------------------------------------------------------------------- launcher configs

# accelerate launch copies each key of these sections onto its own command-line arguments, with
# these prefixes added (accelerate.commands.launch._validate_launch_command); a key that is no
# argument of `accelerate launch` is silently ignored there, so it is checked here.
_SECTION_PREFIX = {"fsdp_config": "fsdp_", "fp8_config": "fp8_", "dynamo_config": "dynamo_"}
_OFFLOAD = {"none", "cpu", "nvme"}


def config_problems(path: Path) -> list[str]:
    """What the installed accelerate would not take from a launcher config: unknown top-level keys
    or values (its own loader), keys of the nested sections that are no `accelerate launch`
    argument, and values outside accelerate's choices."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import PrecisionType
    from accelerate.utils import constants as C

    try:
        cfg = load_config_from_file(str(path))  # what `accelerate launch --config_file` calls
    except (ValueError, TypeError) as exc:
        return [str(exc)]
    actions = {a.dest: a for a in launch_command_parser()._actions}
    problems = []
    if cfg.mixed_precision not in [p.value for p in PrecisionType]:
        problems.append(f"mixed_precision: {cfg.mixed_precision!r}")
    for section, values in vars(cfg).items():
        if not isinstance(values, dict):
            continue
        prefix = _SECTION_PREFIX.get(section, "")
        for key, value in values.items():
            name = key if key.startswith(prefix) else prefix + key
            if name not in actions:
                problems.append(f"{section}.{key}: no such accelerate launch setting")
            elif actions[name].choices and str(value) not in actions[name].choices:
                problems.append(f"{section}.{key}: {value!r} not in {actions[name].choices}")
    allowed = {
        "fsdp_sharding_strategy": C.FSDP_SHARDING_STRATEGY, "fsdp_auto_wrap_policy": C.FSDP_AUTO_WRAP_POLICY,
        "fsdp_backward_prefetch": C.FSDP_BACKWARD_PREFETCH, "fsdp_state_dict_type": C.FSDP_STATE_DICT_TYPE,
    }
    for key, choices in allowed.items():
        if key in cfg.fsdp_config and cfg.fsdp_config[key] not in choices:
            problems.append(f"fsdp_config.{key}: {cfg.fsdp_config[key]!r} not in {choices}")
    ds = cfg.deepspeed_config
    if ds.get("deepspeed_multinode_launcher", "standard") not in C.DEEPSPEED_MULTINODE_LAUNCHERS:
        problems.append(f"deepspeed_config.deepspeed_multinode_launcher: {ds['deepspeed_multinode_launcher']!r}")
    for key in ("offload_optimizer_device", "offload_param_device"):
        if key in ds and ds[key] not in _OFFLOAD:
            problems.append(f"deepspeed_config.{key}: {ds[key]!r} not in {sorted(_OFFLOAD)}")
    if "zero_stage" in ds and ds["zero_stage"] not in (0, 1, 2, 3):
        problems.append(f"deepspeed_config.zero_stage: {ds['zero_stage']!r}")
    return problems


@pytest.mark.parametrize("name", SHIPPED)
def test_launcher_config_names_real_settings(name):
    path = LAUNCH_CONFIGS / name
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert path.read_text(encoding="utf-8").startswith("#"), "each config starts with a comment saying what it is for"
    assert config_problems(path) == []
    # One node of 8 GPUs by default, as open-r1; bf16 on the GPUs.
    assert (raw["num_machines"], raw["num_processes"], raw["mixed_precision"], raw["use_cpu"]) == (1, 8, "bf16", False)
    kind = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "zero3.yaml": "DEEPSPEED"}[name]
    assert raw["distributed_type"] == kind
    if name == "fsdp.yaml":
        assert raw["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert raw["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_model writes a full model
    if name == "zero3.yaml":
        assert raw["deepspeed_config"]["zero_stage"] == 3
        assert raw["deepspeed_config"]["zero3_save_16bit_model"] is True  # save_model writes a full model


def test_launcher_config_check_catches_misspellings(tmp_path):
    """The check above can fail: a misspelt key at either level, or a wrong value, is reported."""
    fsdp = yaml.safe_load((LAUNCH_CONFIGS / "fsdp.yaml").read_text(encoding="utf-8"))
    cases = {
        "top": {**fsdp, "num_proceses": 8},
        "nested": {**fsdp, "fsdp_config": {**fsdp["fsdp_config"], "fsdp_sharding_stratgy": "FULL_SHARD"}},
        "unprefixed": {**fsdp, "fsdp_config": {**fsdp["fsdp_config"], "shard_stratgy": "FULL_SHARD"}},
        "value": {**fsdp, "fsdp_config": {**fsdp["fsdp_config"], "fsdp_sharding_strategy": "FULL_SHARDED"}},
        "type": {**fsdp, "distributed_type": "MULTI_GPUS"},
        "precision": {**fsdp, "mixed_precision": "bfloat16"},
    }
    zero3 = yaml.safe_load((LAUNCH_CONFIGS / "zero3.yaml").read_text(encoding="utf-8"))
    cases["deepspeed"] = {**zero3, "deepspeed_config": {**zero3["deepspeed_config"], "zero3_save_16bit_modle": True}}
    cases["offload"] = {**zero3, "deepspeed_config": {**zero3["deepspeed_config"], "offload_param_device": "gpu"}}
    for label, cfg in cases.items():
        p = tmp_path / f"{label}.yaml"
        p.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        assert config_problems(p), label


def test_paper_configs_parse():
    """The paper-scale trainer configs read into TRL's classes; GRPO's server mode and its colocate
    override."""
    from trainers import grpo, sft

    s, t, m = sft.parse_args([str(CONFIGS / "sft_paper.yaml")])
    assert m.model_name_or_path == "Qwen/Qwen3-8B" and not m.use_peft and t.assistant_only_loss
    assert t.gradient_checkpointing and t.bf16
    s, t, m = grpo.parse_args([str(CONFIGS / "grpo_paper_server.yaml")])
    assert t.use_vllm and t.vllm_mode == "server" and t.vllm_server_port == 8000
    assert s.reward_funcs[0] == "bard" and t.reward_weights == [1.0, 0.0, 0.0]
    assert t.generation_batch_size % t.num_generations == 0
    s, t, m = grpo.parse_args([str(CONFIGS / "grpo_paper_server.yaml"), "--vllm_mode", "colocate"])
    assert t.vllm_mode == "colocate"
