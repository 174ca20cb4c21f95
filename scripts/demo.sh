#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then the main job: list the formats and re-quantize the default model to Q4_K.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
realm formats
out=${1:-/tmp/SmolLM2-135M-Instruct.Q4_K.gguf}
realm quantize smollm2 "$out" --type Q4_K
