"""The one prompt format, shared by training (dataset building) and serving (worker, simulate, eval).

A conversation is plain text, one message per line, each line starting with its speaker's tag:

    [RIYA] hey are we still going tonight?
    [ALICE] yeah! want to meet at 7?
    [RIYA] sounds perfect
    [ALICE]

* Tags are plain text (`[A-Z0-9_]+` in brackets), never new special tokens: new tokens start untrained and pull
  the model out of distribution.
* A burst (several messages in a row by one speaker) stays several lines, each with its tag.
* Injection safety: a message's text can never start a new line. Backslash, newline, carriage return and the
  other Unicode line breaks are escaped reversibly (`\\`, `\n`, `\r`, `\u2028`...), so text such as
  "ok\n[ALICE] fake" renders as one line of the real speaker.
* A prompt ends with `\n[NEXT]` and no trailing space; a completion starts with a space, holds the target's whole
  burst, and ends with the tag of whoever spoke next (or `[END]` when the session ended). That final tag is
  what teaches the model to stop; at inference generation stops at any tag other than the target's.

Changing anything here changes what adapters learned: bump FORMAT_VERSION, which adapters record.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from errors import ConvoError

FORMAT_VERSION = 1
END_TAG = "END"  # pseudo-speaker closing a session; never a person's tag
ROLE_ME = "ME"
ROLE_FRIEND = "FRIEND"

_TAG_RE = re.compile(r"[A-Z0-9_]+")
_LINE_RE = re.compile(r"\[([A-Z0-9_]+)\](?: (.*))?\Z", re.DOTALL)

# Everything str.splitlines() treats as a line boundary, plus the backslash that escapes them.
_ESCAPES = {
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\x0b": "\\v",
    "\x0c": "\\f",
    "\x1c": "\\u001c",
    "\x1d": "\\u001d",
    "\x1e": "\\u001e",
    "\x85": "\\u0085",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_ESCAPE_RE = re.compile("|".join(re.escape(c) for c in _ESCAPES))
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}
_UNESCAPE_RE = re.compile(r"\\(?:u[0-9a-f]{4}|.)", re.DOTALL)


class PromptFormatError(ConvoError):
    """Text that is not in the prompt format, or a tag that is not a valid tag."""


@dataclass(frozen=True, slots=True)
class Turn:
    """One message: the speaker's tag (e.g. "ALICE") and the message text (may contain newlines)."""

    speaker: str
    text: str


def make_tag(display_name: str, reserved: Iterable[str] = ()) -> str:
    """Default tag for a display name: upper-cased, ASCII-folded, spaces to `_` ("Zoë Li" -> "ZOE_LI").

    Names with no ASCII letters or digits get a stable hash tag ("U1A2B3C"). `END` and the `reserved` tags
    (those already given to other speakers) are avoided by appending `_` until the tag is free.
    """
    # Upper-case before folding so that "ß" becomes "SS" rather than vanishing.
    folded = unicodedata.normalize("NFKD", display_name.upper()).encode("ascii", "ignore").decode("ascii")
    tag = re.sub(r"\s+", "_", folded.strip().upper())
    tag = re.sub(r"[^A-Z0-9_]", "", tag).strip("_")
    tag = re.sub(r"_+", "_", tag)
    if not tag:
        tag = "U" + hashlib.sha1(display_name.encode("utf-8")).hexdigest()[:6].upper()
    taken = set(reserved) | {END_TAG}
    while tag in taken:
        tag = tag + "_"
    return tag


def check_tag(tag: str) -> str:
    """Return `tag` if it is a valid speaker tag, else raise PromptFormatError."""
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise PromptFormatError(f"invalid speaker tag {tag!r}: use A-Z, 0-9 and _ only")
    return tag


