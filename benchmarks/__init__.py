"""Throughput benchmarks: mode-cotd against vLLM's own server and a transformers + peft baseline.

One concept per file: `prompts` (test-set prompts), `workloads` (which adapter each request
asks for), `loadgen` (async streaming OpenAI client: closed loop and Poisson), `stats`
(TTFT/TPOT/ITL and throughput), `servers` (start/stop `vllm serve` and `mode-cotd serve`),
`prom` (reading /metrics), `peft_baseline` (scenario g), `vllm_bench` (`vllm bench serve`),
`scenarios` (a–g), `scaling` (distinct mixtures in flight, composite build cost, hit rate),
`environment`, `report` and `plots` (JSON, markdown, PNG), `runner` (one whole run) and `cli`
(`mode-cotd bench`). Nothing here imports vLLM, Ray or FastAPI at import time.
"""
