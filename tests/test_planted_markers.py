"""Planted styles (training.evaluate.planted) and the markers that measure them (training.evaluate.markers)."""

from __future__ import annotations

import pytest

from training.evaluate.markers import (
    MARKERS,
    add_counts,
    marker_counts,
    marker_error,
    marker_rates,
    rates_from_counts,
)
from training.evaluate.planted import STYLES, get_style


@pytest.fixture(scope="module")
def chitchat_bursts() -> list[list[str]]:
    """Every burst of the first 150 chitchat conversations (about 2,900 bursts, all speakers)."""
    chitchat_dataset = pytest.importorskip("chitchat_dataset")
    data = chitchat_dataset.Dataset()
    return [[m["text"] for m in b] for k in sorted(data)[:150] for b in data[k]["messages"]]


@pytest.mark.parametrize("name", sorted(STYLES))
def test_planted_rates_match_design_on_chitchat(name, chitchat_bursts):
    style = STYLES[name]
    assert len(style.rates) >= 5
    rates = marker_rates([style.rewrite(b, seed=3) for b in chitchat_bursts])
    natural = marker_rates(chitchat_bursts)
    for marker, designed in style.rates.items():
        assert rates[marker] == pytest.approx(designed, abs=0.03), marker
    # the style moves natural text: its error against the unstyled text is large
    assert marker_error(natural, rates) > 0.12


def test_styles_are_distinct(chitchat_bursts):
    rates = {n: marker_rates([s.rewrite(b) for b in chitchat_bursts]) for n, s in STYLES.items()}
    names = sorted(rates)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert marker_error(rates[a], rates[b]) > 0.2, (a, b)


def test_rewrite_is_deterministic_and_seeded(chitchat_bursts):
    style = get_style("lowkey")
    bursts = chitchat_bursts[:300]
    first = [style.rewrite(b, seed=1) for b in bursts]
    assert first == [style.rewrite(b, seed=1) for b in bursts]
    assert first != [style.rewrite(b, seed=2) for b in bursts]  # the laugh coins move with the seed
    assert [style.rewrite(b, seed=1) for b in reversed(bursts)] == list(reversed(first))  # order-free


def test_lowkey_rewrite_example():
    out = get_style("lowkey").rewrite(["I don't know, to be honest you're right. Are you coming to the party tonight?"])
    text = " ".join(out)
    assert "idk" in text and "tbh" in text and "ur" in text and " u " in f" {text} "
    assert text == text.lower() and "'" not in text and len(out) > 1
    assert not any(m.endswith((".", "!", "?")) for m in out)


def test_proper_joins_and_spells_out():
    out = get_style("proper").rewrite(["idk lol", "u coming? 😂"])
    assert out == ["I don't know. You coming?"]


def test_unknown_style_names_the_known_ones():
    with pytest.raises(ValueError, match="lowkey"):
        get_style("nope")


def test_marker_counts_known_answers():
    replies = [["hey u", "lol ok"], ["Fine. 😊"], ["I don't know you"]]
    r = marker_rates(replies)
    assert r["lowercase"] == pytest.approx(2 / 4)
    assert r["burst"] == pytest.approx(1 / 3)
    assert r["laugh"] == pytest.approx(1 / 4)
    assert r["emoji"] == pytest.approx(1 / 4)
    assert r["apostrophe"] == pytest.approx(1 / 4)
    assert r["short_forms"] == pytest.approx(1 / 3)  # u vs "I don't know" and "you"
    assert r["final_punct"] == 0.0  # "Fine. 😊" ends with the emoji
    assert marker_rates([[""]])["lowercase"] is None
    counts = [marker_counts([rep]) for rep in replies]
    assert rates_from_counts(add_counts(counts)) == r
    assert marker_error(r, r) == 0.0
    opposite = {k: 1.0 - v for k, v in r.items()}
    assert marker_error(r, opposite) == pytest.approx(sum(abs(1 - 2 * v) for v in r.values()) / len(MARKERS))


def test_marker_errors_compare_methods_over_one_set_of_markers():
    """A method with no you-word at all must not drop short_forms from its error while another pays for it."""
    from training.evaluate.markers import common_markers, marker_error, marker_rates

    real = marker_rates([["idk u coming"], ["ur late lol"]])
    silent = marker_rates([["ok"], ["sure thing"]])  # no you-word: short_forms undefined
    formal = marker_rates([["are you coming"], ["you are late"]])  # you-words, never shortened
    assert silent["short_forms"] is None and formal["short_forms"] == 0.0 and real["short_forms"] == 1.0
    both = common_markers(real, [silent, formal])
    assert "short_forms" not in both and set(both) <= set(real)
    alone = marker_error(real, formal)
    assert marker_error(real, formal, both) < alone  # short_forms (an error of 1.0) no longer counts for one only
    assert marker_error(real, silent, both) == marker_error(real, silent)
