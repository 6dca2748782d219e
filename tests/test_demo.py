"""`make demo`'s service stages on the tiny base: Redis choice, worker, scripted conversation, feedback store, gate."""

from __future__ import annotations

import importlib.util
import io
import shutil
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from bench.demo_redis import (
    EMBEDDED_WARNING,
    choose_redis,
    demo_redis,
    embedded_server,
    redis_answers,
    redis_server,
)
from tests.conftest import torch_threads

UNREACHABLE = "redis://127.0.0.1:1/0"
# The tiny base at lr 1e-2 is a pipeline check, not a model: the cosine schedule these stages were written for keeps
# the retrained v2 close enough to v1 that it still produces text (with a constant rate it can emit only empty text,
# which the worker reports as an error: issue 16's empty-candidate problem, handled in the candidate step).
TRAIN = dict(batch_size=8, grad_accum=1, learning_rate=1e-2, lora_r=8, lora_alpha=16, sample_prompts=0,
             warmup_ratio=0.0, early_stopping_patience=10, eval_steps=8, lr_scheduler="cosine")


# ---------------------------------------------------------------- the Redis fallback order


@pytest.mark.parametrize(
    ("local", "binary", "expected"),
    [(True, "/usr/bin/redis-server", "local"), (True, None, "local"), (False, "/usr/bin/redis-server", "redis-server"),
     (False, None, "embedded")],
)
def test_fallback_order(local, binary, expected):
    asked = []

    def answers(url):
        asked.append(url)
        return local

    assert choose_redis("redis://here:6379/0", answers=answers, which=lambda name: binary) == expected
    assert asked == ["redis://here:6379/0"]  # the local Redis is always asked first


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_server_runs_in_a_temp_dir_and_stops(tmp_path):
    with redis_server(tmp_path) as url:
        assert redis_answers(url)
        assert url != "redis://127.0.0.1:6379/0"
    assert not redis_answers(url, timeout_s=0.3)
    assert (tmp_path / "redis" / "redis.log").is_file()


def test_embedded_server_speaks_redis_with_lua_and_stops():
    import redis

    with embedded_server() as url:
        client = redis.Redis.from_url(url)
        script = client.register_script("return redis.call('SET', KEYS[1], ARGV[1], 'NX') and 1 or 0")
        assert script(keys=["k"], args=["v"]) == 1 and script(keys=["k"], args=["w"]) == 0  # the worker's reply script
        assert client.get("k") == b"v"
        client.close()
    assert not redis_answers(url, timeout_s=0.3)


