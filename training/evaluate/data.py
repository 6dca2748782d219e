"""What evaluation reads from a dataset dir: samples, meta, whole sessions and persona exchanges."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from errors import EvalError
from inference.prompt_format import PromptFormatError, Turn
from training.dataset import Sample


def read_samples(path: Path) -> list[Sample]:
    """Read a train.jsonl / val.jsonl (training.dataset's reader), checking each prompt parses."""
    from training.dataset import read_samples as read_rows

    out = []
    for n, d in enumerate(read_rows(Path(path)), 1):
        s = Sample(d["prompt"], d["completion"], d["session"], d["chat"], d["target"])
        try:
            s.history()
        except PromptFormatError as e:
            raise EvalError(f"{path}:{n}: prompt is not in the prompt format ({e}); rebuild with `convo dataset`") from e
        out.append(s)
    return out


def load_meta(data_dir: Path) -> dict:
    """meta.json of a dataset dir (training.dataset's reader), which must name the persona's tag."""
    from training.dataset import load_dataset_meta

    meta = load_dataset_meta(Path(data_dir))
    try:
        meta["persona"]["tag"]
    except (KeyError, TypeError) as e:
        raise EvalError(f"{Path(data_dir) / 'meta.json'}: no persona.tag in it; rebuild it with `convo dataset`") from e
    return meta


def _sample_turns(s: Sample) -> list[Turn]:
    return s.history() + [Turn(s.target, m) for m in s.reply()]


def sessions(samples: list[Sample]) -> list[list[Turn]]:
    """Whole sessions rebuilt from overlapping sample windows (samples are in chronological order).

    Each sample holds a window of its session (history + the target's burst); consecutive windows overlap, so
    each is appended after its longest prefix that ends the session built so far.
    """
    by_session: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        by_session[(s.chat, s.session)].append(s)
    out = []
    for group in by_session.values():
        merged: list[Turn] = []
        for s in group:
            seq = _sample_turns(s)
            k = min(len(merged), len(seq))
            while k > 0 and merged[-k:] != seq[:k]:
                k -= 1
            merged.extend(seq[k:])
        out.append(merged)
    return out


@dataclass(frozen=True, slots=True)
class Exchange:
    """A lead-in from the conversation and how the persona answered it (what retrieval shows the model)."""

    lead_in: tuple[Turn, ...]
    reply: tuple[Turn, ...]

    def turns(self) -> list[Turn]:
        """Lead-in then reply."""
        return [*self.lead_in, *self.reply]


def exchanges(samples: list[Sample], persona_tag: str, lead_in_turns: int = 2) -> list[Exchange]:
    """The persona's answers in `samples` with up to `lead_in_turns` messages before each, deduplicated."""
    seen = set()
    out = []
    for s in samples:
        if s.target != persona_tag:
            continue
        reply = tuple(Turn(s.target, m) for m in s.reply())
        if not reply:
            continue
        lead = tuple(s.history()[-lead_in_turns:]) if lead_in_turns else ()
        ex = Exchange(lead, reply)
        if ex not in seen:
            seen.add(ex)
            out.append(ex)
    return out
