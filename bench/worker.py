"""Inference worker benchmarks, side by side in one run: batching, the cost of mixing adapters, queue overhead.

    .venv/bin/python bench/worker.py [--base DIR] [--adapters DIR] [--quantize 4bit|none|auto] [--json]

1. Throughput (the PEFT backend, no Redis): the same 32 requests over 8 personas' adapters run as one mixed batch
   vs one at a time, and as one batch on a single adapter (the cost of mixing).
2. One-message draft end to end (client -> Redis -> worker -> client, the real worker loop and model): p50/p99.
3. Queue overhead with a no-op engine (EchoBackend): 1,000 requests against the local Redis at concurrency 1 and 32,
   p50/p99 end to end.

Without --base it builds an untrained tiny Llama (hidden 192, so NF4 works on the CPU too); without --adapters it
makes random LoRA adapters, so it runs anywhere with only a base model dir. On CUDA it prints the peak GPU memory
(torch.cuda.max_memory_allocated). Every figure is measured in this run; say which machine and base it was.
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


# ---------------------------------------------------------------- 1. throughput


def throughput(backend, registry, personas: list[str], n_requests: int, max_new_tokens: int) -> dict:
    """Mixed batch vs one at a time vs one adapter, on the same requests (greedy: identical work)."""
    from inference.batching import BatchItem, build_prompt

    def items_for(names):
        out = []
        for i in range(n_requests):
            loaded = registry.acquire(names[i % len(names)], frozenset(a.name for a in registry.current.values()))
            q = request(names[i % len(names)], i, max_new_tokens, temperature=0)
            prompt, target = build_prompt(q, loaded.info.meta)
            out.append(BatchItem(q, prompt, target, loaded.name))
        return out

    mixed, single = items_for(personas), items_for(personas[:1])
    backend.generate(mixed[:4])  # warm-up (first-call allocations, kernels)

    def timed(batches):
        sync()
        t0 = time.perf_counter()
        tokens = sum(r.new_tokens for b in batches for r in backend.generate(b))
        sync()
        return time.perf_counter() - t0, tokens

    t_mixed, tok_mixed = timed([mixed])
    t_single, tok_single = timed([single])
    t_seq, tok_seq = timed([[item] for item in mixed])
    return {
        "requests": n_requests, "adapters": len(personas), "max_new_tokens": max_new_tokens,
        "batched_mixed_s": t_mixed, "batched_mixed_tokens_per_s": tok_mixed / t_mixed,
        "batched_one_adapter_s": t_single, "batched_one_adapter_tokens_per_s": tok_single / t_single,
        "one_at_a_time_s": t_seq, "one_at_a_time_tokens_per_s": tok_seq / t_seq,
        "speedup_batched_vs_one_at_a_time": t_seq / t_mixed,
        "mixing_cost_eight_vs_one_adapter": t_mixed / t_single,
    }


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------- 2./3. through Redis


@contextlib.contextmanager
def worker_thread(worker):
    """Run the worker's loop on its own event loop in a thread until the block ends."""
    box: dict = {}
    ready = threading.Event()

    def target():
        async def main():
            box["loop"] = asyncio.get_running_loop()
            ready.set()
            await worker.main()

        asyncio.run(main())

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    ready.wait(30)
    try:
        yield worker
    finally:
        box["loop"].call_soon_threadsafe(worker.stopping.set)
        thread.join(60)


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


