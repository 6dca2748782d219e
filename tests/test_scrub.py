"""`--scrub`: identifiers become placeholders; dates, times, years and ordinary numbers stay."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.ingest.scrub import EMAIL_RE, Scrubber, iban_ok, luhn_ok


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("mail john.doe+chat@mail.example.co.uk!", "mail <EMAIL>!", "email"),
        ("see https://example.com/a?b=1). ok", "see <URL>). ok", "url"),
        ("wiki https://en.wikipedia.org/wiki/Foo_(bar), yes", "wiki <URL>, yes", "url"),
        ("www.example.org/path.", "<URL>.", "url"),
        ("card 4111 1111 1111 1111 exp 12/25", "card <CARD> exp 12/25", "card"),
        ("card 5500-0000-0000-0004.", "card <CARD>.", "card"),
        ("amex 378282246310005", "amex <CARD>", "card"),
        ("iban DE89 3704 0044 0532 0130 00 THIS ok", "iban <IBAN> THIS ok", "iban"),
        ("iban GB82WEST12345698765432.", "iban <IBAN>.", "iban"),
        ("call +44 20 7946 0958 now", "call <PHONE> now", "phone"),
        ("call (202) 555-0143 or 202.555.0143", "call <PHONE> or <PHONE>", "phone"),
        ("ring +49 171 1234567", "ring <PHONE>", "phone"),
    ],
)
def test_replaces_each_kind(text, expected, kind):
    s = Scrubber()
    assert s.scrub(text) == expected
    assert set(s.counts) == {kind}
    assert s.counts[kind] == expected.count(f"<{kind.upper()}>")


@pytest.mark.parametrize(
    "text",
    [
        "meet on 12/31/2021 at 10:30, or 31.12.2021 21:05",
        "from 2019-2021, then 2022 2023 2024",
        "timestamp 2021-03-04 12:30:45",
        "order 12345678901234 and 4111 1111 1111 1112",  # a long number and a card failing Luhn
        "iban DE89 3704 0044 0532 0130 02",  # mod-97 check fails (and no Luhn-valid digit groups)
        "room 1204, pin 1234, score 3-2",
        "",
    ],
)
def test_leaves_dates_times_years_and_plain_numbers(text):
    s = Scrubber()
    assert s.scrub(text) == text
    assert not s.counts


def test_counts_accumulate_over_messages_and_card_is_not_a_phone():
    s = Scrubber()
    out = [s.scrub(t) for t in ("a@b.io and c@d.io", "4111111111111111", "+1 202 555 0143", "x")]
    assert out == ["<EMAIL> and <EMAIL>", "<CARD>", "<PHONE>", "x"]
    assert s.counts == {"email": 2, "card": 1, "phone": 1}


def test_national_numbers_follow_the_region():
    assert Scrubber(regions=("DE",)).scrub("ruf an: 030 12345678") == "ruf an: <PHONE>"
    assert Scrubber(regions=("US",)).scrub("ruf an: 030 12345678") == "ruf an: 030 12345678"


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")


def _luhn_cards_left(text: str) -> list[str]:
    """Brute force, independent of the scrubber: any whole-group 13-19 digit span passing Luhn."""
    found = []
    for run in re.finditer(r"(?<!\w)\d+(?:[ -]\d+)*(?!\w)", text):
        groups = re.findall(r"\d+", run.group())
        for i in range(len(groups)):
            for j in range(i, len(groups)):
                digits = "".join(groups[i : j + 1])
                if 13 <= len(digits) <= 19 and luhn_ok(digits):
                    found.append(digits)
    return found


def _with_luhn_digit(prefix: str) -> str:
    for d in "0123456789":
        if luhn_ok(prefix + d):
            return prefix + d
    raise AssertionError


_card = st.builds(
    lambda digits, sep: sep.join(re.findall(".{1,4}", _with_luhn_digit(digits))),
    st.text("0123456789", min_size=12, max_size=18),
    st.sampled_from(["", " ", "-"]),
)
_email = st.builds(
    lambda a, b: f"{a}@{b}.com", st.from_regex(r"[a-z0-9._+-]{1,8}", fullmatch=True),
    st.from_regex(r"[a-z0-9-]{1,8}", fullmatch=True),
)
_piece = st.one_of(
    _card, _email, st.text(max_size=12), st.text("0123456789 -+()./:@", max_size=20),
    st.sampled_from(["https://x.io/", "www.", "@", ".com", "+1 ", "DE89 3704 0044 0532 0130 00", "<CARD>"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_piece, max_size=8).map("".join))
def test_never_leaves_an_email_or_a_luhn_valid_card(text):
    s = Scrubber()
    out = s.scrub(text)
    assert EMAIL_RE.search(out) is None
    assert _luhn_cards_left(out) == []
    for kind in ("email", "phone", "url", "card", "iban"):
        tag = f"<{kind.upper()}>"
        assert out.count(tag) - text.count(tag) == s.counts[kind]
