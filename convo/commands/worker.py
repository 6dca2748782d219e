"""`convo serve worker`, `convo serve status` and `convo ask`: thin shells over inference.worker and inference.client.

The worker imports torch only inside its command; `serve status` and `ask` never load a model.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from convo.commands.serve import serve_app
from errors import ConfigError

console = Console(highlight=False)


def _state(ctx: typer.Context):
    from convo.cli import state

    return state(ctx)


def worker_cmd(
    ctx: typer.Context,
    base: Annotated[str | None, typer.Option("--base", help="Base model: a local HF model dir or a hub id. \\[default: worker.base, else the base the adapters record]")] = None,
    adapters: Annotated[str | None, typer.Option("--adapters", help="Dir with one adapter dir per persona (`<persona>/` or `<persona>/current -> vN`). \\[default: worker.adapters_dir = adapters]")] = None,
    quantize: Annotated[str | None, typer.Option("--quantize", help="4bit: NF4 through bitsandbytes (CUDA or CPU); none: bf16 on CUDA, fp32 on CPU; auto: bf16 on CUDA while its weights take <= 40 % of the GPU, else 4bit; fp32 on CPU. \\[default: worker.quantize = auto]")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Consumer name in the `workers` group; reuse it after a restart to re-read its own pending entries. \\[default: host-pid]")] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", min=1, max=256, help="Requests per generate call. \\[default: worker.max_batch = 16]")] = None,
    max_wait_ms: Annotated[float | None, typer.Option("--max-wait-ms", min=0, help="After the first request, wait this long for more to batch. \\[default: 5]")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", min=0, max=65535, help="Prometheus /metrics port; 0: off. \\[default: worker.metrics_port = 9464]")] = None,
    visibility_timeout_s: Annotated[float | None, typer.Option("--visibility-timeout-s", min=0.001, help="Take over entries another worker has held this long without acking. \\[default: 60]")] = None,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads for torch (0: torch's choice).")] = 0,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve every persona's adapter on one base model: read requests from Redis, batch, generate, reply."""
    if quantize is not None and quantize not in ("4bit", "none", "auto"):
        raise ConfigError(f"--quantize {quantize}: use 4bit, none or auto")
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level {log_level}: use debug, info, warning or error")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _state(ctx).settings
    overrides = {k: v for k, v in dict(max_batch=max_batch, max_wait_ms=max_wait_ms, metrics_port=metrics_port,
                                       visibility_timeout_s=visibility_timeout_s).items() if v is not None}
    if overrides:
        settings = settings.model_copy(update={"worker": settings.worker.model_copy(update=overrides)})
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    from inference.client import connect
    from inference.worker import build_worker

    async def serve() -> None:
        redis = connect(settings.redis)
        try:
            worker = build_worker(settings, redis, base=base, adapters_dir=adapters, quantize=quantize, name=name)
            await worker.main()
        finally:
            await redis.aclose()

    asyncio.run(serve())


def status_cmd(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
) -> None:
    """Show the workers alive (heartbeats), queue depth, pending requests and dead letters."""
    from inference.client import connect
    from inference.protocol import Keys
    from inference.worker import read_status

    settings = _state(ctx).settings

    async def run():
        redis = connect(settings.redis)
        try:
            return await read_status(redis, Keys(settings.redis.prefix))
        finally:
            await redis.aclose()

    status = _run_redis(run, settings.redis.url)
    if as_json:
        print(json.dumps(status, indent=2, default=str))
        return
    table = Table(title=f"workers ({len(status['workers'])} alive)")
    for col in ("worker", "pid", "base", "adapters loaded", "requests", "in flight", "batch rows", "tokens/s",
                "prompt tokens run / cached", "last seen"):
        table.add_column(col)
    for w in status["workers"]:
        occupancy = f"{w['rows_active']}/{w['rows_capacity']}" if w["rows_capacity"] else "-"
        table.add_row(escape(w["worker"]), str(w["pid"]), escape(w["base"]), escape(", ".join(w["adapters_loaded"])),
                      str(w["requests"]), str(w["in_flight"]), occupancy, f"{w['tokens_per_s']:.0f}",
                      prompt_tokens(w["prompt_tokens_run"], w["prompt_tokens_cached"]), f"{w['age_s']:.1f} s ago")
    console.print(table)
    console.print(f"queue depth {status['queue_depth']}  pending {status['pending']}  dead letters {status['dead']}")


