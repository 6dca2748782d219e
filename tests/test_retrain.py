"""The gated loop on a tiny base: KTO pass, the gate rejects a worse candidate and promotes a better one,
rollback switches `current` and publishes a reload."""

from __future__ import annotations

import json
import random
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from config.settings import FeedbackSettings, RedisSettings, Settings, TrainSettings
from inference.adapter_meta import read_adapter_meta
from inference.protocol import FeedbackEvent, HistoryMessage, ReloadMessage
from inference.versions import current_version, list_versions, set_current
from tests.conftest import torch_threads
from tests.fixtures.train.make_dataset import OPENERS, REPLIES, write_dataset
from training.feedback.export import SpeakerMap, build_rows
from training.feedback.store import FeedbackStore
from training.retrain import decide, kto_weights, retrain, run_kto
from training.train import TrainOptions, train

pytestmark = pytest.mark.slow
TRAIN = dict(batch_size=8, grad_accum=1, learning_rate=1e-2, lora_r=8, lora_alpha=16, sample_prompts=0,
             warmup_ratio=0.0, early_stopping_patience=10, logging_steps=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "alice", n_train=48, n_val=12)


@pytest.fixture(scope="module")
def v1(tmp_path_factory, data, tiny_base) -> Path:
    """A short `convo train` run: the version retrains continue from (copied per test)."""
    out = tmp_path_factory.mktemp("v1") / "v1"
    train(TrainOptions.from_settings(TrainSettings(**TRAIN, max_steps=30, eval_steps=30), data_dir=data,
                                     base=str(tiny_base), out_dir=out))
    shutil.rmtree(out / "checkpoints")
    return out


@pytest.fixture
def adapters(tmp_path, v1) -> Path:
    root = tmp_path / "adapters"
    shutil.copytree(v1, root / "alice" / "v1")
    set_current(root / "alice", "v1")
    return root


def feedback_events(n: int = 40, seed: int = 0) -> list[FeedbackEvent]:
    """Alice-like drafts sent or liked, junk drafts disliked."""
    rng = random.Random(seed)
    out = []
    t = datetime(2026, 11, 2, tzinfo=UTC)
    for i in range(n):
        kind = ("sent", "liked", "disliked", "disliked")[i % 4]
        cand = ["zq xv kk zz"] if kind == "disliked" else rng.choice(REPLIES)
        out.append(FeedbackEvent(kind=kind, draft_id=f"draft{i}", persona="alice", mode="friend",
                                 context=[HistoryMessage(speaker="Riya", text=rng.choice(OPENERS))],
                                 candidate=list(cand), final_text=" ".join(cand) if kind == "sent" else None,
                                 ts=t + timedelta(minutes=i)))
    return out


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(f"sqlite:///{tmp_path}/feedback.db")
    s.create()
    for e in feedback_events():
        s.add(e)
    yield s
    s.close()


def settings_for(adapters: Path, redis_url: str = "redis://127.0.0.1:1/0", prefix: str = "convo", **fb) -> Settings:
    feedback = dict(adapters_dir=str(adapters), tolerance=0.02, heldout_fraction=0.3, min_kto_labels=1000,
                    retrain_max_steps=20)
    feedback.update(fb)
    return Settings(train=TrainSettings(**TRAIN, eval_steps=30),
                    feedback=FeedbackSettings(**feedback), redis=RedisSettings(url=redis_url, prefix=prefix))


def shuffled_copy(data: Path, dest: Path) -> Path:
    """The dataset with its training targets shuffled across prompts (validation untouched)."""
    shutil.copytree(data, dest)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    junk = ["zq xv kk zz", "pp qq ww", "xx yy"]
    rng = random.Random(1)
    comps = [r["completion"] for r in rows]
    rng.shuffle(comps)
    with (dest / "train.jsonl").open("w") as f:
        for r, c in zip(rows, comps, strict=True):
            # shuffled targets, and junk words in them so the candidate learns something measurably worse
            f.write(json.dumps({**r, "completion": f" {rng.choice(junk)}" + c[c.index("\n"):]}) + "\n")
    return dest


