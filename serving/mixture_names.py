"""Explicit mixtures named in `model`, for clients that can set no other field (lm-eval, `vllm bench serve`).

    "<served name>:mixture:<JSON object>"   e.g. mode-cotd:mixture:{"gsm8k": 0.7, "svamp": 0.3}

is the same route as model "<served name>" with body field "mixture": {"gsm8k": 0.7, "svamp": 0.3} (kind
"mixture", validated and rounded by RouteTable.mixture), and answers with the model name as sent. The JSON
form is evaluation's (training/routes.py: mixture:{...}). The handler asks here only when RouteTable.resolve
found no route, so no other request pays for it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from serving.errors import InvalidMixture, InvalidRequest
from serving.routes import Route, RouteTable

INFIX = ":mixture:"
"""Between the served name and the mixture's JSON."""


def mixture_route(routes: RouteTable, model: str, mixture: Any) -> Route | None:
    """The mixture route `model` names, or None when it names none; InvalidMixture / InvalidRequest when it
    names a bad one (not JSON, not an object, unknown experts, weights out of range) or `mixture` is also set."""
    prefix = routes.served_name + INFIX
    if not model.startswith(prefix):
        return None
    if mixture is not None:
        raise InvalidRequest(f"model {model!r} names a mixture, and the body has one too: give it once",
                             param="mixture")
    try:
        weights = json.loads(model[len(prefix):])
    except json.JSONDecodeError as e:
        raise InvalidMixture(f"model {model!r}: the mixture after {prefix!r} is not JSON ({e.msg}); "
                             f'write it like {prefix}{{"expert": 0.5, "other": 0.5}}', param="model") from None
    if not isinstance(weights, dict):
        raise InvalidMixture(f"model {model!r}: the mixture after {prefix!r} must be a JSON object "
                             "{expert: weight}", param="model")
    return dataclasses.replace(routes.resolve(routes.served_name, weights), model=model)
