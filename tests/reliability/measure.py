"""Reliability figures against a running mode-cotd server (docs/reliability.md quotes its output).

    python tests/reliability/measure.py capacity    --base http://127.0.0.1:8000
    python tests/reliability/measure.py overload    --base ... --serve-pid PID [--rate R] [--seconds 60]
    python tests/reliability/measure.py disconnects --base ... [--clients 50]
    python tests/reliability/measure.py fuzz        --base ... [--cases 1000]
    python tests/reliability/measure.py kill        --base ... --serve-pid PID

Each prints one JSON object. `--serve-pid` is the `mode-cotd serve` process: memory is the
RSS of it and every process under it (Ray, the replicas, vLLM's engine core), and `kill`
SIGKILLs one student replica found under it, never anything else.
tests/reliability/test_real_server.py starts the default server and runs them all.

    capacity     closed loop: 64 clients, greedy 32-token completions on the gate route, req/s
    overload     open loop at `rate` req/s (default 4x capacity) for `seconds`: outcomes, latencies, peak RSS
    disconnects  clients that leave mid-stream (and non-streaming ones that time out): vLLM's
                 unfinished-request count on /metrics afterwards, and how long it took to reach 0
    fuzz         schemathesis from the server's /openapi.json (tests/serving/fuzzing.py)
    kill         kill -9 of one student replica under load: time until requests succeed again and
                 until Serve runs as many replicas as before, what the in-flight ones got, whether any hung
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

PROMPTS = [
    f"Infer the correct answer for the question.\n\nQ: {q}\nA:" for q in (
        "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "A train travels 60 miles in 1.5 hours. What is its average speed in miles per hour?",
        "Take the last letters of the words in \"Elon Musk\" and concatenate them.",
        "If today is 2019-03-01, what date was it 10 days ago in MM/DD/YYYY?",
        "Sara had 12 pencils and gave 5 to Ali. How many pencils does Sara have now?",
        "Which is a renewable energy source? Answer Choices: (A) coal (B) wind (C) oil (D) gas",
        "There are 15 trees. Workers plant more until there are 21. How many trees did they plant?",
        "A shop sells pens at 3 dollars each. How much do 7 pens cost?",
    )
]
MAX_TOKENS = 32
CLIENT_TIMEOUT_S = 300.0
"""A request still unanswered after this counts as hung."""


def limits() -> httpx.Limits:
    return httpx.Limits(max_connections=4096, max_keepalive_connections=256)


def body(i: int, stream: bool = False, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": "mode-cotd", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}


# ---------------------------------------------------------------------------- processes and metrics


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def find(pid: int, *words: str) -> list[psutil.Process]:
    """Processes under `pid` whose command line has every word."""
    found = []
    for p in tree(pid):
        try:
            cmd = " ".join(p.cmdline()) + " " + p.name()
        except psutil.Error:
            continue
        if all(w in cmd for w in words):
            found.append(p)
    return found


async def sample_rss(pid: int, stop: asyncio.Event, every_s: float = 0.5) -> list[tuple[float, int]]:
    samples = []
    started = time.perf_counter()
    while not stop.is_set():
        samples.append((time.perf_counter() - started, await asyncio.to_thread(tree_rss, pid)))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass
    return samples


def metric(base: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


# ---------------------------------------------------------------------------- one request


def _refusal_ok(status: int, text: str) -> bool:
    """OpenAI's error JSON, or (503 only) Ray Serve's own plain-text backpressure answer."""
    try:
        return set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        return status == 503 and "backpressure" in text


async def one(client: httpx.AsyncClient, base: str, payload: dict, timeout_s: float = CLIENT_TIMEOUT_S) -> dict:
    """Send one completion; return its outcome (status, seconds, retry_after, ok, text)."""
    started = time.perf_counter()
    out = {"status": None, "retry_after": None, "ok": False, "text": None}
    try:
        async with asyncio.timeout(timeout_s):
            if payload.get("stream"):
                async with client.stream("POST", f"{base}/v1/completions", json=payload) as r:
                    out["status"], out["retry_after"] = r.status_code, r.headers.get("retry-after")
                    raw = (await r.aread()).decode()
                if r.status_code in (429, 503):
                    out["ok"] = _refusal_ok(r.status_code, raw)
                if r.status_code == 200:
                    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
                    chunks = [json.loads(e) for e in events[:-1]]
                    out["ok"] = events[-1:] == ["[DONE]"] and all("error" not in c for c in chunks)
                    out["text"] = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
            else:
                r = await client.post(f"{base}/v1/completions", json=payload)
                out["status"], out["retry_after"] = r.status_code, r.headers.get("retry-after")
                if r.status_code == 200:
                    data = r.json()
                    choice = data["choices"][0]
                    out["ok"] = (isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
                                 and 1 <= data["usage"]["completion_tokens"] <= payload["max_tokens"]
                                 and "route" in data["mode_cotd"])
                    out["text"] = choice["text"]
                elif r.status_code in (429, 503):
                    out["ok"] = _refusal_ok(r.status_code, r.text)
    except TimeoutError:
        out["status"] = "hung"
    except httpx.HTTPError as e:
        out["status"] = f"transport:{type(e).__name__}"
    out["seconds"] = time.perf_counter() - started
    return out


# ---------------------------------------------------------------------------- capacity and overload


async def warm_up(base: str) -> dict[int, str]:
    """Each prompt once, alone (builds its composite); the unloaded greedy text of each."""
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client:
        texts = {}
        for i in range(len(PROMPTS)):
            r = await one(client, base, body(i))
            assert r["status"] == 200, r
            texts[i] = r["text"]
        return texts


async def capacity(base: str, clients: int = 64, seconds: float = 40.0) -> dict:
    await warm_up(base)
    done: list[dict] = []
    stop_at = time.perf_counter() + seconds

    async def worker(w: int, client: httpx.AsyncClient):
        i = w
        while time.perf_counter() < stop_at:
            done.append(await one(client, base, body(i)))
            i += clients

    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits()) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(w, client) for w in range(clients)))
        elapsed = time.perf_counter() - started
    ok = [d for d in done if d["status"] == 200]
    latencies = sorted(d["seconds"] for d in ok)
    return {"clients": clients, "seconds": round(elapsed, 1), "completed": len(ok),
            "statuses": dict(Counter(str(d["status"]) for d in done)),
            "capacity_rps": round(len(ok) / elapsed, 2),
            "p50_s": round(latencies[len(latencies) // 2], 2) if latencies else None,
            "tokens_per_request": MAX_TOKENS}


async def overload(base: str, serve_pid: int, rate: float, seconds: float = 60.0) -> dict:
    reference = await warm_up(base)
    fallbacks_before = metric(base, "mode_cotd_gate_fallbacks_total")
    stop = asyncio.Event()
    rss_task = asyncio.create_task(sample_rss(serve_pid, stop))
    baseline_rss = tree_rss(serve_pid)
    tasks: list[asyncio.Task] = []
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits()) as client:
        started = time.perf_counter()
        i = 0
        while (now := time.perf_counter() - started) < seconds:
            due = i / rate
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one(client, base, body(i, stream=i % 4 == 3))))
            i += 1
        sent_in = time.perf_counter() - started
        results = await asyncio.gather(*tasks)
        drained_in = time.perf_counter() - started
    stop.set()
    rss = await rss_task
    accepted = [(i, r) for i, r in enumerate(results) if r["status"] == 200]
    refused = [r for r in results if r["status"] in (429, 503)]
    other = [r for r in results if r["status"] not in (200, 429, 503)]
    refused_s = sorted(r["seconds"] for r in refused)
    accepted_s = sorted(r["seconds"] for _, r in accepted)
    return {
        "rate_rps": round(rate, 2), "seconds": seconds, "sent": len(results), "sent_in_s": round(sent_in, 1),
        "all_answered_in_s": round(drained_in, 1),
        "accepted_completed": len(accepted), "accepted_correct": sum(r["ok"] for _, r in accepted),
        "accepted_same_text_as_unloaded": sum(r["text"] == reference[i % len(PROMPTS)] for i, r in accepted),
        "refused": dict(Counter(str(r["status"]) for r in refused)),
        "refused_with_retry_after": sum(r["retry_after"] is not None for r in refused),
        "refused_openai_shaped_or_serve_backpressure": sum(r["ok"] for r in refused),
        "other": dict(Counter(str(r["status"]) for r in other)),
        "hung": sum(r["status"] == "hung" for r in results),
        "refusal_latency_p50_s": round(refused_s[len(refused_s) // 2], 3) if refused_s else None,
        "refusal_latency_max_s": round(refused_s[-1], 3) if refused_s else None,
        "accepted_latency_p50_s": round(accepted_s[len(accepted_s) // 2], 2) if accepted_s else None,
        "accepted_latency_max_s": round(accepted_s[-1], 2) if accepted_s else None,
        "rss_before_gib": round(baseline_rss / 2**30, 2),
        "rss_peak_gib": round(max(r for _, r in rss) / 2**30, 2),
        "rss_after_gib": round(tree_rss(serve_pid) / 2**30, 2),
        "rss_samples": len(rss),
        "gate_fallbacks": metric(base, "mode_cotd_gate_fallbacks_total") - fallbacks_before,
        "engine_unfinished_after": metric(base, "mode_cotd_engine_unfinished_requests"),
    }


# ---------------------------------------------------------------------------- disconnects


async def disconnects(base: str, clients: int = 50, max_tokens: int = 64) -> dict:
    """`clients` streams that leave after their first chunk, then as many non-streaming ones that time out."""
    async def leave_mid_stream(i: int) -> bool:
        payload = body(i, stream=True, max_tokens=max_tokens)
        async with (httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as client,
                    client.stream("POST", f"{base}/v1/completions", json=payload) as r):
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return True  # leaving the block closes the connection mid-stream
        return False

    async def give_up(i: int) -> None:
        try:
            async with httpx.AsyncClient(timeout=1.5) as client:
                await client.post(f"{base}/v1/completions", json=body(i, max_tokens=max_tokens))
        except httpx.TimeoutException:
            pass

    figures = {}
    for name, make in (("streaming", leave_mid_stream), ("non_streaming", give_up)):
        before_aborts = metric(base, "mode_cotd_client_disconnects_total")
        started = time.perf_counter()
        got_chunk = await asyncio.gather(*(make(i) for i in range(clients)))
        left_at = time.perf_counter()
        peak = unfinished = metric(base, "mode_cotd_engine_unfinished_requests")
        while unfinished > 0 and time.perf_counter() - left_at < 60:
            await asyncio.sleep(0.25)
            unfinished = metric(base, "mode_cotd_engine_unfinished_requests")
        figures[name] = {
            "clients": clients, "max_tokens": max_tokens,
            "left_mid_stream": sum(bool(g) for g in got_chunk) if name == "streaming" else None,
            "seconds_until_all_left": round(left_at - started, 1),
            "engine_unfinished_right_after": peak,
            "engine_unfinished_after": unfinished,
            "seconds_until_zero": round(time.perf_counter() - left_at, 2),
            "student_open_after": metric(base, "mode_cotd_student_open_requests"),
            "disconnects_counted": metric(base, "mode_cotd_client_disconnects_total") - before_aborts,
        }
    return figures


# ---------------------------------------------------------------------------- fuzz


def fuzz(base: str, cases: int = 1000) -> dict:
    import schemathesis

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
    from fuzzing import fuzz as run

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    models = [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=30).json()["data"]]
    per_post = (cases - 40) // 2
    budget = {"POST /v1/completions": per_post + 10, "POST /v1/chat/completions": per_post + 10,
              "GET /v1/models": 10, "GET /health": 5, "GET /metrics": 5}
    report = run(schema, budget, models, base_url=base, timeout_s=CLIENT_TIMEOUT_S)
    out = report.as_dict()
    out["health_after"] = httpx.get(f"{base}/health", timeout=30).status_code
    return out


# ---------------------------------------------------------------------------- kill -9


def running_student_replicas(app: str = "mode-cotd") -> int | None:
    """Student replicas Serve's controller calls RUNNING (None: its Ray cluster is not reachable from here)."""
    import ray
    from ray import serve

    try:
        if not ray.is_initialized():
            ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
        states = serve.status().applications[app].deployments["student"].replica_states
    except Exception:  # noqa: BLE001 - a figure left out, not a failure of the run
        return None
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")


