"""`mode-cotd compose --server URL`: the same search, run by a serving mode-cotd through its API.

The shots are read as offline (`load_shots`), sent to `POST <server>/v1/compositions` as
{"prompt": the task's student prompt, "answer": the shot's output} (the prompt the evaluation sends, so the
search scores what clients will send), and the job is polled until it ends; progress goes to stderr and the
final job document (weights, loss, trace, route) to stdout. The server searches over its bundle's experts on
the simplex (serving/composition_jobs.py) in `--mode` (exact or linear); `--objective` is passed on (answer_loss or few_shot_loss), and
without it the server's own runtime.objective applies.
An API key, when the server wants one, comes from $MODE_COTD_API_KEY.
"""

from __future__ import annotations

import json
import os
import sys
import time

from mode_cotd.data import student_prompt
from mode_cotd.errors import ConfigError

POLL_S = 1.0
SERVER_OBJECTIVES = ("answer_loss", "few_shot_loss")


def compose_on_server(config, shots, timeout_s: float = 3600.0, priority: str | None = None) -> dict:
    """Run the composition job for `config` (a training.compose.ComposeConfig) on config.server; the final
    job document (`priority`: "background" or "shared", None: the server's default). ConfigError with the
    server's message when it refuses the job or the job fails."""
    import httpx

    base = config.server.rstrip("/")
    key = os.environ.get("MODE_COTD_API_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"name": config.name or config.task, "task": config.task, "mode": config.mode,
            "examples": [{"prompt": student_prompt(e), "answer": e.output} for e in shots]}
    if config.objective is not None:  # None: the server's runtime.objective
        if config.objective not in SERVER_OBJECTIVES:
            raise ConfigError(f"compose --server: objective {config.objective!r} is not one a server runs; "
                              f"use one of {list(SERVER_OBJECTIVES)}")
        body["objective"] = config.objective
    if priority is not None:
        body["priority"] = priority
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        response = client.post("/v1/compositions", json=body)
        if response.status_code != 202:
            raise ConfigError(f"{base}: the server refused the job ({response.status_code}): {_message(response)}")
        job = response.json()
        deadline = time.monotonic() + timeout_s
        while job["status"] in ("queued", "running"):
            if time.monotonic() > deadline:
                raise ConfigError(f"{base}: job {job['id']} did not finish within {timeout_s:g} s")
            time.sleep(POLL_S)
            job = client.get(f"/v1/compositions/{job['id']}").json()
            progress = job.get("progress") or {}
            print(f"[compose] {job['status']}: {progress.get('evaluations')}/{progress.get('budget')} candidates, "
                  f"best loss {progress.get('best_loss')}", file=sys.stderr, flush=True)
    if job["status"] != "succeeded":
        raise ConfigError(f"{base}: job {job['id']} failed: {(job.get('error') or {}).get('message')}")
    return job


def _message(response) -> str:
    try:
        return json.dumps(response.json().get("error", response.json()))
    except ValueError:
        return response.text[:500]
