"""The composition objectives: few-shot loss, answer-token loss and shot error, against plain references."""

from __future__ import annotations

import pytest
import torch

from mode_cotd.data import load_task, student_prompt
from mode_cotd.errors import DataError
from mode_cotd.format import completion_prompt, completion_target
from mode_cotd.student import load_student
from mode_cotd.tasks import END, TARGET_SEPARATOR, parse_target
from training.objectives import OBJECTIVES, ShotError, TokenLoss, make_objective

TASK = "addsub"


@pytest.fixture(scope="module")
def shots(data_dir):
    return [e for e in load_task(TASK, "train", data_dir) if e.rationale][:4]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_student):
    model, tokenizer = load_student(tiny_student, dtype="float32", device="cpu")
    return model.eval(), tokenizer


def _reference_nll(model, tokenizer, prompt: str, target: str) -> tuple[float, int]:
    """Summed -log p of the target's tokens (and eos) after the prompt, one example at a time."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + target_ids])  # [1, T]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)  # [T-1, V]
    positions = range(len(prompt_ids) - 1, ids.shape[1] - 1)
    return -sum(logprobs[p, ids[0, p + 1]].item() for p in positions), len(target_ids)


def test_the_few_shot_loss_is_the_mean_nll_of_every_target_token(model_and_tokenizer, shots):
    model, tokenizer = model_and_tokenizer
    total, count = 0.0, 0
    for e in shots:
        nll, n = _reference_nll(model, tokenizer, completion_prompt(student_prompt(e)), completion_target(e.output))
        total, count = total + nll, count + n
    loss = TokenLoss(model, tokenizer, shots, 1024, 3, "cpu")
    assert loss.tokens == count and loss() == pytest.approx(total / count, rel=1e-4)


def test_the_answer_loss_counts_only_the_answer_after_the_rationale(model_and_tokenizer, shots):
    model, tokenizer = model_and_tokenizer
    total, count = 0.0, 0
    for e in shots:
        rationale, answer = parse_target(e.output)
        prompt = completion_prompt(student_prompt(e)) + " " + rationale + TARGET_SEPARATOR
        nll, n = _reference_nll(model, tokenizer, prompt, answer + END)
        total, count = total + nll, count + n
    loss = TokenLoss(model, tokenizer, shots, 1024, 3, "cpu", answer_only=True)
    assert loss.tokens == count and count < TokenLoss(model, tokenizer, shots, 1024, 3, "cpu").tokens / 3
    assert loss() == pytest.approx(total / count, rel=1e-4)


def test_a_shot_without_an_answer_separator_is_refused_for_the_answer_loss(model_and_tokenizer, shots):
    from dataclasses import replace

    model, tokenizer = model_and_tokenizer
    with pytest.raises(DataError, match="no answer tokens"):
        TokenLoss(model, tokenizer, [replace(shots[0], output="just a rationale END")], 1024, 1, "cpu",
                  answer_only=True)


def test_the_losses_take_text_shots_as_well(model_and_tokenizer, shots):
    from mode_cotd.shots import shot_from_text

    model, tokenizer = model_and_tokenizer
    texts = [shot_from_text(completion_prompt(student_prompt(e)), e.output) for e in shots]
    for answer_only in (False, True):
        expected = TokenLoss(model, tokenizer, shots, 1024, 3, "cpu", answer_only=answer_only)
        got = TokenLoss(model, tokenizer, texts, 1024, 3, "cpu", answer_only=answer_only)
        assert got.tokens == expected.tokens and got() == expected()


class _Scripted:
    """A model whose greedy generation is a fixed text per row (the shot's own rationale, or nonsense)."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts = tokenizer, texts

    def generate(self, input_ids, attention_mask, **_):
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.texts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.eos_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # [k, new]
        return torch.cat([input_ids, new], dim=1)


def test_shot_error_scores_greedy_generations_with_the_papers_rules(model_and_tokenizer, shots):
    _, tokenizer = model_and_tokenizer
    texts = [" " + e.output + " and more" for e in shots[:3]] + [" no idea -->\n\n12345 END"]
    error = ShotError(_Scripted(tokenizer, texts), tokenizer, shots, "cpu")
    assert error() == pytest.approx(1 - 3 / 4)
    assert all(t.endswith(END) for t in error.last_texts)  # cut at " END": what follows is not scored


def test_every_objective_runs_on_a_real_model(model_and_tokenizer, shots):
    model, tokenizer = model_and_tokenizer
    for name in OBJECTIVES:
        value = make_objective(name, model, tokenizer, shots[:2], 1024, 2, "cpu")()
        assert value >= 0 and (name != "shot_error" or value <= 1)
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("accuracy", model, tokenizer, shots, 512, 2, "cpu")
