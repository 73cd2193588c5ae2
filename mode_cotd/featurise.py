"""Prompt featurisers: text -> a fixed-size fp32 feature vector per prompt, the gate's input.

Featurisers are pluggable through the plain dict FEATURISERS (name -> factory taking the
student folder). The default, `embedding_mean`, mean-pools the frozen student's input
embeddings over the prompt's tokens: it reads only the embedding matrix from the
student's safetensors (no full model load, no transformer pass) and its tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from mode_cotd.errors import ConfigError, StudentError

EMBEDDING_KEYS = (
    "model.embed_tokens.weight",
    "embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
)
"""Tensor names under which HF causal LMs store the input embedding matrix, tried in order."""


class Featuriser(Protocol):
    """Maps a batch of prompts to features [B, feature_dim], fp32, on CPU."""

    name: str
    feature_dim: int

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor: ...


def read_input_embeddings(student: str | Path) -> torch.Tensor:
    """The student's input embedding matrix [V, D] as fp32, read alone from its safetensors."""
    from safetensors import SafetensorError, safe_open

    folder = Path(student)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StudentError(f"{index}: unreadable safetensors index ({e})") from e
        files = [folder / weight_map[k] for k in EMBEDDING_KEYS if k in weight_map][:1]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise StudentError(f"{folder}: no *.safetensors weights to read the input embeddings from")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                names = set(f.keys())
                for key in EMBEDDING_KEYS:
                    if key in names:
                        return f.get_tensor(key).to(torch.float32)  # [V, D]
        except (SafetensorError, OSError) as e:
            raise StudentError(f"{file}: unreadable safetensors ({e})") from e
    raise StudentError(f"{folder}: no input embedding tensor found (looked for {', '.join(EMBEDDING_KEYS)})")


@dataclass
class EmbeddingMeanFeaturiser:
    """features[b] = mean over the tokens t of prompt b of E[t], E the student's input embeddings.

    Prompts are tokenised without special tokens and truncated to `max_tokens`; an empty
    prompt gets the zero vector. Output: fp32 [B, D], D = the student's hidden size.
    """

    embeddings: torch.Tensor
    """The frozen input embedding matrix [V, D], fp32."""
    tokenizer: Any
    """The student's tokenizer (a transformers tokenizer)."""
    max_tokens: int = 1024
    """Tokens per prompt that are pooled; the rest are cut off."""
    name: str = "embedding_mean"
    """Registry name of this featuriser."""

    @classmethod
    def from_student(cls, student: str | Path, max_tokens: int = 1024) -> EmbeddingMeanFeaturiser:
        """Read the embedding matrix and tokenizer of a student folder."""
        from transformers import AutoTokenizer

        embeddings = read_input_embeddings(student)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(student))
        except (OSError, ValueError) as e:
            raise StudentError(f"{student}: cannot load the student's tokenizer ({e})") from e
        return cls(embeddings=embeddings, tokenizer=tokenizer, max_tokens=max_tokens)

    @property
    def feature_dim(self) -> int:
        """D, the embedding width."""
        return self.embeddings.shape[1]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("featuriser takes a list of prompts, not one string")
        if len(prompts) == 0:
            return self.embeddings.new_zeros(0, self.feature_dim)  # [0, D]
        ids: list[list[int]] = self.tokenizer(
            list(prompts), add_special_tokens=False, truncation=True, max_length=self.max_tokens
        )["input_ids"]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)  # [B]
        flat = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long)  # [sum(lengths)]
        offsets = torch.cumsum(lengths, 0) - lengths  # [B]
        return F.embedding_bag(flat, self.embeddings, offsets, mode="mean")  # [B, D]


FEATURISERS: dict[str, Callable[[str | Path], Featuriser]] = {
    "embedding_mean": EmbeddingMeanFeaturiser.from_student,
}
"""Featuriser name -> factory taking the student folder."""


def make_featuriser(name: str, student: str | Path) -> Featuriser:
    """The featuriser registered as `name`, built for the student folder."""
    if name not in FEATURISERS:
        raise ConfigError(f"unknown featuriser {name!r}; known: {', '.join(sorted(FEATURISERS))}")
    return FEATURISERS[name](student)
