"""What a few-shot composition search minimises: three objectives over k shots, for the model as it is now.

    few_shot_loss   the paper's (LoraHub's): mean cross-entropy over every target token of the shots
                    (rationale, "-->", answer, " END" and eos), the prompt masked
    answer_loss     the same over the answer tokens only: the prompt and the rationale up to and including
                    "\\n\\n-->\\n\\n" are given (teacher forcing) and masked; the answer, " END" and eos count
                    (mode_cotd/shots.py tokenizes and labels the shots for both losses)
    shot_error      1 - the accuracy of greedy generations on the shots' prompts (mode_cotd.tasks scoring,
                    the text cut at " END"); MAX_NEW_TOKENS new tokens at most

The few-shot loss picked gsm8k's expert for coin_flip (0% on its test prompts) where addsub's gets 18%
(docs/results.md): a loss over the whole rationale rewards an expert whose style fits the shots, not one
that answers them. The other two measure the answer. Each objective is a callable with no arguments, read
after the caller has written a candidate's LoRA weights into the model (training/compose.py writes them
in place); lower is better for all three.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mode_cotd.format import pad_id
from mode_cotd.shots import shot_of, shot_pairs
from mode_cotd.tasks import END, get_task, is_correct
from training.distill import collate

OBJECTIVES = ("few_shot_loss", "answer_loss", "shot_error")
"""Names of the objectives (ComposeConfig.objective)."""
MAX_NEW_TOKENS = 256
"""Longest greedy generation of shot_error (the evaluation's limit)."""


class TokenLoss:
    """Mean cross-entropy over the labelled tokens of the shots: few_shot_loss, or answer_loss (answer_only).

    ``shots`` are data Examples or mode_cotd.shots.Shot texts (e.g. a user's, shots.shot_from_text)."""

    def __init__(self, model, tokenizer, shots: Sequence, max_length: int, batch_size: int, device: str,
                 answer_only: bool = False):
        pad = pad_id(tokenizer)
        pairs = shot_pairs(tokenizer, shots, max_length, answer_only)
        self.model = model
        self.batches = [tuple(t.to(device) for t in collate(pairs[i:i + batch_size], pad))
                        for i in range(0, len(pairs), batch_size)]  # each: input_ids, attention_mask, labels [B, T]
        self.tokens = sum(int((b[2] != -100).sum()) for b in self.batches)

    @torch.no_grad()
    def __call__(self) -> float:
        total = 0.0
        for input_ids, attention_mask, labels in self.batches:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum").item()
        return total / self.tokens


class ShotError:
    """1 - greedy accuracy on the shots' prompts (left-padded batch, `max_new_tokens` at most)."""

    def __init__(self, model, tokenizer, shots: Sequence, device: str, max_new_tokens: int = MAX_NEW_TOKENS):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.golds = [(e.gold, get_task(e.task)) for e in shots]
        pad = pad_id(tokenizer)
        rows = [list(tokenizer(shot_of(e).prompt, add_special_tokens=True)["input_ids"])
                for e in shots]
        width = max(len(r) for r in rows)
        self.input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # [k, T]
        self.attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                                           device=device)  # [k, T]
        self.pad = pad
        self.tokens = len(rows)
        self.last_texts: list[str] = []

    @torch.no_grad()
    def __call__(self) -> float:
        out = self.model.generate(input_ids=self.input_ids, attention_mask=self.attention_mask, do_sample=False,
                                  max_new_tokens=self.max_new_tokens, pad_token_id=self.pad)  # [k, T + new]
        texts = self.tokenizer.batch_decode(out[:, self.input_ids.shape[1]:], skip_special_tokens=True)
        self.last_texts = [t.split(END)[0] + END if END in t else t for t in texts]
        right = sum(is_correct(t, gold, task) for t, (gold, task) in zip(self.last_texts, self.golds))
        return 1.0 - right / len(self.golds)


def make_objective(name: str, model, tokenizer, shots: Sequence, max_length: int, batch_size: int, device: str):
    """The objective `name` (one of OBJECTIVES) over `shots`, for `model`."""
    if name == "few_shot_loss":
        return TokenLoss(model, tokenizer, shots, max_length, batch_size, device)
    if name == "answer_loss":
        return TokenLoss(model, tokenizer, shots, max_length, batch_size, device, answer_only=True)
    if name == "shot_error":
        return ShotError(model, tokenizer, shots, device)
    raise ValueError(f"unknown objective {name!r}; known: {OBJECTIVES}")
