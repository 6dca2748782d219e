"""Cutting a completion out of generated token ids: the one place this is done (never import torch here).

A causal LM returns the prompt's ids followed by the new ones. The completion is the decode of the ids after the
prompt's *token* length. Slicing the decoded sequence at the prompt's *character* length is wrong whenever decode
does not round-trip (normalizers, whitespace handling, byte fallback, `clean_up_tokenization_spaces`): the cut
lands a few characters off, which is where the classic `decoded[len(prompt) - 2:]` fudge comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _as_id_list(sequence_ids: Any) -> list[int]:
    """A flat list of ints from a list, a tuple, a numpy array or a torch tensor (1-D or one row)."""
    ids = sequence_ids.tolist() if hasattr(sequence_ids, "tolist") else list(sequence_ids)
    if ids and isinstance(ids[0], (list, tuple)):
        if len(ids) != 1:
            raise ValueError(f"cut_completion takes one sequence, got a batch of {len(ids)}")
        ids = list(ids[0])
    return [int(i) for i in ids]


def cut_completion(tokenizer: Any, sequence_ids: Sequence[int] | Any, prompt_length: int) -> str:
    """Decode only the ids generated after the prompt (`prompt_length` = the prompt's number of token ids).

    Special tokens (EOS, padding) are skipped and tokenization spaces are not "cleaned up", so the text is exactly
    what the model wrote, including the leading space that completions start with when the tokenizer keeps it.
    """
    ids = _as_id_list(sequence_ids)
    if not 0 <= prompt_length <= len(ids):
        raise ValueError(f"prompt_length {prompt_length} outside the sequence (length {len(ids)})")
    return tokenizer.decode(ids[prompt_length:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
