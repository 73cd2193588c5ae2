"""Serving: an OpenAI-compatible Ray Serve app that mixes LoRA experts per request over vLLM.

Plain classes hold the logic and are testable without Ray or vLLM:

    settings.py        every knob, as dataclasses (mode_cotd/settings.py fills them from flags, Serve YAML, dicts)
    protocol.py        what the deployments exchange; the engine and backend seams
    routes.py          model name / explicit mixture -> route (rules shared with training: mode_cotd/routes.py)
    mixture_names.py   a mixture named in `model`
    prompts.py         tokenizer, chat template, empty and over-context prompts
    prompt_batch.py    a completions `prompt` list: one choice per prompt, each routed on its own
    echo.py            `echo` with prompt logprobs
    router.py          the gate over a batch of prompts -> one Mixture each
    adapter_resolver.py which adapter serves a request: expert folder, union member / mixture id, or composite
    mixture_union.py   the bundle's experts pinned as one union; mixtures as LoRA ids (no composite)
    adapter_cache.py   the composite on disk (single flight, LRU, SVD, checksums, confined paths)
    sealed.py          checksummed adapter folders
    lora_admission.py  at most N distinct adapters among the requests in vLLM
    student_service.py adapter lease + engine generation, bounded admission (503 when full)
    engine.py          vLLM AsyncLLM with multi-LoRA (vLLM is imported here and in fast_lora/ only)
    fast_lora/         the vLLM platform plugin: grouped LoRA ops for the CPU backend, mixture ids
    schemas.py, responses.py, errors.py   OpenAI bodies, chunks and error JSON
    handler.py, api.py the request pipeline and the FastAPI app
    request_state.py   one request's timing and the client-gone state
    limits.py, auth.py body size limit (413), optional API keys (401)
    metrics.py         every Prometheus metric
    bundle_source.py   a local bundle folder, or a URI fetched once to the local cache
    backend.py         the app's backend over the plain classes in one process
    components.py      settings -> each plain piece
    deployments.py, app.py, cli.py   three thin Ray Serve deployments, the app, `mode-cotd serve`

What it does on a bad day (overload, faults, hostile input) is in docs/reliability.md.
"""
