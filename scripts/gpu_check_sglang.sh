#!/usr/bin/env bash
# GPU check of the colocated sglang engine (docs/sglang.md), in two tiers:
#   A (torch only): bf16 buckets of a Qwen2.5-0.5B-shaped model sent by CUDA IPC to a spawned consumer on the
#     same GPU, bit-exact or not, GB/s, s per 1B params, free memory; torch_memory_saver pause/resume if installed.
#   B (sglang installed): engine on a random-init model, generate, release, one training step, staged resume +
#     bucketed sync, generate again; log-probs against an HF forward of the updated weights.
#
#   bash scripts/gpu_check_sglang.sh      # about 1-2 minutes on one H100/H200 (tier A alone)
#
# Needs: torch with CUDA, transformers; the repository on PYTHONPATH (done here). Output: $OUT (or /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False   # off around CUDA IPC and the memory saver
python scripts/gpu_check_sglang.py
