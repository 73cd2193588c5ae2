"""Teacher rationales: exact teachers on the real files, import, filter, resume, and endpoints (real vLLM)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from mode_cotd.data import Example, load_task, read_jsonl
from mode_cotd.errors import ConfigError, DataError
from mode_cotd.tasks import extract_answer, format_target, get_task, is_correct
from training.programmatic import coin_flip, last_letter_concatenation, programmatic_example
from training.teacher import (
    EndpointConfig,
    TeacherError,
    add_samples,
    collect_from_endpoint,
    filter_rationales,
    main,
    raw_path,
    read_samples,
    report_path,
)

EXACT_TASKS = ("last_letter_concatenation", "coin_flip")


# ----------------------------------------------------------------------------- programmatic teachers


@pytest.mark.parametrize("task", EXACT_TASKS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_exact_teachers_agree_with_every_gold_label(data_dir, task, split):
    kind = get_task(task).answer_kind
    questions = load_task(task, split, data_dir)
    wrong = []
    for question in questions:
        example = programmatic_example(question)
        answer = extract_answer(example.output, kind)
        if answer != question.gold.strip().lower() and answer != question.gold.strip():
            wrong.append((question.input, question.gold, answer))
        assert is_correct(example.output, question.gold, kind)
    assert not wrong, wrong[:3]
    assert len(questions) >= 150


def test_last_letter_rationale_is_in_the_data_style():
    rationale, answer = last_letter_concatenation(
        'Take the last letters of each words in "Lucky Mireya Jj Kc" and concatenate them.')
    assert answer == "yajc"
    assert rationale.splitlines()[:2] == ['The last letter of "Lucky" is "y".', 'The last letter of "Mireya" is "a".']
    assert rationale.endswith('So the final answer is "yajc".')


def test_two_word_names_count_as_one_name():
    _, answer = last_letter_concatenation(
        'Take the last letters of each words in "Claudia Cole Matthew Juan Pablo" and concatenate them.')
    assert answer == "aewo"


def test_coin_flip_tracks_each_flip():
    rationale, answer = coin_flip('A coin is heads up. Ann flips the coin. Bo does not flip the coin. '
                                  'Cy flips the coin. Is the coin still heads up? Note that "flip" here means "reverse".')
    assert answer == "yes"
    assert "Ann flips the coin, so the coin is now tails up." in rationale
    assert "Bo does not flip the coin, so the coin is still tails up." in rationale
    _, answer = coin_flip("A coin is heads up. Ann flips the coin. Is the coin still heads up?")
    assert answer == "no"


def test_unparseable_question_and_unknown_task_are_refused():
    with pytest.raises(DataError, match="cannot parse"):
        coin_flip("A coin is heads up. Is the coin still heads up?")
    with pytest.raises(DataError, match="cannot parse"):
        last_letter_concatenation("What is 2 + 2?")
    with pytest.raises(ConfigError, match="no programmatic teacher for task 'gsm8k'"):
        programmatic_example(Example("gsm8k", "Q: 1+1\nA:", "2"))


# ----------------------------------------------------------------------------- command, filter, resume


def test_programmatic_command_writes_rationales_report_and_resumes(data_dir, tmp_path):
    output = tmp_path / "rationales.jsonl"
    argv = ["programmatic", "--task", "coin_flip", "--task", "last_letter_concatenation",
            "--data-dir", str(data_dir), "--subsample", "20", "--output", str(output)]
    assert main(argv) == 0
    records = read_jsonl(output)
    assert len(records) == 40
    assert {r["task"] for r in records} == set(EXACT_TASKS)
    assert all(r["model"] == "programmatic" and r["sample_index"] == 0 for r in records)
    assert all(r["source"] == f"programmatic:{r['task']}" for r in records)
    report = json.loads(report_path(output).read_text())
    for task in EXACT_TASKS:
        assert report["tasks"][task] == {"samples": 20, "kept": 20, "kept_fraction": 1.0,
                                         "questions": 20, "questions_kept": 20}
    raw_before = raw_path(output).read_bytes()
    assert main(argv) == 0  # a rerun finds every sample done
    assert raw_path(output).read_bytes() == raw_before


def test_import_keeps_well_formed_rationales_and_reports_the_fraction(data_dir, tmp_path):
    good = load_task("gsm8k", "train", data_dir)[:3]
    broken = {"input": good[0].input + " (variant)", "output": "a rationale with no separator"}
    released = tmp_path / "released.json"
    released.write_text(json.dumps([{"input": e.input, "output": e.output} for e in good] + [broken]))
    output = tmp_path / "out" / "rationales.jsonl"
    assert main(["import", str(released), "--task", "gsm8k", "--model", "text-davinci-002",
                 "--output", str(output)]) == 0
    kept = read_jsonl(output)
    assert [r["input"] for r in kept] == [e.input for e in good]
    assert all(r["model"] == "text-davinci-002" and r["source"] == str(released) for r in kept)
    report = json.loads(report_path(output).read_text())
    assert report["tasks"]["gsm8k"]["kept_fraction"] == 0.75


def test_filter_drops_answers_that_miss_the_gold(tmp_path):
    output = tmp_path / "rationales.jsonl"
    question = "Infer the correct answer for the question.\n\nQ: 2 + 3?\nA:"
    samples = [
        (Example("addsub", question, format_target("2 plus 3 is 5.", "5"), model="m", sample_index=0), "5"),
        (Example("addsub", question, format_target("2 plus 3 is 6.", "6"), model="m", sample_index=1), "5"),
        (Example("addsub", question, "no separator, answer 5", model="m", sample_index=2), "5"),
    ]
    assert add_samples(raw_path(output), samples) == 3
    report = filter_rationales(output)
    assert [r["sample_index"] for r in read_jsonl(output)] == [0]
    assert report["tasks"]["addsub"]["kept"] == 1
    assert report["tasks"]["addsub"]["kept_fraction"] == pytest.approx(1 / 3)


def test_a_torn_last_line_is_cut_before_appending(tmp_path):
    raw = tmp_path / "r.raw.jsonl"
    first = Example("addsub", "Q: 1\nA:", format_target("one", "1"), model="m", sample_index=0)
    add_samples(raw, [(first, "1")])
    with raw.open("a") as f:
        f.write('{"task": "addsub", "input": "Q: 2')  # killed mid-write
    second = Example("addsub", "Q: 2\nA:", format_target("two", "2"), model="m", sample_index=0)
    assert add_samples(raw, [(first, "1"), (second, "2")]) == 1
    assert raw.read_text().endswith("\n")
    assert [e.input for e, _ in read_samples(raw)] == ["Q: 1\nA:", "Q: 2\nA:"]


def test_filter_without_samples_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no teacher samples"):
        filter_rationales(tmp_path / "rationales.jsonl")


# ----------------------------------------------------------------------------- endpoint failures


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_down_is_a_teacher_error_naming_the_url(data_dir, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    output = tmp_path / "rationales.jsonl"
    with pytest.raises(TeacherError, match=f"{url}.*unreachable"):
        main(["endpoint", "--task", "addsub", "--data-dir", str(data_dir), "--subsample", "2",
              "--base-url", url, "--model", "teacher", "--max-retries", "1", "--output", str(output)])
    assert not output.exists()
    assert not raw_path(output).exists() or raw_path(output).read_bytes() == b""


def _chat_response(text: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "teacher",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}]}).encode()


@contextlib.contextmanager
def _junk_server(bodies):
    """An HTTP server on 127.0.0.1 answering POSTs with the next of ``bodies`` (the last one repeats)."""
    queue = list(bodies)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = queue.pop(0) if len(queue) > 1 else queue[0]
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("api", ["chat", "completions"])
@pytest.mark.parametrize("body", [b'{"hello": "world"}', b"<html>not json</html>", b'{"choices": []}'])
def test_garbage_from_the_endpoint_is_a_teacher_error(data_dir, tmp_path, api, body):
    questions = load_task("addsub", "train", data_dir)[:2]
    with _junk_server([body]) as url:
        config = EndpointConfig(base_url=url, model="teacher", api=api, max_retries=0)
        with pytest.raises(TeacherError, match=f"{url}.*not an OpenAI {api} response"):
            collect_from_endpoint(config, questions, tmp_path / "r.raw.jsonl")


def test_garbage_mid_run_keeps_the_complete_samples(data_dir, tmp_path):
    questions = load_task("addsub", "train", data_dir)[:4]
    raw = tmp_path / "r.raw.jsonl"
    bodies = [_chat_response("3 + 4 = 7. The answer is 7."), _chat_response("So 9."), b"garbage"]
    with _junk_server(bodies) as url:
        config = EndpointConfig(base_url=url, model="teacher", concurrency=1, max_retries=0)
        with pytest.raises(TeacherError, match=url):
            collect_from_endpoint(config, questions, raw)
    samples = read_samples(raw)
    assert [e.answer for e, _ in samples] == ["7", "9"]
    assert raw.read_text().count("\n") == 2


# ----------------------------------------------------------------------------- a real vLLM server


@pytest.fixture
def vllm_server(tiny_student, heavy_lock, tmp_path):
    """`vllm.entrypoints.openai.api_server` serving the tiny student on a free port; killed at the end."""
    port = _closed_port()
    log = (tmp_path / "vllm.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_student),
         "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
         "--dtype", "float32", "--enforce-eager", "--seed", "0",
         "--gpu-memory-utilization", "0.15"],  # on CPU: the share of RAM reserved (KV cache)
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{(tmp_path / 'vllm.log').read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM not healthy after 600 s:\n{(tmp_path / 'vllm.log').read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.vllm
def test_endpoint_teacher_against_a_real_vllm_server(vllm_server, data_dir, tmp_path):
    for api in ("chat", "completions"):
        output = tmp_path / api / "rationales.jsonl"

        def argv(samples: int, api: str = api, output: Path = output) -> list[str]:
            return ["endpoint", "--task", "last_letter_concatenation", "--data-dir", str(data_dir),
                    "--subsample", "3", "--base-url", vllm_server, "--model", "tiny", "--api", api,
                    "--samples", str(samples), "--max-tokens", "24", "--concurrency", "4", "--output", str(output)]

        assert main(argv(2)) == 0
        samples = read_samples(raw_path(output))
        assert len(samples) == 6
        assert sorted(e.sample_index for e, _ in samples) == [0, 0, 0, 1, 1, 1]
        assert {e.model for e, _ in samples} == {"tiny"}
        assert {e.source for e, _ in samples} == {f"openai-{api}:{vllm_server}"}
        assert all(e.prompt.startswith("Q: Take the last letters") and e.prompt.endswith("step by step.")
                   for e, _ in samples)
        assert all(e.input.startswith("Infer the correct answer") for e, _ in samples)
        assert any(e.output.strip() for e, _ in samples), "the server returned only empty completions"
        report = json.loads(report_path(output).read_text())
        assert report["tasks"]["last_letter_concatenation"]["samples"] == 6
        assert output.exists()

        raw_before = raw_path(output).read_bytes()
        assert main(argv(2)) == 0  # resumed: nothing left to ask
        assert raw_path(output).read_bytes() == raw_before
        assert main(argv(3)) == 0  # one more sample per question
        assert sorted(e.sample_index for e, _ in read_samples(raw_path(output))) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
