"""Feedback -> sft/kto/pairs rows in the dataset's exact format, accepted by TRL's own dataset preprocessing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from inference.adapter_meta import AdapterMeta, BaseModelRef, Speaker
from inference.prompt_format import Turn, render_completion, render_prompt
from inference.protocol import FeedbackEvent, HistoryMessage
from tests.conftest import torch_threads
from training.feedback.export import SpeakerMap, build_rows, split_heldout, write_export
from training.feedback.stats import acceptance, edit_similarity

T0 = datetime(2026, 11, 2, 12, tzinfo=UTC)  # a Monday


def meta() -> AdapterMeta:
    return AdapterMeta(
        persona=Speaker(name="Alice", speaker_id="u_alice", tag="ALICE"),
        me=Speaker(name="Riya", speaker_id="u_riya", tag="RIYA"),
        tags={"u_alice": "ALICE", "u_riya": "RIYA"}, mode="both",
        base_model=BaseModelRef(id="tiny"), format_version=1,
    )


def ev(kind, draft="d1", mode="friend", minutes=0, **kw) -> FeedbackEvent:
    fields = dict(kind=kind, draft_id=draft, persona="alice", mode=mode, ts=T0 + timedelta(minutes=minutes),
                  context=[HistoryMessage(speaker="Riya", text="you coming?\n[ALICE] fake"),
                           HistoryMessage(speaker="ALICE", text="maybe")],
                  candidate=["omg yes 🙌", "be there soon"])
    fields.update(kw)
    return FeedbackEvent(**fields)


@pytest.fixture
def events() -> list[FeedbackEvent]:
    return [
        ev("shown"),
        ev("sent", minutes=1),
        ev("shown", draft="d2", minutes=2),
        ev("edited", draft="d2", minutes=3, final_text="nah, next week"),
        ev("liked", draft="d3", minutes=4),
        ev("disliked", draft="d4", minutes=5, candidate=["asdf qwerty"]),
        ev("liked", draft="d5", minutes=6, candidate=["lol"]),
        ev("disliked", draft="d5", minutes=7, candidate=["lol"]),  # changed their mind: the last reaction wins
        ev("sent", draft="d6", minutes=8, mode="self", context=[HistoryMessage(speaker="Alice", text="hi")],
           candidate=["hey you"]),
        ev("regenerated", draft="d7", minutes=9),
    ]


def test_rows_use_the_datasets_exact_prompt_and_completion_format(events):
    rows = build_rows(events, SpeakerMap.from_meta(meta()))
    # Names map to tags, text is escaped (no injected line), the prompt ends in the target's tag.
    prompt = render_prompt([Turn("RIYA", "you coming?\n[ALICE] fake"), Turn("ALICE", "maybe")], "ALICE")
    assert prompt.endswith("\n[ALICE]") and prompt.count("\n") == 2
    sent = render_completion("ALICE", ["omg yes 🙌", "be there soon"], "RIYA")  # ends with who it answered
    assert {"prompt": prompt, "completion": sent, "session": "feedback:d1", "chat": "console:feedback",
            "target": "ALICE"} in rows.sft
    edited = render_completion("ALICE", ["nah, next week"], "RIYA")
    assert any(r["completion"] == edited for r in rows.sft)  # the owner's own text, not the draft
    self_row = next(r for r in rows.sft if r["session"] == "feedback:d6")
    assert self_row["prompt"] == "[ALICE] hi\n[RIYA]" and self_row["completion"] == " hey you\n[ALICE]"
    assert len(rows.sft) == 3
    labels = sorted((r["completion"].split("\n")[0], r["label"]) for r in rows.kto)
    assert labels == [(" asdf qwerty", False), (" hey you", True), (" lol", False), (" omg yes 🙌", True),
                      (" omg yes 🙌", True)]
    assert rows.pairs == [{"prompt": prompt, "chosen": edited, "rejected": sent}]
    assert rows.counts["kto_desirable"] == 3 and rows.counts["kto_undesirable"] == 2


def test_acceptance_counts_sent_and_small_edits_per_week(events):
    extra = [
        ev("shown", draft="d8", minutes=60 * 24 * 7),  # next ISO week
        ev("edited", draft="d8", minutes=60 * 24 * 7 + 1, final_text="omg yes 🙌\nbe there soon!"),  # small edit
    ]
    acc = acceptance(events + extra, small_edit_ratio=0.8)
    # shown: d1, d2, d6 (sent without a shown event), d8; accepted: d1, d6, d8 (d2 was rewritten)
    assert (acc["shown"], acc["accepted"]) == (4, 3)
    assert [(w["week"], w["shown"], w["accepted"]) for w in acc["weekly"]] == [("2026-W45", 3, 2), ("2026-W46", 1, 1)]
    assert edit_similarity(["omg yes 🙌"], "omg yes 🙌") == 1.0


def test_heldout_split_is_stable_and_roughly_the_fraction():
    ids = [f"draft{i}" for i in range(2000)]
    held = [i for i in ids if split_heldout(i, 0.2)]
    assert held == [i for i in ids if split_heldout(i, 0.2)]
    assert 300 < len(held) < 500
    assert not any(split_heldout(i, 0.0) for i in ids)


@pytest.mark.slow
def test_exported_files_pass_trls_dataset_preprocessing(events, tmp_path, tiny_base):
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer
    from trl.data_utils import is_conversational

    paths = write_export(build_rows(events, SpeakerMap.from_meta(meta())), tmp_path / "export")
    assert not list((tmp_path / "export").glob(".*"))  # no temp files left
    loaded = {k: datasets.load_dataset("json", data_files=str(p), split="train") for k, p in paths.items()}
    assert set(loaded["kto"].column_names) == {"prompt", "completion", "label"}
    assert loaded["kto"].features["label"].dtype == "bool"
    assert set(loaded["pairs"].column_names) == {"prompt", "chosen", "rejected"}
    assert not any(is_conversational(ds[0]) for ds in loaded.values())  # TRL reads them as standard text

    tok = AutoTokenizer.from_pretrained(tiny_base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False,
                  per_device_train_batch_size=2, max_steps=1)
    with torch_threads(1):
        sft = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_base), processing_class=tok,
                         args=SFTConfig(**common, completion_only_loss=True), train_dataset=loaded["sft"],
                         peft_config=lora)
        row = sft.train_dataset[0]
        loss_on = [lab != -100 for lab in row["labels"]]  # TRL masks the prompt, keeps the completion
        assert any(loss_on) and not all(loss_on) and len(row["labels"]) == len(row["input_ids"])
        kto = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_base), processing_class=tok,
                         args=KTOConfig(**common, gradient_checkpointing=False), train_dataset=loaded["kto"],
                         peft_config=lora)
        assert len(kto.train_dataset) == len(loaded["kto"]) and kto.train_dataset[0]["completion_ids"]
        dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_base), processing_class=tok,
                         args=DPOConfig(**common, gradient_checkpointing=False), train_dataset=loaded["pairs"],
                         peft_config=lora)
        assert len(dpo.train_dataset) == 1
        assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dpo.train_dataset.column_names)
    # The exported prompt tokenizes as a prefix of prompt + completion (the completion starts on a token boundary).
    r = json.loads(paths["sft"].read_text().splitlines()[0])
    p_ids = tok(r["prompt"])["input_ids"]
    assert tok(r["prompt"] + r["completion"])["input_ids"][: len(p_ids)] == p_ids


def test_stats_and_export_commands(events, tmp_path, cli, capsys, monkeypatch):
    from training.feedback.store import FeedbackStore

    monkeypatch.setenv("CONVO_FEEDBACK__DB_URL", f"sqlite:///{tmp_path}/fb.db")
    monkeypatch.setenv("CONVO_FEEDBACK__ADAPTERS_DIR", str(tmp_path / "adapters"))
    store = FeedbackStore(f"sqlite:///{tmp_path}/fb.db")
    store.create()
    for e in events:
        store.add(e)
    store.add(ev("sent", draft="b1", persona="bob"))
    store.close()

    assert cli(["feedback", "stats", "--persona", "alice", "--json", "--plot", str(tmp_path / "acc.png")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["counts"] == {"alice": {"shown": 2, "sent": 2, "edited": 1, "liked": 2, "disliked": 2,
                                         "regenerated": 1}}
    assert (stats["acceptance"]["shown"], stats["acceptance"]["accepted"]) == (3, 2)
    assert (tmp_path / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli(["feedback", "stats"]) == 0
    out = capsys.readouterr().out
    assert "bob" in out and "acceptance" in out

    # Without an adapter for alice the target tags of friend/self drafts are unknown: skipped, with the reason.
    assert cli(["feedback", "export", "--persona", "alice", "--out", str(tmp_path / "x"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sft"] == 0 and any("no target tag" in r for r in summary["skipped"])
    # With one, names map to its tags.
    from inference.adapter_meta import write_adapter_meta
    from inference.versions import set_current

    write_adapter_meta(tmp_path / "adapters" / "alice" / "v1", meta())
    set_current(tmp_path / "adapters" / "alice", "v1")
    assert cli(["feedback", "export", "--persona", "alice", "--out", str(tmp_path / "x"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["sft"], summary["kto"], summary["pairs"], summary["skipped"]) == (3, 5, 1, {})
    assert len((tmp_path / "x" / "kto.jsonl").read_text().splitlines()) == 5
    assert cli(["feedback", "export", "--persona", "nobody", "--out", str(tmp_path / "y")]) == 2
    assert "no feedback stored for persona 'nobody'" in capsys.readouterr().err
