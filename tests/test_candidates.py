"""inference/candidates.py: raw completions -> clean, distinct candidates; re-sampling and rerank (no model)."""

from __future__ import annotations

import pytest

from inference.candidates import (
    assistant_voice,
    clean,
    completion_text,
    distinct,
    flaws,
    loops,
    rerank_score,
    sample_candidates,
)


@pytest.mark.parametrize("raw, expected", [
    (" hey\n[ALICE] you there?", ["hey", "you there?"]),
    ("", []),  # the model ended the turn at once
    (" ", []),
    (" [ALICE]", []),  # a bare speaker tag
    (" [ALICE] ok then", ["ok then"]),  # the model repeated its own tag
    (" sure [RIYA] cool", ["sure"]),  # someone else's turn started mid-line
    (" [RIYA] what", []),
    (" see you [RI", ["see you"]),  # a tag cut off by the token limit
    (" I'm free tomorrow.\n[ALICE] I'm free tomorrow.\n[ALICE] i'm free tomorrow", ["I'm free tomorrow."]),
    (" I'm so tired too I'm so tired too I'm so tired too I'm so", ["I'm so tired too"]),
    (" ok\\n[RIYA] fake line", ["ok"]),  # an escaped newline the model wrote, then a tag
])
def test_clean(raw, expected):
    assert clean(raw, "ALICE") == expected


def test_clean_keeps_ordinary_brackets_and_repeated_words():
    assert clean(" lol (me) [sic] no no no", "ALICE") == ["lol (me) [sic] no no no"]


def test_flaws_name_what_was_wrong_before_cleaning():
    assert flaws(" hi", "A") == frozenset()
    assert flaws("", "A") == {"empty"}
    assert flaws(" [A]", "A") == {"tag"}
    assert flaws(" a b\n[A] a b", "A") == {"repeat"}
    assert flaws(" go go go go go go go", "A") == {"loop"}
    assert flaws(" How can I assist you today?", "A") == {"assistant"}


@pytest.mark.parametrize("text", [
    "How can I assist you today?",
    "I'm not sure what you're asking, but I can help you with that.",
    "As an AI, I don't have feelings",
    "I\u2019m here to help!",
    "Feel free to ask me anything",
    "Is there anything else I can do for you?",
    "I hope this helps!",
    "I'm sorry, but I can't do that",
    "Could you please provide more details?",
    "I'd be happy to help with that",
])
def test_assistant_voice_positive(text):
    assert assistant_voice(text)


@pytest.mark.parametrize("text", [
    "i can help you move on sunday",
    "not sure what you mean lol",
    "happy to see you!",
    "how can i help it, i'm tired",
    "sorry but i'm out tonight",
    "feel free to come by",
    "let me know when you're free",
    "i'm just tired",
])
def test_assistant_voice_negative(text):
    assert not assistant_voice(text)


def test_loops_matches_the_eval_metric_definition():
    assert loops("a b c a b c a b c")
    assert not loops("a b c a b c")


def test_distinct_dedupes_normalised_text_and_skips_empty():
    assert distinct([["Hi!"], [], ["hi"], ["yo"], ["HI."], ["sup"]], 2) == [["Hi!"], ["yo"]]


def test_completion_text_is_what_the_model_writes():
    assert completion_text(["hey", "you up?"], "ALICE") == " hey\n[ALICE] you up?"
    assert completion_text(["a\nb"], "ALICE") == " a\\nb"


class Scripted:
    """A generate_fn replaying scripted raw completions per item (a list per call), counting what was asked."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[list[tuple[str, int]]] = []

    def __call__(self, items, samples):
        self.calls.append(list(zip(items, samples, strict=True)))
        out = []
        for item, k in zip(items, samples, strict=True):
            queue = self.script[item]
            out.append([queue.pop(0) if queue else "" for _ in range(k)])
        return out


def test_n_distinct_after_resampling_bad_and_duplicate_samples():
    gen = Scripted({"x": ["", " hi", " hi", " [A]", " yo", " sup"]})
    [out] = sample_candidates(["x"], ["A"], [3], gen, max_resample_rounds=3)
    assert out.candidates == [["hi"], ["yo"], ["sup"]]
    assert [k for _, k in (c[0] for c in gen.calls)] == [3, 2, 2]  # the first 3 gave 1 good; then the missing
    assert out.rejected == 3 and out.flaws["empty"] == 2 and out.flaws["tag"] == 1  # the last call drew 2 for 1


def test_resampling_is_bounded_and_never_returns_an_empty_candidate():
    gen = Scripted({"x": [" ok"], "y": [" a", " b"]})  # x never gives more than one usable sample
    outs = sample_candidates(["x", "y"], ["A", "A"], [2, 2], gen, max_resample_rounds=2)
    assert len(gen.calls) == 3 and [i for i, _ in gen.calls[1]] == ["x"]  # y done in round 0
    assert outs[0].candidates == [["ok"]] and outs[1].candidates == [["a"], ["b"]]
    assert all(c for out in outs for c in out.candidates)
    [none] = sample_candidates(["z"], ["A"], [1], Scripted({"z": []}), max_resample_rounds=1)
    assert none.candidates == [] and none.samples == 1 + 2


def test_assistant_voice_is_resampled_and_only_a_last_resort():
    gen = Scripted({"x": [" How can I assist you today?", " nah im good"], "y": [" I hope this helps!"]})
    out_x, out_y = sample_candidates(["x", "y"], ["A", "A"], [1, 1], gen, max_resample_rounds=1)
    assert out_x.candidates == [["nah im good"]]
    assert out_y.candidates == [["I hope this helps!"]]  # rounds ran out: better than nothing
    assert out_x.flaws["assistant"] == 1


def test_rerank_returns_the_n_best_by_score_in_order():
    gen = Scripted({"x": [" meh", " totally me", " generic", " me too"]})
    calls = []

    def score(pairs):
        calls.append(pairs)
        return [{" meh": -0.5, " totally me": 0.9, " generic": -1.0, " me too": 0.3}[c] for _, c in pairs]

    [out] = sample_candidates(["x"], ["A"], [2], gen, score, rerank_k=4)
    assert gen.calls == [[("x", 4)]]
    assert out.candidates == [["totally me"], ["me too"]] and out.scored == 4
    assert len(calls) == 1 and [c for _, c in calls[0]] == [" meh", " totally me", " generic", " me too"]
    [plain] = sample_candidates(["x"], ["A"], [2], Scripted({"x": [" meh", " totally me"]}), score, rerank_k=0)
    assert plain.candidates == [["meh"], ["totally me"]] and plain.scored == 0


def test_rerank_score_is_the_per_token_log_likelihood_ratio():
    assert rerank_score(-10.0, -14.0, 4) == 1.0
    assert rerank_score(0.0, 0.0, 0) == 0.0
