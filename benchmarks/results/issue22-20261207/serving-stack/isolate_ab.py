"""In one running mode-cotd server: the student route at concurrency 16 (64 tokens) with every process floating,
then with every process but the vLLM worker pinned to core 1 (the worker keeps core 0), twice (A/B, A/B).
python isolate_ab.py BASE_URL STUDENT_NAME"""

import os
import subprocess
import sys

from benchmarks import loadgen
from benchmarks.prompts import load_prompts
from benchmarks.scenarios import SCENARIOS, request_specs


def worker_pid() -> int:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    for line in ps.splitlines()[1:]:
        if "VLLM::Worker" in line:
            return int(line.split(None, 1)[0])
    raise SystemExit("no vLLM worker process")


def pin_others(cores: set[int]) -> tuple[int, int]:
    worker, pinned = worker_pid(), 0
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        if pid == worker:
            continue
        try:
            os.sched_setaffinity(pid, cores)
            pinned += 1
        except OSError:
            pass
    return pinned, worker


def load(base: str, student: str, prompts, tag: str) -> None:
    records = loadgen.run(base, request_specs(SCENARIOS["c"], prompts[:16], 64, student, "gsm8k"), concurrency=16)
    span = max(r.end_s for r in records) - min(r.start_s for r in records)
    print(f"{tag}: {sum(r.output_tokens for r in records if r.ok) / span:.1f} tok/s", flush=True)


def main() -> None:
    base, student = sys.argv[1], sys.argv[2]
    prompts = load_prompts(64, seed=0)
    load(base, student, prompts, "warm")
    for rnd in range(2):
        pin_others({0, 1})
        load(base, student, prompts, f"round {rnd} A (all float)")
        pinned, worker = pin_others({1})
        os.sched_setaffinity(0, {1})
        load(base, student, prompts, f"round {rnd} B (others on core 1, worker {worker} alone: {pinned} pinned)")
    pin_others({0, 1})


if __name__ == "__main__":
    main()