def draft_engine_only(backend, registry, persona: str, count: int) -> dict:
    """Latency of single one-message drafts through the backend alone (no queue): what a GPU run reports."""
    from inference.batching import BatchItem, build_prompt

    loaded = registry.acquire(persona)
    ms, tokens = [], 0
    for i in range(count):
        q = request(persona, i, 24)
        prompt, target = build_prompt(q, loaded.info.meta)
        sync()
        t0 = time.perf_counter()
        tokens += backend.generate([BatchItem(q, prompt, target, loaded.name)])[0].new_tokens
        sync()
        ms.append((time.perf_counter() - t0) * 1000)
    return dict(summary(ms), tokens_per_s=tokens / (sum(ms) / 1000))


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
    parser.add_argument("--quantize", default="auto", choices=["4bit", "none", "auto"])
    parser.add_argument("--personas", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--draft-requests", type=int, default=30, help="One-message drafts timed end to end.")
    parser.add_argument("--queue-requests", type=int, default=1000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's choice).")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON only.")
    args = parser.parse_args()

    import logging

    import torch

    from bench.demo_redis import redis_answers
    from inference.adapters import AdapterRegistry, load_base
    from inference.client import connect
    from inference.peft_backend import PeftBackend
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
    model, tokenizer, device = load_base(base, args.quantize, None)
    registry = AdapterRegistry(model, root, base, max_loaded=max(len(personas), 1))
    registry.scan()
    if registry.rejected:
        raise SystemExit(f"adapters rejected: {registry.rejected}")
    backend = PeftBackend(registry, tokenizer, device)
    quantized = any("4bit" in type(m).__name__ for m in registry.model.modules())
    results: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "base": str(args.base or "untrained tiny Llama (hidden 192, 2 layers)"), "quantized_4bit": quantized,
    }
    say(f"device {results['device']} · base {results['base']} · 4-bit {quantized}")

    results["throughput"] = tp = throughput(backend, registry, personas, args.requests, args.max_new_tokens)
    say(f"throughput, {tp['requests']} requests over {tp['adapters']} adapters, {tp['max_new_tokens']} new tokens:")
    say(f"  batched, mixed adapters   {tp['batched_mixed_s']:.2f} s  {tp['batched_mixed_tokens_per_s']:.0f} tok/s")
    say(f"  batched, one adapter      {tp['batched_one_adapter_s']:.2f} s  "
        f"{tp['batched_one_adapter_tokens_per_s']:.0f} tok/s")
    say(f"  one at a time             {tp['one_at_a_time_s']:.2f} s  {tp['one_at_a_time_tokens_per_s']:.0f} tok/s")
    say(f"  batched vs one at a time  {tp['speedup_batched_vs_one_at_a_time']:.1f}x (target >= 4x)")
    say(f"  mixing cost ({tp['adapters']} adapters vs 1) {tp['mixing_cost_eight_vs_one_adapter']:.2f}x time")

    results["draft_engine_only"] = draft_engine_only(backend, registry, personas[0], args.draft_requests)
    d = results["draft_engine_only"]
    say(f"one-message draft, engine only (24 new tokens max, one request): p50 {d['p50_ms']:.1f} ms  "
        f"p99 {d['p99_ms']:.1f} ms  {d['tokens_per_s']:.0f} tok/s")
    if cuda:
        results["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        say(f"peak GPU memory (torch.cuda.max_memory_allocated) {results['max_memory_allocated_mib']:.0f} MiB")
    if not redis_answers(args.redis_url):
        say(f"no Redis at {args.redis_url}: queue figures skipped")
        results["redis"] = None
    else:
        results["redis"] = args.redis_url
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        keys = Keys(prefix)
        try:
            ws = WorkerSettings(metrics_port=0, max_batch=32, max_wait_ms=2, watch_interval_s=0)
            redis = connect(args.redis_url)
            worker = Worker(redis, keys, backend, ws, registry=registry, base=str(base), name=f"{prefix}-model")
            with worker_thread(worker):
                draft = latencies(args.redis_url, keys, lambda i: request(personas[i % len(personas)], i, 24),
                                  args.draft_requests, 1)
            results["draft_end_to_end"] = d = summary(draft)
            say(f"one-message draft end to end via Redis (concurrency 1): p50 {d['p50_ms']:.1f} ms  "
                f"p99 {d['p99_ms']:.1f} ms")
            results["queue_overhead"] = {}
            for concurrency in (1, 32):
                with echo_worker_process(args.redis_url, prefix):
                    latencies(args.redis_url, keys, lambda i: request("echo", i, 8), 50, concurrency)  # warm-up
                    ms = latencies(args.redis_url, keys, lambda i: request("echo", i, 8), args.queue_requests,
                                   concurrency)
                results["queue_overhead"][f"concurrency_{concurrency}"] = q = summary(ms)
                say(f"queue overhead, no-op engine, {q['n']} requests at concurrency {concurrency}: "
                    f"p50 {q['p50_ms']:.2f} ms  p99 {q['p99_ms']:.2f} ms (target p50 <= 2, p99 <= 10)")
        finally:
            cleanup(args.redis_url, prefix)
    results["wall_s"] = time.perf_counter() - started
    say(f"total {results['wall_s']:.0f} s")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
