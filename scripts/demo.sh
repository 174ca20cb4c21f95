#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then the main job on the default model (SmolLM2-135M-Instruct, Q4_1), CPU or GPU:
# answer a question through the chat template, continue a prompt (both stream, then print tokens/s), and
# re-quantize the model to Q4_K.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
realm chat "What is the capital of France?"
realm generate "The history of the Roman Empire" --max-tokens 64
out=${1:-/tmp/SmolLM2-135M-Instruct.Q4_K.gguf}
realm quantize smollm2 "$out" --type Q4_K --no-progress
