"""The cost of the API hop: `convo serve api` vs the direct client `convo ask` uses, side by side in one run.

    .venv/bin/python bench/api.py [--redis-url URL] [--requests 1000] [--json]

One no-op worker process (EchoBackend: no model, so only the queue and the hop are measured), one `convo serve api`
process (the real command, uvicorn, default settings: completions kept for feedback) and one with
`api.feedback = false`. The same one-message requests then go, in alternating rounds so machine noise hits all
paths alike, (a) straight onto the Redis stream through WorkerClient, as `convo ask` does, and (b) as
`POST /v1/chat/completions` over keep-alive HTTP/1.1 connections, at concurrency 1 and 32. Prints p50/p99 end to
end for each path, the API's overhead over the direct client and the API process's CPU time per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.worker import cleanup, echo_worker_process, latencies, redis_answers, summary  # noqa: E402
from inference.protocol import GenerateRequest, Keys  # noqa: E402

KEY = "bench-" + uuid.uuid4().hex
LINES = ["hey are we still going tonight?", "yeah! want to meet at 7?", "running late sorry", "coffee tomorrow?"]


def write_persona(adapters: Path) -> None:
    """Adapter metadata only (the echo worker loads no weights): what /v1/models and the speaker tags read."""
    from inference.adapter_meta import AdapterMeta, BaseModelRef, Speaker, write_adapter_meta
    from inference.prompt_format import FORMAT_VERSION

    write_adapter_meta(adapters / "echo", AdapterMeta(
        persona=Speaker(name="Echo", tag="ECHO"), me=Speaker(name="Owner", tag="OWNER"),
        base_model=BaseModelRef(id="none"), format_version=FORMAT_VERSION))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def api_process(redis_url: str, prefix: str, adapters: Path, feedback: bool, log: Path):
    """`convo serve api` in its own process until the block ends; yields (base URL, pid) once /healthz says 200."""
    import httpx

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), CONVO_REDIS__URL=redis_url, CONVO_REDIS__PREFIX=prefix,
               CONVO_API__KEYS=json.dumps([KEY]), CONVO_API__RATE_LIMIT_PER_MIN="1e9",
               CONVO_API__METRICS_PORT="0", CONVO_API__FEEDBACK=str(feedback).lower())
    proc = subprocess.Popen([sys.executable, "-m", "convo", "serve", "api", "--port", str(port), "--adapters",
                             str(adapters), "--log-level", "warning"], env=env, cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while True:  # bounded wait for the server to come up
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > end or proc.poll() is not None:
                raise SystemExit(f"convo serve api did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def request(i: int) -> GenerateRequest:
    return GenerateRequest.build(persona="echo", history=[{"speaker": "OWNER", "text": LINES[i % len(LINES)]}],
                                 n=1, max_new_tokens=8)


async def http_post(reader, writer, host: str, path: str, body: bytes) -> tuple[int, bytes]:
    """One keep-alive HTTP/1.1 POST on an open connection: (status, body). A few lines of asyncio instead of an
    HTTP library, so the load generator's own CPU (httpx costs several ms a request here) does not swamp the hop
    being measured when 32 clients share this process."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    return status, await reader.readexactly(length)


def api_latencies(base: str, total: int, concurrency: int) -> list[float]:
    """End-to-end ms of `total` chat completions sent by `concurrency` HTTP clients back to back."""
    host = base.removeprefix("http://")
    address, port = host.split(":")

    async def run():
        out: list[float] = []
        counter = iter(range(total))

        async def one_client():
            reader, writer = await asyncio.open_connection(address, int(port))
            try:
                for i in counter:
                    body = json.dumps({"model": "echo", "n": 1, "max_tokens": 8,
                                       "messages": [{"role": "user", "content": LINES[i % len(LINES)]}]}).encode()
                    t0 = time.perf_counter()
                    status, answer = await http_post(reader, writer, host, "/v1/chat/completions", body)
                    out.append((time.perf_counter() - t0) * 1000)
                    if status != 200:
                        raise RuntimeError(f"request failed: {status} {answer[:200]!r}")
            finally:
                writer.close()

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return out

    return asyncio.run(run())


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--requests", type=int, default=1000, help="Requests per path and concurrency.")
    parser.add_argument("--rounds", type=int, default=5, help="Alternating rounds the requests are split into.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON only.")
    args = parser.parse_args()
    say = (lambda *a: None) if args.json else print
    if not redis_answers(args.redis_url):
        raise SystemExit(f"no Redis at {args.redis_url} (start one: make redis)")
    prefix = f"benchapi{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    tmp = Path(tempfile.mkdtemp(prefix="bench_api_"))
    write_persona(tmp / "adapters")
    results: dict = {"redis": args.redis_url, "requests": args.requests, "cpus": os.cpu_count()}
    started = time.perf_counter()
    per_round = max(1, args.requests // args.rounds)
    try:
        with echo_worker_process(args.redis_url, prefix), \
                api_process(args.redis_url, prefix, tmp / "adapters", True, tmp / "api.log") as (api, pid), \
                api_process(args.redis_url, prefix, tmp / "adapters", False, tmp / "api_nofb.log") as (nofb, pid2):
            paths = {"direct": lambda n, c: latencies(args.redis_url, keys, request, n, c),
                     "api": lambda n, c: api_latencies(api, n, c),
                     "api_no_feedback": lambda n, c: api_latencies(nofb, n, c)}
            pids = {"api": pid, "api_no_feedback": pid2}
            for concurrency in (1, 32):
                for run in paths.values():
                    run(max(50, concurrency * 2), concurrency)  # warm-up: connections, imports, JIT-free paths
                ms: dict[str, list[float]] = {name: [] for name in paths}
                cpu = dict.fromkeys(pids, 0.0)
                for _ in range(args.rounds):
                    for name, run in paths.items():
                        before = cpu_s(pids[name]) if name in pids else 0.0
                        ms[name] += run(per_round, concurrency)
                        if name in pids:
                            cpu[name] += cpu_s(pids[name]) - before
                row = {name: summary(values) for name, values in ms.items()}
                for name, seconds in cpu.items():
                    row[name]["server_cpu_ms_per_request"] = seconds * 1000 / len(ms[name])
                row["overhead_p50_ms"] = row["api"]["p50_ms"] - row["direct"]["p50_ms"]
                row["overhead_p99_ms"] = row["api"]["p99_ms"] - row["direct"]["p99_ms"]
                results[f"concurrency_{concurrency}"] = row
                say(f"concurrency {concurrency}, {len(ms['direct'])} requests per path (no-op worker):")
                for name in paths:
                    cpu_note = (f"   server CPU {row[name]['server_cpu_ms_per_request']:.2f} ms/request"
                                if name in pids else "")
                    p50, p99 = row[name]["p50_ms"], row[name]["p99_ms"]
                    say(f"  {name:<16} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms{cpu_note}")
                say(f"  API hop overhead  p50 {row['overhead_p50_ms']:+.2f} ms   p99 {row['overhead_p99_ms']:+.2f} ms")
    finally:
        cleanup(args.redis_url, prefix)
    results["wall_s"] = time.perf_counter() - started
    say(f"total {results['wall_s']:.0f} s")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
