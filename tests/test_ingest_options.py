"""Settings-driven ingest options: phone regions for --scrub, the date order for WhatsApp."""

from __future__ import annotations

import json

import pytest

from convo.cli import run
from errors import ConfigError
from training.ingest.pipeline import ingest

TEXT = "ruf an: 030 12345678 oder (212) 555-0123"


def _wa(tmp_path):
    path = tmp_path / "WhatsApp Chat with Jana.txt"
    path.write_text(f"31/12/2021, 21:05 - Jana: {TEXT}\n31/12/2021, 21:06 - Riya: ok\n", encoding="utf-8")
    return path


def test_phone_regions_decide_which_national_numbers_are_scrubbed(tmp_path):
    src, out = _wa(tmp_path), tmp_path / "m.jsonl"
    us = ingest([src], out, me="Riya", scrub=True)
    assert json.loads(out.read_text("utf-8").splitlines()[0])["text"] == "ruf an: 030 12345678 oder <PHONE>"
    assert us.meta["scrubbed"] == {"phone": 1}
    de = ingest([src], out, me="Riya", scrub=True, phone_regions=["de", "US"])
    assert json.loads(out.read_text("utf-8").splitlines()[0])["text"] == "ruf an: <PHONE> oder <PHONE>"
    assert de.meta["scrubbed"] == {"phone": 2}
    with pytest.raises(ConfigError, match=r"ingest.phone_regions: 'XX': expected ISO 3166 region codes"):
        ingest([src], out, me="Riya", scrub=True, phone_regions=["XX"])


def test_phone_regions_from_settings_and_option(tmp_path, monkeypatch, capsys):
    src, out = _wa(tmp_path), tmp_path / "m.jsonl"
    monkeypatch.setenv("CONVO_INGEST__PHONE_REGIONS", '["DE"]')
    assert run(["ingest", str(src), "--out", str(out), "--me", "Riya", "--scrub"]) == 0
    assert json.loads(out.read_text("utf-8").splitlines()[0])["text"] == "ruf an: <PHONE> oder (212) 555-0123"
    assert run(["ingest", str(src), "--out", str(out), "--me", "Riya", "--scrub", "--phone-region", "US"]) == 0
    assert json.loads(out.read_text("utf-8").splitlines()[0])["text"] == "ruf an: 030 12345678 oder <PHONE>"
    assert run(["ingest", str(src), "--out", str(out), "--scrub", "--phone-region", "Mars"]) == 2
    assert "'MARS': expected ISO 3166 region codes" in capsys.readouterr().err


def test_date_order_from_settings(tmp_path, monkeypatch):
    src, out = tmp_path / "chat.txt", tmp_path / "m.jsonl"
    src.write_text("01/02/2021, 10:00 - A: one\n01/03/2021, 10:00 - Riya: two\n", encoding="utf-8")
    monkeypatch.setenv("CONVO_INGEST__DATE_ORDER", "mdy")
    assert run(["ingest", str(src), "--out", str(out), "--me", "Riya"]) == 0
    assert json.loads(out.read_text("utf-8").splitlines()[0])["ts"].startswith("2021-01-02")
    monkeypatch.setenv("CONVO_INGEST__DATE_ORDER", "ydm")
    assert run(["ingest", str(src), "--out", str(out), "--me", "Riya"]) == 2


def test_me_by_name_takes_every_account_of_that_name(tmp_path):
    """`--me Sam` where WhatsApp's id is the name "Sam" still takes Telegram's Sam (another id) too."""
    import json

    from training.ingest.pipeline import ingest

    telegram = tmp_path / "result.json"
    telegram.write_text(json.dumps({"name": "Jordan", "type": "personal_chat", "id": 7, "messages": [
        {"id": 1, "type": "message", "date": "2024-01-01T10:00:00", "date_unixtime": "1704103200", "from": "Sam",
         "from_id": "user1001", "text": "hey", "text_entities": []},
        {"id": 2, "type": "message", "date": "2024-01-01T10:01:00", "date_unixtime": "1704103260", "from": "Jordan",
         "from_id": "user2002", "text": "yo", "text_entities": []},
    ]}), encoding="utf-8")
    whatsapp = tmp_path / "WhatsApp Chat with Alex.txt"
    whatsapp.write_text("1/13/24, 9:00 PM - Sam: hi alex\n1/13/24, 9:01 PM - Alex: hi sam\n", encoding="utf-8")
    ingest([telegram, whatsapp], tmp_path / "m.jsonl", me="Sam")
    meta = json.loads((tmp_path / "m.meta.json").read_text())
    assert sorted(meta["me"]["ids"]) == ["Sam", "user1001"]
