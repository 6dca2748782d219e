"""The SFT loss on completion tokens only, in chunks: full-vocabulary logits never exist for the whole batch.

    hidden = backbone(input_ids)                      # (B, T, H): the model without its LM head
    h, y   = hidden[:, :-1][labels[:, 1:] != -100]    # (N, H), (N,): completion positions only
    for each chunk of LOSS_CHUNK_TOKENS rows of h:    # checkpointed: its logits are recomputed in backward
        nll += logsumexp(h_c @ W.T) - (h_c @ W.T)[y_c] # (C, V) logits, then freed
    loss = nll / num_items_in_batch                   # completion tokens of the whole effective batch

Why: the model's own forward builds (B, T, V) fp32 logits for every position, prompt included, and TRL's fused
head on a CPU scores every position too (its compact path is CUDA/Triton only), in tiles of 4096 tokens x 32768
vocabulary entries. Prompts are most of the tokens of a chat sample, so scoring only completion positions saves
the LM head's time as well as its memory; Gemma 3's 262k vocabulary makes that the largest single cost.

The value and gradients are those of the plain loss (tests/test_budget.py checks both against the model's own
loss on a tiny model); dividing by the completion tokens of the whole effective batch makes micro-batches with
gradient accumulation equal one big batch. What it does not do: label smoothing, DFT, MoE auxiliary losses.
"""

from __future__ import annotations

import torch

from inference.completion_nll import token_nll
from training.budget import LOSS_CHUNK_TOKENS


def completion_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                   chunk_tokens: int = LOSS_CHUNK_TOKENS, **backbone_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL over completion tokens, their count) for a causal LM (PEFT-wrapped or not)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, 1:] = labels[:, 1:] != -100  # labels are input_ids with prompt and padding at -100
    nll, _, zero = token_nll(model, input_ids, attention_mask, mask, chunk_tokens, targets=labels, **backbone_kwargs)
    return zero + nll.sum(), mask.sum()


def completion_loss(model, inputs: dict, num_items_in_batch=None, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """The Trainer's loss for one micro-batch: summed completion NLL / completion tokens of the effective batch
    (`num_items_in_batch`, counted by the Trainer over all accumulation steps), or of this micro-batch."""
    extra = {k: v for k, v in inputs.items() if k in ("position_ids", "token_type_ids")}
    nll, count = completion_nll(model, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"],
                                chunk_tokens, **extra)
    denominator = count if num_items_in_batch is None else num_items_in_batch
    return nll / torch.as_tensor(denominator, device=nll.device).clamp(min=1)


def bounded_trainer(base_cls):
    """`base_cls` (SFTTrainer) with `completion_loss` as its loss, in training and in validation alike."""

    class BoundedSFTTrainer(base_cls):
        """SFTTrainer whose loss never builds logits for prompt positions nor for the whole batch at once."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = completion_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as SFTTrainer: DDP averages the gradients
            return (loss, None) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = completion_loss(model, inputs)  # the mean over this batch's completion tokens, as before
            return loss.detach(), None, None

    return BoundedSFTTrainer
