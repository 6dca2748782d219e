"""WhatsApp .txt exports: every locale quirk in a hand-written fixture, plus chitchat-dataset chats."""

from __future__ import annotations

import json
import re
import tempfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from errors import IngestError
from tests.conftest import FIXTURES
from training.ingest.base import HEAD_BYTES, ParseContext
from training.ingest.whatsapp import PARSER, PLACEHOLDERS, chat_name

WA = FIXTURES / "ingest" / "whatsapp"


def parse(path: Path, tz=UTC, date_order=None) -> tuple[list[tuple], ParseContext]:
    ctx = ParseContext(tz=tz, date_order=date_order)
    rows = [(m.speaker, m.text, m.ts.isoformat()) for m in PARSER.parse(path, ctx)]
    return rows, ctx


def test_android_us_12h_multiline_placeholders_and_system_lines():
    path = WA / "WhatsApp Chat with Alice.txt"
    rows, ctx = parse(path)
    assert rows == [
        ("Alice", "hey are you coming tonight?", "2021-01-05T21:05:00+00:00"),
        ("Riya", "yes!", "2021-01-05T21:06:00+00:00"),
        ("Riya", "what time", "2021-01-05T21:06:00+00:00"),
        ("Alice", "8 works?\nsecond line of the same message\n\nand a third after a blank line",
         "2021-01-05T21:07:00+00:00"),
        ("Alice", "sounds good", "2021-01-06T00:30:00+00:00"),  # "<This message was edited>" stripped
        ("Riya", "morning: coffee first", "2021-01-13T08:00:00+00:00"),
    ]
    # encryption notice + missed call; <Media omitted>; two deletions; "null"
    assert ctx.skipped == {"system": 2, "media_only": 1, "deleted": 2, "placeholder": 1}
    assert ctx.me_hints == {"Riya"}  # only the exporting user sees "You deleted this message"
    msgs = list(PARSER.parse(path, ParseContext(tz=UTC)))
    assert {m.chat for m in msgs} == {"Alice"}
    assert all(m.speaker_id == m.speaker and m.reply_to is None and m.source == "whatsapp" for m in msgs)


def test_android_eu_group_events_crlf_captions_and_phone_names():
    rows, ctx = parse(WA / "android_eu_group.txt")
    assert rows == [
        ("Tom", "who's in?", "2021-02-03T18:02:00+00:00"),
        ("Riya", "me", "2021-02-03T18:03:00+00:00"),
        ("Riya", "obviously", "2021-02-03T18:03:00+00:00"),
        ("Sam", "hi all: finally here", "2021-02-15T09:11:00+00:00"),
        ("Riya", "look at this view", "2021-02-16T10:05:00+00:00"),  # caption kept, file line dropped
        ("+351 912 345 678", "quem é?", "2021-02-16T10:07:00+00:00"),  # unsaved contact
    ]
    # encryption, created group "Trip: Lisbon", added, subject "...: ...", joined via link, security code, left
    assert ctx.skipped == {"system": 7, "media_only": 1}


def test_ios_bracketed_dotted_with_marks_from_unzipped_folder():
    path = WA / "WhatsApp Chat - Lisa" / "_chat.txt"
    rows, ctx = parse(path)
    assert rows == [
        ("Lisa", "Frohe Weihnachten!", "2021-12-24T18:30:05+00:00"),
        ("Riya", "danke, dir auch 🎄", "2021-12-24T18:31:10+00:00"),
        ("Riya", "Guten Morgen\nwie war's?", "2021-12-25T09:00:00+00:00"),
        ("Lisa", "gut", "2021-12-25T09:02:00+00:00"),
    ]
    assert ctx.skipped == {"system": 1, "media_only": 2, "deleted": 1}
    assert {m.chat for m in PARSER.parse(path, ParseContext(tz=UTC))} == {"Lisa"}


