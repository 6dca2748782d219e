"""Inference worker benchmarks, side by side in one run: the decode loop against plain `generate`, batching,
mixing adapters, head-of-line blocking, the prefix cache, and (optionally) the queue.

    .venv/bin/python bench/worker.py [--base DIR] [--adapters DIR] [--quantize 4bit|none|auto] [--threads 1] [--json]

1. Single stream: one request at a time, same prompt and 24 new tokens, our decode loop (bare base, and with an
   adapter) vs transformers' plain `model.generate` of the same model, interleaved: the ratio of tokens/s.
2. Throughput: `--requests` requests (24 new tokens each) kept at concurrency 1, 8 and 32 over 1 adapter and at
   8 and 32 over 8 adapters: tokens/s and draft latency p50/p99; batched (8 adapters, top concurrency) vs one at a
   time; the cost of mixing 8 adapters vs 1 at the top concurrency (median of back-to-back pairs).
3. Head-of-line: 8 long requests (96 tokens) generating, one short (8 tokens) arrives: its latency vs theirs.
4. Prefix cache: a 6-turn chat drafted turn by turn with and without the cache: prompt tokens run and time.
5. With `--draft-requests N` / `--queue-requests N` (and a Redis at --redis-url): one-message drafts end to end
   through the real worker loop, and the queue's own overhead with a no-op engine (1,000 requests, concurrency 1
   and 32).

Stops are turned off in 1-3 (every row generates all its tokens), so every configuration does the same work.
Without --base it builds an untrained tiny Llama; without --adapters it makes random LoRA adapters. On CUDA it
prints the peak GPU memory. Every figure is measured in this run; say which machine and base it was.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.settings import WorkerSettings  # noqa: E402
from inference.protocol import GenerateRequest, Keys  # noqa: E402

LINES = ["hey are we still going tonight?", "yeah! want to meet at 7?", "sounds perfect", "ok see you there",
         "running late sorry", "did you see the game?", "coffee tomorrow?", "haha same"]


def build_base(out: Path) -> Path:
    """An untrained tiny Llama (throughput does not depend on the weights)."""
    import random

    from training.tiny_base import build_tiny_base, render_conversation

    rng = random.Random(0)
    texts = [render_conversation([(str(i % 2), rng.choice(LINES)) for i in range(4)], rng) for _ in range(50)]
    build_tiny_base(out, texts, vocab_size=400, hidden_size=192, num_layers=2, num_heads=2, max_steps=0,
                    max_minutes=1.0, seed=0, seq_len=32)
    return out


def make_adapters(base: Path, root: Path, count: int) -> list[str]:
    """`count` random LoRA adapters (different seeds) on `base`."""
    from inference.adapter_meta import base_model_ref
    from inference.adapters import random_adapter

    ref = base_model_ref(base)
    names = [f"p{i}" for i in range(count)]
    for i, name in enumerate(names):
        random_adapter(base, root / name, f"Persona {i}", seed=i, me="Owner", base_model=ref)
    return names


def request(persona: str, i: int, max_new_tokens: int, **fields) -> GenerateRequest:
    history = [{"speaker": "OWNER", "text": LINES[(i + k) % len(LINES)]} for k in range(1 + i % 3)]
    return GenerateRequest.build(persona=persona, history=history, max_new_tokens=max_new_tokens, **fields)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# ---------------------------------------------------------------- in process: the backend alone


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def no_stops(backend) -> None:
    """Rows run their full max_new_tokens (no tag stop, no EOS): every configuration does the same work."""
    backend.newline_ids, backend.eos_ids = frozenset(), frozenset()


def make_item(registry, persona: str, i: int, max_new_tokens: int, history_lines: int | None = None, **fields):
    """A greedy BatchItem for `persona` (`__base__`: the bare base)."""
    from inference.batching import BASE_ADAPTER, BatchItem, build_prompt

    q = request(persona, i, max_new_tokens, temperature=0, **fields) if history_lines is None else \
        GenerateRequest.build(persona=persona, temperature=0, max_new_tokens=max_new_tokens, history=[
            {"speaker": "OWNER" if k % 2 else "Persona 0", "text": LINES[(i + k) % len(LINES)]}
            for k in range(history_lines)], **fields)
    if persona == BASE_ADAPTER:
        prompt, target = build_prompt(q, None)
        return BatchItem(q, prompt, target, BASE_ADAPTER)
    loaded = registry.acquire(persona, frozenset(a.name for a in registry.current.values()))
    prompt, target = build_prompt(q, loaded.info.meta)
    return BatchItem(q, prompt, target, loaded.name)


def single_stream(backend, registry, persona: str, runs: int, max_new_tokens: int) -> dict:
    """Our loop (bare base / adapter) vs plain `generate`, one request at a time, interleaved; tokens/s medians."""
    import torch

    from inference.batching import BASE_ADAPTER
    from inference.engine import encode

    base_item = make_item(registry, BASE_ADAPTER, 0, max_new_tokens, history_lines=8)
    adapter_item = make_item(registry, persona, 0, max_new_tokens, history_lines=8)
    ids = torch.tensor([encode(backend.tokenizer, base_item.prompt)], device=backend.device)

    def plain():
        with torch.no_grad():
            out = backend.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                         pad_token_id=backend.tokenizer.pad_token_id)
        return out.shape[1] - ids.shape[1]

    def ours(item):
        return lambda: backend.generate([item])[0].new_tokens

    runners = {"plain_generate": plain, "ours_bare_base": ours(base_item), "ours_with_adapter": ours(adapter_item)}
    for run in runners.values():  # warm-up
        run()
    rates: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(runs):
        for name, run in runners.items():
            sync()
            t0 = time.perf_counter()
            tokens = run()
            sync()
            rates[name].append(tokens / (time.perf_counter() - t0))
    out = {f"{k}_tokens_per_s": statistics.median(v) for k, v in rates.items()}
    out["prompt_tokens"] = ids.shape[1]
    out["ratio_ours_vs_plain"] = out["ours_bare_base_tokens_per_s"] / out["plain_generate_tokens_per_s"]
    out["ratio_ours_adapter_vs_plain"] = out["ours_with_adapter_tokens_per_s"] / out["plain_generate_tokens_per_s"]
    return out


def closed_loop(backend, items, concurrency: int) -> dict:
    """Keep `concurrency` requests in flight until all `items` are answered: tokens/s, latency p50/p99."""
    done = threading.Semaphore(0)
    slots = threading.Semaphore(concurrency)
    latencies_ms: list[float] = []
    tokens = [0]

    def finished(future, t0):
        latencies_ms.append((time.perf_counter() - t0) * 1000)
        tokens[0] += future.result().new_tokens
        slots.release()
        done.release()

    sync()
    start = time.perf_counter()
    for item in items:
        slots.acquire()
        t0 = time.perf_counter()
        backend.submit(item).add_done_callback(lambda f, t0=t0: finished(f, t0))
    for _ in items:
        done.acquire()
    sync()
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(items), "wall_s": wall, "tokens_per_s": tokens[0] / wall,
            **{k: v for k, v in summary(latencies_ms).items() if k != "n"}}


def throughput(backend, registry, personas: list[str], n_requests: int, max_new_tokens: int,
               levels=(1, 8, 32), pairs: int = 2) -> dict:
    """Concurrency levels x (1 adapter, all adapters), the same requests each time.

    The mixing cost is the median over `pairs` back-to-back (1 adapter, all adapters) runs at the top concurrency,
    so load from other jobs on a shared machine falls on both sides of each ratio.
    """
    out: dict = {"requests": n_requests, "max_new_tokens": max_new_tokens, "adapters": len(personas), "runs": []}
    by_names = {}
    for names in (personas[:1], personas):
        items = by_names[len(names)] = [make_item(registry, names[i % len(names)], i, max_new_tokens)
                                        for i in range(n_requests)]
        for c in levels:
            if c == 1 and len(names) > 1:
                continue  # one at a time mixes nothing: the 1-adapter run is the baseline
            run = closed_loop(backend, items, c)
            run["adapters"] = len(names)
            out["runs"].append(run)
    by = {(r["adapters"], r["concurrency"]): r for r in out["runs"]}
    top, many = max(levels), len(personas)
    out["speedup_batched_vs_one_at_a_time"] = by[(many, top)]["tokens_per_s"] / by[(1, 1)]["tokens_per_s"]
    ratios = []
    for _ in range(pairs):
        one = closed_loop(backend, by_names[1], top)["tokens_per_s"]
        mixed = closed_loop(backend, by_names[many], top)["tokens_per_s"]
        ratios.append(one / mixed)
    out["mixing_cost_pairs"] = ratios
    out["mixing_cost"] = statistics.median(ratios)
    return out


def head_of_line(backend, registry, personas: list[str], long_tokens: int = 96, short_tokens: int = 8) -> dict:
    """8 long requests generating; a short one submitted once they all run: its latency vs theirs."""
    longs = [make_item(registry, personas[i % len(personas)], i, long_tokens) for i in range(8)]
    short = make_item(registry, personas[-1], 99, short_tokens)
    t0 = time.perf_counter()
    futures = [backend.submit(item) for item in longs]
    end = time.monotonic() + 300
    while backend.stats()["rows_active"] < 8 and time.monotonic() < end:  # bounded wait for all eight to run
        time.sleep(0.005)
    t_short = time.perf_counter()
    backend.submit(short).result()
    short_ms = (time.perf_counter() - t_short) * 1000
    still_running = sum(not f.done() for f in futures)
    for f in futures:
        f.result()
    long_ms = (time.perf_counter() - t0) * 1000
    return {"long_requests": 8, "long_tokens": long_tokens, "short_tokens": short_tokens, "short_ms": short_ms,
            "long_ms": long_ms, "long_running_when_short_answered": still_running, "short_vs_long": short_ms / long_ms}


def prefix_cache_chat(backend, registry, persona: str, turns: int = 6, max_new_tokens: int = 24) -> dict:
    """A chat drafted turn by turn (history +2 messages per turn), without then with the prefix cache."""
    from inference.batching import BatchItem, build_prompt

    loaded = registry.acquire(persona)
    items = []
    history: list[dict] = []
    for t in range(turns):
        history = history + [{"speaker": "Persona 0", "text": LINES[(2 * t) % len(LINES)] + " " + LINES[t % 3]},
                             {"speaker": "OWNER", "text": LINES[(2 * t + 1) % len(LINES)]}]
        q = GenerateRequest.build(persona=persona, history=history, temperature=0, max_new_tokens=max_new_tokens)
        prompt, target = build_prompt(q, loaded.info.meta)
        items.append(BatchItem(q, prompt, target, loaded.name))
    cache = backend.prefix_cache
    out = {}
    for label, use in (("without", None), ("with", cache)):
        backend.prefix_cache = use
        if use is not None:
            use.drop(loaded.name)
        before = backend.prefill_tokens
        t0 = time.perf_counter()
        results = [backend.generate([item])[0] for item in items]
        out[f"{label}_s"] = time.perf_counter() - t0
        out[f"{label}_prefill_tokens"] = backend.prefill_tokens - before
        out[f"{label}_candidates"] = [r.candidates for r in results]
    backend.prefix_cache = cache
    out["identical_output"] = out.pop("without_candidates") == out.pop("with_candidates")
    out["prompt_tokens_saved_share"] = 1 - out["with_prefill_tokens"] / out["without_prefill_tokens"]
    out["time_ratio"] = out["with_s"] / out["without_s"]
    return out


# ---------------------------------------------------------------- 2./3. through Redis


def worker_thread(worker):
    """Run the worker's loop on its own event loop in a thread until the block ends."""
    from inference.worker import running_in_thread

    return running_in_thread(worker)


