"""A `roberta-server serve` child process on loopback, for tests, benchmarks and the integration
tests of applications that call the server.

The server is started with `--port 0 --metrics-port 0` (later arguments may override them) and
its JSON log lines are read to learn the ports it bound, so callers never race for a port. The
log is drained for the whole life of the process, so its pipe never fills.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import grpc


class ServerProcess:
    """`python -m roberta_server serve ARGS` with its log records in `logs`."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        cmd = [
            sys.executable, "-m", "roberta_server", "serve",
            "--host", "127.0.0.1", "--port", "0",
            "--metrics-host", "127.0.0.1", "--metrics-port", "0",
            "--log-format", "json", *args,
        ]  # fmt: skip
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=full_env
        )
        self.logs: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port: int | None = None
        self.metrics_port: int | None = None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = {"message": line.rstrip(), "level": "RAW"}
            self.logs.append(record)
            self._lines.put(record)
        self._lines.put(None)

    def wait_for(self, message: str, timeout: float = 180.0) -> dict[str, Any]:
        """Block until a log record with this message appears; fail if the process dies."""
        for record in list(self.logs):
            if record.get("message") == message:
                return record
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                record = self._lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if record is None:
                raise RuntimeError(
                    f"server exited ({self.proc.poll()}) before {message!r}:\n{self.tail()}"
                )
            if record.get("message") == message:
                return record
        raise TimeoutError(f"no {message!r} within {timeout}s:\n{self.tail()}")

    def wait_listening(self) -> ServerProcess:
        """Until the gRPC port is bound (the model may still be loading)."""
        self.port = self.wait_for("grpc listening")["port"]
        # The metrics listener starts first; `--metrics-port -1` switches it off.
        metrics = [r for r in self.logs if r.get("message") == "metrics listening"]
        self.metrics_port = metrics[0]["metrics_port"] if metrics else None
        return self

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        """Until the model is loaded and the server answers."""
        if self.port is None:
            self.wait_listening()
        self.wait_for("serving", timeout)
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        """An insecure channel to the server, with the server's default 64 MiB message limit."""
        return grpc.insecure_channel(
            self.target,
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )

    def tail(self, n: int = 30) -> str:
        return "\n".join(json.dumps(r) for r in self.logs[-n:])

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server and return its exit code; kill it if it outlives `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def scrape_metrics(port: int) -> dict[str, float]:
    """One HTTP scrape of /metrics: {sample name with labels: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