def test_ios_us_12h_narrow_space_midnight_and_noon():
    # 1/2 and 1/3 fit both orders and time runs forward either way: only --date-order can tell
    with pytest.raises(IngestError, match=r"ios_us_12h\.txt:1: dates such as 01/02 fit both day-first and "
                                          r"month-first .* pass --date-order dmy \(31/12\) or --date-order mdy"):
        parse(WA / "ios_us_12h.txt")
    rows, ctx = parse(WA / "ios_us_12h.txt", date_order="mdy")
    assert rows == [
        ("Sam", "did you see that", "2022-01-02T21:05:40+00:00"),
        ("Riya", "yes lol", "2022-01-02T21:06:01+00:00"),
        ("Sam", "midnight", "2022-01-03T00:00:00+00:00"),
        ("Riya", "noon-ish", "2022-01-03T12:30:00+00:00"),
    ]
    assert ctx.skipped == {"system": 1, "media_only": 1}


def test_ambiguous_dates_resolved_by_chronology_despite_12h_clock():
    # every date fits both orders; only day-first keeps time running forward (5/1 < 12/1 < 2/2)
    rows, _ = parse(WA / "android_es_ampm.txt")
    assert rows == [
        ("Ana", "hola", "2022-01-05T09:05:00+00:00"),
        ("Riya", "hola!", "2022-01-05T09:06:00+00:00"),
        ("Ana", "qué tal", "2022-01-12T22:00:00+00:00"),  # "p. m." with no-break spaces
        ("Riya", "bien", "2022-02-02T08:00:00+00:00"),
    ]


def test_ambiguous_dates_resolved_by_the_last_line_of_the_file():
    # 24h clock would default to day-first, but 02/13 on the last line only fits month-first
    rows, _ = parse(WA / "ambiguous_late.txt")
    assert [ts[:10] for _, _, ts in rows] == ["2021-02-03"] * 3 + ["2021-02-13"]
    assert [t for _, t, _ in rows] == ["one", "two", "three", "settled by this line"]


def test_year_first_dates():
    rows, _ = parse(WA / "year_first_24h.txt")
    assert rows == [
        ("Kai", "almost", "2021-12-31T23:59:00+00:00"),
        ("Kai", "happy new year", "2022-01-01T00:00:00+00:00"),
        ("Riya", "🎉🎉", "2022-01-01T00:01:00+00:00"),
    ]


def test_timestamps_are_local_time_of_the_given_zone():
    msgs = list(PARSER.parse(WA / "year_first_24h.txt", ParseContext(tz=ZoneInfo("Europe/Berlin"))))
    assert msgs[0].ts.isoformat() == "2021-12-31T23:59:00+01:00"
    assert msgs[0].ts.astimezone(UTC) == datetime(2021, 12, 31, 22, 59, tzinfo=UTC)
    msgs = list(PARSER.parse(WA / "year_first_24h.txt", ParseContext(tz=timezone(timedelta(hours=-5)))))
    assert msgs[1].ts.isoformat() == "2022-01-01T00:00:00-05:00"


@pytest.mark.parametrize("name,order", [("chitchat_android_eu", "dmy"), ("chitchat_ios_us", None)])
def test_chitchat_conversations_round_trip(name, order):
    expected = [json.loads(line) for line in (WA / f"{name}.expected.jsonl").read_text("utf-8").splitlines()]
    got = [json.loads(m.to_json()) for m in PARSER.parse(WA / f"{name}.txt", ParseContext(tz=UTC, date_order=order))]
    for rec in got:  # pydantic writes UTC as "Z"
        rec["ts"] = datetime.fromisoformat(rec["ts"]).isoformat()
        assert rec.pop("id") is None and rec.pop("chat_id") is None  # WhatsApp has no ids
    assert len(expected) > 200
    assert got == expected


def test_chat_names():
    assert chat_name(Path("WhatsApp Chat with Alice Smith.txt")) == "Alice Smith"
    assert chat_name(Path("exports/WhatsApp Chat - Trip 2021/_chat.txt")) == "Trip 2021"
    assert chat_name(Path("family.txt")) == "family"


