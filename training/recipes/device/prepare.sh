#!/usr/bin/env bash
# Prepare the three payloads of the GPU run that trained the all_data baseline and searched the 8 unseen-task
# compositions (2026-11-26, one H100). The device tool takes at most 64 MiB per call, working tree included, and the
# default student's GGUF is 98 MB, so it travels in two halves over calls 1 and 2 (the machine stays warm between
# calls, and /tmp keeps half 1), and the bundle's experts travel in call 3:
#
#   call 1  carry .devdata/p1: GGUF half 1; runs benchmarks/cuda_mixture_ops.py and the block-scale tests on CUDA
#   call 2  carry .devdata/p2: GGUF half 2, the seen tasks' train files, wheels (gguf, nevergrad and its needs);
#           rebuilds the student folder, starts the all_data run detached (training.recipes.default_bundle)
#   call 3  carry .devdata/p3: bundles/default, the 5-shot files; runs `python -m training.compose` for the
#           4 unseen tasks x {exact, linear} on CUDA, waits for all_data, returns results.tar
#
# The repo's own tree travels too: untrack bundles/default for the calls (it travels in p3) so that each call
# stays under 64 MiB. Each call: `bash .devdata/pN/callN.sh`, with carry [".devdata/pN"].
set -euo pipefail
cd "$(dirname "$0")/../../.."
VENV=${VENV:-.venv}
GGUF=$("$VENV/bin/python" -c "from mode_cotd.student import default_gguf_path; print(default_gguf_path())")
STUDENT=$("$VENV/bin/python" -c "from mode_cotd.student import resolve_student; print(resolve_student())")
DATA=${MODE_COTD_DATA:-../shared/data/mode-cotd}
SEEN="addsub aqua commonsense_qa date_understanding gsm8k last_letter_concatenation multiarith single_eq svamp tracking_shuffled_objects"
D=.devdata
rm -rf $D/p1 $D/p2 $D/p3 && mkdir -p $D/p1 $D/p2/meta $D/p2/data/train $D/p2/whl $D/p3/data/learn $D/p3/data/train
split -b 49200000 "$GGUF" $D/p1/gguf.part- && mv $D/p1/gguf.part-ab $D/p2/
sha256sum "$GGUF" | cut -d' ' -f1 > $D/p2/gguf.sha256
cp "$STUDENT"/*.json "$STUDENT"/*.jinja $D/p2/meta/   # the local config: the bundle's student identity
for t in $SEEN; do cp "$DATA/train/${t}_train.json" $D/p2/data/train/; done
cp training/recipes/results/choice.json $D/p2/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d $D/p2/whl gguf==0.19.0 nevergrad==1.0.12 bayesian-optimization==1.4.0 \
    cma==4.5.0 directsearch==1.1
cp $D/p2/whl/* $D/p3/ 2>/dev/null || true; mkdir -p $D/p3/whl && mv $D/p3/*.whl $D/p3/whl/
cp "$DATA"/learn/*.jsonl $D/p3/data/learn/ && cp "$DATA/train/coin_flip_train.json" $D/p3/data/train/
cp -r bundles/default $D/p3/bundle
cp training/recipes/device/call1.sh $D/p1/ && cp training/recipes/device/call2.sh $D/p2/ && cp training/recipes/device/call3.sh $D/p3/
du -sh $D/p1 $D/p2 $D/p3
