"""NLL of completion tokens through the LM head in chunks: full-vocabulary logits never exist for a whole batch.

    hidden = backbone(input_ids)                    # (B, T, H): the model without its LM head
    h, y   = hidden[:, :-1][mask[:, 1:]]            # (N, H), (N,): completion positions only
    for each chunk of `chunk_tokens` rows of h:     # checkpointed under grad: its logits are recomputed in backward
        nll_c = logsumexp(h_c @ W.T) - (h_c @ W.T)[y_c]   # (C, V) logits, then freed

Why: a model's own forward builds (B, T, V) fp32 logits for every position, prompt included; with Gemma 3's 262k
vocabulary that is 2 GB for 8 x 256 tokens before softmax copies. Training (training/completion_loss.py) and
scoring (inference.engine.completion_logprobs: eval NLL, rerank) both go through here, so the head's memory is
bounded the same way everywhere. Logit scale and final softcapping are applied as the model's head would.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 256  # completion positions scored at once: a (256, V) fp32 block, 256 MiB for V = 262k


def unwrap(model):
    """The CausalLM inside a PEFT / accelerate wrapper (PEFT's LoRA layers sit inside it, so they still apply)."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_nll(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
               scale: float, softcap: float | None) -> torch.Tensor:
    """Per-token NLL (C,) of targets `y` (C,) under logits h @ W.T (C, V), in fp32."""
    z = (h @ weight.t()).float()
    if bias is not None:
        z = z + bias.float()
    if scale != 1.0:
        z = z * scale
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return torch.logsumexp(z, dim=-1) - z.gather(1, y[:, None]).squeeze(1)


def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, loss_mask: torch.Tensor,
              chunk_tokens: int = CHUNK_TOKENS, targets: torch.Tensor | None = None,
              **backbone_kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(NLL of each completion token (N,), its row (N,), a differentiable zero) for a causal LM, PEFT-wrapped or
    not. `loss_mask` (B, T) marks the completion tokens; token t is predicted from position t - 1; the target
    ids are `targets` (B, T) where given (a Trainer's labels), else `input_ids`."""
    causal = unwrap(model)
    backbone = getattr(causal, causal.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                      **backbone_kwargs).last_hidden_state  # (B, T, H)
    mask = loss_mask[:, 1:]
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (N,)
    h = hidden[:, :-1][mask]  # (N, H)
    y = (input_ids if targets is None else targets)[:, 1:][mask]  # (N,)
    head = causal.get_output_embeddings()
    config = causal.config.get_text_config() if hasattr(causal.config, "get_text_config") else causal.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None) or 1.0
    parts = []
    for start in range(0, h.shape[0], chunk_tokens):
        args = (h[start : start + chunk_tokens], head.weight, head.bias, y[start : start + chunk_tokens], scale, softcap)
        parts.append(checkpoint(_chunk_nll, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _chunk_nll(*args))
    nll = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    return nll, rows, hidden.sum() * 0.0  # the zero: a micro-batch without completion tokens still backprops
