"""A tiny Llama-architecture student and byte-level tokenizer, built in code.

Tests (and CI's end-to-end pipeline) use it instead of a hub model: 2 layers, hidden 64,
head_dim 32 (a size vLLM's CPU attention supports), a 259-token byte vocabulary plus
special tokens, and a chat template. It is saved as an ordinary HF folder (safetensors,
tokenizer.json) that transformers, peft and vLLM load unmodified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mode_cotd.adapter import adapter_from_modules
from mode_cotd.architecture import ATTENTION_MODULES, architecture_of
from mode_cotd.gate import Gate, GateConfig

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass
class TinyStudentConfig:
    """Shape of the tiny student."""

    hidden_size: int = 64
    """Model width."""
    intermediate_size: int = 128
    """MLP width."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 2
    """Query heads (head_dim = hidden_size / heads = 32)."""
    num_key_value_heads: int = 1
    """Key/value heads (grouped-query attention)."""
    max_position_embeddings: int = 1024
    """Context length."""
    seed: int = 0
    """Seed for the random weights."""


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is a token, plus SPECIAL_TOKENS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_student(path: str | Path, config: TinyStudentConfig | None = None) -> Path:
    """Write a random tiny Llama student (fp32 safetensors + tokenizer) to ``path`` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or TinyStudentConfig()
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama_config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def random_adapter(
    student: str | Path | dict,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    r: int = 8,
    lora_alpha: float = 16.0,
    seed: int = 0,
    std: float = 0.05,
):
    """A random LoRA adapter (non-zero A and B) for every decoder layer of ``student``.

    For tests and benchmarks: a stand-in expert whose effect on the output is visible.
    ``std`` is the standard deviation of both A and B entries.
    """
    import torch

    arch = architecture_of(student)
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(arch.num_hidden_layers):
        for name in target_modules:
            block = "self_attn" if name in ATTENTION_MODULES else "mlp"
            d_in, d_out = arch.module_shape(f"model.layers.{layer}.{block}.{name}")
            a = torch.randn(r, d_in, generator=generator) * std  # [r, in]
            b = torch.randn(d_out, r, generator=generator) * std  # [out, r]
            modules[f"base_model.model.model.layers.{layer}.{block}.{name}"] = (a, b)
    return adapter_from_modules(modules, r=r, lora_alpha=lora_alpha)


def random_gate(experts: tuple[str, ...] | list[str], grid: float, top_k: int = 2, seed: int = 0, std: float = 2.0,
                feature_dim: int = 64):
    """A random linear top-k gate over ``experts`` (``feature_dim`` features: the student's hidden size for the
    embedding-mean featuriser): for tests and benchmarks, whose routing spreads over experts.

    ``std`` is the standard deviation of every weight and bias; large, so that prompts route differently.
    """
    import torch

    torch.manual_seed(seed)
    gate = Gate(GateConfig(experts=list(experts), feature_dim=feature_dim, hidden_dim=0, top_k=top_k, grid=grid))
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_(0, std)
    return gate
