"""The prefix cache on a real multi-turn chat: `convo chat` (friend mode) through the real worker and Redis.

    PYTHONPATH=. .venv/bin/python bench/prefix_flows.py [--base models/smollm2-135m] [--turns 14] [--json]

One worker (`inference.worker.build_worker`: the decode loop, the candidate step, the adapter registry, the prefix
cache) on the base and one random LoRA adapter (r=4, B scaled by 0.1 so it changes the text without turning it to
noise), in a thread; the bot side is `bot.console.ConsoleChat`, the core of `convo chat`, typing scripted lines in
friend mode. Every turn the chat's history grows by your line and the persona's burst, and the bot sends the
context window (`dataset.context_messages`, 16) to the worker. Once the chat is longer than the window:

* sliding (`bot.context_cut_messages` = 1): the window drops its oldest message every turn, so the prompt's first
  tokens change and the prefix cache, which needs a shared start, stops hitting;
* cut (`bot.context_cut_messages` = 8): the window's start moves by 8 messages at a time, so the turns in between
  reuse the previous prompt's keys/values.

Four configurations in one run, each the same scripted chat from an empty history (greedy, so the same text
every time): the prefix cache off and on, for each window. Per configuration: prompt tokens prefilled (run) of
all prompt tokens, the share the cache saved overall and over the last 6 turns (9-14 of 14), the median turn
latency (your line in, the reply shown), and whether the replies equal those of the cache off with the same
window. Every figure is measured in this run; say which machine it was.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LINES = [
    "hey, are you around tonight?", "I was thinking we could get dinner somewhere new", "what about that thai place",
    "ok but I'm running a bit late from work", "can you book a table for 8?", "also did you talk to sam today",
    "he said the trip is still on for june", "I need to sort out the tickets this week", "haha yes I know",
    "anyway how was your day", "mine was long, too many meetings", "I'm so tired of zoom calls",
    "ok see you at 8 then", "bring the book you borrowed pls",
]
PERSONA = "friend"
CONFIGS = (("cache off, sliding", False, 1), ("cache on, sliding", True, 1), ("cache off, cut", False, None),
           ("cache on, cut", True, None))


def make_adapter(base: Path, root: Path, seed: int = 0) -> Path:
    """One random LoRA adapter (r=4, B x 0.1) for the persona `friend` (Jordan), the owner being Sam."""
    from inference.adapters import random_adapter

    return random_adapter(base, root / PERSONA, "Jordan", seed=seed, r=4, me="Sam", b_scale=0.1)


@contextlib.contextmanager
def worker_thread(worker, redis_url: str, timeout_s: float = 300.0):
    """The worker's loop in a thread for the block; yields once its heartbeat exists (warmed up)."""
    from inference.client import connect
    from inference.worker import running_in_thread

    r = connect(redis_url, sync=True)
    try:
        with running_in_thread(worker, ready=lambda: bool(r.exists(worker.keys.heartbeat(worker.name))),
                               ready_timeout_s=timeout_s):
            yield worker
    finally:
        r.close()


async def chat_flow(core, persona, lines: list[str], decoder) -> list[dict]:
    """The scripted chat through ConsoleChat from an empty history; per turn: prompt tokens run and cached, context
    messages sent, latency and the reply."""
    from rich.console import Console

    from bot.console import ConsoleChat

    chat = ConsoleChat(core, persona, "friend", Console(file=io.StringIO(), width=200))
    await core.forget(chat.chat)
    turns = []
    for line in lines:
        before = (decoder.prefill_tokens, decoder.prefill_tokens_saved)
        t0 = time.perf_counter()
        await chat.handle(line)
        latency_s = time.perf_counter() - t0
        draft = chat.pending
        turns.append({"latency_s": latency_s, "run": decoder.prefill_tokens - before[0],
                      "cached": decoder.prefill_tokens_saved - before[1],
                      "context": len(draft.context) if draft else None,
                      "reply": draft.candidates[0] if draft else None})
    await chat.close()
    return turns


def summarise(turns: list[dict], late: int) -> dict:
    """Totals, shares saved (overall and over the last `late` turns) and latency of one configuration."""
    run, cached = sum(t["run"] for t in turns), sum(t["cached"] for t in turns)
    tail = turns[-late:]
    tail_run, tail_cached = sum(t["run"] for t in tail), sum(t["cached"] for t in tail)
    latencies = [t["latency_s"] for t in turns]
    return {"prompt_tokens_run": run, "prompt_tokens_total": run + cached,
            "saved_share": cached / (run + cached) if run + cached else 0.0,
            "saved_share_late": tail_cached / (tail_run + tail_cached) if tail_run + tail_cached else 0.0,
            "p50_turn_s": statistics.median(latencies), "total_s": sum(latencies),
            "context_messages_last": turns[-1]["context"], "errors": sum(t["reply"] is None for t in turns)}