def prompt_tokens(run: int, cached: int) -> str:
    """Prompt tokens prefilled / taken from the prefix cache, with the cached share: "1,200 / 3,600 (75 % cached)"."""
    total = run + cached
    return f"{run:,} / {cached:,} ({cached / total:.0%} cached)" if total else "-"


def ask_cmd(
    ctx: typer.Context,
    conversation: Annotated[str, typer.Argument(help="The conversation so far, one '[TAG] text' line per message (a line without a tag is yours: speaker ME).")],
    persona: Annotated[str, typer.Option("--persona", help="Persona name (its adapter dir's name).")],
    mode: Annotated[str, typer.Option("--mode", help="friend: answer as the persona; self: draft your next message to them.")] = "friend",
    n: Annotated[int | None, typer.Option("--n", min=1, max=8, help="Candidates. \\[default: generate.n = 3]")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", min=0.0, max=5.0, help="0 is greedy. \\[default: generate.temperature = 0.8]")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1, max=256, help="\\[default: generate.max_new_tokens = 64]")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Show candidate 1 live while it is written.")] = False,
    timeout_s: Annotated[float, typer.Option("--timeout-s", min=0.1, help="Give up (exit 2) after this long.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole response as JSON.")] = False,
) -> None:
    """Ask a running worker for the next message: prints the candidates (exit 2 on timeout or error)."""
    from inference.client import WorkerClient, WorkerError, connect
    from inference.protocol import GenerateRequest, Keys, Partial

    settings = _state(ctx).settings
    g = settings.generate
    if mode not in ("friend", "self"):
        raise ConfigError(f"--mode {mode}: use friend or self")
    request = GenerateRequest.build(
        persona=persona, mode=mode, history=parse_history(conversation),
        n=n or g.n, temperature=g.temperature if temperature is None else temperature,
        top_p=g.top_p, max_new_tokens=min(max_new_tokens or g.max_new_tokens, 256),
    )

    async def run():
        redis = connect(settings.redis)
        client = WorkerClient(redis, Keys(settings.redis.prefix))
        try:
            if not stream:
                return await asyncio.wait_for(client.generate(request, timeout_s), timeout_s + 5)
            response = None
            async for item in client.stream(request, timeout_s):
                if isinstance(item, Partial):
                    if not as_json:
                        console.print(f"[dim]… {escape(item.text)}[/]")
                else:
                    response = item
            return response
        finally:
            await redis.aclose()

    response = _run_redis(run, settings.redis.url)
    if not response.ok:
        raise WorkerError(response)
    if as_json:
        print(response.dumps())
        return
    for i, candidate in enumerate(response.candidates, 1):
        console.print(f"[bold]{i}.[/] " + escape("\n   ".join(candidate) or "(empty)"))
    version = f" {response.adapter.version}" if response.adapter and response.adapter.version else ""
    console.print(f"[dim]{escape(persona)}{escape(version)} · queue {response.queue_ms or 0:.0f} ms · "
                  f"generate {response.generate_ms or 0:.0f} ms · {escape(response.worker or '')}[/]")


def parse_history(conversation: str) -> list[dict]:
    """'[TAG] text' lines to history messages; untagged lines are the owner's (speaker ME)."""
    from inference.prompt_format import line_speaker

    history = []
    for line in conversation.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        tag = line_speaker(line)
        if tag is None:
            history.append({"speaker": "ME", "text": line.strip()})
        else:
            history.append({"speaker": tag, "text": line[len(tag) + 2:].strip()})
    return history


def _run_redis(fn, url: str):
    """Run an async Redis job; an unreachable Redis is a one-line error."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from inference.client import WorkerTimeout

    try:
        return asyncio.run(fn())
    except TimeoutError as e:
        raise WorkerTimeout("no answer from a worker in time (is `convo serve worker` running?)") from e
    except (RedisConnectionError, RedisTimeoutError, OSError) as e:
        raise ConfigError(f"cannot reach Redis at {_safe_url(url)}: {e} (start it, or set CONVO_REDIS__URL)") from e


def _safe_url(url: str) -> str:
    """The URL without a password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts)


def register(app: typer.Typer) -> None:
    """Add `serve worker`, `serve status` and `ask`."""
    serve_app.command("worker")(worker_cmd)
    serve_app.command("status")(status_cmd)
    app.command("ask")(ask_cmd)
