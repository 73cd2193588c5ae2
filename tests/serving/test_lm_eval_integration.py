"""lm-eval, unmodified, against the real app (Ray Serve + vLLM, tiny student, 3 tiny experts, a gate, 127.0.0.1).

One app for the module. The server's prompt logprobs (echo, logprobs, max_tokens 0) equal transformers + peft
offline within 1e-3 per token in float32, for one expert and for an explicit two-expert mixture against its
exact composite (mode_cotd.mixing.compose_exact); bad lists of prompts get a clear 400 and the server keeps
serving; then `lm_eval --model local-completions --batch_size 4` runs both task families (generate_until and
loglikelihood multiple choice, benchmarks/lm_eval_tasks) for the gate route, one expert and an explicit mixture
named in `model`, and reports numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from mode_cotd import paths
from mode_cotd.adapter import load_adapter, save_adapter
from mode_cotd.mixing import compose_exact
from serving.settings import ApiSettings, CacheSettings, EngineSettings, RouterSettings, ServeSettings

from .serve_app import free_port, serve_app

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.ray]

PROMPT = "Infer the correct answer for the question.\n\nQ: Tom has 3 apples and buys 4 more. How many?\nA: 3 + 4 = 7"
TOLERANCE = 1e-3
"""Largest |server - offline| per prompt token (float32 on both sides)."""
TASKS_FOLDER = paths.REPO_ROOT / "benchmarks" / "lm_eval_tasks"
LM_EVAL_TASKS = "mode_cotd_gen_addsub,mode_cotd_mc_commonsense_qa"
LIMIT = 4
"""Examples per task: one batch of 4 for the generation task, 20 option continuations (5 batches) for the other."""
MAX_PROMPTS = 8


@pytest.fixture(scope="module")
def server(tiny_bundle, tiny_student, tmp_path_factory, heavy_lock_for_module):
    port = free_port()
    settings = ServeSettings(
        bundle=str(tiny_bundle), student=str(tiny_student), host="127.0.0.1", port=port, app_name="mode-cotd-lm-eval",
        # float32: vLLM's "auto" runs a float32 checkpoint in half precision (3.5e-3 off per token here)
        engine=EngineSettings(max_model_len=1024, max_loras=4, max_cpu_loras=8, max_num_seqs=32, dtype="float32",
                              enforce_eager=True, kv_cache_memory_bytes=64 * 2**20),
        batching=RouterSettings(max_batch_size=8, batch_wait_timeout_s=0.02),
        cache=CacheSettings(dir=str(tmp_path_factory.mktemp("composites")), max_entries=16),
        api=ApiSettings(default_max_tokens=16, max_prompts=MAX_PROMPTS),
    )
    with serve_app(settings) as (base, _):
        yield base


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def server_prompt_logprobs(base: str, model: str, ids: list[int]) -> list[float]:
    out = client(base).completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=0, temperature=0)
    logprobs = out.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and len(logprobs.token_logprobs) == len(ids)
    return logprobs.token_logprobs[1:]


def offline_prompt_logprobs(student: Path, adapter: Path | None, ids: list[int]) -> list[float]:
    """log p(token i | tokens < i) for i >= 1, by transformers (+ peft with `adapter`) in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student, torch_dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model = model.float().eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # [L, V]
    logprobs = torch.log_softmax(logits, -1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def test_prompt_logprobs_match_transformers_and_peft(server, tiny_student, tiny_bundle, tmp_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_student)(PROMPT)["input_ids"]
    experts = tiny_bundle / "experts"
    composite = save_adapter(compose_exact([load_adapter(experts / "alpha"), load_adapter(experts / "beta")],
                                           [0.5, 0.5]), tmp_path / "composite")
    base = offline_prompt_logprobs(tiny_student, None, ids)
    report = {}
    for name, model, adapter in [
        ("expert", "mode-cotd:alpha", experts / "alpha"),
        ("mixture", 'mode-cotd:mixture:{"alpha": 0.5, "beta": 0.5}', composite),
        ("student", Path(tiny_student).name, None),
    ]:
        served = server_prompt_logprobs(server, model, ids)
        offline = offline_prompt_logprobs(tiny_student, adapter, ids)
        report[name] = {"max_difference": max_difference(served, offline),
                        "effect_of_the_adapter": max_difference(offline, base)}
    print("prompt logprobs, server vs offline:", json.dumps(report))
    assert all(r["max_difference"] <= TOLERANCE for r in report.values()), report
    # the adapters change the logprobs far beyond the tolerance, so a mixture served wrong would fail
    assert report["expert"]["effect_of_the_adapter"] > 50 * TOLERANCE
    assert report["mixture"]["effect_of_the_adapter"] > 50 * TOLERANCE
    # the same numbers through the body's mixture field, and as one of a list of prompts
    body = client(server).completions.create(model="mode-cotd", prompt=[ids, ids[:10]], echo=True, logprobs=1,
                                             max_tokens=0, extra_body={"mixture": {"alpha": 0.5, "beta": 0.5}})
    assert max_difference(body.choices[0].logprobs.token_logprobs[1:],
                          offline_prompt_logprobs(tiny_student, composite, ids)) <= TOLERANCE
    assert len(body.choices[1].logprobs.tokens) == 10 and body.usage.prompt_tokens == len(ids) + 10


@pytest.mark.parametrize("prompt, code", [
    ([], None),
    (["a"] * (MAX_PROMPTS + 1), "too_many_prompts"),
    (["a", [97, 98]], None),
    (["a", "x" * 1024], "context_length_exceeded"),
])
def test_bad_lists_get_a_clear_400_and_the_server_keeps_serving(server, prompt, code):
    body = {"model": "mode-cotd:alpha", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0}
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and (code is None or error["code"] == code)
    good = httpx.post(f"{server}/v1/completions", json={**body, "prompt": ["a", PROMPT]}, timeout=60)
    assert good.status_code == 200 and len(good.json()["choices"]) == 2


def run_lm_eval(base: str, model: str, tokenizer: Path, output: Path) -> dict:
    """`lm_eval --model local-completions` as README.md documents it; the results JSON it writes."""
    model_args = (f"model={model},base_url={base}/v1/completions,tokenizer={tokenizer},"
                  "tokenizer_backend=huggingface,max_length=1024,max_retries=1,timeout=300")
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
               "--include_path", str(TASKS_FOLDER), "--tasks", LM_EVAL_TASKS, "--batch_size", "4",
               "--limit", str(LIMIT), "--gen_kwargs", "max_gen_toks=8", "--output_path", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "Retrying" not in done.stderr, done.stderr[-5000:]  # every request answered the first time
    files = sorted(output.rglob("results_*.json"))
    assert files, f"lm_eval wrote no results under {output}"
    return json.loads(files[-1].read_text())["results"]


def completions_served(base: str, route: str) -> float:
    """mode_cotd_requests_total of /v1/completions answered 200 on `route`."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    labels = {"route": route, "endpoint": "/v1/completions", "status": "200"}
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "mode_cotd_requests_total" and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.parametrize("model, route", [("mode-cotd", "gate"), ("mode-cotd:alpha", "expert"),
                                          ('"mode-cotd:mixture:alpha=0.5,beta=0.5"', "mixture")])
def test_lm_eval_runs_both_task_families(server, tiny_student, data_dir, tmp_path, model, route):
    pytest.importorskip("lm_eval")
    before = completions_served(server, route)
    started = time.monotonic()
    results = run_lm_eval(server, model, Path(tiny_student), tmp_path)
    scores = {task: results[task]["acc,none"] for task in LM_EVAL_TASKS.split(",")}
    print(f"lm_eval {model}: {scores} in {time.monotonic() - started:.1f} s")
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores.values()), results
    # batches of 4 prompts: 4 generations in 1 request, 4 questions x 5 options = 20 loglikelihoods in 5
    assert completions_served(server, route) - before == 1 + 5
