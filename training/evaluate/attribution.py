"""Whose reply is this: a classifier over the people of the message log names who wrote each reply.

The candidates are the persona and the other people of the same message log (the owner's other contacts, and
the owner): the speakers with at least `MIN_REPLIES` replies, the most active first, at most `MAX_CANDIDATES`.
Each is represented by their replies (a burst of consecutive messages, joined by newlines): the persona by the
replies of the dataset's training split only (the held-out validation replies are what gets attributed), every
other candidate by their replies in the log, at most `MAX_REPLIES_PER_CANDIDATE` each (evenly spaced through the
log). The classifier reads what the AUC column's does (metrics.py): char n-grams (1-4, TF-IDF, case kept),
here into a linear SVM (one-vs-rest over the candidates, balanced class weights): as accurate as a multinomial
logistic regression on chitchat speakers (3-fold, 5 candidates: 0.574 vs 0.575) and twenty times faster to fit.

**Attribution** of a method: the share of its generated replies the classifier names the persona for (top-1
accuracy; an empty reply counts as not the persona's). How to read it:

* *chance* is 1 / number of candidates (the classifier's weights are balanced, so a reply that carries nothing
  of anyone lands on each candidate about equally often);
* the *ceiling* is the persona's real held-out replies' attribution: a method that writes exactly like the
  persona would score about that, not 1 (real replies are often short and generic: "ok", "haha yes");
* a difference between two methods is real when its paired bootstrap interval over prompts excludes 0.

With fewer than `MIN_CANDIDATES` candidates (the persona and one other person) the column is skipped with a
one-line reason: telling one person from one other says little about who wrote a reply.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from errors import EvalError

Reply = Sequence[str]

MIN_CANDIDATES = 3
MAX_CANDIDATES = 8
MIN_REPLIES = 20
MAX_REPLIES_PER_CANDIDATE = 400


def reply_text(reply: Reply) -> str:
    """A reply as the classifier reads it: its messages joined by newlines."""
    return "\n".join(m for m in reply if m.strip())


def log_replies(log_path: Path, exclude: set[str], person_of: dict[str, str] | None = None,
                ) -> tuple[dict[str, list[list[str]]], dict[str, str]]:
    """Replies per person in a canonical message log (consecutive messages of one speaker in a chat), the
    speaker ids in `exclude` left out; and each person's display name. `person_of` maps a speaker id to its
    person (the dataset's tags: the owner's Telegram id and WhatsApp name are one person, one candidate)."""
    person_of = person_of or {}
    by: dict[str, list[list[str]]] = {}
    names: dict[str, str] = {}
    last: tuple[str, str] | None = None
    try:
        lines = Path(log_path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EvalError(f"{log_path}: cannot read the message log for attribution ({e.strerror})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            chat, sid, text, name = rec["chat"], rec["speaker_id"], rec["text"], rec.get("speaker", rec["speaker_id"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EvalError(f"{log_path}:{n}: not a `convo ingest` message line (attribution reads the log)") from e
        if sid in exclude:
            last = None
            continue
        sid = person_of.get(sid, sid)
        names.setdefault(sid, str(name))
        if last == (chat, sid):
            by[sid][-1].append(text)
        else:
            by.setdefault(sid, []).append([text])
        last = (chat, sid)
    return by, names


def _spread(items: list, k: int) -> list:
    if len(items) <= k:
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


@dataclass
class Attributor:
    """A fitted "whose reply is this" classifier: `candidates[0]` is the persona."""

    candidates: list[str]  # display names, the persona first
    model: object
    training_replies: dict[str, int]

    @property
    def chance(self) -> float:
        """1 / number of candidates."""
        return 1.0 / len(self.candidates)

    def persona_hits(self, replies: Sequence[Reply]) -> list[bool]:
        """Per reply: did the classifier name the persona (label 0)? Empty replies: False."""
        texts = [reply_text(r) for r in replies]
        keep = [i for i, t in enumerate(texts) if t.strip()]
        hits = [False] * len(texts)
        if keep:
            for i, label in zip(keep, self.model.predict([texts[i] for i in keep]), strict=True):
                hits[i] = int(label) == 0
        return hits


def candidate_pool(
    persona_replies: Sequence[Reply], persona_name: str, others: dict[str, list[list[str]]], names: dict[str, str],
    max_candidates: int = MAX_CANDIDATES, min_replies: int = MIN_REPLIES,
) -> tuple[list[str], list[list[Reply]]] | str:
    """(candidate names, their replies), the persona first; or the reason there are too few candidates."""
    usable = [(sid, rs) for sid, rs in others.items() if len([r for r in rs if reply_text(r).strip()]) >= min_replies]
    usable.sort(key=lambda x: (-len(x[1]), x[0]))
    usable = usable[: max_candidates - 1]
    if len([r for r in persona_replies if reply_text(r).strip()]) < 2:
        return "the persona has fewer than 2 training replies"
    if 1 + len(usable) < MIN_CANDIDATES:
        return (f"{1 + len(usable)} candidate(s) with {min_replies}+ replies (the persona and "
                f"{len(usable)} other), need {MIN_CANDIDATES}")
    pool = [_spread([r for r in persona_replies if reply_text(r).strip()], MAX_REPLIES_PER_CANDIDATE)]
    pool += [_spread([r for r in rs if reply_text(r).strip()], MAX_REPLIES_PER_CANDIDATE) for _, rs in usable]
    return [persona_name, *(names.get(sid, sid) for sid, _ in usable)], pool


def fit_attributor(candidates: list[str], pool: list[list[Reply]], seed: int = 0) -> Attributor:
    """Fit the char n-gram classifier on every candidate's replies (label = index in `candidates`)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    texts = [reply_text(r) for rs in pool for r in rs]
    labels = [k for k, rs in enumerate(pool) for _ in rs]
    model = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), lowercase=False, min_df=2, sublinear_tf=True),
        LinearSVC(C=0.5, class_weight="balanced", random_state=seed),
    )
    model.fit(texts, labels)
    return Attributor(candidates, model, dict(zip(candidates, (len(rs) for rs in pool), strict=True)))


