"""bench/idiolect.py end to end on the tiny base: one planted style, every method, attribution, the doc."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import torch_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.slow


def test_idiolect_bench_smoke_run_and_doc(tmp_path, tiny_base):
    import idiolect

    doc, work = tmp_path / "quality.md", tmp_path / "work"
    argv = ["--base", str(tiny_base), "--base-label", "tiny", "--styles", "lowkey", "--max-messages", "2000",
            "--max-conversations", "12", "--contacts", "3", "--contact-bursts", "60", "--max-steps", "4",
            "--eval-steps", "2", "--patience", "1", "--val-samples", "6", "--max-prompts", "3", "--n", "1",
            "--max-new-tokens", "6", "--bootstrap", "50", "--budget", "48", "--methods", "incontext,adapter,base",
            "--work", str(work), "--doc", str(doc)]
    with torch_threads(1):
        assert idiolect.main(argv) == 0
    res = json.loads((work / "results.json").read_text())
    (run,) = res["runs"].values()
    assert run["done"] and run["style"] == "lowkey" and run["adapter"]["stopped_by"]
    assert set(run["methods"]) == {"incontext", "adapter", "base"}  # (the preference step: bench/quality.py's)
    assert run["attribution"]["chance"] == pytest.approx(1 / 4)  # the persona and 3 contacts
    assert run["natural_found"] == len(run["real"]) == 3  # every held-out reply traced to its unplanted original
    assert all(r == r.lower() for reply in run["real"] for r in reply)  # planted: lowercase
    for rec in run["methods"].values():
        assert all(u["attribution"] is not None for u in rec["units"])
    text = (work / "quality.md").read_text()
    assert "## Planted texting styles and attribution" in text and "### Base: tiny" in text
    assert "| (real) |" in text and "| (natural) |" in text and "| (chance) |" in text
    assert "Targets:" in text and "What stopped each SFT adapter" in text
    # --doc-only: the natural study's doc with these sections appended, the same through bench/quality.py
    from tests.test_quality_bench import _synthetic_results

    natural = tmp_path / "natural.json"  # a small natural study (the real ones take a minute to analyse)
    natural.write_text(json.dumps(_synthetic_results(0.1)))
    assert idiolect.main(["--doc-only", "--results", str(work / "results.json"), "--natural", str(natural),
                          "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Quality study") and "## Findings (computed)" in text
    assert "## Planted texting styles and attribution" in text
    import quality

    other = tmp_path / "q.md"
    assert quality.main(["--doc-only", "--results", str(natural), "--planted", str(work / "results.json"),
                         "--doc", str(other)]) == 0
    assert other.read_text() == text


def test_base_comparison_is_computed():
    import idiolect

    def results(shift: float) -> dict:
        real = [[f"ok {i}"] for i in range(10)]
        units = lambda hit: [{"replies": [[f"ok {i}"]] if hit else [[f"Fine. {i}"]], "attribution": [int(hit), 1],  # noqa: E731
                              "nll": [5.0, 5], "semantic": 0.5} for i in range(10)]
        methods = {"adapter+preference": {"seconds": 1, "units": units(shift > 0)},
                   "incontext": {"seconds": 1, "units": units(False)}}
        run = {"key": "lowkey-x", "label": "x", "style": "lowkey", "real": real, "methods": methods,
               "real_attribution": [[1, 1]] * 10, "natural_attribution": [[0, 1]] * 10, "natural": None,
               "conversations": 1, "messages": 1, "counts": {}}
        return {"args": {"bootstrap": 100, "seed": 0}, "runs": {"lowkey-x": run}}

    good, bad = idiolect.analyse(results(1)), idiolect.analyse(results(0))
    lines = "\n".join(idiolect.compare_bases([("A", {}, good), ("B", {}, bad)]))
    assert "**Better base on generated text: A**" in lines
    tg = dict((t, ok) for t, ok, _ in idiolect.targets(good, "lowkey-x"))
    assert tg["attribution ≥ 0.8× the real replies'"] and tg["attribution above in-context's, interval excluding 0"]


def test_natural_runs_have_no_marker_targets_and_one_marker_set():
    """`--styles natural` (the speaker unplanted) is studied like a style but carries no marker targets, and every
    row's marker error is computed over the one set of markers defined for all of them."""
    import idiolect

    real = [[f"ok u {i}"] for i in range(6)]
    units = [{"replies": [[f"Fine {i}."]], "attribution": [0, 1], "nll": None, "semantic": None} for i in range(6)]
    run = {"key": "natural-x", "label": "x", "style": "natural", "real": real, "conversations": 1, "messages": 1,
           "counts": {}, "methods": {"adapter+preference": {"seconds": 1, "units": units},
                                     "incontext": {"seconds": 1, "units": units}}}
    a = idiolect.analyse({"args": {"bootstrap": 50, "seed": 0}, "runs": {"natural-x": run}})
    assert idiolect.targets(a, "natural-x") == []
    # the generated replies never use a you-word, so short_forms is undefined for them: left out for every row
    assert "short_forms" not in a["runs"]["natural-x"]["marker_set"]
    assert "lowercase" in a["runs"]["natural-x"]["marker_set"]
    assert idiolect.Unplanted().rewrite(["Hi there.", "Bye"]) == ["Hi there.", "Bye"]
