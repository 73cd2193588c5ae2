"""Smoke-check a running `make serve`: the gate route answers last-letter test prompts in the paper's format.

    make serve &                      # in another shell; ready when GET /health answers 200
    .venv/bin/python scripts/smoke_serve.py [--base-url http://127.0.0.1:8000]

Prints the routes, gate-routed completions of the first PROMPTS last-letter test prompts (openai client) with the
experts that served each, the first of them through the shared adapter's own route where the bundle has one
(bundles/residual: mode-cotd:all_data), a chat, and a completion through curl. Exits 1 unless every answer is a
rationale in the paper's format ("The last letter of ...", "-->", the answer, " END"), the gate's top expert
(the shared adapter, under every route at weight 1, aside) is last_letter_concatenation wherever it chose
experts, and it chose them for at least one prompt. A gate with a shared adapter may abstain to it alone (its
top probability below the calibrated threshold): those prompts count as served, not as routed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from openai import OpenAI

from mode_cotd.data import load_task, student_prompt

PROMPTS = 8
"""Last-letter test prompts sent through the gate (the first ones of the test file)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    client = OpenAI(base_url=f"{args.base_url}/v1", api_key="none")
    models = client.models.list().data
    print("routes:", [m.id for m in models])
    shared = next(m.model_extra["mode_cotd"].get("shared") for m in models if m.id == "mode-cotd")

    examples = load_task("last_letter_concatenation", "test")[:PROMPTS]
    answers = []
    for example in examples:
        r = client.completions.create(model="mode-cotd", prompt=student_prompt(example), max_tokens=200,
                                      temperature=0)
        answers.append((r.choices[0].text, r.model_extra["mode_cotd"]))
        print("gate completion:", repr(r.choices[0].text), r.choices[0].finish_reason, f"(gold {example.gold!r})",
              "served by:", r.model_extra["mode_cotd"])
    if shared is not None:
        a = client.completions.create(model=f"mode-cotd:{shared}", prompt=student_prompt(examples[0]),
                                      max_tokens=200, temperature=0)
        print(f"shared adapter alone (mode-cotd:{shared}):", repr(a.choices[0].text), a.choices[0].finish_reason)

    c = client.chat.completions.create(model="mode-cotd", messages=[{"role": "user", "content": "What is 12 + 30?"}],
                                       max_tokens=120, temperature=0)
    print("gate chat:", repr(c.choices[0].message.content), c.choices[0].finish_reason, c.model_extra["mode_cotd"])

    body = {"model": "mode-cotd", "max_tokens": 150, "temperature": 0,
            "prompt": "Q: Tom has 3 apples and buys 4 more. How many apples does he have?\nA:"}
    curl = subprocess.run(["curl", "-s", f"{args.base_url}/v1/completions", "-H", "Content-Type: application/json",
                           "-d", json.dumps(body)], capture_output=True, text=True, check=True)
    print("curl:", curl.stdout)
    return check_last_letter(answers, shared)


def check_last_letter(answers: list[tuple[str, dict]], shared: str | None = None) -> int:
    """0 when every (text, served_by) answer is a rationale in the paper's format (one "The last letter of ..."
    line per word, "-->", the answer, " END"), the gate put last_letter_concatenation first wherever it chose
    experts, and it chose experts at least once; else 1, naming what is wrong. `shared`: the bundle's shared
    adapter (under every route at weight 1), left out of the gate's choice."""
    faults, routed = [], 0
    for i, (text, served_by) in enumerate(answers):
        experts = {name: w for name, w in (served_by.get("experts") or {}).items() if name != shared}
        if experts:
            routed += 1
            top = max(experts, key=experts.get)
            if top != "last_letter_concatenation":
                faults.append(f"prompt {i}: the gate's top expert is {top!r}, not 'last_letter_concatenation' "
                              f"({experts})")
        for part in ("The last letter of", "-->"):
            if part not in text:
                faults.append(f"prompt {i}: no {part!r} in the answer")
        if not text.endswith(" END"):
            faults.append(f"prompt {i}: the answer does not end with ' END'")
    if not routed:
        faults.append(f"the gate chose no expert for any of the {len(answers)} prompts"
                      + (f" (all went to the shared adapter {shared!r} alone)" if shared else ""))
    for fault in faults:
        print("FAIL:", fault, file=sys.stderr)
    if not faults:
        print(f"OK: {len(answers)} rationales in the paper's format; the gate routed {routed} to the last-letter "
              f"expert and {len(answers) - routed} to {shared or 'no expert'} alone")
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main())