def test_sniff():
    for path in WA.rglob("*.txt"):
        assert PARSER.sniff(path, path.read_bytes()[:HEAD_BYTES]) == (path.name != "not_whatsapp.txt"), path
    assert not PARSER.sniff(Path("x.json"), b'{"name": "Alice", "messages": []}')
    assert not PARSER.sniff(Path("x.txt"), b"")


def test_file_without_any_message_line_names_file_and_line_1():
    with pytest.raises(IngestError, match=r"not_whatsapp\.txt:1: expected a WhatsApp line"):
        list(PARSER.parse(WA / "not_whatsapp.txt", ParseContext(tz=UTC)))


def test_empty_and_blank_files(tmp_path):
    for content in (b"", b"\n\n  \n"):
        path = tmp_path / "empty.txt"
        path.write_bytes(content)
        with pytest.raises(IngestError, match=r"empty\.txt:1: expected a WhatsApp line"):
            list(PARSER.parse(path, ParseContext(tz=UTC)))


def test_non_utf8_names_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("01/02/2021, 10:00 - Zoë: hi\n".encode() + "01/02/2021, 10:01 - Zoë: olé\n".encode("latin-1"))
    first_line = len("01/02/2021, 10:00 - Zoë: hi\n".encode())
    offset = first_line + len("01/02/2021, 10:01 - Zo")
    with pytest.raises(IngestError, match=rf"latin1\.txt: byte offset {offset} \(line 2\): not UTF-8"):
        list(PARSER.parse(path, ParseContext(tz=UTC)))


