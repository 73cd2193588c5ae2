#!/bin/bash
cd "$(git rev-parse --show-toplevel)"   # run from anywhere in the repository
OUT=/tmp/prof3; mkdir -p $OUT
TOK=$(.venv/bin/python -c "from mode_cotd.student import resolve_student; print(resolve_student())")
.venv/bin/mode-cotd serve --engine-dtype float32 --engine-compile > $OUT/serve.log 2>&1 &
SERVE=$!
for i in $(seq 120); do sleep 5; curl -s http://127.0.0.1:8000/health 2>/dev/null | grep -q ok && break; done
W=$(pgrep -f "VLLM::Worker" | head -1); C=$(pgrep -f "VLLM::EngineCore" | head -1); R=$(pgrep -f "ServeReplica:mode-cotd:student" | head -1)
echo "worker $W core $C replica $R"
for model in mode-cotd mode-cotd:gsm8k; do tag=${model//:/_}
  .venv/bin/python -m benchmarks.vllm_bench --backend openai --base-url http://127.0.0.1:8000 --endpoint /v1/completions \
    --model $model --tokenizer $TOK --dataset-name custom --dataset-path benchmarks/results/full-20261127/prompts.jsonl \
    --skip-chat-template --custom-output-len 64 --ignore-eos --temperature 0 --num-prompts 16 --max-concurrency 16 \
    --save-result --result-dir $OUT --result-filename $tag.json --disable-tqdm > $OUT/$tag.bench.log 2>&1 &
  B=$!
  sleep 10
  .venv/bin/py-spy record -p $C -d 15 -r 50 -f raw -o $OUT/$tag.core.txt > /dev/null 2>&1 &
  P1=$!
  .venv/bin/py-spy record -p $W -d 15 -r 50 -f raw -o $OUT/$tag.worker.txt > /dev/null 2>&1 &
  P2=$!
  .venv/bin/py-spy record -p $R -d 15 -r 50 -f raw -o $OUT/$tag.replica.txt > /dev/null 2>&1
  wait $B $P1 $P2
  python3 -c "import json;d=json.load(open('$OUT/$tag.json'));print('$model', d['total_output_tokens'], round(d['output_throughput'],1), round(d['median_tpot_ms'],1))"
done
curl -s http://127.0.0.1:8000/metrics | grep -E "^mode_cotd_(mixture_union_requests_total|routed_weight_ratio_count|requests_total)" > $OUT/metrics.txt
kill -INT $SERVE; sleep 20; pkill -f "mode-cotd serve"; echo done
