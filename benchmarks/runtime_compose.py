"""Compose an unseen task through a running server, and what it costs everyone else (issue 28).

    python -m benchmarks.runtime_compose [--task openbook_qa] [--test-prompts 100] [--out DIR]

One run, side by side: `mode-cotd serve` on the default bundle with runtime routes on (a fresh state folder).
Other users are an open-loop probe: requests to an expert route (greedy, PROBE_TOKENS tokens) arriving at
exponential intervals (mean --probe-interval-s, seeded), each timed. Phases, in order:

    idle         --idle-s seconds of probe traffic alone
    background   the composition job of the task's 5-shot file (learn/<task>.jsonl, through
                 training.remote_compose: the `mode-cotd compose --server` path), priority "background"
                 (each example scored only when the engine holds no other request), probes continuing
    shared       the same job again under another name, priority "shared" (examples scored at once,
                 beside the probes)

Reported per phase: the probes' p50 and p90 latency and their ratio to idle, and each job's wall and search
time. Then the accuracy on the same seeded test prompts of the background job's route and of the bundle's
offline composition of the task (`mode-cotd:<task>`, the paper's search over [-3, 3], training/compose.py),
greedy, 256 tokens, scored by mode_cotd.tasks. Written to <out>/result.json and <out>/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
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

PROBE_TOKENS = 16
PROBE_ROUTE = "mode-cotd:addsub"
PROBE_PROMPT = "Infer the correct answer for the question.\n\nQ: Tom has 3 apples and buys 4 more. How many?\nA:"
EVAL_TOKENS = 256
EVAL_CONCURRENCY = 8


@dataclass
class Probe:
    """Open-loop traffic: one request at each arrival (exponential gaps), timed, tagged with the phase."""

    base: str
    interval_s: float
    seed: int
    phase: str = "idle"
    samples: list[tuple[str, float]] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        rng = random.Random(self.seed)
        senders = []
        while not stop.wait(rng.expovariate(1 / self.interval_s)):
            sender = threading.Thread(target=self._one, args=(self.phase,))
            sender.start()
            senders.append(sender)
        for sender in senders:
            sender.join()

    def _one(self, phase: str) -> None:
        started = time.perf_counter()
        response = httpx.post(f"{self.base}/v1/completions", timeout=300, json={
            "model": PROBE_ROUTE, "prompt": PROBE_PROMPT, "max_tokens": PROBE_TOKENS, "temperature": 0,
            "ignore_eos": True})
        response.raise_for_status()
        self.samples.append((phase, time.perf_counter() - started))

    def latencies(self, phase: str) -> list[float]:
        return [seconds for p, seconds in self.samples if p == phase]


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
    parser.add_argument("--task", default="openbook_qa", help="an unseen task with a 5-shot file (learn/<task>.jsonl)")
    parser.add_argument("--bundle", type=Path, default=paths.REPO_ROOT / "bundles" / "default")
    parser.add_argument("--test-prompts", type=int, default=100)
    parser.add_argument("--probe-interval-s", type=float, default=4.0)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="one more `mode-cotd serve` argument, repeatable (--serve-arg=--engine-cpu-threads-bind "
                             "--serve-arg=0-1); recorded in the result")
    parser.add_argument("--out", type=Path, default=Path(f"benchmarks/results/runtime-compose-{time.strftime('%Y%m%d')}"))
    args = parser.parse_args(argv)

    config = ComposeConfig(task=args.task, bundle=str(args.bundle), name=f"{args.task}-runtime")
    shots, shots_source = load_shots(config)
    tests = subsample(load_task(args.task, "test"), args.test_prompts, args.seed)
    jobs = {}
    with tempfile.TemporaryDirectory(prefix="mode-cotd-runtime-bench-") as tmp:
        spec = mode_cotd_spec(Path(tmp) / "composites", bundle=args.bundle,
                              extra_args=["--runtime-enabled", "--runtime-state-dir", str(Path(tmp) / "state"),
                                          *args.serve_arg])
        with running(spec, args.out) as server:
            config.server = server.base_url
            probe, stop = Probe(server.base_url, args.probe_interval_s, args.seed), threading.Event()
            thread = threading.Thread(target=probe.run, args=(stop,))
            thread.start()
            try:
                time.sleep(args.idle_s)
                for priority in ("background", "shared"):
                    probe.phase = priority
                    config.name = f"{args.task}-runtime" + ("" if priority == "background" else "-shared")
                    started = time.perf_counter()
                    job = compose_on_server(config, shots, priority=priority)
                    jobs[priority] = {"wall_s": round(time.perf_counter() - started, 2),
                                      "search_s": job["result"]["seconds"], "evaluations": job["progress"]["evaluations"],
                                      "objective": job["objective"], "weights": job["result"]["weights"],
                                      "loss": job["result"]["loss"], "model": job["model"]}
                probe.phase = "after"
            finally:
                stop.set()
                thread.join()
            offline = f"mode-cotd:{args.task}"
            accuracies = {m: asyncio.run(accuracy(server.base_url, m, tests, args.task))
                          for m in (jobs["background"]["model"], offline)}
    idle = quantiles(probe.latencies("idle"))
    phases = {phase: {**quantiles(probe.latencies(phase)), "p50_ratio": quantiles(probe.latencies(phase))["p50"]
                      / idle["p50"]} for phase in jobs}
    result = {"task": args.task, "shots": shots_source, "bundle": str(args.bundle), "serve_args": args.serve_arg,
              "jobs": jobs,
              "probe": {"route": PROBE_ROUTE, "max_tokens": PROBE_TOKENS, "interval_s": args.probe_interval_s,
                        "idle": idle, **phases},
              "accuracy": {"test_prompts": len(tests), "seed": args.seed, "routes": accuracies}}
    write_json_atomic(args.out / "result.json", result)
    lines = [f"# Composing {args.task} through the API (python -m benchmarks.runtime_compose)", "",
             (f"Probe: {PROBE_ROUTE}, {PROBE_TOKENS} tokens, open loop, one request per {args.probe_interval_s:g} s "
             f"on average; idle p50 {idle['p50']:.3f} s ({idle['n']} requests). Server arguments beyond the "
             f"defaults: {' '.join(args.serve_arg) or 'none'}."), "",
             ("| job priority | candidates | objective | wall (s) | searching (s) | probe p50 (s) | p50 / idle | "
             "probe requests |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for priority, job in jobs.items():
        phase = phases[priority]
        lines.append(f"| {priority} | {job['evaluations']} | {job['objective']} | {job['wall_s']:.1f} | "
                     f"{job['search_s']:.1f} | {phase['p50']:.3f} | {phase['p50_ratio']:.2f}x | {phase['n']} |")
    lines += ["", f"Accuracy on {len(tests)} seeded test prompts of {args.task} (greedy, {EVAL_TOKENS} tokens):", ""]
    lines += [f"- {m}: {a['accuracy']:.3f} ({a['correct']}/{a['n']})" for m, a in accuracies.items()]
    write_text_atomic(args.out / "README.md", "\n".join(lines) + "\n")
    print((args.out / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
