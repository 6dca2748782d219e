"""`convo eval` end to end on a tiny base with a LoRA adapter, and the optional api method on a local stand-in."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from convo.cli import run
from errors import EvalError
from tests.conftest import FIXTURES
from training.evaluate import api

DATA = FIXTURES / "eval" / "data"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run several times faster on one thread than contending for a busy machine's cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    """A LoRA adapter on the tiny base with perturbed weights (so it changes the model), plus a train log."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from inference.adapter_meta import AdapterMeta, Speaker, base_model_ref, write_adapter_meta
    from inference.prompt_format import FORMAT_VERSION

    out = tmp_path_factory.mktemp("adapter") / "alice"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    write_adapter_meta(out, AdapterMeta(
        persona=Speaker(name="Alice", speaker_id="alice", tag="ALICE"),
        me=Speaker(name="Bob", speaker_id="bob", tag="BOB"),
        base_model=base_model_ref(tiny_base),
        format_version=FORMAT_VERSION,
    ))
    log = [{"step": s, "loss": 3.0 - 0.2 * s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 2.5}]
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return out


@pytest.fixture(scope="module")
def engine(adapter):
    from inference.engine import Engine

    return Engine.load(adapter=adapter)


def test_context_tokens_carry_no_loss(engine):
    """Adding context changes the NLL of the completion but never the number of tokens it is counted over."""
    prompt, completion = "[BOB] coffee tomorrow?\n[ALICE]", " yes please\n[BOB]"
    context = "[BOB] did you see the game?\n[ALICE] no I missed it\n[END]\n"
    (alone, n_alone), (with_ctx, n_ctx) = engine.completion_nll([(prompt, completion), (context + prompt, completion)])
    assert n_alone == n_ctx == len(engine.tokenizer(completion, add_special_tokens=False)["input_ids"])
    assert alone != with_ctx


