"""Scenario g: what a user of the paper's code would write. transformers + peft, one request at a time.

Every expert of the bundle is loaded once as a peft adapter on the student. For each request, the
mixture is composed with `add_weighted_adapter(..., combination_type="cat")` (exact: Σ wᵢ·sᵢ·BᵢAᵢ,
rank Σrᵢ, the same adapter mode-cotd builds), made active, used for greedy `generate` of exactly
`max_tokens` tokens (`min_new_tokens` = `max_new_tokens`, the counterpart of `ignore_eos`) and
deleted. A streamer timestamps each token, so TTFT (composition included) and ITL are measured
the same way as over HTTP.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.stats import RequestRecord
from mode_cotd.bundle import read_manifest, resolve_inside
from mode_cotd.student import load_student


@dataclass(frozen=True)
class PeftRequest:
    """One request of the baseline."""

    prompt: str
    mixture: dict[str, float]
    """Expert -> weight (a single expert at 1.0 is composed like any other mixture)."""


class _TokenClock:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt ids
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load(student: Path, bundle: Path, dtype: str = "float32", threads: int | None = None):
    """The student with every expert of the bundle loaded as a peft adapter, and its tokenizer."""
    import torch
    from peft import PeftModel

    if threads:
        torch.set_num_threads(threads)
    base, tokenizer = load_student(student, dtype=dtype)
    manifest = read_manifest(bundle)
    model = None
    for name, record in manifest.experts.items():
        path = resolve_inside(Path(bundle), record.path)
        if model is None:
            model = PeftModel.from_pretrained(base, str(path), adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    model.eval()
    return model, tokenizer


def run(model, tokenizer, requests: Sequence[PeftRequest], max_tokens: int) -> tuple[list[RequestRecord], list[float]]:
    """Serve the requests one by one; the records, and the seconds each `add_weighted_adapter` took."""
    import torch

    records, compose_s = [], []
    zero = time.perf_counter()
    for i, request in enumerate(requests):
        start = time.perf_counter()
        name = f"bench_mix_{i}"
        record = RequestRecord(index=i, start_s=start - zero, end_s=start - zero, model="peft",
                               mixture=dict(request.mixture))
        try:
            model.add_weighted_adapter(list(request.mixture), list(request.mixture.values()), name,
                                       combination_type="cat")
            model.set_adapter(name)
            compose_s.append(time.perf_counter() - start)
            inputs = tokenizer(request.prompt, return_tensors="pt")
            clock = _TokenClock()
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                     streamer=clock, pad_token_id=tokenizer.pad_token_id)
            record.output_tokens = int(out.shape[1] - inputs["input_ids"].shape[1])
            record.prompt_tokens = int(inputs["input_ids"].shape[1])
            if clock.times:
                record.ttft_s = clock.times[0] - start
                record.itl_s = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
        except Exception as exc:  # noqa: BLE001 - reported as a failed request
            record.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            if name in model.peft_config:
                with warnings.catch_warnings():  # "the active adapter was deleted": it was meant to be
                    warnings.simplefilter("ignore", UserWarning)
                    model.delete_adapter(name)
        record.end_s = time.perf_counter() - zero
        records.append(record)
    return records, compose_s


def environment() -> dict[str, Any]:
    """Thread settings of the baseline's process."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}