def run(base: Path, *, turns: int = 14, max_new_tokens: int = 16, context_messages: int = 16, cut: int = 8,
        redis_url: str = "redis://127.0.0.1:6379/0", work: Path | None = None, say=print) -> dict:
    """The four configurations, one after the other on one worker; the results as a dict."""
    import torch

    from bot.core import BotConfig, BotCore, load_persona
    from config.settings import Settings
    from inference.client import connect
    from inference.worker import build_worker

    work = work or Path(tempfile.mkdtemp(prefix="bench_prefix_flows_"))
    adapters = work / "adapters"
    make_adapter(base, adapters)
    prefix = f"benchpf{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis={"url": redis_url, "prefix": prefix},
        dataset={"context_messages": context_messages},
        worker={"quantize": "none", "device": "cpu", "metrics_port": 0, "max_wait_ms": 0, "watch_interval_s": 0,
                "heartbeat_interval_s": 0.5, "prefix_cache_mb": 256},
        generate={"temperature": 0.0, "max_new_tokens": max_new_tokens},
        bot={"adapters_dir": str(adapters), "typing_s_per_char": 0.0, "reply_timeout_s": 300.0},
    )
    lines = [LINES[i % len(LINES)] for i in range(turns)]
    late = min(6, turns)
    results: dict = {"base": str(base), "device": f"cpu ({torch.get_num_threads()} threads)", "turns": turns,
                     "max_new_tokens": max_new_tokens, "context_messages": context_messages, "cut": cut,
                     "late_turns": [turns - late + 1, turns], "configs": {}}
    worker = build_worker(settings, connect(redis_url), base=str(base), adapters_dir=str(adapters),
                          name=f"{prefix}-w")
    decoder = worker.backend.inner
    cache = decoder.prefix_cache

    async def flows():
        persona = load_persona(adapters, PERSONA)
        out = {}
        for label, cache_on, config_cut in CONFIGS:
            config_cut = config_cut or cut
            config = BotConfig.from_settings(settings, context_cut_messages=config_cut)
            core = BotCore(connect(redis_url), config, "console")
            for loaded in list(worker.registry.current.values()):  # every configuration starts from an empty cache
                cache.drop(loaded.name)
            decoder.prefix_cache = cache if cache_on else None
            torch.manual_seed(0)  # re-draws of the candidate step (if any) sample the same way in every config
            out[label] = await chat_flow(core, persona, lines, decoder)
            await core.redis.aclose()
            s = summarise(out[label], late)
            say(f"  {label} (cut {config_cut}): {s['prompt_tokens_run']:,}/{s['prompt_tokens_total']:,} prompt tokens "
                f"run, p50 {s['p50_turn_s']:.2f} s")
        decoder.prefix_cache = cache
        return out

    try:
        with worker_thread(worker, redis_url):
            async def warm():  # loads the adapter: no configuration pays for it
                core = BotCore(connect(redis_url), BotConfig.from_settings(settings), "console")
                await core.add_message("warm", "SAM", "hi")
                await core.generate("warm", load_persona(adapters, PERSONA), "friend")
                await core.redis.aclose()

            asyncio.run(warm())
            flows_out = asyncio.run(flows())
    finally:
        cleanup(redis_url, prefix)
        worker.backend.close()
    for label, _, config_cut in CONFIGS:
        turns_out = flows_out[label]
        entry = summarise(turns_out, late)
        entry["cut"] = config_cut or cut
        entry["turns"] = turns_out
        results["configs"][label] = entry
    for window in ("sliding", "cut"):
        off, on = results["configs"][f"cache off, {window}"], results["configs"][f"cache on, {window}"]
        on["identical_to_cache_off"] = [t["reply"] for t in on["turns"]] == [t["reply"] for t in off["turns"]]
    return results


def cleanup(redis_url: str, prefix: str) -> None:
    """Delete every key of this run's prefix."""
    from inference.client import connect

    r = connect(redis_url, sync=True)
    for key in r.scan_iter(match=f"{prefix}:*", count=1000):
        r.delete(key)
    r.close()


def table(results: dict) -> str:
    """The configurations side by side."""
    configs = results["configs"]
    first, last = results["late_turns"]
    rows = [
        ("window (context_cut_messages)", lambda c: f"{'sliding' if c['cut'] == 1 else 'cut'} ({c['cut']})"),
        ("prompt tokens run / total", lambda c: f"{c['prompt_tokens_run']:,} / {c['prompt_tokens_total']:,}"),
        ("saved by the cache, all turns", lambda c: f"{c['saved_share']:.0%}"),
        (f"saved, turns {first}-{last}", lambda c: f"{c['saved_share_late']:.0%}"),
        ("p50 turn latency", lambda c: f"{c['p50_turn_s']:.2f} s"),
        ("all turns", lambda c: f"{c['total_s']:.1f} s"),
        ("context messages, last turn", lambda c: str(c["context_messages_last"])),
        ("replies = cache off's", lambda c: "-" if "identical_to_cache_off" not in c
         else ("yes" if c["identical_to_cache_off"] else "NO")),
        ("turns without a reply", lambda c: str(c["errors"])),
    ]
    width = max(len(label) for label, _ in rows)
    cols = [max(len(name), 16) for name in configs]
    out = [" " * width + "  " + "  ".join(name.rjust(w) for name, w in zip(configs, cols, strict=True))]
    for label, cell in rows:
        out.append(label.ljust(width) + "  " + "  ".join(cell(c).rjust(w) for c, w in
                                                        zip(configs.values(), cols, strict=True)))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=Path("models/smollm2-135m"), help="Base model dir.")
    parser.add_argument("--turns", type=int, default=14)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--context-messages", type=int, default=16, help="dataset.context_messages.")
    parser.add_argument("--cut", type=int, default=8, help="bot.context_cut_messages of the cut configurations.")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's choice).")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON only.")
    args = parser.parse_args(argv)

    import logging

    import torch

    from bench.demo_redis import redis_answers

    logging.getLogger("convo").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not redis_answers(args.redis_url):
        print(f"no Redis at {args.redis_url}: start one (`make redis`) or pass --redis-url", file=sys.stderr)
        return 2
    say = (lambda *a: None) if args.json else print
    started = time.perf_counter()
    say(f"base {args.base} · {args.turns} turns of `convo chat` (friend mode), greedy, {args.max_new_tokens} new "
        f"tokens · context {args.context_messages} messages · torch threads {torch.get_num_threads()}")
    results = run(args.base, turns=args.turns, max_new_tokens=args.max_new_tokens,
                  context_messages=args.context_messages, cut=args.cut, redis_url=args.redis_url, say=say)
    results["wall_s"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results))
        print(f"total {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
