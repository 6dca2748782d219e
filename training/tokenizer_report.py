"""How a base model's tokenizer sees a dataset (`convo tokenizer-report`).

Four questions, answered from a `convo dataset` folder: how many tokens a message costs; how many samples
(prompt + completion) exceed the training length; whether the emoji people actually send survive tokenization
(unknown tokens, byte-fallback pieces like `<0xF0>`, decode that does not give the emoji back); and how the speaker
tags tokenize at the start of a line, including whether a prompt ending in `[TAG]` tokenizes as a prefix of the
same text followed by a message (if not, the model sees a token sequence at inference that training never showed).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from errors import DatasetError
from inference.prompt_format import END_TAG, escape_text, parse
from training.dataset import META_FILE, TRAIN_FILE, VAL_FILE, load_dataset_meta, read_samples

_MOD = "(?:\ufe0f|[\U0001f3fb-\U0001f3ff])*"
_BASE = (
    "[\u231a\u231b\u23e9-\u23f3\u23f8-\u23fa\u2600-\u27bf\u2b1b\u2b1c\u2b50\u2b55"
    "\U0001f000-\U0001f1e5\U0001f200-\U0001f3fa\U0001f400-\U0001faff]"
)
# One emoji as people see it: flags, keycaps, and ZWJ sequences with skin tones and variation selectors.
EMOJI_RE = re.compile(
    "[\U0001f1e6-\U0001f1ff]{2}"
    "|[0-9#*]\ufe0f?\u20e3"
    f"|{_BASE}{_MOD}[\U000e0020-\U000e007f]*(?:\u200d{_BASE}{_MOD})*"
)
_BYTE_PIECE_RE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def find_emoji(text: str) -> list[str]:
    """The emoji in `text`, each a whole cluster ("👩‍👩‍👧", "👍🏽", "🇫🇷" are one each)."""
    return EMOJI_RE.findall(text)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return float(ordered[k])


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _piece_flags(tokenizer: Any, ids: list[int]) -> tuple[list[str], bool, bool]:
    pieces = [str(p) for p in tokenizer.convert_ids_to_tokens(ids)]
    unk_id = getattr(tokenizer, "unk_token_id", None)
    unk = unk_id is not None and unk_id in ids
    byte_fallback = any(_BYTE_PIECE_RE.fullmatch(p) for p in pieces)
    return pieces, unk, byte_fallback


def target_messages(sample: dict[str, str]) -> list[str]:
    """The burst of a sample: the messages its completion holds, exactly as written (not stripped)."""
    n_prompt_lines = sample["prompt"].count("\n") + 1
    turns = parse(sample["prompt"] + sample["completion"])
    return [t.text for t in turns[n_prompt_lines - 1 : -1]]


def tag_report(tokenizer: Any, tag: str) -> dict[str, Any]:
    """How `\\n[TAG]` tokenizes mid-conversation, and whether the prompt end is a token prefix of the training text."""
    before, after = "ok", " sure"
    text = f"{before}\n[{tag}]{after}"
    start, end = len(before), len(before) + len(tag) + 3  # the span of "\n[TAG]"
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [i for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if a < end and b > start]
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        ids = _ids(tokenizer, f"\n[{tag}]")
    pieces, unk, byte_fallback = _piece_flags(tokenizer, ids)
    prompt_ids = _ids(tokenizer, f"{before}\n[{tag}]")
    full_ids = _ids(tokenizer, text)
    return {
        "tag": tag,
        "tokens": len(ids),
        "pieces": pieces,
        "unk": unk,
        "byte_fallback": byte_fallback,
        "prompt_prefix_ok": full_ids[: len(prompt_ids)] == prompt_ids,
    }


def emoji_report(tokenizer: Any, emoji: str, samples: int) -> dict[str, Any]:
    """Tokens for one emoji on its own, with flags for unknown / byte-fallback pieces and decode round-trip."""
    ids = _ids(tokenizer, emoji)
    pieces, unk, byte_fallback = _piece_flags(tokenizer, ids)
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return {
        "emoji": emoji,
        "codepoints": " ".join(f"U+{ord(c):04X}" for c in emoji),
        "samples": samples,
        "tokens": len(ids),
        "pieces": pieces,
        "unk": unk,
        "byte_fallback": byte_fallback,
        "round_trip": decoded.strip() == emoji,
    }


def tokenizer_report(tokenizer: Any, data_dir: Path, max_tokens: int, tokenizer_name: str | None = None) -> dict:
    """The whole report as a JSON-ready dict (see the module docstring)."""
    data_dir = Path(data_dir)
    meta = load_dataset_meta(data_dir)
    samples = read_samples(data_dir / TRAIN_FILE) + read_samples(data_dir / VAL_FILE)
    if not samples:
        raise DatasetError(f"{data_dir}: {TRAIN_FILE} and {VAL_FILE} hold no samples; rebuild with `convo dataset`")
    if max_tokens < 1:
        raise DatasetError(f"--max-tokens {max_tokens}: must be a positive number of tokens")

    message_tokens = []
    messages_with_unk = 0
    unk_id = getattr(tokenizer, "unk_token_id", None)
    for sample in samples:
        for text in target_messages(sample):
            ids = _ids(tokenizer, " " + escape_text(text))  # as it follows its tag in a line
            message_tokens.append(len(ids))
            messages_with_unk += unk_id is not None and unk_id in ids
    sample_tokens = [len(_ids(tokenizer, s["prompt"] + s["completion"], special=True)) for s in samples]
    truncated = sum(n > max_tokens for n in sample_tokens)

    emoji_samples: Counter = Counter()
    for s in samples:
        emoji_samples.update(set(find_emoji(s["prompt"] + s["completion"])))
    emoji = [emoji_report(tokenizer, e, n) for e, n in emoji_samples.most_common()]

    tags = sorted(set(meta.get("tags", {}).values()) | {END_TAG})
    return {
        "tokenizer": tokenizer_name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "data": str(data_dir),
        "meta": str(data_dir / META_FILE),
        "max_tokens": max_tokens,
        "samples": len(samples),
        "messages": {
            "count": len(message_tokens),
            "median_tokens": percentile(message_tokens, 50),
            "p95_tokens": percentile(message_tokens, 95),
            "max_tokens": max(message_tokens, default=0),
            "with_unk": int(messages_with_unk),
        },
        "sample_tokens": {
            "median": percentile(sample_tokens, 50),
            "p95": percentile(sample_tokens, 95),
            "max": max(sample_tokens),
            "truncated": truncated,
            "truncated_share": truncated / len(samples),
        },
        "emoji": emoji,
        "tags": [tag_report(tokenizer, t) for t in tags],
    }
