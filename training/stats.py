"""Per chat and speaker statistics of a message log (`convo stats`), computed in one streaming pass.

Memory grows with the number of (chat, speaker) pairs and distinct message lengths, not with the file:
the median comes from a histogram of word counts, bursts from the current run per chat.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from training.ingest.jsonl import read_messages

# One emoji "character": a flag pair, a keycap, or a pictograph with optional skin tone, variation selector
# and zero-width-joiner continuations (👩‍💻 counts once).
_PICTO = (
    "\U0001f000-\U0001f0ff\U0001f300-\U0001f5ff\U0001f600-\U0001f64f\U0001f680-\U0001f6ff"
    "\U0001f700-\U0001f7ff\U0001f900-\U0001f9ff\U0001fa70-\U0001faff\u2600-\u27bf\u2b05-\u2b07"
    "\u2b1b\u2b1c\u2b50\u2b55\u2934\u2935\u3030\u303d\u3297\u3299\u203c\u2049\u2194-\u2199\u231a\u231b"
    "\u2328\u23cf\u23e9-\u23f3\u23f8-\u23fa"
)
_MOD = "[\U0001f3fb-\U0001f3ff]?\ufe0f?"
EMOJI_RE = re.compile(
    rf"[\U0001f1e6-\U0001f1ff]{{2}}|[0-9#*]\ufe0f?\u20e3|[{_PICTO}]{_MOD}(?:\u200d[{_PICTO}]{_MOD})*"
)


@dataclass
class SpeakerStats:
    """Running totals for one speaker in one chat."""

    speaker: str
    messages: int = 0
    words: int = 0
    in_bursts: int = 0
    first: datetime | None = None
    last: datetime | None = None
    length_hist: Counter = field(default_factory=Counter)  # words per message -> messages
    emoji: Counter = field(default_factory=Counter)

    def median_words(self) -> float:
        """Median words per message, from the histogram."""
        if not self.messages:
            return 0.0
        lo_rank, hi_rank = (self.messages - 1) // 2, self.messages // 2
        lo = hi = None
        seen = 0
        for length in sorted(self.length_hist):
            seen += self.length_hist[length]
            if lo is None and seen > lo_rank:
                lo = length
            if seen > hi_rank:
                hi = length
                break
        return (lo + hi) / 2

    def as_dict(self, speaker_id: str, top_emoji: int) -> dict:
        """The JSON form of these numbers."""
        return {
            "speaker": self.speaker,
            "speaker_id": speaker_id,
            "messages": self.messages,
            "words": self.words,
            "median_words": self.median_words(),
            "burst_share": round(self.in_bursts / self.messages, 4) if self.messages else 0.0,
            "first": self.first.isoformat() if self.first else None,
            "last": self.last.isoformat() if self.last else None,
            "top_emoji": [{"emoji": e, "count": n} for e, n in self.emoji.most_common(top_emoji)],
        }


def compute_stats(
    path: Path, top_emoji: int = 3, progress: Callable[[int], None] | None = None
) -> dict:
    """Stream the log at `path` and return {"file", "messages", "chats": [{"chat", "speakers": [...]}]}.

    A message is "in a burst" when it belongs to a run of two or more consecutive messages by the same
    speaker in its chat (file order). Bad lines raise IngestError naming file:line.
    """
    chats: dict[str, dict[str, SpeakerStats]] = {}
    run: dict[str, tuple[str, int]] = {}  # chat -> (speaker_id, length of the current run)
    total = 0

    def close_run(chat: str) -> None:
        speaker_id, length = run.pop(chat, ("", 0))
        if length >= 2:
            chats[chat][speaker_id].in_bursts += length

    for msg in read_messages(path, progress):
        total += 1
        speakers = chats.setdefault(msg.chat, {})
        st = speakers.get(msg.speaker_id)
        if st is None:
            st = speakers[msg.speaker_id] = SpeakerStats(speaker=msg.speaker)
        st.speaker = msg.speaker  # latest display name wins
        n_words = len(msg.text.split())
        st.messages += 1
        st.words += n_words
        st.length_hist[n_words] += 1
        st.emoji.update(EMOJI_RE.findall(msg.text))
        if st.first is None or msg.ts < st.first:
            st.first = msg.ts
        if st.last is None or msg.ts > st.last:
            st.last = msg.ts
        current = run.get(msg.chat)
        if current is not None and current[0] == msg.speaker_id:
            run[msg.chat] = (msg.speaker_id, current[1] + 1)
        else:
            close_run(msg.chat)
            run[msg.chat] = (msg.speaker_id, 1)
    for chat in list(run):
        close_run(chat)

    return {
        "file": str(path),
        "messages": total,
        "chats": [
            {
                "chat": chat,
                "messages": sum(s.messages for s in speakers.values()),
                "speakers": [
                    s.as_dict(sid, top_emoji)
                    for sid, s in sorted(speakers.items(), key=lambda kv: (-kv[1].messages, kv[0]))
                ],
            }
            for chat, speakers in sorted(chats.items())
        ],
    }