async def kill_student(base: str, serve_pid: int, clients: int = 8, settle_s: float = 15.0,
                       after_recovery_s: float = 20.0, give_up_s: float = 300.0) -> dict:
    """Kill -9 one student replica (of however many run) under load.

    recovery_s: kill -> the first 200 for a request sent after it (with one replica, its restart;
    with more, the survivors serve). replaced_s: kill -> Serve reports as many RUNNING student
    replicas as before (the killed one restarted and loaded vLLM).
    """
    await warm_up(base)
    victims = find(serve_pid, "ServeReplica", "student")
    assert victims, f"no student replica under {serve_pid}"
    victim = victims[0]
    replicas_before = await asyncio.to_thread(running_student_replicas)
    engine_cores_before = [p.pid for p in find(victim.pid, "EngineCore")]  # the victim's (others' keep running)
    results: list[tuple[float, dict]] = []  # (start time relative to the kill, outcome)
    killed_at: float | None = None
    recovered_at: float | None = None
    stop = asyncio.Event()

    async def worker(w: int, client: httpx.AsyncClient):
        nonlocal recovered_at
        i = w
        while not stop.is_set():
            began = time.perf_counter()
            r = await one(client, base, body(i, stream=i % 2 == 1), timeout_s=give_up_s)
            rel = began - killed_at if killed_at is not None else began - time.perf_counter() - 1e9
            r["ended_rel_s"] = time.perf_counter() - killed_at if killed_at is not None else None
            results.append((rel, r))
            if killed_at is not None and rel > 0 and r["status"] == 200 and recovered_at is None:
                recovered_at = time.perf_counter()
            if r["status"] != 200:
                await asyncio.sleep(0.5)  # a client honouring Retry-After, roughly
            i += clients

    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits()) as client:
        workers = [asyncio.create_task(worker(w, client)) for w in range(clients)]
        await asyncio.sleep(settle_s)
        killed_at = time.perf_counter()
        os.kill(victim.pid, signal.SIGKILL)
        replaced_at = None
        dropped = False  # Serve has seen the replica die (fewer RUNNING than before)
        while time.perf_counter() - killed_at < give_up_s:
            running = await asyncio.to_thread(running_student_replicas)
            dropped = dropped or (running is not None and replicas_before is not None and running < replicas_before)
            if dropped and running == replicas_before and replaced_at is None:
                replaced_at = time.perf_counter()
            if recovered_at is not None and (replaced_at is not None or replicas_before is None):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(after_recovery_s)
        stop.set()
        await asyncio.gather(*workers)
    in_flight = [r for rel, r in results if rel < 0 and r["ended_rel_s"] is not None and r["ended_rel_s"] >= 0]
    after = [r for rel, r in results if rel >= 0]
    new_victims = find(serve_pid, "ServeReplica", "student")
    orphans = [pid for pid in engine_cores_before if psutil.pid_exists(pid)
               and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    return {
        "killed_pid": victim.pid, "clients": clients, "student_replicas": replicas_before or len(victims),
        "recovery_s": round(recovered_at - killed_at, 1) if recovered_at else None,
        "replaced_s": round(replaced_at - killed_at, 1) if replaced_at else None,
        "in_flight_at_kill": dict(Counter(str(r["status"]) for r in in_flight)),
        "in_flight_max_s_after_kill": round(max((r["ended_rel_s"] for r in in_flight), default=0), 2),
        "after_kill": dict(Counter(str(r["status"]) for r in after)),
        "after_kill_refusals_with_retry_after": sum(r["retry_after"] is not None for r in after
                                                   if r["status"] in (429, 503)),
        "hung": sum(r["status"] == "hung" for _, r in results),
        "slowest_request_s": round(max(r["seconds"] for _, r in results), 1),
        "student_replicas_after": [p.pid for p in new_victims],
        "killed_replicas_engine_core_left_running": orphans,
        "health_after": (await asyncio.to_thread(httpx.get, f"{base}/health", timeout=30)).status_code,
    }


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="measure.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["capacity", "overload", "disconnects", "fuzz", "kill"])
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    parser.add_argument("--serve-pid", type=int, help="PID of `mode-cotd serve` (overload, kill)")
    parser.add_argument("--rate", type=float, help="overload: requests per second (default 4x a capacity run)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--cases", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.what == "capacity":
        out = asyncio.run(capacity(args.base))
    elif args.what == "overload":
        rate = args.rate or 4 * asyncio.run(capacity(args.base))["capacity_rps"]
        out = asyncio.run(overload(args.base, args.serve_pid, rate, args.seconds))
    elif args.what == "disconnects":
        out = asyncio.run(disconnects(args.base, args.clients))
    elif args.what == "fuzz":
        out = fuzz(args.base, args.cases)
    else:
        out = asyncio.run(kill_student(args.base, args.serve_pid))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