def test_demo_redis_falls_back_and_warns_when_nothing_answers(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.demo_redis.shutil.which", lambda name: None)
    with demo_redis(UNREACHABLE, tmp_path) as r:
        assert r.kind == "embedded" and r.warning == EMBEDDED_WARNING
        assert redis_answers(r.url)
    assert not redis_answers(r.url, timeout_s=0.3)


# ---------------------------------------------------------------- the service stages

# The worker (inference/worker.py) and the learning loop (training/retrain.py) land on main from their own branches.
needs_services = pytest.mark.skipif(
    importlib.util.find_spec("inference.worker") is None or importlib.util.find_spec("training.retrain") is None,
    reason="the worker or learning-loop branch has not landed yet",
)


@pytest.fixture(scope="module")
def adapters_v1(tiny_base, tmp_path_factory):
    """A dataset (ALICE answers RIYA) and Alice's adapter trained for 8 steps as adapters/alice/v1, current -> v1."""
    from config.settings import TrainSettings
    from inference.versions import set_current
    from tests.fixtures.train.make_dataset import write_dataset
    from training.train import TrainOptions, train

    root = tmp_path_factory.mktemp("demo")
    data = write_dataset(root / "dataset", n_train=48, n_val=8)
    quiet = Console(file=io.StringIO())
    with torch_threads(1):
        train(TrainOptions.from_settings(TrainSettings(**TRAIN, max_steps=8), data_dir=data, base=str(tiny_base),
                                         out_dir=root / "adapters" / "alice" / "v1", logging_steps=4), console=quiet)
    set_current(root / "adapters" / "alice", "v1")
    return root


def _settings(root, url, **feedback):
    from bench.demo_services import demo_settings
    from config.settings import Settings

    return demo_settings(Settings(), out_dir=root, redis_url=url, prefix=f"demo-test-{uuid.uuid4().hex[:6]}",
                         base="unused", **feedback)


@needs_services
@pytest.mark.redis
@pytest.mark.slow
def test_service_stages_worker_conversation_store_and_gate(redis_url, tiny_base, adapters_v1, tmp_path):
    import redis
    import torch

    from bench.demo_services import (
        cleanup_prefix,
        retrain_once,
        running_worker,
        scripted_conversation,
        store_feedback,
        wait_until,
    )
    from inference.protocol import Keys
    from inference.versions import current_version

    root = adapters_v1
    out = io.StringIO()
    console = Console(file=out, width=120)
    with demo_redis(redis_url, tmp_path) as r:  # the test Redis answers: the demo must take it, not start one
        assert r.kind == "local" and r.url == redis_url and r.warning is None
        settings = _settings(root, r.url, retrain_max_steps=8, heldout_fraction=0.3)
        keys = Keys(settings.redis.prefix)
        torch.manual_seed(2)  # the worker samples from the global generator: one reply order, one outcome (seed
        # picked for the decode loop's sampler: with 0 the tiny model writes one empty reply, and the script counts 4)
        with torch_threads(1), running_worker(settings, str(tiny_base)) as worker:
            conv = scripted_conversation(settings, "alice", console)
            # friend mode: 2 replies; self mode: 2 sets of 3 drafts; each one served by v1 through the worker
            assert conv.replies == 4 and conv.versions == {"v1"}
            assert conv.events == {"shown": 8, "liked": 2, "disliked": 2, "sent": 1, "edited": 1}
            assert "sam>" in out.getvalue() and "draft 1" in out.getvalue()

            stored, store = store_feedback(settings)
            try:
                assert stored.stored == conv.total_events and stored.dead == 0
                kinds = sorted(s.event.kind for s in store.iter_events(persona="alice"))
                assert kinds.count("edited") == 1 and kinds.count("sent") == 1 and len(kinds) == 14
                edited = next(s.event for s in store.iter_events(persona="alice") if s.event.kind == "edited")
                assert edited.final_text == "yeah after 6, where do you want to go?" and edited.context
                again, _ = store_feedback(settings)  # drained: a second pass finds nothing new
                assert again.read == 0

                outcome = retrain_once(settings, "alice", store, data_dir=root / "dataset", base=str(tiny_base),
                                       console=console, train_overrides=dict(TRAIN, eval_steps=8))
            finally:
                store.close()
            pdir = root / "adapters" / "alice"
            assert outcome.parent == "v1" and outcome.candidate == "v2" and (pdir / "v2").is_dir()
            assert outcome.status in ("promoted", "rejected") and outcome.reason
            assert outcome.gate["current"]["val_nll"] > 0 and outcome.gate["candidate"]["val_nll"] > 0
            assert current_version(pdir) == ("v2" if outcome.status == "promoted" else "v1")
            if outcome.status == "promoted":  # the reload reached the running worker: v2 answers now
                wait_until(lambda: worker.serving("alice") == "v2", 20, "the worker to load v2")
                after = scripted_conversation(settings, "alice", console,
                                              scripts=(("friend", ("so what now?", "/quit")),))
                assert after.versions == {"v2"}
        client = redis.Redis.from_url(r.url)
        assert client.exists(keys.feedback)
        assert not client.exists(keys.heartbeat(worker.worker.name))  # the worker stopped and said so
        assert cleanup_prefix(settings) > 0
        assert not list(client.scan_iter(match=f"{settings.redis.prefix}:*"))
        client.close()


@needs_services
@pytest.mark.slow
def test_worker_and_conversation_on_the_embedded_redis(tiny_base, adapters_v1, tmp_path, monkeypatch):
    from bench.demo_services import running_worker, scripted_conversation

    monkeypatch.setattr("bench.demo_redis.shutil.which", lambda name: None)
    with demo_redis(UNREACHABLE, tmp_path) as r:
        assert r.kind == "embedded"
        settings = _settings(adapters_v1, r.url)
        with torch_threads(1), running_worker(settings, str(tiny_base)):
            conv = scripted_conversation(settings, "alice", Console(file=io.StringIO()),
                                         scripts=(("friend", ("hey you coming?", "/good", "/quit")),))
        assert conv.replies == 1 and conv.events == {"shown": 1, "liked": 1}


@needs_services
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_ctrl_c_stops_the_worker_and_the_redis_server_it_started(tiny_base, adapters_v1, tmp_path):
    from bench.demo_services import running_worker

    with pytest.raises(KeyboardInterrupt):
        with demo_redis(UNREACHABLE, tmp_path, kind="redis-server") as r:
            settings = _settings(adapters_v1, r.url)
            with torch_threads(1), running_worker(settings, str(tiny_base)) as handle:
                assert handle.heartbeat_seen()
                raise KeyboardInterrupt
    assert handle._thread is None and handle.worker.stopping.is_set()  # stopped and joined
    assert not redis_answers(r.url, timeout_s=0.3)  # the server it started is gone


# ---------------------------------------------------------------- bench/demo.py itself


def test_demo_stops_with_one_line_when_an_earlier_run_is_missing(tmp_path, capsys):
    from bench.demo import main

    code = main(["--services-only", "--out", str(tmp_path / "nothing"), "--base", "tiny"])
    out = capsys.readouterr().out
    assert code == 1
    assert "demo failed: --services-only needs an earlier full run" in " ".join(out.split())
    assert "Traceback" not in out


def test_validation_is_trimmed_evenly_and_stays_a_valid_dataset(tmp_path):
    import json

    from bench.demo import trim_validation
    from tests.fixtures.train.make_dataset import write_dataset
    from training.train import read_dataset

    data = write_dataset(tmp_path / "d", n_train=8, n_val=20)
    before = (data / "val.jsonl").read_text().splitlines()
    assert trim_validation(data, 5) == (5, 20)
    after = (data / "val.jsonl").read_text().splitlines()
    assert after == [before[i] for i in (0, 4, 8, 12, 16)]
    assert json.loads((data / "meta.json").read_text())["counts"]["val"] == 5
    assert len(read_dataset(data).val) == 5
    assert trim_validation(data, 50) is None and trim_validation(data, 0) is None  # nothing to cut


@pytest.mark.slow
def test_candidates_stage_shows_clean_distinct_candidates_with_and_without_rerank(adapters_v1, tmp_path, monkeypatch):
    """Stage 7: the adapter's candidates after the candidate step, rerank off and K=6, beside the real reply."""
    import json
    import re

    from bench import demo

    monkeypatch.setattr(demo, "console", Console(file=io.StringIO(), width=200))
    out = tmp_path / "candidates.json"
    with torch_threads(1):
        result = demo.show_candidates(adapters_v1 / "adapters" / "alice" / "v1", adapters_v1 / "dataset", out,
                                      demo.PRESETS["tiny"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert len(result["prompts"]) == demo.CANDIDATE_PROMPTS
    for shown in result["prompts"]:
        assert shown["real"] and all(m for m in shown["real"])
        for label in ("rerank off", f"rerank K={demo.RERANK_K}"):
            cands = shown[label]
            assert len({json.dumps(c) for c in cands}) == len(cands)  # distinct
            assert all(c and all(m.strip() and not re.search(r"\[[A-Z0-9_]+\]", m) for m in c) for c in cands)
    summary = result["summary"]
    assert summary["rerank off"]["scored"] == 0
    # K=6 drew at least 6 raw samples per prompt and scored the usable ones against the base.
    assert summary[f"rerank K={demo.RERANK_K}"]["raw_samples"] >= demo.RERANK_K * demo.CANDIDATE_PROMPTS
    assert summary[f"rerank K={demo.RERANK_K}"]["scored"] > 0
    printed = demo.console.file.getvalue()
    assert "ALICE really wrote" in printed and "unusable" in printed


# ---------------------------------------------------------------- the panel's marker table and verdict


def _eval_dir(tmp_path, methods: dict, rows: list[dict]):
    import json

    d = tmp_path / "eval"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"prompts": len(rows), "methods": methods, "real": {}}))
    (d / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_marker_table_is_computed_from_the_generations_when_eval_has_no_column(tmp_path):
    from bench.demo_style import marker_table, style_figures, verdict
    from training.evaluate.markers import marker_error, marker_rates
    from training.evaluate.planted import get_style

    lowkey = get_style("lowkey")
    natural = [["Hello, how are you doing today?"], ["I don't know. Maybe later!"], ["You're right, it was fun."]]
    rows = [{"real": lowkey.rewrite(n), "replies": {"incontext": [n, n], "adapter": [lowkey.rewrite(n, seed=1)]}}
            for n in natural]
    d = _eval_dir(tmp_path, {"incontext": {"nll_per_token": 2.8}, "adapter": {"nll_per_token": 2.7}}, rows)
    fig = style_figures(d)
    assert fig.source == "computed from generations.jsonl" and fig.attribution is None
    assert fig.methods == ["incontext", "adapter"]
    real = marker_rates(r["real"] for r in rows)
    assert fig.real == real and real["lowercase"] == 1.0 and real["final_punct"] == 0.0
    assert fig.error["incontext"] == pytest.approx(marker_error(real, marker_rates(n for n in natural)))
    assert fig.error["adapter"] < 0.2 < fig.error["incontext"]
    beats, sentence = verdict(fig)
    # Lower marker error, but no attribution measured: not claimed as a win, and said so with the figures.
    assert not beats and "does NOT beat" in sentence and "attribution missing" in sentence
    assert f"{fig.error['adapter']:.3f} vs in-context {fig.error['incontext']:.3f}" in sentence
    out = io.StringIO()
    Console(file=out, width=160).print(marker_table(fig))
    text = out.getvalue()
    assert "lowercase" in text and "marker error" in text and "the real held-out replies" in text
    assert "attribution" not in text.lower().replace("attribution missing", "")


def test_panel_shows_the_evals_marker_and_attribution_columns_and_a_computed_verdict(tmp_path):
    from types import SimpleNamespace

    from bench import demo
    from bench.demo_style import style_figures, verdict

    rates = {"lowercase": 1.0, "final_punct": 0.0, "apostrophe": 0.0, "short_forms": 1.0, "laugh": 0.35,
             "emoji": 0.0, "burst": 0.7, "short_message": 0.7}

    def method(lower, error, att):
        return {"nll_per_token": 2.7, "style": {"combined": 0.3}, "auc": 0.7, "markers": dict(rates, lowercase=lower),
                "marker_error": error, "attribution": att,
                "intervals": {"marker_error": [error - 0.05, error + 0.05], "attribution": [att - 0.1, att + 0.1]}}

    methods = {"base": method(0.2, 0.40, 0.10), "incontext": method(0.5, 0.30, 0.25), "adapter": method(0.9, 0.12, 0.6)}
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "metrics.json").write_text(__import__("json").dumps({
        "prompts": 8, "methods": methods,
        "real": {"markers": rates, "marker_reference": 0.05},
        "attribution": {"skipped": None, "candidates": ["Jordan", "Sam", "Alex"], "chance": 1 / 3, "real": 0.75,
                        "real_interval": [0.5, 1.0]}}))
    fig = style_figures(out / "eval")
    assert fig.source == "convo eval" and fig.attribution == {"base": 0.10, "incontext": 0.25, "adapter": 0.6}
    beats, sentence = verdict(fig)
    assert beats and sentence.startswith("adapter v1 beats in-context on how Jordan texts")
    assert "0.120 vs in-context 0.300" in sentence and "0.60 vs in-context 0.25" in sentence
    # The same figures with the adapter's attribution below in-context's: the panel must say it did not beat it.
    methods["adapter"]["attribution"] = 0.2
    (out / "eval" / "metrics.json").write_text((out / "eval" / "metrics.json").read_text().replace('"attribution": 0.6',
                                                                                                   '"attribution": 0.2'))
    beats, sentence = verdict(style_figures(out / "eval"))
    assert not beats and "does NOT beat" in sentence and "0.20 vs in-context 0.25 (higher is closer: v1 not better" in sentence

    stages = demo.Stages()
    outcome = SimpleNamespace(gate={"current": {"val_nll": 2.8}, "candidate": {"val_nll": 2.79}}, parent="v1",
                              candidate="v2", status="promoted", reason="promoted: within tolerance", kto=None)
    panel = demo.summary_panel(out, Path("base"), "smollm2", "local", __import__("json").loads(
        (out / "eval" / "metrics.json").read_text()), SimpleNamespace(events={"shown": 8}, replies=4,
                                                                       versions={"v1"}),
        SimpleNamespace(stored=14, duplicates=0, dead=0), outcome, "v2", stages)
    buf = io.StringIO()
    Console(file=buf, width=200).print(panel)
    text = buf.getvalue()
    assert "how Jordan texts: marker rates" in text and "marker error" in text and "attribution" in text
    assert "does NOT beat in-context" in text and "Jordan, Sam, Alex" in text and "NLL/token" in text