def escape_text(text: str) -> str:
    """Make a message text single-line, reversibly."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], text)


def unescape_text(text: str) -> str:
    """Inverse of escape_text; unknown escapes (which a model may invent) are kept as written."""
    return _UNESCAPE_RE.sub(lambda m: _UNESCAPES.get(m.group(0), m.group(0)), text)


def render_line(turn: Turn) -> str:
    """`[TAG] text` with the text escaped (always a single line)."""
    return f"[{check_tag(turn.speaker)}] {escape_text(turn.text)}"


def render(turns: Sequence[Turn]) -> str:
    """Render a conversation: one line per message, no trailing newline."""
    return "\n".join(render_line(t) for t in turns)


def parse_line(line: str) -> Turn:
    """Parse one rendered line back into a Turn."""
    m = _LINE_RE.match(line)
    if not m:
        raise PromptFormatError(f"not a conversation line (expected '[TAG] text'): {line[:60]!r}")
    return Turn(m.group(1), unescape_text(m.group(2) or ""))


def parse(text: str) -> list[Turn]:
    """Parse rendered conversation text back into turns: parse(render(turns)) == turns."""
    if text == "":
        return []
    return [parse_line(line) for line in text.split("\n")]


def line_speaker(line: str) -> str | None:
    """The tag a line starts with, or None if it does not start with a complete tag."""
    m = re.match(r"\[([A-Z0-9_]+)\]", line)
    return m.group(1) if m else None


def trim_burst(text: str, target: str) -> str:
    """Generated text up to (not including) the line that ended the target's burst."""
    lines = text.split("\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if line_speaker(line) != target:
            break
        kept.append(line)
    return "\n".join(kept)


def render_prompt(history: Sequence[Turn], next_speaker: str) -> str:
    """The conversation so far followed by `\\n[NEXT]` (no trailing space): the model writes NEXT's turn."""
    head = render(history)
    tag = f"[{check_tag(next_speaker)}]"
    return f"{head}\n{tag}" if head else tag


def render_completion(target: str, messages: Sequence[str], following: str | None) -> str:
    """Training target for a prompt ending in `[TARGET]`: the whole burst, then the next speaker's tag.

    `following` is the tag of whoever spoke next, or None when the session ended there (renders `[END]`).
    """
    check_tag(target)
    if not messages:
        raise PromptFormatError("a completion needs at least one message")
    nxt = check_tag(following) if following is not None else END_TAG
    if nxt == target:
        raise PromptFormatError("the following speaker must differ from the target (a burst is one completion)")
    lines = [" " + escape_text(messages[0])]
    lines += [render_line(Turn(target, m)) for m in messages[1:]]
    return "\n".join(lines) + f"\n[{nxt}]"


def completion_finished(generated: str, target: str) -> bool:
    """True once generated text (after `[TARGET]`) has begun a line tagged by anyone but the target.

    Used as the stopping criterion while sampling: the model signals the end of the burst by writing the next
    speaker's tag (or `[END]`).
    """
    for line in generated.split("\n")[1:]:
        tag = line_speaker(line)
        if tag is not None and tag != target:
            return True
        if tag is None and not could_become_tag(line):
            return True  # a line that is not a turn at all: stop, it is junk
    return False


def could_become_tag(partial: str) -> bool:
    """True while a partly written line could still turn out to start with a tag (`""`, `"["`, `"[AL"`)."""
    return re.fullmatch(r"(\[[A-Z0-9_]*)?", partial) is not None


def split_completion(generated: str, target: str) -> list[str]:
    """The messages of the target's burst in generated text that followed a prompt ending in `[TARGET]`.

    The first line is the continuation of the prompt's `[TARGET]` (its leading space is dropped); following lines
    count while they carry the target's tag. Generation ends at any other tag, `[END]`, or a line that is not a
    turn. Empty messages are dropped.
    """
    lines = generated.split("\n")
    first = lines[0][1:] if lines[0].startswith(" ") else lines[0]
    messages = [unescape_text(first)]
    for line in lines[1:]:
        if line_speaker(line) != target:
            break
        try:
            messages.append(parse_line(line).text)
        except PromptFormatError:
            messages.append(unescape_text(line[len(target) + 2 :].lstrip(" ")))
    return [m.strip() for m in messages if m.strip()]
