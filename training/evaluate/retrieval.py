"""BM25 over the persona's past exchanges: which training answers look most like the current context."""

from __future__ import annotations

import re
from collections.abc import Sequence

from inference.prompt_format import Turn
from training.evaluate.data import Exchange

_WORD_RE = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (what BM25 indexes)."""
    return _WORD_RE.findall(text.lower())


class ExchangeIndex:
    """BM25Okapi (rank-bm25) over the text of each exchange: lead-in and the persona's reply."""

    def __init__(self, items: Sequence[Exchange]):
        from rank_bm25 import BM25Okapi

        self.items = list(items)
        docs = [words(" ".join(t.text for t in ex.turns())) for ex in self.items]
        # BM25Okapi divides by the mean document length; keep it away from an all-empty corpus.
        self._bm25 = BM25Okapi([d or ["\x00"] for d in docs]) if self.items else None

    def rank(
        self, context: Sequence[Turn], query_turns: int = 3, limit: int = 200, include_unmatched: bool = False
    ) -> list[Exchange]:
        """Exchanges sharing words with the last `query_turns` messages of `context`, most similar first.

        With `include_unmatched`, the others follow in corpus order (up to `limit` in all).
        """
        if self._bm25 is None:
            return []
        query = words(" ".join(t.text for t in context[-query_turns:]))
        scores = self._bm25.get_scores(query) if query else [0.0] * len(self.items)
        order = sorted(range(len(self.items)), key=lambda i: (-scores[i], i))
        return [self.items[i] for i in order if include_unmatched or scores[i] > 0][:limit]
