"""A roberta-server process for the benchmarks, started on free loopback ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading


class Server:
    """The server under test, started on free ports; its JSON log gives them."""

    def __init__(self, model: str, *args: str):
        cmd = [sys.executable, "-m", "roberta_server", "serve", "--model", model,
               "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1",
               "--metrics-port", "0", "--log-format", "json", *args]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        self.port = self.metrics_port = 0
        for line in self.proc.stderr:
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("message") == "metrics listening":
                self.metrics_port = record["metrics_port"]
            elif record.get("message") == "grpc listening":
                self.port = record["port"]
            elif record.get("message") == "serving":
                break
        else:
            raise RuntimeError(f"server exited with {self.proc.wait()}")
        # Keep draining its log so the pipe never fills.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(120)
