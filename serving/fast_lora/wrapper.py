"""`PunicaWrapperGrouped`: vLLM's CPU punica wrapper with the LoRA ops grouped by adapter slot.

vLLM builds one wrapper per model (serving.fast_lora.platform names this class), calls
`update_metadata` once per step with the step's LoRA mapping, and then, in every LoRA layer,
one of the `add_*` methods below. This subclass keeps vLLM's metadata (the inherited index
tensors) and adds, once per step, the step's (row, slot, weight) pairs (serving.fast_lora.pairs)
for the linear layers, and the grouping of its tokens and sampled rows by slot
(serving.fast_lora.segments) for the embedding and logits layers. Anything not overridden
(full-linear classifier heads, MoE LoRA) is vLLM's CPU code as is.

Mixture ids (serving.fast_lora.mixture_ids) are served through the union of their experts,
each pinned in a slot under its member id: a mixture row's pairs are its experts' slots at their
weights, so `add_lora_linear` (ops.pair_lora_linear) serves adapters, members and mixtures in
one pass: contiguous rows on one id as runs (one matmul pair over their blocks side by side),
the rest in one batched matmul pair over the slots they use. Only the slots a step uses are
read, whatever the size of the union; their gathered weights are kept between steps while the
same slots are in use (`gathered`). A mixture id's own slot holds a placeholder adapter that is
never read, so mixture rows get no embedding or lm_head LoRA: the union must have none (the
serving side builds it from the experts' linear modules only).

Rows with no adapter are left untouched. (vLLM's CPU ops index the weights with -1 for
them, which reads the last slot: with every slot filled, base requests batched with LoRA
requests pick up the last slot's adapter. The grouped ops do not.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from serving.fast_lora import compiled_ops, native
from serving.fast_lora.gather_cache import GatherCache
from serving.fast_lora.ops import grouped_expand, grouped_lora_logits, grouped_shrink, pair_lora_linear
from serving.fast_lora.pairs import NO_PAIRS, StepPairs, step_pairs
from serving.fast_lora.segments import Group, group_rows, member_ranks, mixture_slots, without_mixture_slots

if TYPE_CHECKING:
    from vllm.lora.layers import LoRAMapping


class PunicaWrapperGrouped(PunicaWrapperCPU):
    """Multi-LoRA metadata and ops for one model on CPU, one dense matmul pair per adapter in the step."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs: Any):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self.token_groups: list[Group] = []
        """The step's tokens grouped by slot, mixture rows left out (embedding layers and the unfused ops)."""
        self.pairs: StepPairs = NO_PAIRS
        """The step's (row, slot, weight) pairs, mixture rows included (linear layers; serving.fast_lora.pairs)."""
        self.sampler_groups: list[Group] = []
        """The step's sampled rows grouped by slot (logits)."""
        self.gathered = GatherCache()
        """Slot weights gathered for earlier steps, reused while the same slots are in use (gather_cache)."""
        self.op_key = compiled_ops.register(self)
        """This wrapper's key for the custom ops a compiled model calls (serving.fast_lora.compiled_ops)."""
        native.kernel()  # load (or build) the fused kernel now, while the engine starts, not in its first step

    def update_metadata(self, mapping: LoRAMapping, lora_index_to_id: list[int | None], max_loras: int,
                        vocab_size: int, **kwargs: Any) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        mixtures = mixture_slots(lora_index_to_id)
        self.pairs = step_pairs(self.token_lora_indices, lora_index_to_id)
        self.token_groups = group_rows(without_mixture_slots(self.token_lora_indices, mixtures),
                                       member_ranks(lora_index_to_id))
        self.sampler_groups = group_rows(without_mixture_slots(self.sampler_indices, mixtures))

    def add_shrink(self, y: tuple[torch.Tensor, ...] | torch.Tensor, x: torch.Tensor,
                   lora_a_stacked: tuple[torch.Tensor, ...], scale: float, **kwargs: Any) -> None:
        """y[i][r] += scale · x[r] @ Aᵢ[s]ᵀ per slice i; y[i] `[T, R]`, x `[T, H]`, Aᵢ `[S, 1, R, H]`."""
        self._linear_only("add_shrink")
        x = x.view(-1, x.shape[-1])  # [T, H]
        for i, lora_a in enumerate(lora_a_stacked):
            grouped_shrink(y[i], x, lora_a, self.token_groups, scale)

    def add_expand(self, y: torch.Tensor, x: tuple[torch.Tensor, ...] | torch.Tensor,
                   lora_b_stacked: tuple[torch.Tensor, ...], output_slices: tuple[int, ...],
                   offset_start: int = 0, add_inputs: bool = True, **kwargs: Any) -> None:
        """y[r, oᵢ:oᵢ+nᵢ] (+)= x[i][r] @ Bᵢ[s]ᵀ, oᵢ = offset_start + n₀ + … + nᵢ₋₁; x[i] `[T, R]`, Bᵢ `[S, 1, nᵢ, R]`."""
        self._linear_only("add_expand")
        y = y.view(-1, y.shape[-1])  # [T, N]
        offset = offset_start
        for i, (lora_b, n) in enumerate(zip(lora_b_stacked, output_slices)):
            grouped_expand(y[:, : offset + n], x[i], lora_b, self.token_groups, offset, add_inputs)
            offset += n

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                           add_inputs: bool = True, **kwargs: Any) -> None:
        """y[r] (+)= x[r] @ B[s]ᵀ; y `[T, D]`, x `[T, R]` (the adapter's embedding rows), B `[S, 1, D, R]`."""
        if torch.compiler.is_compiling():  # a compiled model calls the op; it runs eager_lora_embedding
            torch.ops.mode_cotd.lora_embedding(y, x, lora_b_stacked, add_inputs, self.op_key)
        else:
            self.eager_lora_embedding(y, x, lora_b_stacked, add_inputs)

    def eager_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                             add_inputs: bool) -> None:
        grouped_expand(y, x, lora_b_stacked, self.token_groups, 0, add_inputs)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                        *, buffer: tuple[torch.Tensor, ...] | None = None, **kwargs: Any) -> None:
        """y[r, oᵢ:oᵢ+nᵢ] += ((scale · x[r] @ Aᵢ[s]ᵀ) in float32) @ Bᵢ[s]ᵀ; y `[T, Σnᵢ]`, x `[T, H]`.

        `buffer` is not filled (nothing reads it after the call); only its dtype is used (vLLM's CPU layers
        pass none: float32).
        """
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        buffer_dtype = buffer[0].dtype if buffer else torch.float32
        if not torch.compiler.is_compiling():
            self.eager_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer_dtype)
            return
        if buffer_dtype != torch.float32:
            raise NotImplementedError("compiled mode-cotd LoRA ops shrink in float32 only")
        # a compiled model calls the op, which runs eager_lora_linear with the step's metadata
        torch.ops.mode_cotd.lora_linear(y, x, list(lora_a_stacked), list(lora_b_stacked), scale,
                                        list(output_slices), self.op_key)

    def eager_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                          lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                          buffer_dtype: torch.dtype = torch.float32) -> None:
        pair_lora_linear(y, x, lora_a_stacked, lora_b_stacked, self.pairs, scale, output_slices, buffer_dtype,
                         self.gathered)

    def _linear_only(self, op: str) -> None:
        """Mixture rows need the union's block scales, which only add_lora_linear applies."""
        if self.pairs.mixture_rows:
            raise NotImplementedError(f"{op} with mixture LoRA ids: mode-cotd serves mixtures through the union "
                                      "on linear layers only (not with fully sharded LoRA)")

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale: float, *, buffer: torch.Tensor | None = None,
                        **kwargs: Any) -> None:
        """y[r, :n] += ((scale · x[r] @ A[s]ᵀ) in float32) @ B[s][:n]ᵀ over the sampled rows; y `[N, V]`, x `[N, H]`."""
        buffer_dtype = buffer.dtype if buffer is not None else torch.float32
        grouped_lora_logits(y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), lora_a_stacked, lora_b_stacked,
                            self.sampler_groups, scale, buffer_dtype)