def test_kto_pass_runs_on_the_tiny_model_and_changes_only_the_adapter(v1, tmp_path, tiny_base):
    from safetensors.torch import load_file

    adapter = tmp_path / "cand"
    shutil.copytree(v1, adapter)
    before = load_file(adapter / "adapter_model.safetensors")
    rows = build_rows(feedback_events(24), SpeakerMap.from_meta(read_adapter_meta(v1))).kto
    assert {r["label"] for r in rows} == {True, False}
    settings = Settings(train=TrainSettings(seed=0), feedback=FeedbackSettings(kto_max_steps=3, kto_batch_size=4,
                                                                               kto_learning_rate=1e-3))
    metrics = run_kto(str(tiny_base), adapter, rows, settings, tmp_path / "kto", console=None or _quiet())
    assert metrics["steps"] == 3 and metrics["labels"] == 24
    assert metrics["desirable"] == 12 and metrics["undesirable_weight"] == 1.0 and metrics["desirable_weight"] == 1.0
    after = load_file(adapter / "adapter_model.safetensors")
    assert before.keys() == after.keys()  # the "default" adapter only; TRL's frozen "ref" copy is not saved
    assert any(not (before[k] == after[k]).all() for k in before)
    assert not (adapter / "ref").exists()


def test_kto_class_weights_balance_the_labels():
    assert kto_weights(30, 10) == (pytest.approx(1 / 3), 1.0)
    assert kto_weights(10, 40) == (1.0, 0.25)
    dw, uw = kto_weights(7, 3)
    assert 1 <= dw * 7 / (uw * 3) <= 4 / 3  # TRL's recommended range


def test_gate_decisions():
    cur = {"val_nll": 1.0, "margin": 0.5}
    assert decide(cur, {"val_nll": 1.01, "margin": 0.6}, 0.02)[0]
    ok, why = decide(cur, {"val_nll": 1.05, "margin": 0.6}, 0.02)
    assert not ok and "validation NLL 1.0000 -> 1.0500" in why
    ok, why = decide(cur, {"val_nll": 0.9, "margin": 0.4}, 0.02)
    assert not ok and "margin 0.5000 -> 0.4000 dropped" in why
    ok, why = decide({"val_nll": 1.0}, {"val_nll": 0.9}, 0.0)
    assert ok and "margin not checked" in why


def _quiet():
    from rich.console import Console

    return Console(file=open("/dev/null", "w"))  # noqa: SIM115


@pytest.mark.redis
def test_gate_rejects_a_worse_candidate_promotes_a_better_one_and_rollback_reloads(
    adapters, store, data, tmp_path, redis_url, cli, monkeypatch
):
    prefix = f"looptest{uuid.uuid4().hex[:8]}"
    settings = settings_for(adapters, redis_url, prefix, min_kto_labels=8, kto_max_steps=2, kto_batch_size=4,
                            kto_learning_rate=1e-4)
    pdir = adapters / "alice"
    sub = redis.Redis.from_url(redis_url).pubsub()
    sub.subscribe(f"{prefix}:reload")
    assert sub.get_message(timeout=5)["type"] == "subscribe"

    # A candidate trained on shuffled targets: rejected, v1 keeps serving, the reason is printed and stored.
    worse = retrain(settings, "alice", store, data_dir=shuffled_copy(data, tmp_path / "shuffled"), console=_quiet())
    assert worse.status == "rejected" and "validation NLL" in worse.reason, worse.reason
    assert worse.gate["candidate"]["val_nll"] > worse.gate["current"]["val_nll"] + 0.02
    assert current_version(pdir) == "v1" and list_versions(pdir) == ["v1", "v2"]
    assert (read_adapter_meta(pdir / "v2").model_extra["loop"]["status"]) == "rejected"
    assert sub.get_message(timeout=0.2) is None  # nothing published for a rejected candidate

    # A candidate that continues on the real data (plus the sent drafts, then KTO): promoted, reload published.
    better = retrain(settings, "alice", store, data_dir=data, console=_quiet())
    assert better.status == "promoted", better.reason
    assert better.gate["candidate"]["val_nll"] < better.gate["current"]["val_nll"]
    assert better.kto is not None and better.kto["steps"] == 2
    assert "margin" in better.gate["candidate"] and better.gate["candidate"]["margin"] >= better.gate["current"]["margin"]
    assert current_version(pdir) == "v3" and better.reload_receivers == 1
    msg = sub.get_message(timeout=5)
    assert ReloadMessage.loads(msg["data"]) == ReloadMessage(persona="alice", version="v3")
    meta = read_adapter_meta(pdir / "v3").model_extra
    assert meta["parent"] == "v1" and meta["loop"]["data_hashes"]["feedback_sft_sha256"]
    assert meta["loop"]["counts"]["train"]["sft"] > 0  # sent drafts went into training
    assert read_adapter_meta(pdir / "v3").training_args["data_dir"] == str(data)  # the next retrain starts there
    assert [(r.status, r.candidate_version) for r in store.list_runs("alice")] == [("rejected", "v2"), ("promoted", "v3")]
    assert not [p for p in pdir.iterdir() if p.name.startswith(".work")]

    # Rollback from the CLI: back to v3's parent, atomically, and workers are told.
    monkeypatch.setenv("CONVO_FEEDBACK__ADAPTERS_DIR", str(adapters))
    monkeypatch.setenv("CONVO_REDIS__URL", redis_url)
    monkeypatch.setenv("CONVO_REDIS__PREFIX", prefix)
    assert cli(["adapters", "rollback", "alice"]) == 0
    assert current_version(pdir) == "v1"
    assert ReloadMessage.loads(sub.get_message(timeout=5)["data"]) == ReloadMessage(persona="alice", version="v1")
    assert cli(["adapters", "promote", "alice", "2"]) == 0  # a rejected version can still be promoted by hand
    assert current_version(pdir) == "v2"
    assert ReloadMessage.loads(sub.get_message(timeout=5)["data"]).version == "v2"
    assert cli(["adapters", "promote", "alice", "v9"]) == 2
    assert current_version(pdir) == "v2"
    sub.close()


