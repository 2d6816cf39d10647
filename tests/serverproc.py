"""A real `roberta-server` process on loopback for end-to-end tests.

The server is started with `--port 0 --metrics-port 0` and its JSON log lines are read to learn
the ports it bound, so tests never race for a port.
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
from pathlib import Path

import grpc


class ServerProcess:
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
        self.logs: list[dict] = []
        self._lines: queue.Queue[dict | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port: int | None = None
        self.metrics_port: int | None = None

    def _read(self) -> None:
        for line in self.proc.stderr:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = {"message": line.rstrip(), "level": "RAW"}
            self.logs.append(record)
            self._lines.put(record)
        self._lines.put(None)

    def wait_for(self, message: str, timeout: float = 120.0) -> dict:
        """Block until a log record with this message appears; fail if the process dies."""
        for record in self.logs:
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
        self.metrics_port = self.wait_for("metrics listening")["metrics_port"]
        self.port = self.wait_for("grpc listening")["port"]
        return self

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        if self.port is None:
            self.wait_listening()
        self.wait_for("serving", timeout)
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
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


def export_checkpoint(model: str, out: Path, fmt: str = "fairseq") -> Path:
    """Write a checkpoint with the project's own export command."""
    subprocess.run(
        [sys.executable, "-m", "roberta_server", "export", "--model", model, "--format", fmt,
         "--out", str(out)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out


def scrape_metrics(port: int) -> dict[str, float]:
    """One real HTTP scrape of /metrics: {sample name with labels: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
