"""bench/quality.py end to end on the tiny base: the demo pair and one chitchat speaker, every method it can run,
resumed from its results file, and the doc rebuilt from that file alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import torch_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.slow


def test_quality_bench_smoke_run_resumes_and_rebuilds_its_doc(tmp_path, tiny_base):
    import quality

    doc, work = tmp_path / "quality.md", tmp_path / "work"
    argv = ["--base", str(tiny_base), "--top", "1", "--max-messages", "2000", "--max-conversations", "12",
            "--max-steps", "4", "--eval-steps", "2", "--patience", "1", "--val-samples", "6", "--max-prompts", "2",
            "--n", "2", "--max-new-tokens", "8", "--bootstrap", "50", "--budget", "64", "--rerank-k", "3",
            "--pref-pairs", "4", "--pref-steps", "2",
            "--work", str(work), "--doc", str(doc)]
    with torch_threads(1):
        assert quality.main(argv) == 0
    results = json.loads((work / "results.json").read_text())
    assert list(results["runs"]) [0] == "demo-jordan" and len(results["runs"]) == 2
    skipped = results["not_run"]
    for run in results["runs"].values():
        assert run["done"] and run["adapter"]["steps"] <= 4 and run["adapter"]["stopped_by"]
        assert set(run["methods"]) == set(quality.METHODS) - set(skipped)
        assert len(run["real"]) == 2
        for rec in run["methods"].values():
            assert len(rec["units"]) == 2 and all(len(u["replies"]) == 2 for u in rec["units"])
    text = doc.read_text()
    assert "python bench/quality.py --base" in text and "Wall time:" in text
    assert "## Findings (computed)" in text and "Recommended default" in text
    assert "**not met**" in text  # 2 prompts, 1 chitchat speaker: the sizes are not met, and it says so
    for method, reason in skipped.items():
        assert f"`{method}`: not run ({reason})" in text
    assert "| incontext |" in text and "Paired differences vs incontext" in text

    # Resume: a method missing from the results is the only thing redone.
    key = "demo-jordan"
    del results["runs"][key]["methods"]["retrieval"]
    results["runs"][key]["done"] = False
    (work / "results.json").write_text(json.dumps(results))
    before = {k: {m: r["seconds"] for m, r in run["methods"].items()} for k, run in results["runs"].items()}
    adapter_mtime = (work / key / "adapter" / "adapter_config.json").stat().st_mtime_ns
    with torch_threads(1):
        assert quality.main(argv) == 0
    again = json.loads((work / "results.json").read_text())
    assert "retrieval" in again["runs"][key]["methods"] and again["runs"][key]["done"]
    assert (work / key / "adapter" / "adapter_config.json").stat().st_mtime_ns == adapter_mtime  # not retrained
    for k, secs in before.items():
        assert {m: again["runs"][k]["methods"][m]["seconds"] for m in secs} == secs  # not re-evaluated

    # The doc can be rebuilt from the results alone, anywhere, also from runs made side by side over other speakers.
    first, second = dict(again), dict(again)
    first["runs"] = {k: r for k, r in again["runs"].items() if k == key}
    second["runs"] = {k: r for k, r in again["runs"].items() if k != key}
    second["command"] += " --no-demo"
    second["args"] = {**again["args"], "max_steps": again["args"]["max_steps"] + 5}  # a longer budget may be merged
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    doc.unlink()
    assert quality.main(["--doc-only", "--results", str(tmp_path / "a.json"), "--results", str(tmp_path / "b.json"),
                         "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "## Findings (computed)" in text and "Wall time of run 2" in text and "--no-demo" in text
    assert all(r["label"] in text for r in again["runs"].values())
    assert "with the same settings except the adapters' training budget: run 1: at most" in text
    assert f"run 2: at most {again['args']['max_steps'] + 5} steps" in text and "Early stopping ended" in text
    second["args"]["lr"] = 1.0  # anything else must match
    (tmp_path / "b.json").write_text(json.dumps(second))
    with pytest.raises(SystemExit, match="lr"):
        quality.main(["--doc-only", "--results", str(tmp_path / "a.json"), "--results", str(tmp_path / "b.json"),
                      "--doc", str(doc)])


def _synthetic_results(semantic_gain: float) -> dict:
    """Two speakers, 12 prompts: `adapter+rerank` is `semantic_gain` closer in meaning than incontext on each."""
    import random

    rng = random.Random(0)
    flags = {"replies": 2, "empty": 0, "repeated": 0, "long": 1, "copied": 0, "assistant": 0}
    runs = {}
    for key in ("demo-jordan", "spk2"):
        real = [[f"real reply {i} {rng.choice(['ok', 'sure', 'lol'])}"] for i in range(12)]
        methods = {}
        for m, gain in (("incontext", 0.0), ("adapter", 0.0), ("adapter+rerank", semantic_gain)):
            units = [{"nll": [10.0 + rng.random(), 5], "semantic": 0.2 + gain + 0.01 * rng.random(),
                      "replies": [[f"reply {i} a"], [f"reply {i} b"]], "flags": dict(flags)} for i in range(12)]
            methods[m] = {"seconds": 1.0, "context_tokens_mean": 0, "units": units}
        runs[key] = {"key": key, "label": key, "done": True, "real": real, "last_messages": ["[SAM] hi"] * 12,
                     "style_reference": {}, "real_flags": dict(flags), "conversations": 1, "messages": 1,
                     "counts": {"train": 1, "val": 1}, "methods": methods}
    args = {"bootstrap": 200, "seed": 0, "max_prompts": 12, "n": 2, "machine": "test", "context": 6, "lora_r": 8,
            "lr": 1e-3, "batch_size": 4, "max_length": 64, "val_samples": 8, "eval_steps": 0, "patience": 2,
            "max_steps": 10, "max_new_tokens": 8, "budget": 64, "rerank_k": 4}
    return {"command": "python bench/quality.py", "args": args, "base": "b", "base_note": "n", "runs": runs,
            "not_run": {"adapter+preference": "reason"}, "wall_s": 60.0}


def test_quality_findings_name_the_method_that_beats_incontext_and_say_so_when_none_does():
    import quality

    found = "\n".join(quality.findings({}, quality.analyse(_synthetic_results(0.1))))
    assert "**Recommended default: `adapter+rerank`**" in found and "better on 2/2 speakers" in found
    found = "\n".join(quality.findings({}, quality.analyse(_synthetic_results(0.0))))
    assert "**No method beats in-context on generated text**" in found
    # Nothing beats anything: all three are unbeaten and the lowest NLL/token picks the default among them.
    assert "(unbeaten: `incontext`, `adapter`, `adapter+rerank`)" in found and "**Recommended default: `" in found
    # A method beaten on generated text is never the default, even with the lowest NLL/token.
    results = _synthetic_results(0.1)
    for run in results["runs"].values():
        for u in run["methods"]["incontext"]["units"]:
            u["nll"] = [0.0, 5]
    found = "\n".join(quality.findings({}, quality.analyse(results)))
    assert "**Recommended default: `adapter+rerank`**" in found and "it beats `incontext`, `adapter`" in found
