"""Explicit mixtures named in `model`, for clients that can set no other field (lm-eval, `vllm bench serve`).

    "<served name>:mixture:gsm8k=0.7,svamp=0.3"           the mixture's text form (mode_cotd.mixture.Mixture)
    "<served name>:mixture:{"gsm8k": 0.7, "svamp": 0.3}"  JSON, as evaluation writes routes (training/routes.py)

is the same route as model "<served name>" with body field "mixture": {"gsm8k": 0.7, "svamp": 0.3} (kind
"mixture", validated and rounded by serving.routes.RouteTable, whose `resolve` asks here), and answers with the
model name as sent. lm-eval's --model_args splits on commas outside quotes and refuses braces outside JSON, so
there the text form goes in double quotes: model="mode-cotd:mixture:gsm8k=0.7,svamp=0.3".
"""

from __future__ import annotations

import json
from typing import Any

from serving.errors import InvalidMixture

INFIX = ":mixture:"
"""Between the served name and the mixture."""


def named_weights(model: str, prefix: str) -> dict[str, Any]:
    """The {expert: weight} written after `prefix` in `model` (JSON or the text form); InvalidMixture when it is
    neither. Validating the weights is the route table's (RouteTable.mixture)."""
    text = model[len(prefix):]
    return _json(model, prefix, text) if text.lstrip().startswith("{") else _text_form(model, text)


def _json(model: str, prefix: str, text: str) -> dict[str, Any]:
    try:
        weights = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidMixture(f"model {model!r}: the mixture after {prefix!r} is not JSON ({e.msg})",
                             param="model") from None
    return weights  # a JSON text that starts with "{" is an object


def _text_form(model: str, text: str) -> dict[str, float]:
    """{"a": 0.7, "b": 0.3} from "a=0.7,b=0.3"."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, equals, weight = part.partition("=")
        try:
            if not equals or name.strip() in weights:
                raise ValueError
            weights[name.strip()] = float(weight)
        except ValueError:
            raise InvalidMixture(f"model {model!r}: expected the mixture as expert=weight,expert=weight "
                                 f"(each expert once), got {part!r}", param="model") from None
    return weights