def latencies(redis_url: str, keys: Keys, make, total: int, concurrency: int) -> list[float]:
    """End-to-end ms of `total` requests sent by `concurrency` clients back to back."""
    from inference.client import WorkerClient, connect

    async def run():
        r = connect(redis_url, max_connections=concurrency + 8)
        client = WorkerClient(r, keys)
        out: list[float] = []
        counter = iter(range(total))

        async def one_client():
            for i in counter:
                q = make(i)
                t0 = time.perf_counter()
                response = await client.generate(q, timeout_s=120)
                out.append((time.perf_counter() - t0) * 1000)
                if not response.ok:
                    raise RuntimeError(f"request failed: {response.error}")

        try:
            await asyncio.gather(*(one_client() for _ in range(concurrency)))
        finally:
            await r.aclose()
        return out

    return asyncio.run(run())


def run_echo_worker(redis_url: str, prefix: str) -> None:
    """A no-op worker process (EchoBackend) until SIGTERM: the queue's own cost, apart from the clients' process."""
    from inference.batching import EchoBackend
    from inference.client import connect
    from inference.worker import Worker

    ws = WorkerSettings(metrics_port=0, max_batch=32, max_wait_ms=0, watch_interval_s=0, heartbeat_interval_s=0.2)
    worker = Worker(connect(redis_url), Keys(prefix), EchoBackend(), ws, name=f"{prefix}-noop")
    asyncio.run(worker.main())


