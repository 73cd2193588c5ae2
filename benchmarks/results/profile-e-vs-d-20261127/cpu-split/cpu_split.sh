#!/bin/bash
# CPU seconds per process during one load: 1 expert, 8 distinct experts, the gate route.
cd "$(git rev-parse --show-toplevel)"   # run from anywhere in the repository
OUT=/tmp/cpu4; mkdir -p $OUT
TOK=$(.venv/bin/python -c "from mode_cotd.student import resolve_student; print(resolve_student())")
.venv/bin/mode-cotd serve --engine-dtype float32 --engine-compile > $OUT/serve.log 2>&1 &
for i in $(seq 120); do sleep 5; curl -s http://127.0.0.1:8000/health 2>/dev/null | grep -q ok && break; done
snap() { for p in /proc/[0-9]*; do s=$(cat $p/stat 2>/dev/null) || continue; c=$(tr '\0' ' ' < $p/cmdline 2>/dev/null | cut -c1-60); set -- ${s#*) }; echo "${p#/proc/} $((${12}+${13})) $c"; done; }
run() { tag=$1; shift
  snap > $OUT/$tag.before; t0=$(date +%s.%N)
  .venv/bin/python -m benchmarks.vllm_bench --backend openai --base-url http://127.0.0.1:8000 --endpoint /v1/completions \
    --tokenizer $TOK --dataset-name custom --dataset-path benchmarks/results/full-20261127/prompts.jsonl \
    --skip-chat-template --custom-output-len 64 --ignore-eos --temperature 0 --num-prompts 32 --max-concurrency 16 \
    --save-result --result-dir $OUT --result-filename $tag.json --disable-tqdm "$@" > $OUT/$tag.bench.log 2>&1
  t1=$(date +%s.%N); snap > $OUT/$tag.after
  python3 - $OUT $tag $t0 $t1 <<'PY'
import sys,json
out,tag,t0,t1=sys.argv[1],sys.argv[2],float(sys.argv[3]),float(sys.argv[4])
def load(f):
    d={}
    for l in open(f):
        p=l.split(' ',2); d[p[0]]=(int(p[1]),p[2].strip() if len(p)>2 else '')
    return d
b,a=load(f'{out}/{tag}.before'),load(f'{out}/{tag}.after')
r=json.load(open(f'{out}/{tag}.json'))
print(f'== {tag}: wall {t1-t0:.1f} s, {r["total_output_tokens"]} tokens, {r["output_throughput"]:.1f} tok/s, TPOT p50 {r["median_tpot_ms"]:.0f} ms')
rows=sorted(((a[k][0]-b[k][0])/100,a[k][1]) for k in a if k in b and a[k][0]-b[k][0]>20)
for cpu,name in reversed(rows): print(f'  {cpu:7.1f} cpu-s  {name}')
PY
}
run one --model mode-cotd:gsm8k
run eight --model mode-cotd:gsm8k --lora-modules mode-cotd:gsm8k mode-cotd:aqua mode-cotd:addsub mode-cotd:svamp mode-cotd:multiarith mode-cotd:single_eq mode-cotd:commonsense_qa mode-cotd:date_understanding
run gate --model mode-cotd
pkill -INT -f "mode-cotd serve"; sleep 20; pkill -f "mode-cotd serve"; echo done
