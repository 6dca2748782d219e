"""Regenerate the sample exports `make demo` starts from: `.venv/bin/python examples/make_examples.py`.

Real two-person conversations from chitchat-dataset (MIT), which no one here wrote, dressed as the files the apps
export. One chitchat speaker plays "Sam" (the exporting user, "me") in both:
* `telegram/result.json`: a Telegram Desktop single-chat export of every conversation between Sam and the speaker
  Sam talks with most ("Jordan", the friend the demo imitates);
* `whatsapp/WhatsApp Chat with Alex.txt`: an Android WhatsApp export (US dates, 12-hour clock) of every conversation
  between Sam and their second most frequent partner ("Alex"), with the encryption notice WhatsApp writes first.

Jordan's messages (only Jordan's: Sam and Alex stay as written) are rewritten with the planted texting style
`lowkey` of training/evaluate/planted.py (all lowercase, no final punctuation, no apostrophes, u/ur/idk/tbh, "lmao"
on about a third of messages, no emoji, long messages split into several short ones), so the demo can show whether
the adapter learned how Jordan texts: the markers of training/evaluate/markers.py have known rates in Jordan's
messages and natural ones in everyone else's. A burst (Jordan's consecutive messages) is rewritten as one;
deterministic (same input, same bytes). The script prints the markers' rates in Jordan's messages before and after.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).parent
ME, FRIEND, OTHER = "Sam", "Jordan", "Alex"
FRIEND_STYLE, STYLE_SEED = "lowkey", 0  # Jordan's planted texting style (training/evaluate/planted.py)


def _messages(conv: dict) -> list[tuple[str, datetime, str]]:
    out = []
    for turn in conv["messages"]:
        for u in turn:
            text = " ".join(u["text"].split())
            if text:
                out.append((u["sender"], datetime.fromisoformat(u["timestamp"].replace("Z", "+00:00")).astimezone(UTC),
                            text))
    return out


def _bursts(messages: list[tuple[str, datetime, str]]) -> list[list[tuple[str, datetime, str]]]:
    """Runs of consecutive messages by one sender."""
    out: list[list[tuple[str, datetime, str]]] = []
    for m in messages:
        if out and out[-1][0][0] == m[0]:
            out[-1].append(m)
        else:
            out.append([m])
    return out


def restyled(conv: dict, sender: str, style) -> list[tuple[str, datetime, str]]:
    """The conversation's messages with `sender`'s bursts rewritten by `style`; a burst split into more messages
    than it had gives the extra ones its last message's time (times never go backwards)."""
    out = []
    for burst in _bursts(_messages(conv)):
        if burst[0][0] != sender:
            out += burst
            continue
        texts = style.rewrite([text for _, _, text in burst], seed=STYLE_SEED)
        out += [(sender, burst[min(i, len(burst) - 1)][1], text) for i, text in enumerate(texts)]
    return out


def pick() -> tuple[str, str, str, list[dict], list[dict]]:
    """(me, friend, other, conversations me-friend, conversations me-other), oldest first."""
    from chitchat_dataset import Dataset

    convs = sorted(Dataset().values(), key=lambda c: c["start"])
    pairs: Counter = Counter()
    for c in convs:
        senders = {u["sender"] for t in c["messages"] for u in t}
        if len(senders) == 2:
            pairs[tuple(sorted(senders))] += 1
    (me, friend), _ = pairs.most_common(1)[0]
    partners = Counter({(p if q == me else q): n for (p, q), n in pairs.items() if me in (p, q)})
    other = next(p for p, _ in partners.most_common() if p != friend)

    def between(a: str, b: str) -> list[dict]:
        return [c for c in convs if {u["sender"] for t in c["messages"] for u in t} == {a, b}]

    return me, friend, other, between(me, friend), between(me, other)


def write_telegram(path: Path, me: str, friend: str, convs: list[dict]) -> int:
    """Telegram Desktop single-chat export (result.json), the friend's messages in their planted style."""
    from training.evaluate.planted import get_style

    style = get_style(FRIEND_STYLE)
    messages = []
    for conv in convs:
        for sender, ts, text in restyled(conv, friend, style):
            who, wid = (ME, "user1001") if sender == me else (FRIEND, "user2002")
            messages.append({"id": len(messages) + 1, "type": "message", "date": ts.strftime("%Y-%m-%dT%H:%M:%S"),
                             "date_unixtime": str(int(ts.timestamp())), "from": who, "from_id": wid, "text": text,
                             "text_entities": [{"type": "plain", "text": text}]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": FRIEND, "type": "personal_chat", "id": 2002, "messages": messages},
                               ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    return len(messages)


def write_whatsapp(path: Path, me: str, convs: list[dict]) -> int:
    """Android WhatsApp export, US locale: `12/31/21, 9:05 PM - Name: text` (times in UTC: ingest with --tz UTC)."""
    lines = []
    first = _messages(convs[0])[0][1]
    lines.append(f"{first.month}/{first.day}/{first:%y}, {first:%-I:%M %p} - Messages and calls are end-to-end "
                 "encrypted. No one outside of this chat, not even WhatsApp, can read or listen to them. "
                 "Tap to learn more.")
    n = 0
    for conv in convs:
        for sender, ts, text in _messages(conv):
            who = ME if sender == me else OTHER
            lines.append(f"{ts.month}/{ts.day}/{ts:%y}, {ts:%-I:%M %p} - {who}: {text}")
            n += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return n


def style_table(friend: str, convs: list[dict]) -> str:
    """The markers' rates in the friend's replies as chitchat wrote them and as the export has them."""
    from training.evaluate.markers import MARKERS, marker_rates
    from training.evaluate.planted import get_style

    style = get_style(FRIEND_STYLE)

    def replies(rows):
        return [[t for _, _, t in b] for b in _bursts(rows) if b[0][0] == friend]

    before = marker_rates(r for c in convs for r in replies(_messages(c)))
    after = marker_rates(r for c in convs for r in replies(restyled(c, friend, style)))
    lines = [f"{FRIEND}'s replies, style {FRIEND_STYLE} ({style.description}):",
             f"  {'marker':<14} {'designed':>8} {'chitchat':>8} {'export':>8}"]
    for k in MARKERS:
        designed = style.rates.get(k)
        cells = ["-" if v is None else f"{v:.2f}" for v in (designed, before[k], after[k])]
        lines.append(f"  {k:<14} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8}")
    return "\n".join(lines)


def main() -> None:
    """Write both sample exports."""
    me, friend, other, with_friend, with_other = pick()
    n1 = write_telegram(HERE / "telegram" / "result.json", me, friend, with_friend)
    n2 = write_whatsapp(HERE / "whatsapp" / f"WhatsApp Chat with {OTHER}.txt", me, with_other)
    print(f"telegram: {len(with_friend)} conversations, {n1} messages ({ME}={me[:8]}, {FRIEND}={friend[:8]})")
    print(f"whatsapp: {len(with_other)} conversations, {n2} messages ({OTHER}={other[:8]})")
    print(style_table(friend, with_friend))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE.parent))  # training.evaluate.planted of this checkout
    main()