def test_a_failed_retrain_leaves_current_serving_and_is_recorded(adapters, store, tmp_path):
    settings = settings_for(adapters)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="meta.json|not there"):
        retrain(settings, "alice", store, data_dir=tmp_path / "empty", console=_quiet())
    assert current_version(adapters / "alice") == "v1" and list_versions(adapters / "alice") == ["v1"]
    runs = store.list_runs("alice")
    assert [r.status for r in runs] == ["failed"] and "meta.json" in runs[0].reason or "not there" in runs[0].reason


def test_retrain_command_exits_0_and_prints_the_reason_when_the_candidate_is_rejected(
    adapters, store, data, tmp_path, cli, capsys, monkeypatch
):
    for name, value in {"ADAPTERS_DIR": str(adapters), "DB_URL": store.db_url, "HELDOUT_FRACTION": "0.3",
                        "MIN_KTO_LABELS": "1000"}.items():
        monkeypatch.setenv(f"CONVO_FEEDBACK__{name}", value)
    monkeypatch.setenv("CONVO_REDIS__URL", "redis://127.0.0.1:1/0")  # nobody listening: nothing to publish anyway
    for name, value in {**TRAIN, "eval_steps": 20}.items():
        monkeypatch.setenv(f"CONVO_TRAIN__{name.upper()}", str(value))
    shuffled = shuffled_copy(data, tmp_path / "shuffled")
    code = cli(["retrain", "--persona", "alice", "--data", str(shuffled), "--max-steps", "20", "--json"])
    assert code == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["status"] == "rejected" and outcome["reason"].startswith("rejected: validation NLL")
    assert current_version(adapters / "alice") == "v1"
    assert store.list_runs("alice")[-1].reason == outcome["reason"]
    assert cli(["retrain", "--persona", "nobody"]) == 2


def test_training_can_start_from_an_existing_adapters_weights(v1, data, tiny_base, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "cont"
    settings = TrainSettings(**{**TRAIN, "learning_rate": 1e-12, "lora_r": 16}, max_steps=1, eval_steps=1)
    train(TrainOptions.from_settings(settings, data_dir=data, base=str(tiny_base), out_dir=out, init_adapter=v1),
          console=_quiet())
    start, cont = load_file(v1 / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert start.keys() == cont.keys()
    # One step at lr 1e-12 leaves v1's weights: training began from them, not from a fresh B = 0 LoRA.
    assert all(torch_allclose(start[k], cont[k]) for k in start)
    assert any(float(abs(t).max()) > 0 for k, t in cont.items() if "lora_B" in k)
    assert read_adapter_meta(out).training_args["lora_r"] == 8  # v1's rank, not TrainSettings' default 16


def torch_allclose(a, b) -> bool:
    import torch

    return torch.allclose(a, b, atol=1e-6)
