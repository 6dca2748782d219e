"""`convo feedback stats` per adapter version: acceptance and mean edit similarity, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from inference.protocol import FeedbackEvent, HistoryMessage
from training.feedback.stats import acceptance, edit_similarity, feedback_stats

T0 = datetime(2026, 11, 2, 12, tzinfo=UTC)  # a Monday (ISO week 45)
DRAFT = ["omg yes 🙌", "be there soon"]




def ev(kind, draft, version, minutes=0, persona="jordan", **kw) -> FeedbackEvent:
    fields = dict(kind=kind, draft_id=draft, persona=persona, mode="self", adapter_version=version,
                  ts=T0 + timedelta(minutes=minutes), context=[HistoryMessage(speaker="JORDAN", text="you coming?")],
                  candidate=DRAFT, final_text="\n".join(DRAFT) if kind == "sent" else None)
    fields.update(kw)
    return FeedbackEvent(**fields)


def two_versions() -> list[FeedbackEvent]:
    """Jordan's drafts by v1 (week 45) and v2 (week 46), one by the bare base, and one of Alex's v1."""
    week = 60 * 24 * 7
    return [
        # v1: sent as drafted; rewritten; shown and left alone; edited a little.
        ev("shown", "a1", "v1"), ev("sent", "a1", "v1", 1),
        ev("shown", "a2", "v1", 2), ev("edited", "a2", "v1", 3, final_text="nah, next week"),
        ev("shown", "a3", "v1", 4),
        ev("shown", "a4", "v1", 5), ev("edited", "a4", "v1", 6, final_text="omg yes 🙌\nbe there soon!"),
        ev("liked", "a5", "v1", 7),  # a reaction to a draft never shown: not counted
        # v2: sent; an edit of an empty draft; sent with no shown event (still shown).
        ev("shown", "b1", "v2", week), ev("sent", "b1", "v2", week + 1),
        ev("shown", "b2", "v2", week + 2, candidate=[]),
        ev("edited", "b2", "v2", week + 3, candidate=[], final_text="hey"),
        ev("sent", "b3", "v2", week + 4),
        ev("shown", "c1", None, 8),  # the bare base drafted it (no adapter version)
        ev("sent", "x1", "v1", 9, persona="alex"),
    ]


def by_version(stats: dict) -> dict:
    return {(r["persona"], r["version"]): r for r in stats["acceptance"]["per_version"]}


def test_per_version_acceptance_and_edit_similarity(store):
    for e in two_versions():
        store.add(e)
    stats = feedback_stats(store, None, 0.8, known_versions={"jordan": ["v1", "v2", "v3"], "alex": ["v1"]})
    rows = by_version(stats)
    # Ordered by persona, then the bare base first and versions by number; v3 is on disk but drafted nothing.
    assert list(rows) == [("alex", "v1"), ("jordan", None), ("jordan", "v1"), ("jordan", "v2"), ("jordan", "v3")]
    rewrite = edit_similarity(DRAFT, "nah, next week")
    small = edit_similarity(DRAFT, "omg yes 🙌\nbe there soon!")
    assert rewrite < 0.8 <= small < 1
    v1, v2, v3 = rows[("jordan", "v1")], rows[("jordan", "v2")], rows[("jordan", "v3")]
    assert (v1["shown"], v1["accepted"], v1["replied"]) == (4, 2, 3)  # a3 was shown, never answered
    assert v1["rate"] == 0.5 and v1["mean_similarity"] == pytest.approx((1 + rewrite + small) / 3)
    # The edit of the empty draft: similarity 0, not accepted; b3 counts as shown though only its `sent` came.
    assert (v2["shown"], v2["accepted"], v2["replied"]) == (3, 2, 3)
    assert v2["mean_similarity"] == pytest.approx(2 / 3)
    assert (v3["shown"], v3["accepted"], v3["replied"], v3["rate"], v3["mean_similarity"]) == (0, 0, 0, None, None)
    base = rows[("jordan", None)]
    assert (base["shown"], base["replied"], base["mean_similarity"]) == (1, 0, None)
    assert (rows[("alex", "v1")]["shown"], rows[("alex", "v1")]["rate"]) == (1, 1.0)  # alex's v1 is not jordan's
    acc = stats["acceptance"]
    assert (acc["shown"], acc["accepted"], acc["replied"]) == (9, 5, 7)
    assert [(w["week"], w["shown"]) for w in acc["weekly"]] == [("2026-W45", 6), ("2026-W46", 3)]

    only = feedback_stats(store, "jordan", 0.8, known_versions={"jordan": ["v1", "v2", "v3"], "alex": ["v1"]})
    assert {r["persona"] for r in only["acceptance"]["per_version"]} == {"jordan"}
    # A looser threshold accepts the rewrite; the empty draft's edit stays unaccepted even at 0.
    loose = by_version(feedback_stats(store, "jordan", 0.2))
    assert loose[("jordan", "v1")]["accepted"] == 3 and loose[("jordan", "v2")]["accepted"] == 2
    assert by_version(feedback_stats(store, "jordan", 0.0))[("jordan", "v2")]["accepted"] == 2


def test_no_events_at_all_gives_rows_of_known_versions_only():
    acc = acceptance([], 0.8, {"jordan": ["v1"]})
    assert (acc["shown"], acc["rate"], acc["mean_similarity"], acc["weekly"]) == (0, None, None, [])
    assert acc["per_version"] == [{"persona": "jordan", "version": "v1", "shown": 0, "accepted": 0, "rate": None,
                                   "replied": 0, "mean_similarity": None, "first_shown": None, "last_shown": None}]


def test_stats_command_per_version_table_json_and_plot(store, tmp_path, cli, capsys, monkeypatch):
    from inference.adapter_meta import AdapterMeta, BaseModelRef, Speaker, write_adapter_meta
    from inference.versions import set_current

    for e in two_versions():
        store.add(e)
    adapters = tmp_path / "adapters"
    meta = AdapterMeta(persona=Speaker(name="Jordan", speaker_id="u2", tag="JORDAN"),
                       me=Speaker(name="Sam", speaker_id="u1", tag="SAM"), tags={"u1": "SAM", "u2": "JORDAN"},
                       mode="both", base_model=BaseModelRef(id="tiny"), format_version=1)
    for v in ("v1", "v2", "v3"):
        write_adapter_meta(adapters / "jordan" / v, meta)
    (adapters / "jordan" / "v4").mkdir()  # a half-made version (no metadata): not a version yet
    set_current(adapters / "jordan", "v3")  # promoted, nothing drafted by it yet
    monkeypatch.setenv("CONVO_FEEDBACK__DB_URL", store.db_url)
    monkeypatch.setenv("CONVO_FEEDBACK__TABLE_PREFIX", store.events.name.removesuffix("feedback_events"))
    monkeypatch.setenv("CONVO_FEEDBACK__ADAPTERS_DIR", str(adapters))

    png = tmp_path / "plots" / "acc.png"
    assert cli(["feedback", "stats", "--persona", "jordan", "--json", "--plot", str(png)]) == 0
    stats = json.loads(capsys.readouterr().out)
    rows = by_version(stats)
    assert [k[1] for k in rows] == [None, "v1", "v2", "v3"]
    assert rows[("jordan", "v3")]["shown"] == 0 and rows[("jordan", "v1")]["rate"] == 0.5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(png.parent.glob(".*"))

    assert cli(["feedback", "stats", "--persona", "jordan", "--small-edit-ratio", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "per adapter version" in out and "mean edit similarity" in out
    line = {ln.split()[1]: ln for ln in out.splitlines() if ln.strip().startswith("│ v")}
    assert "75.0%" in line["v1"] and "0.75" in line["v1"]  # 3 of 4 accepted at 0.2; (1 + 0.27 + 0.98) / 3
    assert "66.7%" in line["v2"] and "0.67" in line["v2"]
    assert line["v3"].split("│")[2].strip() == "0" and "-" in line["v3"]
    assert cli(["feedback", "stats", "--small-edit-ratio", "1.5"]) == 2