def build_attributor(
    log_path: Path | None, persona_id: str, persona_name: str, persona_replies: Sequence[Reply],
    seed: int = 0, max_candidates: int = MAX_CANDIDATES, person_of: dict[str, str] | None = None,
) -> Attributor | str:
    """The attributor for a persona from the message log at `log_path`, or a one-line reason it cannot be built
    (no log recorded, too few candidates). `persona_id`'s lines in the log are ignored: the persona is represented
    by `persona_replies` (the training split), so held-out replies never reach the classifier. `person_of`
    (speaker id -> person, e.g. the dataset's tags) makes the several ids of one person one candidate."""
    if log_path is None:
        return "no message log (the dataset's meta.json records none; give --attribution-log LOG)"
    if not Path(log_path).is_file():
        return f"message log {log_path} not found (give --attribution-log LOG)"
    person_of = person_of or {}
    persona = person_of.get(persona_id, persona_id)
    exclude = {persona_id} | {sid for sid, who in person_of.items() if who == persona}
    others, names = log_replies(Path(log_path), exclude, person_of)
    got = candidate_pool(persona_replies, persona_name, others, names, max_candidates)
    if isinstance(got, str):
        return f"{got} in {log_path}"
    return fit_attributor(*got, seed=seed)


def per_prompt_hits(attributor: Attributor, cands: Sequence[Sequence[Reply]]) -> list[list[int]]:
    """[[hits, replies]] per prompt for one method's candidates."""
    flat = [r for per in cands for r in per]
    hits = attributor.persona_hits(flat)
    out, k = [], 0
    for per in cands:
        out.append([sum(hits[k:k + len(per)]), len(per)])
        k += len(per)
    return out


def accuracy(counts: Sequence[Sequence[int]], idx: Sequence[int] | None = None) -> float | None:
    """Pooled hits / replies over the prompts `idx` (all when None)."""
    idx = range(len(counts)) if idx is None else idx
    hits = sum(counts[i][0] for i in idx)
    total = sum(counts[i][1] for i in idx)
    return hits / total if total else None


def predicted_names(attributor: Attributor, replies: Sequence[Reply]) -> Counter:
    """How often each candidate is named for `replies` (the report shows who a method's replies resemble)."""
    texts = [reply_text(r) for r in replies if reply_text(r).strip()]
    if not texts:
        return Counter()
    return Counter(attributor.candidates[int(k)] for k in attributor.model.predict(texts))