def test_dates_that_fit_no_order_are_an_error(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_text("13/01/2021, 10:00 - A: day-first\n01/13/2021, 10:00 - A: month-first\n", encoding="utf-8")
    with pytest.raises(IngestError, match=r"mixed\.txt:1: a day-first date here, a month-first one on line 2"):
        list(PARSER.parse(path, ParseContext(tz=UTC, date_order="mdy")))


_LINES = [
    line
    for p in sorted(WA.rglob("*.txt"))
    if not p.name.startswith("chitchat")
    for line in p.read_text("utf-8").splitlines()
]
_line = st.one_of(
    st.sampled_from(_LINES),
    st.sampled_from(_LINES).map(lambda s: s[: len(s) // 2]),
    st.text(max_size=40),
    st.builds(
        lambda a, b, c, h, m, rest: f"{a}/{b}/{c}, {h}:{m:02d} - {rest}",
        st.integers(0, 40), st.integers(0, 40), st.integers(0, 3000), st.integers(0, 30), st.integers(0, 99),
        st.text(max_size=20),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_line, max_size=12), junk=st.binary(max_size=8), where=st.integers(0, 400))
def test_random_and_mutated_input_raises_only_ingest_error(lines, junk, where):
    data = "\n".join(lines).encode("utf-8")
    data = data[:where] + junk + data[where:]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "chat.txt"
        path.write_bytes(data)
        PARSER.sniff(path, data[:HEAD_BYTES])
        try:
            msgs = list(PARSER.parse(path, ParseContext(tz=ZoneInfo("America/New_York"))))
        except IngestError as e:
            assert str(path) in str(e)
            return
        for m in msgs:
            assert m.text.strip() and m.speaker and "\u200e" not in m.text


def test_bom_and_leading_blank_lines(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf\n" + "31/12/2021, 21:05 - Zoë: hallo\r\n".encode())
    assert PARSER.sniff(path, path.read_bytes())
    assert parse(path)[0] == [("Zoë", "hallo", "2021-12-31T21:05:00+00:00")]


_FORMATS = {
    # name: (header for a datetime, keeps seconds); the date order is passed when the dates fit both
    "android_us": (lambda t: f"{t.month}/{t.day}/{t.year % 100:02d}, {t.hour % 12 or 12}:{t.minute:02d}\u202f"
                   f"{'AM' if t.hour < 12 else 'PM'} - ", False),
    "android_eu": (lambda t: f"{t.day:02d}/{t.month:02d}/{t.year}, {t.hour:02d}:{t.minute:02d} - ", False),
    "ios_de": (lambda t: f"[{t.day:02d}.{t.month:02d}.{t.year % 100:02d}, {t.hour:02d}:{t.minute:02d}:{t.second:02d}] ",
               True),
    "ios_us": (lambda t: f"\u200e[{t.month}/{t.day}/{t.year % 100:02d}, {t.hour % 12 or 12}:{t.minute:02d}:"
               f"{t.second:02d}\u202f{'AM' if t.hour < 12 else 'PM'}] ", True),
}
_NOT_TYPED = r"(?i)\s*(null|missed|voice|video|waiting|silenced|this message|you deleted)"
_typed = st.text(alphabet="abcxyz XYZ019,.!?'é😂\n", min_size=1, max_size=30).filter(
    lambda t: t.strip() and not re.match(_NOT_TYPED, t)
)


@settings(max_examples=100, deadline=None)
@given(
    fmt=st.sampled_from(sorted(_FORMATS)),
    start=st.datetimes(datetime(2010, 1, 1), datetime(2030, 1, 1)),
    msgs=st.lists(
        st.tuples(st.sampled_from(["Alice", "Bob Smith", "+44 7700 900123", "Zoë", "李雷"]), _typed,
                  st.integers(0, 10**7)),
        min_size=1, max_size=8,
    ),
)
def test_round_trip_of_random_messages_in_every_locale(fmt, start, msgs):
    header, seconds = _FORMATS[fmt]
    t, lines, expected = start, [], []
    for speaker, text, gap_s in msgs:
        t += timedelta(seconds=gap_s)
        lines.append(f"{header(t)}{speaker}: {text}")
        ts = (t if seconds else t.replace(second=0)).replace(microsecond=0, tzinfo=UTC)
        expected.append((speaker, text.strip(), ts.isoformat()))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "chat.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        assert parse(path, date_order="mdy" if fmt.endswith("_us") else "dmy")[0] == expected


LOCALES = sorted(p.stem for p in (WA / "locales").glob("*.txt"))


@pytest.mark.parametrize("name", LOCALES)
def test_locale_shape_fixture(name):
    """Each fixture is written by hand in one locale's shape; its .expected.json lists the messages."""
    path = WA / "locales" / f"{name}.txt"
    want = json.loads((WA / "locales" / f"{name}.expected.json").read_text("utf-8"))
    assert PARSER.sniff(path, path.read_bytes()[:HEAD_BYTES])
    rows, ctx = parse(path, date_order=want["date_order"])
    assert [list(r) for r in rows] == want["messages"]
    assert len(ctx.warnings) == len(want["warnings"])
    for got, expected in zip(ctx.warnings, want["warnings"], strict=True):
        assert got.startswith(f"{path}{expected}")
    assert dict(ctx.skipped) == want["skipped"]
    assert {m.chat for m in PARSER.parse(path, ParseContext(tz=UTC, date_order=want["date_order"]))} == {name}


def test_locale_fixtures_cover_the_shapes_the_issue_names():
    text = "".join((WA / "locales" / f"{n}.txt").read_text("utf-8") for n in LOCALES)
    for shape in ("31. 12. 21", "ص", "م", "午前", "午後", "오전", "오후", "a.\u202fm.", "p.\u00a0m.", "\u202f", "\u200e[",
                  "\u200f", "/", "-", "."):
        assert shape in text, shape


def test_impossible_time_is_an_error_with_file_and_line(tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text("31/12/2021, 21:05 - A: hi\n31/12/2021, 21:75 - A: what\n", encoding="utf-8")
    with pytest.raises(IngestError, match=r"chat\.txt:2: time 21:75 is no time of day"):
        list(PARSER.parse(path, ParseContext(tz=UTC)))


def test_ambiguous_file_uses_date_order_and_evidence_beats_it(tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text("01/02/2021, 10:00 - A: one\n01/03/2021, 10:00 - A: two\n", encoding="utf-8")
    assert [r[2][:10] for r in parse(path, date_order="dmy")[0]] == ["2021-02-01", "2021-03-01"]
    assert [r[2][:10] for r in parse(path, date_order="mdy")[0]] == ["2021-01-02", "2021-01-03"]
    path.write_text("01/02/2021, 10:00 - A: one\n13/02/2021, 10:00 - A: two\n", encoding="utf-8")
    assert [r[2][:10] for r in parse(path, date_order="mdy")[0]] == ["2021-02-01", "2021-02-13"]  # 13 decides


def test_cli_date_order_option_and_error(tmp_path, capsys):
    from convo.cli import run

    src = WA / "locales" / "us_ios_ltr_nnbsp_ambiguous.txt"
    out = tmp_path / "m.jsonl"
    assert run(["ingest", str(src), "--out", str(out), "--me", "Riya"]) == 2
    err = capsys.readouterr().err
    assert "--date-order dmy (31/12) or --date-order mdy (12/31)" in err and "Traceback" not in err
    assert not out.exists()
    assert run(["ingest", str(src), "--out", str(out), "--me", "Riya", "--date-order", "mdy"]) == 0
    assert json.loads(out.read_text("utf-8").splitlines()[0])["ts"] == "2022-01-02T21:05:40Z"
    assert run(["ingest", str(src), "--out", str(out), "--date-order", "ymd"]) == 2
    assert "--date-order 'ymd': expected dmy (31/12) or mdy (12/31)" in capsys.readouterr().err


@pytest.mark.parametrize("lang", sorted(PLACEHOLDERS))
def test_placeholders_of_each_locale_are_never_training_text(lang, tmp_path):
    """Every media, deleted and edited string of a language is dropped (or stripped), never kept as a message."""
    row = PLACEHOLDERS[lang]
    lines = ["31/12/2021, 21:00 - Lena: real one"]
    lines += [f"31/12/2021, 21:01 - Riya: {w}" for w in row["media"] + row["ios_media"]]
    lines += [f"31/12/2021, 21:02 - Lena: {w}" for w in row["deleted"]]
    lines += [f"31/12/2021, 21:03 - Riya: {w}." for w in row["you_deleted"]]  # with WhatsApp's trailing dot
    lines += [f"31/12/2021, 21:04 - Lena: real two {w}" for w in row["edited"]]
    path = tmp_path / "chat.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, ctx = parse(path)
    assert [t for _, t, _ in rows] == ["real one"] + ["real two"] * len(row["edited"])
    assert ctx.skipped == {"media_only": len(row["media"]) + len(row["ios_media"]),
                           "deleted": len(row["deleted"]) + len(row["you_deleted"])}
    assert ctx.me_hints == ({"Riya"} if row["you_deleted"] else set())


def test_russian_media_placeholder_from_a_real_export_is_dropped(tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text("25.03.2024, 10:15 - Маша: <Без медиафайлов>\n25.03.2024, 10:16 - Маша: привет\n", "utf-8")
    rows, ctx = parse(path)
    assert [t for _, t, _ in rows] == ["привет"] and ctx.skipped == {"media_only": 1}


def test_typed_text_that_mentions_a_placeholder_is_kept(tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text("31/12/2021, 21:00 - Lena: she said This message was deleted lol\n"
                    "31/12/2021, 21:01 - Lena: <3 you: really>\n", "utf-8")
    assert [t for _, t, _ in parse(path)[0]] == ["she said This message was deleted lol", "<3 you: really>"]


def test_localized_attachment_keeps_only_its_caption(tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text("31/12/2021, 21:00 - Lena: IMG-20211231-WA0001.jpg (archivo adjunto)\nmira esto\n"
                    "[31/12/2021, 21:01:02] Lena: <adjunto: 00000012-PHOTO-2021-12-31.jpg>\n", "utf-8")
    rows, ctx = parse(path)
    assert [t for _, t, _ in rows] == ["mira esto"] and ctx.skipped == {"media_only": 1}
