"""Compose an unseen task through a running server, and what it costs everyone else (issue 28).

    python -m benchmarks.runtime_compose [--task strategy_qa] [--test-prompts 100] [--out DIR]

One run, side by side: `mode-cotd serve` on the default bundle with runtime routes on (a fresh state folder);
a probe client sends one request at a time (an expert route, greedy, PROBE_TOKENS tokens) and times each.

    idle       PROBE_IDLE probe requests, nothing else running
    during     the composition job of the task's 5-shot file (learn/<task>.jsonl, through
               training.remote_compose: the `mode-cotd compose --server` path), probes continuing
               until the job is done

Reported: the job's wall time and the server's own search time, the probes' p50 (and p90) latency idle and
during the job and their ratio; then the accuracy on the same seeded test prompts of the new route and of the
bundle's offline composition of the task (`mode-cotd:<task>`, the paper's search over [-3, 3] in
training/compose.py), greedy, 256 tokens, scored by mode_cotd.tasks. Written to <out>/result.json and
<out>/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.servers import mode_cotd_spec, running
from mode_cotd import paths
from mode_cotd.atomic import write_json_atomic, write_text_atomic
from mode_cotd.data import load_task, student_prompt, subsample
from mode_cotd.format import completion_prompt
from mode_cotd.tasks import END, score
from training.compose import ComposeConfig, load_shots
from training.remote_compose import compose_on_server

PROBE_IDLE = 20
PROBE_TOKENS = 32
PROBE_ROUTE = "mode-cotd:addsub"
PROBE_PROMPT = "Infer the correct answer for the question.\n\nQ: Tom has 3 apples and buys 4 more. How many?\nA:"
EVAL_TOKENS = 256
EVAL_CONCURRENCY = 8


@dataclass
class Probe:
    """Times one request at a time against `base` until stopped."""

    base: str
    latencies: list[float]

    def run(self, stop: threading.Event, limit: int | None = None) -> None:
        with httpx.Client(base_url=self.base, timeout=120) as client:
            while not stop.is_set() and (limit is None or len(self.latencies) < limit):
                started = time.perf_counter()
                response = client.post("/v1/completions", json={
                    "model": PROBE_ROUTE, "prompt": PROBE_PROMPT, "max_tokens": PROBE_TOKENS, "temperature": 0,
                    "ignore_eos": True})
                response.raise_for_status()
                self.latencies.append(time.perf_counter() - started)


def quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"n": len(ordered), "p50": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


async def accuracy(base: str, model: str, examples, task: str) -> dict:
    """Greedy completions of the test prompts on `model`, scored."""
    limit = asyncio.Semaphore(EVAL_CONCURRENCY)

    async def one(client, example) -> str:
        async with limit:
            response = await client.post("/v1/completions", json={
                "model": model, "prompt": completion_prompt(student_prompt(example)), "max_tokens": EVAL_TOKENS,
                "temperature": 0})
            response.raise_for_status()
            return response.json()["choices"][0]["text"]

    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        outputs = await asyncio.gather(*(one(client, e) for e in examples))
    result = score([o.split(END)[0] for o in outputs], [e.output for e in examples], task)
    return {**result, "model": model}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runtime_compose", description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="strategy_qa", help="an unseen task with a 5-shot file (learn/<task>.jsonl)")
    parser.add_argument("--bundle", type=Path, default=paths.REPO_ROOT / "bundles" / "default")
    parser.add_argument("--test-prompts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(f"benchmarks/results/runtime-compose-{time.strftime('%Y%m%d')}"))
    args = parser.parse_args(argv)

    config = ComposeConfig(task=args.task, bundle=str(args.bundle), name=f"{args.task}-runtime", server="")
    shots, shots_source = load_shots(config)
    tests = subsample(load_task(args.task, "test"), args.test_prompts, args.seed)
    with tempfile.TemporaryDirectory(prefix="mode-cotd-runtime-bench-") as tmp:
        spec = mode_cotd_spec(Path(tmp) / "composites", bundle=args.bundle,
                              extra_args=["--runtime-enabled", "--runtime-state-dir", str(Path(tmp) / "state")])
        with running(spec, args.out) as server:
            base = server.base_url
            idle = Probe(base, [])
            idle.run(threading.Event(), PROBE_IDLE)
            during, stop = Probe(base, []), threading.Event()
            thread = threading.Thread(target=during.run, args=(stop,))
            thread.start()
            started = time.perf_counter()
            try:
                config.server = base
                job = compose_on_server(config, shots)
            finally:
                stop.set()
                thread.join()
            wall = time.perf_counter() - started
            new_route, offline = f"mode-cotd:{config.name}", f"mode-cotd:{args.task}"
            accuracies = [asyncio.run(accuracy(base, m, tests, args.task)) for m in (new_route, offline)]
    idle_q, during_q = quantiles(idle.latencies), quantiles(during.latencies)
    result = {
        "task": args.task, "shots": shots_source, "bundle": str(args.bundle),
        "job": {"wall_s": round(wall, 2), "search_s": job["result"]["seconds"], "evaluations":
                job["progress"]["evaluations"], "objective": job["objective"], "weights": job["result"]["weights"],
                "loss": job["result"]["loss"]},
        "probe": {"route": PROBE_ROUTE, "max_tokens": PROBE_TOKENS, "idle": idle_q, "during": during_q,
                  "p50_ratio": during_q["p50"] / idle_q["p50"]},
        "accuracy": {"test_prompts": len(tests), "seed": args.seed, "runtime": accuracies[0], "offline": accuracies[1]},
    }
    write_json_atomic(args.out / "result.json", result)
    write_text_atomic(args.out / "README.md", (
        f"# Composing {args.task} through the API (python -m benchmarks.runtime_compose)\n\n"
        f"- job: {result['job']['evaluations']} candidates ({job['objective']}) in {wall:.1f} s wall "
        f"({job['result']['seconds']:.1f} s searching)\n"
        f"- probe p50 latency ({PROBE_ROUTE}, {PROBE_TOKENS} tokens): idle {idle_q['p50']:.3f} s, during the job "
        f"{during_q['p50']:.3f} s: {result['probe']['p50_ratio']:.2f}x ({during_q['n']} requests during)\n"
        f"- accuracy on {len(tests)} seeded test prompts: runtime route {accuracies[0]['accuracy']:.3f} "
        f"({accuracies[0]['correct']}/{len(tests)}), offline composition {accuracies[1]['accuracy']:.3f} "
        f"({accuracies[1]['correct']}/{len(tests)})\n"))
    print((args.out / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
