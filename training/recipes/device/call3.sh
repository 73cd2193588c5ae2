#!/usr/bin/env bash
# Call 3 on the GPU machine: the 8 compositions (4 unseen tasks x exact/linear) while all_data trains; collect both.
set -uo pipefail
export PYTHONUNBUFFERED=1
D=.devdata/p3
test -d /tmp/stu/smollm2-135m-instruct || { echo "student missing: machine was not warm"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
cp -r $D/data/learn /tmp/data/ && cp $D/data/train/* /tmp/data/train/
B=/tmp/bundle && cp -r $D/bundle $B
S=/tmp/stu/smollm2-135m-instruct
for task in coin_flip openbook_qa reclor strategy_qa; do
  for mode in exact linear; do
    name=$task; [ $mode = linear ] && name=$task-linear
    MODE_COTD_DATA=/tmp/data python3 -m training.compose --bundle $B --student $S --task $task --name $name \
      --mode $mode --device cuda 2>&1 | grep -E '"(name|uniform_loss|found_loss)"|Error|error' ; echo "[compose] $name rc=${PIPESTATUS[0]} at $(date +%T)"
  done
done
for i in $(seq 1 90); do [ -f /tmp/all_data/experts/all_data/adapter_model.safetensors ] && break; sleep 5; done
tr '\r' '\n' < /tmp/all_data.log | grep -v "Loading weights" | tail -20
tar cf $OUT/results.tar -C /tmp bundle/manifest.json bundle/reports all_data rb 2>&1
cp /tmp/all_data.log $OUT/ ; ls -la $OUT
