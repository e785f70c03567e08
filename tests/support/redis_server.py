"""A real redis-server (Debian's package) for the tests: on a free port, in a temporary
directory, stopped and started again on the same port and data directory at will (to take Redis
away from a running service and give it back), and killed at the end.

`.ci/run` installs redis-server when it is missing; a test that needs it and cannot find it
fails (in CI) or is skipped with the reason (on a machine without it, outside CI).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from tests.support.http import free_port


def redis_server_path() -> str:
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs Debian's redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return path


class RedisServer:
    """redis-server on 127.0.0.1:port; its RDB file in `directory` survives stop/start."""

    def __init__(self, directory: Path, *, maxmemory: str = "256mb") -> None:
        self.directory = directory
        self.port = free_port()
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        assert self.proc is None, "already running"
        args = [
            redis_server_path(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--dbfilename", "dump.rdb",
            "--save", "3600 1",  # so that a shutdown saves, and a restart finds the data again
            "--appendonly", "no",
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", "volatile-lru",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer within 30 s")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM: Redis saves its data (the save point above) and exits."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextmanager
def running_redis(directory: Path, **options: str) -> Iterator[RedisServer]:
    server = RedisServer(directory, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()
