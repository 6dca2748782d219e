"""HF `generate` as the reference the decode loop is compared with: the engine's former generation path, kept
only for tests (inference.engine generates through inference.decode)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from inference.completion import cut_completion
from inference.engine import encode
from inference.prompt_format import completion_finished, trim_burst
from inference.repetition import BurstRepetition


class StopAtOtherSpeaker(StoppingCriteria):
    """Per-row stop once the text generated after the prompt starts a line not tagged by the target."""

    def __init__(self, tokenizer, prompt_len: int, target: str):
        self.tokenizer, self.prompt_len, self.target = tokenizer, prompt_len, target

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [
            completion_finished(cut_completion(self.tokenizer, row, self.prompt_len), self.target)
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def hf_greedy(model, tokenizer, prompts: Sequence[str], target: str, *, max_new_tokens: int = 24,
              repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> list[tuple[list[int], str]]:
    """Per prompt: (new token ids, raw completion trimmed at the burst) of one left-padded greedy `generate`."""
    encoded = [encode(tokenizer, p) for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for r, ids in enumerate(encoded):
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        attention[r, width - len(ids) :] = 1
    processors = LogitsProcessorList()
    rule = BurstRepetition(tokenizer, width, repetition_penalty, no_repeat_ngram_size)
    if rule.active():
        processors.append(rule)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, logits_processor=processors,
                             stopping_criteria=StoppingCriteriaList([StopAtOtherSpeaker(tokenizer, width, target)]))
    special = set(tokenizer.all_special_ids)
    rows = []
    for row in out:
        new = [t for t in row[width:].tolist() if t not in special]
        rows.append((new, trim_burst(cut_completion(tokenizer, row, width), target)))
    return rows
