#!/usr/bin/env bash
# The worker bench on a CUDA machine with no model hub: SmolLM2-135M's architecture and real tokenizer with random
# weights (speed and memory do not depend on the weights; random weights never emit a stop tag, so every request
# generates its full max_new_tokens), 4 random LoRA adapters made on one loaded base.
#   bash bench/gpu/run.sh SMOL_DIR     (SMOL_DIR: a dir with SmolLM2's config.json and tokenizer files,
#                                       e.g. the one `convo base smollm2` writes, weights not needed)
set -euo pipefail
src=${1:?usage: bench/gpu/run.sh SMOL_DIR}
work=$(mktemp -d)
python3 bench/gpu/random_base.py "$src" "$work/base"
python3 bench/gpu/random_adapters.py "$work/base" "$work/adapters" 4
python3 bench/worker.py --base "$work/base" --adapters "$work/adapters" --personas 4 --requests 16 \
  --quantize 4bit --draft-requests 10 --queue-requests 200