@contextlib.contextmanager
def echo_worker_process(redis_url: str, prefix: str):
    """Run `run_echo_worker` in a spawned process; SIGTERM it (a clean drain) when the block ends."""
    import multiprocessing

    from inference.client import connect

    proc = multiprocessing.get_context("spawn").Process(target=run_echo_worker, args=(redis_url, prefix))
    proc.start()
    r = connect(redis_url, sync=True)
    try:
        end = time.monotonic() + 60
        while not r.exists(Keys(prefix).heartbeat(f"{prefix}-noop")):  # bounded wait for the worker to be up
            if time.monotonic() > end or not proc.is_alive():
                raise SystemExit("the no-op worker process did not start")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.join(30)
        r.close()




def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": percentile(ms, 99), "max_ms": max(ms)}


def cleanup(redis_url: str, prefix: str) -> None:
    from inference.client import connect

    r = connect(redis_url, sync=True)
    for key in r.scan_iter(match=f"{prefix}:*", count=1000):
        r.delete(key)
    r.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="Base model dir (default: build an untrained tiny one).")
    parser.add_argument("--adapters", type=Path, help="Adapters dir (default: random LoRA adapters, --personas of them).")
    parser.add_argument("--quantize", default="none", choices=["4bit", "none", "auto"])
    parser.add_argument("--personas", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--concurrency", default="1,8,32", help="Concurrency levels of the throughput part.")
    parser.add_argument("--single-runs", type=int, default=5, help="Interleaved single-stream runs per engine.")
    parser.add_argument("--draft-requests", type=int, default=0, help="One-message drafts timed through Redis.")
    parser.add_argument("--queue-requests", type=int, default=0, help="No-op engine requests (queue overhead).")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's choice).")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON only.")
    args = parser.parse_args()

    import logging
    import resource

    import torch

    from bench.demo_redis import redis_answers
    from inference.adapters import AdapterRegistry
    from inference.client import connect
    from inference.decode import load_backend
    from inference.versions import discover
    from inference.worker import Worker

    logging.getLogger("convo").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda *a: None) if args.json else print
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_worker_"))
    base = args.base or build_base(tmp / "base")
    if args.adapters:
        root, personas = args.adapters, sorted(discover(args.adapters))[: args.personas]
    else:
        root, personas = tmp / "adapters", make_adapters(base, tmp / "adapters", args.personas)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    backend = load_backend(base, quantize=args.quantize, max_rows=64)
    registry = AdapterRegistry(backend.bank, root, base, max_loaded=max(len(personas), 1))
    registry.scan()
    if registry.rejected:
        raise SystemExit(f"adapters rejected: {registry.rejected}")
    quantized = any("4bit" in type(m).__name__ for m in backend.model.modules())
    results: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "base": str(args.base or "untrained tiny Llama (hidden 192, 2 layers)"), "quantized_4bit": quantized,
    }
    say(f"device {results['device']} · base {results['base']} · 4-bit {quantized}")
    backend.warm_up()
    no_stops(backend)
    n = args.max_new_tokens

    results["single_stream"] = ss = single_stream(backend, registry, personas[0], args.single_runs, n)
    say(f"1. single stream, {ss['prompt_tokens']}-token prompt, {n} new tokens (median of {args.single_runs}):")
    say(f"   plain generate {ss['plain_generate_tokens_per_s']:.1f} tok/s · ours, bare base "
        f"{ss['ours_bare_base_tokens_per_s']:.1f} ({ss['ratio_ours_vs_plain']:.2f}x, target >= 1.0) · ours, "
        f"with an adapter {ss['ours_with_adapter_tokens_per_s']:.1f} ({ss['ratio_ours_adapter_vs_plain']:.2f}x)")

    levels = tuple(int(c) for c in args.concurrency.split(","))
    results["throughput"] = tp = throughput(backend, registry, personas, args.requests, n, levels)
    say(f"2. throughput, {tp['requests']} requests of {n} tokens:")
    for run in tp["runs"]:
        say(f"   {run['adapters']} adapter(s), concurrency {run['concurrency']:>2}: {run['tokens_per_s']:7.1f} tok/s  "
            f"draft p50 {run['p50_ms']:7.0f} ms  p99 {run['p99_ms']:7.0f} ms")
    say(f"   batched (concurrency {max(levels)}) vs one at a time: {tp['speedup_batched_vs_one_at_a_time']:.1f}x "
        f"(target >= 4x) · mixing {len(personas)} adapters vs 1: {tp['mixing_cost']:.2f}x time (target <= 1.3x; "
        f"median of {', '.join(f'{r:.2f}' for r in tp['mixing_cost_pairs'])})")

    results["head_of_line"] = hol = head_of_line(backend, registry, personas)
    say(f"3. head-of-line: short request ({hol['short_tokens']} tokens) answered in {hol['short_ms']:.0f} ms while "
        f"{hol['long_running_when_short_answered']} of 8 long ones ({hol['long_tokens']} tokens) still ran; "
        f"they took {hol['long_ms']:.0f} ms ({hol['short_vs_long']:.2f}x)")

    backend.newline_ids = __import__("inference.decode", fromlist=["x"]).newline_token_ids(backend.tokenizer)
    results["prefix_cache"] = pc = prefix_cache_chat(backend, registry, personas[0])
    say(f"4. prefix cache, 6-turn chat: prompt tokens run {pc['without_prefill_tokens']} -> "
        f"{pc['with_prefill_tokens']} ({pc['prompt_tokens_saved_share']:.0%} saved), time {pc['without_s']:.2f} s -> "
        f"{pc['with_s']:.2f} s ({pc['time_ratio']:.2f}x), identical output {pc['identical_output']}")
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        results["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        say(f"peak GPU memory (torch.cuda.max_memory_allocated) {results['max_memory_allocated_mib']:.0f} MiB")
    say(f"peak RSS {results['peak_rss_mib']:.0f} MiB")
    if (args.draft_requests or args.queue_requests) and not redis_answers(args.redis_url):
        say(f"no Redis at {args.redis_url}: queue figures skipped")
    elif args.draft_requests or args.queue_requests:
        results["redis"] = args.redis_url
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        keys = Keys(prefix)
        try:
            if args.draft_requests:
                ws = WorkerSettings(metrics_port=0, max_batch=32, max_wait_ms=2, watch_interval_s=0, warm_up=False)
                redis = connect(args.redis_url)
                worker = Worker(redis, keys, backend, ws, registry=registry, base=str(base), name=f"{prefix}-model")
                with worker_thread(worker):
                    draft = latencies(args.redis_url, keys, lambda i: request(personas[i % len(personas)], i, n),
                                      args.draft_requests, 1)
                results["draft_end_to_end"] = d = summary(draft)
                say(f"5. one-message draft end to end via Redis (concurrency 1): p50 {d['p50_ms']:.1f} ms  "
                    f"p99 {d['p99_ms']:.1f} ms")
            results["queue_overhead"] = {}
            for concurrency in (1, 32) if args.queue_requests else ():
                with echo_worker_process(args.redis_url, prefix):
                    latencies(args.redis_url, keys, lambda i: request("echo", i, 8), 50, concurrency)  # warm-up
                    ms = latencies(args.redis_url, keys, lambda i: request("echo", i, 8), args.queue_requests,
                                   concurrency)
                results["queue_overhead"][f"concurrency_{concurrency}"] = q = summary(ms)
                say(f"   queue overhead, no-op engine, {q['n']} requests at concurrency {concurrency}: "
                    f"p50 {q['p50_ms']:.2f} ms  p99 {q['p99_ms']:.2f} ms (target p50 <= 2, p99 <= 10)")
        finally:
            cleanup(args.redis_url, prefix)
    backend.close()
    results["wall_s"] = time.perf_counter() - started
    say(f"total {results['wall_s']:.0f} s")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