def test_eval_cli_all_methods(adapter, tmp_path, capsys):
    out = tmp_path / "ev"
    code = run([
        "eval", "--adapter", str(adapter), "--data", str(DATA), "--out", str(out), "--max-prompts", "3",
        "--n", "2", "--max-new-tokens", "8", "--context-budget", "40",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "adapter+retrieval" in captured.out and "report.html" in captured.out
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["methods"]) == ["base", "incontext", "retrieval", "adapter", "adapter+retrieval"]
    assert m["prompts"] == 3
    r = m["methods"]
    for res in r.values():
        assert res["tokens"] > 0 and math.isfinite(res["nll_per_token"])
        assert 0 <= res["style"]["combined"] <= 1
        assert res["context_tokens_max"] <= 40
    # same completions scored for every method; the adapter changes the likelihood
    assert len({res["tokens"] for res in r.values()}) == 1
    assert r["adapter"]["nll_per_token"] != pytest.approx(r["base"]["nll_per_token"])
    # context-adding methods fill the same budget (within one line); context-free ones have none
    assert r["base"]["context_tokens_mean"] == r["adapter"]["context_tokens_mean"] == 0
    for name in ("incontext", "retrieval", "adapter+retrieval"):
        assert 25 <= r[name]["context_tokens_mean"] <= 40
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 3 and all(len(g["replies"]["adapter"]) == 2 for g in gens)
    assert (out / "report.html").read_text().count('class="cmp"') == 3


def test_eval_dense_retriever_and_pinned_methods(adapter, tmp_path, capsys):
    """--retriever dense switches `retrieval`; retrieval-bm25 / -dense pin one; intervals and semantic are written."""
    out = tmp_path / "dense"
    code = run([
        "eval", "--adapter", str(adapter), "--data", str(DATA), "--out", str(out), "--max-prompts", "3",
        "--n", "1", "--max-new-tokens", "6", "--context-budget", "40", "--retriever", "dense",
        "--methods", "retrieval,retrieval-bm25,retrieval-dense,adapter+retrieval-dense",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    m = json.loads((out / "metrics.json").read_text())
    r = m["methods"]
    assert r["retrieval"]["context"] == r["retrieval-dense"]["context"] == "retrieval-dense"
    assert r["retrieval-bm25"]["context"] == "retrieval-bm25"
    assert r["adapter+retrieval-dense"]["context"] == "retrieval-dense"
    assert r["retrieval"]["nll_per_token"] == pytest.approx(r["retrieval-dense"]["nll_per_token"])
    assert m["config"]["retriever"] == "dense"
    for res in r.values():
        assert -1 <= res["semantic"] <= 1
        lo, hi = res["intervals"]["nll_per_token"]
        assert lo <= res["nll_per_token"] <= hi
    assert "style_reference" in m["real"] and all("style_calibrated" in res for res in r.values())
    assert run(["eval", "--adapter", str(adapter), "--data", str(DATA), "--retriever", "tfidf"]) == 2
    assert "bm25 or dense" in capsys.readouterr().err


def test_eval_errors_are_one_line(adapter, tmp_path, capsys):
    assert run(["eval", "--data", str(DATA), "--methods", "base,adapter", "--base", "x"]) == 2
    assert "--adapter" in capsys.readouterr().err
    assert run(["eval", "--adapter", str(adapter), "--data", str(DATA), "--methods", "base,nope"]) == 2
    assert "unknown method nope" in capsys.readouterr().err
    assert run(["eval", "--adapter", str(adapter), "--data", str(DATA), "--methods", "api"]) == 2
    assert "--api-base" in capsys.readouterr().err
    assert run(["eval", "--adapter", str(adapter), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "meta.json" in err and "Traceback" not in err


class _StandIn(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that answers as ALICE and records what it was sent."""

    requests: list = []
    answer = "[ALICE] omg yes\n[ALICE] pizza again 🍕\n[BOB] cool"

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, self.headers.get("Authorization"), body))
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": self.answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    _StandIn.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_api_method_against_local_stand_in(adapter, stand_in, tmp_path, monkeypatch):
    from training.evaluate.run import EvalConfig, run_eval

    monkeypatch.setenv("TEST_CONVO_KEY", "sk-test")
    cfg = EvalConfig(
        data_dir=DATA, out_dir=tmp_path, adapter_dir=adapter, methods=("incontext", "api"), context_budget_tokens=40,
        samples_per_prompt=2, max_prompts=2, max_new_tokens=8, api_base=stand_in, api_model="m1",
        api_key_env="TEST_CONVO_KEY",
    )
    result = run_eval(cfg)
    res = result.metrics["methods"]["api"]
    assert res["nll_per_token"] is None  # text metrics only
    assert res["context_tokens_mean"] == result.metrics["methods"]["incontext"]["context_tokens_mean"]
    assert result.comparisons[0]["replies"]["api"][0] == ["omg yes", "pizza again 🍕"]
    assert len(_StandIn.requests) == 4  # 2 prompts x n=2
    path, auth, body = _StandIn.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "m1"
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    assert "[END]" in system and "[ALICE]" in system  # the same in-context sessions as `incontext`
    assert user.rstrip().endswith("Write [ALICE]'s next message(s).")
    with pytest.raises(EvalError, match="HTTP 500"):
        api.ApiClient(stand_in, "broken").chat([], temperature=1, top_p=1, max_tokens=4, seed=0)


def test_api_reply_parsing():
    assert api.parse_reply("sure thing\n[ALICE] ok\n\n[BOB] hi\n[ALICE] no", "ALICE") == ["sure thing", "ok"]
    assert api.parse_reply("", "ALICE") == []


def test_eval_adapter_rerank_method_and_candidate_columns(adapter, tmp_path, capsys):
    """adapter+rerank draws --rerank-k samples and scores them; every method reports assistant voice and raw flaws."""
    out = tmp_path / "rr"
    code = run(["eval", "--adapter", str(adapter), "--data", str(DATA), "--out", str(out), "--max-prompts", "2",
                "--n", "2", "--max-new-tokens", "8", "--methods", "adapter,adapter+rerank", "--rerank-k", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "adapter+rerank" in captured.out and "asst" in captured.out
    r = json.loads((out / "metrics.json").read_text())["methods"]
    assert r["adapter+rerank"]["candidates"]["samples_per_prompt"] >= 4
    assert r["adapter+rerank"]["candidates"]["scored_per_prompt"] >= 2
    assert r["adapter"]["candidates"]["scored_per_prompt"] == 0
    for res in r.values():
        assert set(res["candidates"]["raw_flaws"]) == {"empty", "tag", "repeat", "loop", "assistant"}
        assert "assistant" in res["degeneration"] and res["degeneration"]["empty"] == 0.0
    # same likelihood (rerank changes sampling only)
    assert r["adapter"]["nll_per_token"] == pytest.approx(r["adapter+rerank"]["nll_per_token"])
    assert run(["eval", "--adapter", str(adapter), "--data", str(DATA), "--methods", "adapter+rerank",
                "--rerank-k", "0"]) == 2
    assert "--rerank-k" in capsys.readouterr().err


def test_report_plots_the_sft_runs_loss_for_a_refined_adapter(tmp_path):
    """`convo train`'s preference step moves the SFT run (and its train_log.jsonl) into <adapter>/sft/."""
    from training.evaluate.run import training_log

    refined = tmp_path / "v1"
    (refined / "sft").mkdir(parents=True)
    assert training_log(refined) == refined / "train_log.jsonl"  # neither: the old path (the report says no log)
    (refined / "sft" / "train_log.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    assert training_log(refined) == refined / "sft" / "train_log.jsonl"
    (refined / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert training_log(refined) == refined / "train_log.jsonl"  # an adapter's own log comes first
