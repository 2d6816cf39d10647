"""`roberta-client extract`: resumable bulk feature extraction into a directory of shards.

Output layout, for `--out DIR`:

* `shard-00000.npy`: float32 or float16. With pooling, one row per item, `[items, H]` (or
  `[items, layers, H]` when several layers are asked for). Without pooling, the items' token
  vectors one after another, `[tokens, H]` (or `[tokens, layers, H]`).
* `shard-00000.jsonl`: the shard's index, one line per item in row order:
  `{"id": ..., "row": i, "start": s, "length": n, "num_tokens": t}`; without pooling the item's
  vectors are rows `start .. start+length`. A failed item has `"error"` instead of rows.

A shard's index is written last, and only after its array is complete (both by rename), so an
index on disk means the shard is whole. A rerun reads the indexes, skips the ids they hold and
goes on with new shard numbers: an interrupted job loses only the shard it was filling, and no id
is ever written twice.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from roberta_client.client import RobertaClient
from roberta_client.inputs import InputLike
from roberta_client.streaming import StreamResult

logger = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    input: str
    out: str
    servers: list[str]
    pooling: str = "cls"
    layers: list[int] | None = None
    dtype: str = "float32"  # what is stored: float32 or float16
    truncate: bool = False
    shard_size: int = 10000
    streams_per_server: int = 1
    items_per_message: int = 16
    max_attempts: int = 8
    progress: bool = True


def read_records(path: str) -> Iterator[tuple[str, InputLike]]:
    """(id, input) of each record: JSONL objects with `id`, `text` and optional `text_pair`
    (or `ids`), or plain text lines whose id is their line number (from 0)."""
    handle = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    with handle:
        for number, line in enumerate(handle):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith("{"):
                record = json.loads(line)
                item_id = str(record.get("id", number))
                if "ids" in record:
                    yield item_id, [int(i) for i in record["ids"]]
                elif "text_pair" in record:
                    yield item_id, (record["text"], record["text_pair"])
                else:
                    yield item_id, record["text"]
            else:
                yield str(number), line


class ShardWriter:
    """Collects results and writes them as complete shards."""

    def __init__(self, out: Path, shard_size: int, dtype: str, per_token: bool):
        self.out = out
        self.shard_size = shard_size
        self.dtype = np.float16 if dtype == "float16" else np.float32
        self.per_token = per_token
        out.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        numbers = [-1]
        for index in sorted(out.glob("shard-*.jsonl")):
            numbers.append(int(index.stem.split("-")[1]))
            with open(index, encoding="utf-8") as handle:
                self.done.update(json.loads(line)["id"] for line in handle)
        self.next_shard = max(numbers) + 1
        self.written = 0
        self._reset()

    def _reset(self) -> None:
        self.rows: list[np.ndarray] = []
        self.entries: list[dict[str, Any]] = []
        self.next_row = 0

    def add(self, result: StreamResult) -> None:
        entry: dict[str, Any] = {"id": result.id, "num_tokens": result.num_tokens}
        if result.ok:
            array = np.asarray(result.value)  # [layers, T, H] or [layers, H]
            array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -2)
            length = len(array) if self.per_token else 1
            entry.update(row=len(self.entries), start=self.next_row, length=length)
            self.next_row += length
            self.rows.append(array.astype(self.dtype, copy=False))
        else:
            entry["error"] = f"{result.error.code.name}: {result.error.message}"
        self.entries.append(entry)
        if len(self.entries) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.entries:
            return
        name = self.out / f"shard-{self.next_shard:05d}"
        if not self.rows:
            data = np.zeros((0,), self.dtype)
        elif self.per_token:
            data = np.concatenate(self.rows)
        else:
            data = np.stack(self.rows)
        tmp = self.out / f"{name.name}.npy.tmp"
        with open(tmp, "wb") as handle:
            np.save(handle, data)
        os.replace(tmp, self.out / f"{name.name}.npy")
        tmp = self.out / f"{name.name}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            for entry in self.entries:
                handle.write(json.dumps(entry) + "\n")
        os.replace(tmp, self.out / f"{name.name}.jsonl")
        self.written += len(self.entries)
        self.done.update(e["id"] for e in self.entries)
        self.next_shard += 1
        self._reset()


class Progress:
    """items/s, tokens/s and ETA on stderr: a redrawn line on a terminal, else a log line."""

    def __init__(self, total: int | None, enabled: bool):
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.items = self.tokens = self.errors = 0

    def update(self, result: StreamResult) -> None:
        self.items += 1
        self.tokens += result.num_tokens
        self.errors += not result.ok
        now = time.monotonic()
        if self.enabled and now - self.last >= (0.5 if self.tty else 10.0):
            self.last = now
            self.show(now)

    def show(self, now: float | None = None) -> None:
        elapsed = max(1e-9, (now or time.monotonic()) - self.start)
        rate = self.items / elapsed
        line = f"{self.items}"
        if self.total:
            eta = (self.total - self.items) / rate if rate else float("inf")
            line += f"/{self.total} ({100 * self.items / self.total:.1f}%) ETA {eta:.0f}s"
        line += f" | {rate:.1f} items/s {self.tokens / elapsed:.0f} tokens/s"
        if self.errors:
            line += f" | {self.errors} failed"
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        else:
            logger.info("progress: %s", line)


def run_extract(cfg: ExtractConfig, client_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Extract every record not already in `cfg.out`; returns a summary."""
    writer = ShardWriter(Path(cfg.out), cfg.shard_size, cfg.dtype, cfg.pooling == "none")
    skipped = len(writer.done)
    todo = None
    if cfg.input != "-":
        todo = sum(1 for item_id, _ in read_records(cfg.input) if item_id not in writer.done)
    source = ((i, x) for i, x in read_records(cfg.input) if i not in writer.done)
    lock = threading.Lock()

    def shared() -> Iterator[tuple[str, InputLike]]:
        # One source, several streams: each takes the next record when its window has room.
        while True:
            with lock:
                record = next(source, None)
            if record is None:
                return
            yield record

    results: queue.Queue[StreamResult | BaseException | None] = queue.Queue(maxsize=4096)
    stop = threading.Event()

    def worker(server: str) -> None:
        try:
            with RobertaClient(server, **client_kwargs) as client:
                for result in client.stream_features(
                    shared(),
                    layers=cfg.layers,
                    pooling=cfg.pooling,
                    dtype="float32" if cfg.dtype == "float32" else "float16",
                    truncate=cfg.truncate,
                    items_per_message=cfg.items_per_message,
                    max_attempts=cfg.max_attempts,
                ):
                    if stop.is_set():
                        return
                    results.put(result)
        except BaseException as exc:  # reported by the writer thread
            results.put(exc)
        finally:
            results.put(None)

    targets = list(itertools.chain.from_iterable([s] * cfg.streams_per_server for s in cfg.servers))
    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    progress = Progress(todo, cfg.progress)
    running, failure = len(threads), None
    try:
        while running:
            result = results.get()
            if result is None:
                running -= 1
            elif isinstance(result, BaseException):
                failure = failure or result
                stop.set()
            else:
                writer.add(result)
                progress.update(result)
    finally:
        stop.set()
        writer.flush()
        if cfg.progress:
            progress.show()
            if progress.tty:
                sys.stderr.write("\n")
    if failure is not None:
        raise failure
    return {
        "out": cfg.out,
        "written": writer.written,
        "skipped": skipped,
        "failed": progress.errors,
        "tokens": progress.tokens,
        "seconds": round(time.monotonic() - progress.start, 3),
        "shards": writer.next_shard,
    }
