"""The runtime routes' command-line verbs: `mode-cotd compose --server URL` runs the job on a server, and
`mode-cotd serve --export-runtime OUT` writes the bundle plus its runtime routes as a bundle that serves."""

from __future__ import annotations

import json

import httpx
from fastapi.testclient import TestClient

from mode_cotd.bundle import load_bundle
from mode_cotd.data import Example, write_jsonl
from serving import cli as serve_cli
from serving.settings import RuntimeSettings
from training import compose

from .served import Served, completion
from .test_composition_jobs import ScoringBackend
from .test_runtime_routes import load, write_expert


def test_compose_with_server_runs_the_job_there_and_the_route_serves(tiny_bundle, tiny_student, tmp_path,
                                                                      monkeypatch, capsys):
    runtime = RuntimeSettings(enabled=True, state_dir=str(tmp_path / "state"), search_budget=8)
    served = Served(tiny_bundle, tiny_student, tmp_path, runtime=runtime)
    served.engine.started = True
    served.jobs.backend = ScoringBackend(served.backend)
    shots = [Example("coin_flip", f"A coin is heads up. {i} people flip it. Is it still heads up?",
                     f"{i} flips.\n\n-->\n\n{'yes' if i % 2 == 0 else 'no'} END") for i in range(5)]
    write_jsonl(tmp_path / "shots.jsonl", shots)
    with TestClient(served.app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(httpx, "Client", lambda base_url, headers, timeout: client)
        code = compose.main(["--task", "coin_flip", "--bundle", str(tiny_bundle), "--student", str(tiny_student),
                             "--shots-file", str(tmp_path / "shots.jsonl"), "--name", "flip",
                             "--server", "http://testserver"])
    assert code == 0
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "succeeded" and job["model"] == "mode-cotd:flip"
    scored = len(served.jobs.backend.scored)
    assert scored % 5 == 0 and 5 <= scored <= 8 * 5  # 5 shots per distinct mixture of the 8 candidates
    assert completion(served, model="mode-cotd:flip").status_code == 200


def test_export_runtime_writes_a_bundle_that_loads(tiny_bundle, tiny_student, tmp_path):
    roots = tmp_path / "loras"
    runtime = RuntimeSettings(enabled=True, state_dir=str(tmp_path / "state"), adapter_roots=[str(roots)])
    served = Served(tiny_bundle, tiny_student, tmp_path, runtime=runtime)
    assert load(served, "delta", write_expert(roots, "delta", tiny_student)).status_code == 200
    served.routes.state.add_composition("mostly_delta", {"delta": 0.75, "alpha": 0.25}, "exact", "t")
    out = tmp_path / "exported"
    code = serve_cli.main(["--bundle", str(tiny_bundle), "--student", str(tiny_student),
                           "--runtime-state-dir", str(tmp_path / "state"), "--export-runtime", str(out)])
    assert code == 0
    bundle = load_bundle(out, student=tiny_student, strict=True)
    assert {"alpha", "beta", "gamma", "delta"} == set(bundle.experts)
    assert bundle.compositions["mostly_delta"].weights == {"delta": 0.75, "alpha": 0.25}
