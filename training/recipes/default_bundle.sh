#!/usr/bin/env bash
# Rebuild the default bundle (bundles/default) from the shared data, with the project's own code.
#
#   bash training/recipes/default_bundle.sh          # all stages; each resumes where it stopped
#
# 1. sweep + 10 seen-task experts (training/recipes/default_bundle.py). On CUDA this takes ~8 min
#    (measured on one H200: sweep 3.5 min, experts 4.8 min); on a 2-core CPU it takes many hours.
#    The committed experts were trained on an H200 (bf16), see training/recipes/results/.
#    The all_data baseline (one LoRA on the union of the same train sets) goes to bundles/all_data: 304 s on one
#    H100 (training/recipes/device/ holds the exact calls that ran it there).
# 2. the gate, on the seen tasks' train prompts (CPU, ~1.5 min).
# 3. exact and linear compositions for the 4 unseen tasks from their 5 shots: ~25-35 s each on one H100 (the
#    committed ones, training/recipes/device/call3.sh), ~17 min each on this 2-core CPU.
# 4. the accuracy table (CPU, vLLM): python -m training.recipes.accuracy_table, see docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE_COTD=${MODE_COTD:-.venv/bin/mode-cotd}
PYTHON=${PYTHON:-.venv/bin/python}
BUNDLE=${BUNDLE:-bundles/default}

"$PYTHON" -m training.recipes.default_bundle --stage sweep --out runs/default-bundle
"$PYTHON" -m training.recipes.default_bundle --stage experts --out runs/default-bundle --bundle "$BUNDLE"
"$PYTHON" -m training.recipes.default_bundle --stage all_data --out runs/default-bundle --all-data-bundle bundles/all_data
"$MODE_COTD" train-gate --bundle "$BUNDLE"
for task in coin_flip openbook_qa reclor strategy_qa; do
    "$MODE_COTD" compose --bundle "$BUNDLE" --task "$task" --name "$task" --mode exact
    "$MODE_COTD" compose --bundle "$BUNDLE" --task "$task" --name "$task-linear" --mode linear
done
