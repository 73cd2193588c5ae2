#!/usr/bin/env bash
# Call 1 on the GPU machine: keep GGUF half 1 for call 2; run the CUDA block-scaled mixture check + timing.
set -uo pipefail
export PYTHONUNBUFFERED=1
cp .devdata/p1/gguf.part-aa /tmp/gguf.part-aa
nvidia-smi --query-gpu=name,driver_version --format=csv
PYTHONPATH=. timeout 200 python3 benchmarks/cuda_mixture_ops.py --out $OUT/cuda_mixture_ops.json; echo "bench rc=$?"
PYTHONPATH=. timeout 120 python3 -m pytest -q -p no:cacheprovider tests/serving/fast_lora/test_block_scale.py 2>&1 | tail -5
