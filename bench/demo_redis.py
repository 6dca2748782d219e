"""The demo's Redis: the local one when it answers, else a `redis-server` started in a temp dir, else an embedded one.

    with demo_redis("redis://127.0.0.1:6379/0", tmp_dir) as r:   # r.url, r.kind, r.warning
        ...

* `local`: the configured URL answers a PING; the demo only touches keys under its own per-run prefix.
* `redis-server`: the binary is on PATH; it runs on a free loopback port with no persistence (`--save ""`,
  `--appendonly no`) and its dir inside `tmp_dir`; stopped (SIGTERM, then SIGKILL) when the block ends.
* `embedded`: fakeredis's `TcpFakeServer` (a Redis-compatible server in this process, Lua through `lupa`) on a
  free loopback port, with a warning: good enough for one demo, not for real use.

`choose_redis` holds the order and nothing else, so the order is tested without starting anything.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from errors import ConfigError

logger = logging.getLogger("convo.demo")

RedisKind = Literal["local", "redis-server", "embedded"]
EMBEDDED_WARNING = ("no Redis answers and no redis-server is installed: using an embedded Redis-compatible server "
                    "(fakeredis) inside this process; fine for the demo, not for real use (apt-get install "
                    "redis-server)")


@dataclass(frozen=True, slots=True)
class DemoRedis:
    """The Redis the demo talks to: its URL, which kind it is, and a warning to show (embedded only)."""

    url: str
    kind: RedisKind
    warning: str | None = None


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """True when a Redis at `url` answers PING within `timeout_s`."""
    import redis

    from inference.client import connect

    client = connect(url, sync=True, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError):
        return False
    finally:
        client.close()


def choose_redis(local_url: str, *, answers: Callable[[str], bool] | None = None,
                 which: Callable[[str], str | None] | None = None) -> RedisKind:
    """The first that works: the local Redis at `local_url`, an installed `redis-server`, the embedded server."""
    if (answers or redis_answers)(local_url):
        return "local"
    if (which or shutil.which)("redis-server"):
        return "redis-server"
    return "embedded"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Return once `url` answers PING; ConfigError after `timeout_s` or when `process` exits first."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if redis_answers(url, timeout_s=0.5):
            return
        if process is not None and process.poll() is not None:
            raise ConfigError(f"redis-server exited with code {process.returncode} before answering at {url}")
        time.sleep(0.05)  # polling interval of a bounded wait on the server answering
    raise ConfigError(f"the demo's Redis did not answer at {url} within {timeout_s:g} s")


@contextlib.contextmanager
def redis_server(tmp_dir: Path, binary: str = "redis-server", timeout_s: float = 10.0) -> Iterator[str]:
    """Run `redis-server` on a free loopback port without persistence; yields its URL; stops it on exit."""
    data_dir = Path(tmp_dir) / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = data_dir / "redis.log"
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(data_dir), "--logfile", str(log), "--daemonize", "no"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for(url, timeout_s, process)
        logger.info("redis-server pid=%d on port %d", process.pid, port)
        yield url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@contextlib.contextmanager
def embedded_server(timeout_s: float = 10.0) -> Iterator[str]:
    """Run fakeredis's TcpFakeServer in a daemon thread on a free loopback port; yields its URL."""
    try:
        from fakeredis import TcpFakeServer
    except ImportError as e:
        raise ConfigError("no Redis answers, no redis-server is installed and fakeredis is missing: "
                          "install one (apt-get install redis-server, or pip install 'fakeredis[lua]')") from e
    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    server.daemon_threads = True  # connection threads never keep the process alive
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                              name="embedded-redis")
    thread.start()
    url = f"redis://127.0.0.1:{server.server_address[1]}/0"
    try:
        _wait_for(url, timeout_s)
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def demo_redis(local_url: str, tmp_dir: Path, *, kind: RedisKind | None = None) -> Iterator[DemoRedis]:
    """The demo's Redis in the order of `choose_redis` (or `kind` when given); anything started is stopped on exit."""
    kind = kind or choose_redis(local_url)
    if kind == "local":
        yield DemoRedis(local_url, "local")
    elif kind == "redis-server":
        with redis_server(tmp_dir) as url:
            yield DemoRedis(url, "redis-server")
    else:
        logger.warning("%s", EMBEDDED_WARNING)
        with embedded_server() as url:
            yield DemoRedis(url, "embedded", EMBEDDED_WARNING)
