"""bench/prefix_flows.py on the tiny base, a few turns: the real worker and `convo chat`'s core, four configurations,
so the benchmark cannot rot; and what it measures holds on a small scale (the cut window reuses the cache late in a
chat, the sliding one does not; the cache never changes a greedy reply)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import torch_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.redis


def test_prefix_flows_bench_runs_four_configurations(redis_url, tiny_base, tmp_path):
    import prefix_flows

    with torch_threads(1):
        results = prefix_flows.run(tiny_base, turns=12, max_new_tokens=6, context_messages=8, cut=6,
                                   redis_url=redis_url, work=tmp_path, say=lambda *a: None)
    configs = results["configs"]
    assert list(configs) == [label for label, _, _ in prefix_flows.CONFIGS]
    off_sliding, on_sliding = configs["cache off, sliding"], configs["cache on, sliding"]
    off_cut, on_cut = configs["cache off, cut"], configs["cache on, cut"]
    for off, on in ((off_sliding, on_sliding), (off_cut, on_cut)):
        assert len(on["turns"]) == 12 and off["prompt_tokens_run"] == off["prompt_tokens_total"] > 0
        assert on["identical_to_cache_off"]  # greedy replies do not depend on the cache...
        assert on["prompt_tokens_total"] == off["prompt_tokens_total"]  # ...so neither do the prompts
        assert on["prompt_tokens_run"] < off["prompt_tokens_run"]
    # Past the window (8 messages, 2 a turn: your line and the reply), sliding shares little more than the first tag
    # (the tiny model's replies are all alike); the cut window (6) reuses the prompt on 2 turns of 3.
    assert on_sliding["saved_share_late"] < 0.2 and on_cut["saved_share_late"] > 0.4
    assert on_cut["prompt_tokens_total"] < on_sliding["prompt_tokens_total"]  # a shorter context on some turns
    assert all(t["context"] is None or t["context"] <= 8 for c in configs.values() for t in c["turns"])
    assert off_sliding["context_messages_last"] == 8 and 3 <= off_cut["context_messages_last"] <= 8
    assert results["late_turns"] == [7, 12]
    text = prefix_flows.table(results)
    assert "prompt tokens run / total" in text and "replies = cache off's" in text
    import redis

    r = redis.Redis.from_url(redis_url)
    assert not list(r.scan_iter(match="benchpf*"))  # the run cleaned up its keys
    r.close()
