"""Evaluation metrics on hand-made replies with known answers."""

import math

import pytest

from training.evaluate import metrics as M

# Two people who text nothing alike: long lowercase rambles vs short capitalised lines with emoji and "!".
RAMBLER = [
    ["ok so basically i went to the store and they were out of everything lol"],
    ["yeah i think we should just stay in tonight and watch something"],
    ["honestly no idea what happened there but whatever", "anyway what are you up to"],
    ["i mean it could be worse i guess we will see tomorrow"],
]
SHOUTER = [["Sure! 😀"], ["Nope!!"], ["Great, thanks! 🎉"], ["Fine."], ["Yes! Bye 👋"], ["Wow!"]]


def test_identical_replies_have_zero_style_distance():
    d = M.style_distance(RAMBLER, RAMBLER)
    assert all(d[k] == 0 for k in (*M.STYLE_COMPONENTS, "combined"))


def test_swapped_speaker_has_large_style_distance():
    d = M.style_distance(RAMBLER, SHOUTER)
    assert d["length"] == 1.0  # every rambler message is longer than every shouter message
    assert d["lowercase"] == 1.0
    assert d["emoji"] == 1.0  # one side has none
    assert d["vocabulary"] == 1.0  # no word in common
    assert d["combined"] > 0.7
    # Distance grows with the difference: a half-and-half mix sits in between.
    mixed = M.style_distance(RAMBLER, RAMBLER + SHOUTER)["combined"]
    assert 0 < mixed < d["combined"]


def test_ks_statistic_known_values():
    assert M.ks_statistic([1, 2, 3], [1, 2, 3]) == 0
    assert M.ks_statistic([1, 1], [5, 5]) == 1
    assert M.ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(0.5)


def test_style_features_counts():
    f = M.style_features([["hi there", "OK!"], ["😀😀"]])
    assert f["lengths"] == [2, 1, 0]
    assert f["bursts"] == [2, 1]
    assert f["lowercase_share"] == pytest.approx(0.5)  # "hi there" yes, "OK!" no, emoji-only not counted
    assert f["emoji_per_message"] == pytest.approx(2 / 3)
    assert f["punctuation_per_char"] == pytest.approx(1 / 13)


def test_auc_of_identical_sets_is_one_half():
    real = RAMBLER + SHOUTER
    auc = M.distinguishability_auc(real, real, range(len(real)), range(len(real)))
    assert auc == pytest.approx(0.5)


def test_auc_of_different_people_is_high():
    real = [r for _ in range(3) for r in RAMBLER]
    gen = [r for _ in range(2) for r in SHOUTER]
    auc = M.distinguishability_auc(real, gen, [i % 6 for i in range(len(real))], [i % 6 for i in range(len(gen))])
    assert auc > 0.95


def test_auc_needs_data():
    assert M.distinguishability_auc([["a"]], [["b"]], [0], [0]) is None


def test_degeneration_shares():
    training = M.normalise_messages(["I will be there at eight", "ok"])
    replies = [
        [],  # empty
        ["ok", "ok"],  # the same message twice
        ["la la la la la la la la la"],  # a looping 3-gram
        ["i will be  there at EIGHT"],  # verbatim copy (case and spaces aside)
        ["fine by me, see you later"],
    ]
    d = M.degeneration(replies, training)
    assert d["empty"] == pytest.approx(1 / 5)
    assert d["repeated"] == pytest.approx(2 / 5)
    # messages of 4+ words: the loop, the copy and "fine by me..." -> one copy in three
    assert d["copied"] == pytest.approx(1 / 3)


def test_nll_summary_is_token_weighted():
    s = M.nll_summary([(2.0, 1), (4.0, 3)])
    assert s["nll_per_token"] == pytest.approx(1.5)
    assert s["perplexity"] == pytest.approx(math.exp(1.5))
    assert s["tokens"] == 4
    assert M.nll_summary([])["nll_per_token"] is None
