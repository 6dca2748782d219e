"""The calibrated style distance and the report's intervals (pure functions, no model)."""

from __future__ import annotations

import random

from training.evaluate import metrics as M
from training.evaluate.report import render_report

WORDS = "yeah ok lol sure maybe later cool nice haha idk tonight dinner work tired".split()


def _casual(rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 2))]


def test_another_sample_of_the_same_person_scores_near_zero_and_another_style_does_not():
    rng = random.Random(0)
    pool = [_casual(rng) for _ in range(400)]
    real = [_casual(rng) for _ in range(12)]
    same = [_casual(rng) for _ in range(12)]
    shouting = [["WHAT ARE YOU TALKING ABOUT?!! I CANNOT BELIEVE THIS, SERIOUSLY!!! 😡😡"] for _ in range(12)]
    ref = M.style_reference(real, pool, 12, draws=30)
    assert 0.1 < ref["combined"] < 0.6  # small samples: even the person is far from 0 on the raw scale
    cal_same = M.calibrated_style(M.style_distance(real, same), ref)
    cal_shout = M.calibrated_style(M.style_distance(real, shouting), ref)
    assert cal_same["combined"] < 0.1
    assert cal_shout["combined"] > 0.5
    spread_raw = M.style_distance(real, shouting)["combined"] - M.style_distance(real, same)["combined"]
    assert cal_shout["combined"] - cal_same["combined"] > spread_raw  # calibration widens the usable range


def test_report_shows_intervals_as_text_and_error_bars():
    style = {k: 0.1 for k in (*M.STYLE_COMPONENTS, "combined")}
    method = {
        "context": "none", "context_tokens_mean": 0, "context_tokens_max": 0, "nll_per_token": 2.5, "perplexity": 12.2,
        "tokens": 40, "semantic": 0.4, "style": style, "style_calibrated": style, "auc": 0.7,
        "degeneration": {"empty": 0.0, "repeated": 0.0, "copied": 0.0}, "seconds": 1.0,
        "intervals": {"nll_per_token": [2.25, 2.75], "semantic": [0.3, 0.5], "auc": [0.6, 0.8],
                      "style_calibrated": [0.05, 0.2]},
    }
    metrics = {
        "persona": {"tag": "ALICE"}, "prompts": 2, "methods": {"base": method, "adapter": dict(method, nll_per_token=2.0)},
        "real": {"degeneration": {"empty": 0.0, "repeated": 0.0, "copied": 0.0}, "style_reference": style},
        "config": {"data_dir": "d", "adapter_dir": "a", "samples_per_prompt": 1, "context_budget_tokens": 0, "seed": 0},
    }
    comparisons = [{"index": 0, "chat": "c", "session": "s", "prompt": "[BOB] hi\n[ALICE]", "real": ["hey"],
                    "replies": {"base": [["yo"]], "adapter": [["hey you"]]}}]
    page = render_report(metrics, comparisons)
    assert '<span class="ci">[2.250, 2.750]</span>' in page
    assert page.count("95% bootstrap interval") == 3  # NLL, semantic and AUC plots
    assert "another sample of the person" in page
