#!/usr/bin/env bash
# Call 2 on the GPU machine: rebuild the default student from the GGUF (two halves), start the all_data run detached.
set -euo pipefail
export PYTHONUNBUFFERED=1
D=.devdata/p2
test -f /tmp/gguf.part-aa || { echo "part 1 missing: machine was not warm"; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $D/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
cat /tmp/gguf.part-aa $D/gguf.part-ab > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat $D/gguf.sha256)  /tmp/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
python3 - <<'PY'
import json, shutil
from pathlib import Path
from mode_cotd.student import convert_gguf, student_identity
t = Path("/tmp/stu/smollm2-135m-instruct")
convert_gguf(Path("/tmp/SmolLM2-135M-Instruct.Q4_1.gguf"), t, "bfloat16")
dev = student_identity(t)
for f in Path(".devdata/p2/meta").iterdir():
    shutil.copy(f, t / f.name)
print("device-converted config", dev, "-> local config", student_identity(t))
PY
mkdir -p /tmp/rb && cp $D/choice.json /tmp/rb/
cp -r $D/data /tmp/data
nvidia-smi --query-gpu=name,memory.used --format=csv
cd /tmp && cp -r "$OLDPWD" /tmp/repo && cd /tmp/repo
MODE_COTD_DATA=/tmp/data setsid nohup python3 -m training.recipes.default_bundle --stage all_data \
  --student /tmp/stu/smollm2-135m-instruct --out /tmp/rb --all-data-bundle /tmp/all_data > /tmp/all_data.log 2>&1 < /dev/null &
sleep 45; cat /tmp/all_data.log | tr '\r' '\n' | tail -5
