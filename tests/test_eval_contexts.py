"""Method contexts: sessions rebuilt from samples, BM25 retrieval, equal token budgets."""

import pytest

from errors import ConvoError
from inference.prompt_format import Turn
from tests.conftest import FIXTURES
from training.evaluate.contexts import (
    END_LINE,
    fill_budget,
    fit_prompt,
    incontext_context,
    retrieval_context,
)
from training.evaluate.data import exchanges, load_meta, read_samples, sessions
from training.evaluate.retrieval import ExchangeIndex

DATA = FIXTURES / "eval" / "data"


def count_words(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated piece plus one per line break."""
    return len(text.split()) + text.count("\n")


@pytest.fixture(scope="module")
def train():
    return read_samples(DATA / "train.jsonl")


def test_sessions_are_rebuilt_whole(train):
    sess = sessions(train)
    assert len(sess) == 5
    assert sess[0] == [
        Turn("BOB", "want to get pizza tonight?"),
        Turn("ALICE", "omg yes pizza"),
        Turn("ALICE", "pepperoni pls"),
        Turn("BOB", "ok 8pm"),
        Turn("ALICE", "perfect see u"),
    ]


def test_retrieval_returns_the_similar_exchange(train):
    index = ExchangeIndex(exchanges(train, "ALICE"))
    ranked = index.rank([Turn("BOB", "hey"), Turn("BOB", "pizza tonight or not?")])
    assert ranked[0].reply[0] == Turn("ALICE", "omg yes pizza")
    ranked = index.rank([Turn("BOB", "the gym tomorrow?")])
    assert ranked[0].reply == (Turn("ALICE", "maybe, depends on the weather"),)
    assert index.rank([Turn("BOB", "zzzz qqqq")]) == []


@pytest.mark.parametrize("budget", [12, 25, 40, 60])
def test_context_methods_fill_the_same_budget(train, budget):
    """incontext and retrieval both end within one line of the budget and never over it."""
    index = ExchangeIndex(exchanges(train, "ALICE"))
    history = [Turn("BOB", "work was rough today, my boss again")]
    inc = incontext_context(sessions(train), "ALICE", count_words, budget, seed=0)
    ret = retrieval_context(index, history, count_words, budget)
    longest_line = max(count_words(line + "\n") for s in sessions(train) for line in [f"[{t.speaker}] {t.text}" for t in s])
    for ctx in (inc, ret):
        assert ctx.tokens == count_words(ctx.text)
        assert budget - longest_line <= ctx.tokens <= budget
        assert ctx.text.endswith("\n")
    assert "boss" in ret.text.split("\n")[-3]  # the most similar exchange sits last, next to the prompt


def test_incontext_is_fixed_by_seed(train):
    a = incontext_context(sessions(train), "ALICE", count_words, 40, seed=1)
    assert a == incontext_context(sessions(train), "ALICE", count_words, 40, seed=1)
    others = {incontext_context(sessions(train), "ALICE", count_words, 40, seed=s).text for s in range(6)}
    assert len(others) > 1


def test_fill_budget_whole_units_then_tail():
    units = [["a b", END_LINE], ["c d e", "f g", END_LINE]]  # 5 and 9 tokens
    ctx = fill_budget(units, count_words, 10)
    assert ctx.text == f"a b\n{END_LINE}\nf g\n{END_LINE}\n"  # first unit whole, then the end of the second
    assert ctx.tokens == 10
    assert fill_budget(units, count_words, 14, best_last=True).text == f"c d e\nf g\n{END_LINE}\na b\n{END_LINE}\n"
    assert fill_budget(units, count_words, 0).text == ""


def test_fit_prompt_drops_oldest_lines_and_keeps_the_tag():
    prompt = "[BOB] one two three\n[ALICE] four five\n[BOB] six\n[ALICE]"
    assert fit_prompt(prompt, count_words, 100) == prompt
    assert fit_prompt(prompt, count_words, 6) == "[BOB] six\n[ALICE]"
    assert fit_prompt(prompt, count_words, 1) == "[ALICE]"


def test_bad_dataset_files_are_clear_errors(tmp_path):
    with pytest.raises(ConvoError, match="meta.json"):
        load_meta(tmp_path)
    (tmp_path / "val.jsonl").write_text('{"prompt": "[A]"}\n')
    with pytest.raises(ConvoError, match=r"val.jsonl:1"):
        read_samples(tmp_path / "val.jsonl")
    assert load_meta(DATA)["persona"]["tag"] == "ALICE"
