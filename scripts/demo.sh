#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then the main job on the default model (SmolLM2-135M-Instruct, Q4_1), CPU or GPU:
# answer a question through the chat template, continue a prompt (both stream, then print tokens/s), two tenants'
# LoRA adapters (realm/data/lora) and the base model answering side by side in one batch, and re-quantize the model
# to Q4_K.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
realm chat "What is the capital of France?"
realm generate "The history of the Roman Empire" --max-tokens 64
# Three requests, one batch: the pirate tenant's adapter, the robot tenant's, and none.
for adapter in pirate robot none; do
    key=$([ "$adapter" = none ] && echo "" || echo ", \"adapter\": \"$adapter\"")
    echo "{\"messages\": [{\"role\": \"user\", \"content\": \"Tell me about the moon.\"}]$key}"
done | realm batch - --lora pirate --lora robot --max-tokens 48 --no-progress \
    | python3 -c "import json, sys; [print(n + ': ' + json.loads(l)['text']) for n, l in zip(('pirate', 'robot', 'base'), sys.stdin)]"
out=${1:-/tmp/SmolLM2-135M-Instruct.Q4_K.gguf}
realm quantize smollm2 "$out" --type Q4_K --no-progress
