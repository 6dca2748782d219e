"""bench/quality.py end to end on the tiny base: dataset, early-stopped adapters (friend and both), every method."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import torch_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.slow


def test_quality_bench_end_to_end_on_the_tiny_base(tmp_path, tiny_base):
    import quality

    doc = tmp_path / "quality.md"
    argv = ["--base", str(tiny_base), "--top", "1", "--max-messages", "2000", "--max-conversations", "12",
            "--max-steps", "4", "--eval-steps", "2", "--patience", "1", "--val-samples", "6", "--max-prompts", "4",
            "--max-new-tokens", "8", "--bootstrap", "50", "--budget", "64", "--work", str(tmp_path / "work"),
            "--doc", str(doc)]
    with torch_threads(1):
        assert quality.main(argv) == 0
    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert not results["partial"] and len(results["runs"]) == 1
    run = results["runs"][0]
    assert list(run["methods"]) == [*quality.METHODS, quality.BOTH_ROW]  # both-mode adapter scored on the same prompts
    for name, r in run["methods"].items():
        assert r["nll_per_token"] is not None and r["semantic"] is not None, name
        assert set(r["intervals"]) >= {"nll_per_token", "semantic", "style"}, name
        lo, hi = r["intervals"]["nll_per_token"]
        assert lo <= r["nll_per_token"] <= hi, name
    assert run["adapter"]["steps"] <= 4 and run["adapter_both"]["steps"] <= 4
    assert run["counts_both"]["train"] > run["counts"]["train"]  # both sides: more samples
    text = doc.read_text()
    assert "python bench/quality.py --base" in text  # the reproducing command
    assert "| retrieval-dense |" in text and f"| {quality.BOTH_ROW} |" in text
    assert "Sample replies" in text and "| **real** |" in text
    assert "which components carry signal" in text
    # The doc can be rebuilt from results.json alone.
    doc.unlink()
    assert quality.main(["--doc-only", "--work", str(tmp_path / "work"), "--doc", str(doc)]) == 0
    assert "| retrieval-dense |" in doc.read_text()
