"""Serving: an OpenAI-compatible Ray Serve app that mixes LoRA experts per request over vLLM.

Plain classes hold the logic and are testable without Ray or vLLM:

    settings.py        every knob, as dataclasses (flags, Serve YAML args and code fill the same tree)
    protocol.py        what the deployments exchange; the engine and backend seams
    routes.py          model name / explicit mixture -> route
    prompts.py         tokenizer, chat template, empty and over-context prompts
    router.py          the gate over a batch of prompts -> one mixture each
    adapter_cache.py   mixture -> exact composite on disk (single flight, LRU, SVD, checksums, confined paths)
    student_service.py adapter lease + engine generation, bounded admission (503 when full)
    engine.py          vLLM AsyncLLM with multi-LoRA (the only file importing vLLM)
    schemas.py, responses.py, errors.py   OpenAI bodies, chunks and error JSON
    handler.py, api.py the request pipeline and the FastAPI app
    limits.py, auth.py body size limit (413), optional API keys (401)
    metrics.py         every Prometheus metric
    backend.py         the app's backend over the plain classes in one process
    components.py      settings -> each plain piece
    deployments.py, app.py, cli.py   three thin Ray Serve deployments, the app, `mode-cotd serve`

What it does on a bad day (overload, faults, hostile input) is in docs/reliability.md.
"""
