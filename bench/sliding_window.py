"""Sliding-window layers in the decode loop: keys/values kept, memory and time, full cache vs capped, one run.

    PYTHONPATH=. .venv/bin/python bench/sliding_window.py [--base models/gemma3-270m] [--rows 4] [--json]

Gemma 3 (5 of every 6 layers local, window 512 on the 270M) and Mistral-style configs attend only to the last
`sliding_window` tokens on those layers. Before the cap the decode loop kept every key/value on every layer; now
a sliding layer keeps window - 1 (what transformers' DynamicCache(config=...) keeps in `generate`). One prompt of
`--multiple` x the window (a synthetic chat, `[A]`/`[B]` lines), `--rows` greedy rows sharing it, `--new-tokens`
each, stops off, on the bare base; both modes in one process, alternating, `--repeats` times:

* KV bytes of the running batch at its largest, and of the prompt's prefix-cache entry (exact tensor sizes);
* wall time of the whole request (prefill + decode) and of the decode steps alone (median over repeats);
* whether the two modes' tokens are equal (they must be: the window masks the same keys either way).

Without `--base` (or when it is missing) a random Gemma 3 text model with 6 layers (window 64) is built, so the
figures are tiny-model figures. Peak RSS is not split per mode (one process runs both); the KV bytes are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LINES = ["hey are you around tonight?", "I was thinking we could get dinner somewhere new", "what about the thai place",
         "ok but I'm running a bit late from work", "can you book a table for 8?", "did you talk to sam today",
         "he said the trip is still on for june", "haha yes I know", "anyway how was your day"]


def tiny_gemma3(out: Path) -> Path:
    """A random Gemma 3 text model (hidden 128, 6 layers, 5 local with window 64) on SmolLM2's or the tiny tokenizer."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from training.tiny_base import build_tiny_base, render_conversation

    rng = random.Random(0)
    texts = [render_conversation([(str(i % 2), rng.choice(LINES)) for i in range(6)], rng) for _ in range(200)]
    build_tiny_base(out / "tok", texts, vocab_size=600, hidden_size=32, num_layers=1, num_heads=2, max_steps=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "tok"))
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=64,
                              layer_types=["sliding_attention"] * 5 + ["full_attention"], pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id, bos_token_id=None, query_pre_attn_scalar=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    return out / "model"


def chat_prompt(tokenizer, tokens: int) -> str:
    """A two-speaker chat of at least `tokens` tokens ending with `[B]` (the turn to write)."""
    from inference.engine import encode

    lines, i = [], 0
    while True:
        lines.append(f"[{'AB'[i % 2]}] {LINES[i % len(LINES)]}")
        i += 1
        prompt = "\n".join(lines) + "\n[B]"
        if i % 2 == 0 and len(encode(tokenizer, prompt)) >= tokens:
            return prompt


def run_once(backend, prompt: str, rows: int, new_tokens: int, capped: bool) -> dict:
    """One request of `rows` greedy rows; KV bytes at their largest, times, the tokens."""
    from inference.architectures import kv_bytes
    from inference.batching import BASE_ADAPTER, BatchItem
    from inference.protocol import GenerateRequest

    backend.cap_windows = capped
    if backend.prefix_cache is not None:
        backend.prefix_cache._entries.clear()
        backend.prefix_cache.nbytes = 0
    peak, step_s, tokens = [0], [0.0], {}
    step, finish = type(backend)._step, type(backend)._finish

    def measured_step(self):
        t = time.perf_counter()
        out = step(self)
        step_s[0] += time.perf_counter() - t
        peak[0] = max(peak[0], kv_bytes(self._cache))
        return out

    def recording_finish(self, job):
        tokens["ids"] = [r.ids for r in sorted(job.rows, key=lambda r: r.index)]
        finish(self, job)

    backend._step = measured_step.__get__(backend)
    backend._finish = recording_finish.__get__(backend)
    request = GenerateRequest.build(persona="bench", history=[{"speaker": "A", "text": "hi"}], temperature=0,
                                    max_new_tokens=new_tokens)
    t = time.perf_counter()
    backend.generate([BatchItem(request, prompt, "B", BASE_ADAPTER, samples=rows)])
    total = time.perf_counter() - t
    del backend._step, backend._finish
    entry = sum(e.nbytes for e in backend.prefix_cache._entries.values()) if backend.prefix_cache else 0
    return {"kv_peak_bytes": peak[0], "prefix_entry_bytes": entry, "total_s": total, "decode_s": step_s[0],
            "ids": tokens["ids"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="models/gemma3-270m", help="a Gemma 3 / Mistral-style model dir")
    parser.add_argument("--multiple", type=float, default=4.0, help="prompt length in windows")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from inference.architectures import text_config
    from inference.decode import load_backend
    from inference.engine import encode

    torch.set_num_threads(args.threads)
    base = Path(args.base)
    tmp = None
    if not (base / "config.json").is_file():
        tmp = tempfile.TemporaryDirectory()
        base = tiny_gemma3(Path(tmp.name))
    backend = load_backend(base, device="cpu", partial_interval_ms=1e9)
    backend.newline_ids, backend.eos_ids = frozenset(), frozenset()  # stops off: every row runs --new-tokens
    window = getattr(text_config(backend.model.config), "sliding_window", None)
    if not window:
        print(f"{base}: no sliding window in its config", file=sys.stderr)
        return 2
    prompt = chat_prompt(backend.tokenizer, int(args.multiple * window))
    prompt_tokens = len(encode(backend.tokenizer, prompt))
    runs: dict[str, list[dict]] = {"full": [], "capped": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(run_once(backend, prompt, args.rows, args.new_tokens, capped=mode == "capped"))
    backend.close()
    summary = {mode: {"kv_peak_mib": r[0]["kv_peak_bytes"] / 2**20,
                      "prefix_entry_mib": r[0]["prefix_entry_bytes"] / 2**20,
                      "total_s": statistics.median(x["total_s"] for x in r),
                      "decode_s": statistics.median(x["decode_s"] for x in r)} for mode, r in runs.items()}
    same = all(a["ids"] == b["ids"] for a, b in zip(runs["full"], runs["capped"], strict=True))
    layers = getattr(text_config(backend.model.config), "layer_types", None) or []
    result = {"base": str(args.base if tmp is None else "tiny random Gemma 3 (6 layers, window 64)"),
              "window": window, "sliding_layers": sum(t == "sliding_attention" for t in layers) or "all",
              "layers": text_config(backend.model.config).num_hidden_layers, "prompt_tokens": prompt_tokens,
              "rows": args.rows, "new_tokens": args.new_tokens, "threads": args.threads, "repeats": args.repeats,
              "same_tokens": same, **summary}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['base']}: window {window}, {result['sliding_layers']} of {result['layers']} layers sliding, "
              f"prompt {prompt_tokens} tokens, {args.rows} rows x {args.new_tokens} new tokens, "
              f"{args.threads} threads, median of {args.repeats}")
        print(f"{'':24}{'full cache (before)':>22}{'capped (after)':>18}")
        for key, label, unit in (("kv_peak_mib", "KV of the batch, peak", "MiB"),
                                 ("prefix_entry_mib", "prefix-cache entry", "MiB"),
                                 ("total_s", "request wall time", "s"), ("decode_s", "decode steps", "s")):
            print(f"{label:24}{summary['full'][key]:>18.2f} {unit:<3}{summary['capped'][key]:>14.2f} {unit}")
        print(f"tokens equal: {same}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
