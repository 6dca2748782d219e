"""The HTML report: self-contained, and complete once rendered by headless Chromium with its script run."""

import json
import os
import re
import shutil
import subprocess

import pytest

from training.evaluate import metrics as M
from training.evaluate.report import read_train_log, render_report

METHODS = ["base", "adapter"]
REAL = [["omg yes pizza", "pepperoni pls"], ["ugh same <b>boss</b>"]]
REPLIES = {"base": [[["hello there"]], [["what"]]], "adapter": [[["yes pizza!!"]], [["ugh"]]]}


def _report(tmp_path, with_log=True) -> str:
    comparisons = [
        {"index": i, "chat": "alice-bob", "session": f"s{i}", "prompt": f"[BOB] question {i}\n[ALICE]",
         "real": REAL[i], "replies": {m: REPLIES[m][i] for m in METHODS}}
        for i in range(2)
    ]
    results = {}
    for m in METHODS:
        gen = [r for per in REPLIES[m] for r in per]
        results[m] = {
            "context": "none", "context_tokens_mean": 0, "context_tokens_max": 0, "nll_per_token": 2.0,
            "perplexity": 7.39, "tokens": 10, "style": M.style_distance(REAL, gen), "style_summary": M.summary(gen),
            "auc": None, "degeneration": M.degeneration(gen, set()), "seconds": 1.0,
        }
    metrics = {
        "persona": {"tag": "ALICE"}, "prompts": 2, "methods": results,
        "config": {"data_dir": "data", "adapter_dir": "ad", "samples_per_prompt": 1, "context_budget_tokens": 64,
                   "seed": 0},
        "real": {"style_summary": M.summary(REAL), "degeneration": M.degeneration(REAL, set())},
    }
    log = tmp_path / "train_log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5},
        {"step": 2, "train_loss": 2.5, "train_runtime": 3.0},
    ]) + "\nnot json\n")
    return render_report(metrics, comparisons, log if with_log else None)


def test_train_log_series(tmp_path):
    _report(tmp_path)
    assert read_train_log(tmp_path / "train_log.jsonl") == {"train": [(1, 3.0), (2, 2.0)], "validation": [(2, 2.5)]}
    assert read_train_log(tmp_path / "missing.jsonl") == {}


def test_report_is_self_contained_and_escaped(tmp_path):
    page = _report(tmp_path)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert "<link" not in page and "@import" not in page
    assert page.count("<svg") == 3  # lengths, NLL, training loss
    assert "ugh same &lt;b&gt;boss&lt;/b&gt;" in page  # chat text is escaped, never markup
    assert "<svg" in _report(tmp_path, with_log=False) and _report(tmp_path, with_log=False).count("<svg") == 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CONVO_REQUIRE_BROWSER") == "1":
            pytest.fail("CONVO_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    page = tmp_path / "report.html"
    page.write_text(_report(tmp_path), encoding="utf-8")
    profile = tmp_path / "profile"
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        "--virtual-time-budget=5000", "--dump-dom", page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0 and dom, proc.stderr[-2000:]
    assert 'data-ready="1"' in dom  # the inline script ran to its end
    assert '<table id="metrics">' in dom
    for m in METHODS:
        assert f'<tr data-method="{m}">' in dom
        assert f'class="method-filter" value="{m}"' in dom or f'value="{m}" class="method-filter"' in dom
    assert dom.count('class="cmp"') == 2
    assert "omg yes pizza" in dom and "yes pizza!!" in dom  # real reply beside each method's reply
    assert "2 comparisons, 2 of 2 methods shown" in dom
    assert dom.count("<svg") == 3
