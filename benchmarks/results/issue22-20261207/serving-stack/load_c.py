"""`rounds` closed-loop runs of one bench scenario's route at concurrency 16 (16 test prompts x 64 tokens) against a
running server; prints output tok/s per run:  python load_c.py BASE_URL STUDENT_NAME SCENARIO ROUNDS"""

import sys

from benchmarks import loadgen
from benchmarks.prompts import load_prompts
from benchmarks.scenarios import SCENARIOS, request_specs


def main() -> None:
    base, student, key, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    prompts = load_prompts(64, seed=0)
    for rnd in range(rounds):
        records = loadgen.run(base, request_specs(SCENARIOS[key], prompts[:16], 64, student, "gsm8k"), concurrency=16)
        span = max(r.end_s for r in records) - min(r.start_s for r in records)
        tokens = sum(r.output_tokens for r in records if r.ok)
        print(f"{key} round {rnd}: {tokens / span:.1f} tok/s, failed {sum(not r.ok for r in records)}", flush=True)


if __name__ == "__main__":
    main()
