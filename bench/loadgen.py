"""Load generator for bench_server.py: a separate process that drives a roberta-grpc server.

It runs N concurrent clients in ONE asyncio loop over one grpc.aio channel. Requests are built
and serialized once per phase and sent as raw bytes (identity serializers), and replies are not
parsed unless a phase asks for it, so the generator spends as little of the shared CPU as it can.

Protocol: one JSON command per line on stdin, one JSON reply per line on stdout (logs on stderr).

    {"op": "workload", "path": PATH}
    {"op": "target", "name": "main", "target": "127.0.0.1:PORT", "metrics_url": "http://..."}
    {"op": "phase", "spec": {PhaseSpec fields}}  ->  {"ok": true, "result": {...}}
    {"op": "quit"}

The workload file is JSON: {"inputs": "text"|"ids", "items": [...], "lengths": [...],
"idle_item": ..., "idle_length": N}, where `lengths` are token counts with <s> and </s>.
This module imports no torch: it must stay light next to the server it measures.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import grpc
from roberta_client._proto.roberta.v1 import roberta_pb2 as pb

log = logging.getLogger("loadgen")

SERVICE = "/roberta.v1.Roberta/"
# Below this many replies in a window, throughput is taken from the server's token counter.
MIN_REPLIES_FOR_RATE = 20
MNLI = "mnli"
# Server counters diffed over a measurement window (Prometheus text names).
METRIC_NAMES = (
    "roberta_batch_real_tokens_total",
    "roberta_batch_computed_tokens_total",
    "roberta_batches_total",
    "roberta_batch_size_items_sum",
    "roberta_batch_size_items_count",
    "roberta_inference_duration_seconds_sum",
    "roberta_inference_duration_seconds_count",
    "roberta_queue_wait_seconds_sum",
    "roberta_queue_wait_seconds_count",
    "roberta_tokenize_duration_seconds_sum",
    "roberta_tokenize_duration_seconds_count",
)


@dataclass
class PhaseSpec:
    """One measured phase. Duration mode unless `requests` > 0 (then a fixed request count)."""

    name: str
    target: str = "main"  # name given to a target command
    concurrency: int = 32
    items_per_request: int = 1
    warmup_s: float = 2.0
    duration_s: float = 10.0
    warmup_requests: int = 0
    requests: int = 0
    source: str = "mix"  # "mix": the standard workload in order; "idle": the one idle item
    # "mix": ExtractFeatures (CLS pooling) and Classify (head mnli) alternately; "features";
    # "classify"; "info": GetModelInfo, which does no model work (the gRPC round trip alone)
    rpc: str = "mix"
    parse: bool = False  # parse replies and collect the server-reported usage timings
    scrape: bool = True  # diff the server's /metrics over the window
    timeout_s: float = 300.0


@dataclass
class Prebuilt:
    method: str  # "ExtractFeatures" or "Classify"
    payload: bytes
    tokens: int
    items: int


@dataclass
class Sample:
    sent: float
    done: float
    tokens: int
    items: int
    usage: dict[str, float] | None = None


@dataclass
class Collector:
    samples: list[Sample] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """The numeric samples of a Prometheus text page, by name (label sets kept in the name)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def reply_rate_is_coarse(spec: PhaseSpec, replies: int) -> bool:
    """Whether the server's real tokens computed in the window count throughput better than the
    replies do. So with few replies, and with requests of several texts: each completes only
    after several batches, and concurrent ones complete together, so a 40 s window of 64-text
    requests in float32 held 27 replies in about 7 clumps, and their rate read 8.5% below the
    server's count (16% in a quick run)."""
    return replies < MIN_REPLIES_FOR_RATE or spec.items_per_request > 1


def metrics_diff(before: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    """Server-side view of a window: batches, packing, model busy time."""
    d = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in METRIC_NAMES}
    real = d["roberta_batch_real_tokens_total"]
    computed = d["roberta_batch_computed_tokens_total"]
    batches = d["roberta_batches_total"]
    busy = d["roberta_inference_duration_seconds_sum"]
    items = d["roberta_batch_size_items_sum"]
    queued = d["roberta_queue_wait_seconds_count"]
    tokenized = d["roberta_tokenize_duration_seconds_count"]
    # Batch sizes: the cumulative histogram turned into counts per bucket ("<=8": n).
    prefix = 'roberta_batch_size_items_bucket{le="'
    cumulative = sorted(
        (float(k[len(prefix) : -2]), after[k] - before.get(k, 0.0))
        for k in after
        if k.startswith(prefix)
    )
    hist, below = {}, 0.0
    for le, count in cumulative:
        if count - below:
            hist["<=" + (f"{le:g}" if le != math.inf else "inf")] = count - below
        below = count
    return {
        "window_s": seconds,
        "batches": batches,
        "batch_items_histogram": hist,
        "real_tokens": real,
        "computed_tokens": computed,
        "padding_waste": 1 - real / computed if computed else None,
        "items_per_batch": items / batches if batches else None,
        "real_tokens_per_batch": real / batches if batches else None,
        "model_busy_fraction": busy / seconds if seconds else None,
        "real_tokens_per_busy_s": real / busy if busy else None,
        "server_tokens_per_s": real / seconds if seconds else None,
        "mean_batch_ms": 1e3 * busy / batches if batches else None,
        "mean_queue_wait_ms": (
            1e3 * d["roberta_queue_wait_seconds_sum"] / queued if queued else None
        ),
        "mean_tokenize_ms": (
            1e3 * d["roberta_tokenize_duration_seconds_sum"] / tokenized if tokenized else None
        ),
    }


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class Target:
    """One server: a channel whose calls take and return raw bytes (no protobuf work here)."""

    def __init__(self, address: str, metrics_url: str | None):
        self.address = address
        self.metrics_url = metrics_url
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.aio.insecure_channel(address, options=opts)
        self.calls = {
            name: self.channel.unary_unary(SERVICE + name)
            for name in ("ExtractFeatures", "Classify", "GetModelInfo")
        }

    async def close(self) -> None:
        await self.channel.close()


class LoadGen:
    def __init__(self, workload: dict[str, Any]):
        self.inputs_kind = workload["inputs"]
        self.items = workload["items"]
        self.lengths = workload["lengths"]
        self.idle_item = workload["idle_item"]
        self.idle_length = workload["idle_length"]
        self._cache: dict[tuple, list[Prebuilt]] = {}
        self.targets: dict[str, Target] = {}

    async def set_target(self, name: str, address: str, metrics_url: str | None) -> None:
        if name in self.targets:
            await self.targets.pop(name).close()
        self.targets[name] = Target(address, metrics_url)

    async def close(self) -> None:
        for target in self.targets.values():
            await target.close()
        self.targets.clear()

    def _input(self, item: Any) -> pb.Input:
        if self.inputs_kind == "ids":
            return pb.Input(ids=pb.TokenIds(ids=item))
        return pb.Input(text=item)

    def _build(self, method: str, batch: list[Any]) -> bytes:
        inputs = [self._input(x) for x in batch]
        if method == "Classify":
            return pb.ClassifyRequest(head=MNLI, inputs=inputs).SerializeToString()
        options = pb.FeatureOptions(pooling=pb.POOLING_CLS, dtype=pb.DTYPE_FLOAT32)
        return pb.ExtractFeaturesRequest(inputs=inputs, options=options).SerializeToString()

    def requests(self, spec: PhaseSpec) -> list[Prebuilt]:
        """The phase's requests, built once, in workload order (cycled by the clients)."""
        key = (spec.source, spec.items_per_request, spec.rpc)
        if key in self._cache:
            return self._cache[key]
        if spec.source == "idle":
            pool, lengths = [self.idle_item], [self.idle_length]
        else:
            pool, lengths = self.items, self.lengths
        k = spec.items_per_request
        count = max(1, len(pool) // k)
        out = []
        for j in range(count):
            idx = [(j * k + i) % len(pool) for i in range(k)]
            if spec.rpc == "info":
                payload = pb.GetModelInfoRequest().SerializeToString()
                out.append(Prebuilt("GetModelInfo", payload, 0, 0))
                continue
            if spec.rpc == "mix":
                method = "ExtractFeatures" if j % 2 == 0 else "Classify"
            else:
                method = "ExtractFeatures" if spec.rpc == "features" else "Classify"
            payload = self._build(method, [pool[i] for i in idx])
            out.append(Prebuilt(method, payload, sum(lengths[i] for i in idx), k))
        self._cache[key] = out
        return out

    async def _call(
        self, tgt: Target, req: Prebuilt, spec: PhaseSpec, col: Collector
    ) -> Sample | None:
        sent = time.perf_counter()
        try:
            reply = await tgt.calls[req.method](req.payload, timeout=spec.timeout_s)
        except grpc.aio.AioRpcError as exc:
            col.errors[exc.code().name] += 1
            if len(col.errors) == 1 and sum(col.errors.values()) == 1:
                log.warning("%s: first error %s: %s", spec.name, exc.code().name, exc.details())
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await asyncio.sleep(0.01)
            return None
        done = time.perf_counter()
        usage = None
        if spec.parse and req.method != "GetModelInfo":
            cls = (
                pb.ExtractFeaturesResponse
                if req.method == "ExtractFeatures"
                else pb.ClassifyResponse
            )
            u = cls.FromString(reply).usage
            usage = {
                "tokenize_ms": u.tokenize_ms,
                "queue_ms": u.queue_ms,
                "inference_ms": u.inference_ms,
            }
        return Sample(sent, done, req.tokens, req.items, usage)

    async def run_phase(self, spec: PhaseSpec) -> dict[str, Any]:
        reqs = self.requests(spec)
        counter = itertools.count()
        col = Collector()
        tgt = self.targets[spec.target]
        if spec.requests > 0:
            window, before, after = await self._run_counted(tgt, spec, reqs, counter, col)
        else:
            window, before, after = await self._run_timed(tgt, spec, reqs, counter, col)
        return self._summarize(spec, col, window, before, after)

    async def _scrape(self, tgt: Target, spec: PhaseSpec) -> dict[str, float] | None:
        if not (spec.scrape and tgt.metrics_url):
            return None
        try:
            return await asyncio.to_thread(scrape, tgt.metrics_url)
        except OSError as exc:
            log.warning("metrics scrape failed: %r", exc)
            return None

    async def _run_timed(self, tgt, spec, reqs, counter, col):
        start = time.perf_counter()
        w0 = start + spec.warmup_s
        w1 = w0 + spec.duration_s
        scrapes: dict[str, Any] = {}

        async def client() -> None:
            while time.perf_counter() < w1:
                sample = await self._call(tgt, reqs[next(counter) % len(reqs)], spec, col)
                if sample is not None:
                    col.samples.append(sample)

        async def scraper() -> None:
            await asyncio.sleep(max(0.0, w0 - time.perf_counter()))
            scrapes["t0"] = time.perf_counter()
            scrapes["before"] = await self._scrape(tgt, spec)
            await asyncio.sleep(max(0.0, w1 - time.perf_counter()))
            scrapes["t1"] = time.perf_counter()
            scrapes["after"] = await self._scrape(tgt, spec)

        clients = [asyncio.create_task(client()) for _ in range(spec.concurrency)]
        await scraper()
        # Calls still in flight are cancelled rather than awaited (a bulk request can take
        # seconds): the server drops their queued items, so the next phase starts promptly.
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        # Only the replies that arrived inside the window count.
        col.samples = [s for s in col.samples if w0 <= s.done <= w1]
        window = (scrapes["t0"], scrapes["t1"])
        return window, scrapes["before"], scrapes["after"]

    async def _run_counted(self, tgt, spec, reqs, counter, col):
        warm = Collector()
        for i in range(spec.warmup_requests):  # one at a time: a warm-up, not a load
            await self._call(tgt, reqs[i % len(reqs)], spec, warm)

        async def client() -> None:
            while (n := next(counter)) < spec.requests:
                req = reqs[(spec.warmup_requests + n) % len(reqs)]
                sample = await self._call(tgt, req, spec, col)
                if sample is not None:
                    col.samples.append(sample)

        before = await self._scrape(tgt, spec)
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(spec.concurrency)))
        t1 = time.perf_counter()
        after = await self._scrape(tgt, spec)
        return (t0, t1), before, after

    def _summarize(self, spec, col, window, before, after) -> dict[str, Any]:
        t0, t1 = window
        samples = sorted(col.samples, key=lambda s: s.done)
        lat = sorted(1e3 * (s.done - s.sent) for s in samples)
        tokens = sum(s.tokens for s in samples)
        items = sum(s.items for s in samples)
        seconds = t1 - t0
        # Rate from the first reply of the window to the last one: exact even when replies come
        # in clumps (a bulk request, a batch's worth of replies at once), provided the replies
        # span most of the window; otherwise tokens over the whole window.
        rate = tokens / seconds if seconds else 0.0
        if samples:
            first = samples[0].done
            head = sum(s.tokens for s in samples if s.done <= first + 0.01)
            span = samples[-1].done - first
            if span >= 0.5 * seconds and tokens > head:
                rate = (tokens - head) / span
        result: dict[str, Any] = {
            "spec": asdict(spec),
            "window_s": seconds,
            "requests": len(samples),
            "items": items,
            "useful_tokens": tokens,
            "useful_tokens_per_s": rate,
            "requests_per_s": len(samples) / seconds if seconds else 0.0,
            "errors": dict(col.errors),
            "latency_ms": {
                "mean": sum(lat) / len(lat) if lat else None,
                "p50": percentile(lat, 50),
                "p95": percentile(lat, 95),
                "p99": percentile(lat, 99),
                "max": lat[-1] if lat else None,
            },
        }
        if spec.requests > 0:  # fixed-count blocks may be merged by the caller
            result["latencies_ms"] = [1e3 * (s.done - s.sent) for s in samples]
        usages = [s.usage for s in samples if s.usage]
        if usages:
            result["usages"] = usages
            result["latency_minus_inference_ms"] = [
                1e3 * (s.done - s.sent) - s.usage["inference_ms"] for s in samples if s.usage
            ]
            result["server_usage_ms_p50"] = {
                k: percentile(sorted(u[k] for u in usages), 50) for k in usages[0]
            }
            result["latency_minus_inference_ms_p50"] = percentile(
                sorted(1e3 * (s.done - s.sent) - s.usage["inference_ms"] for s in samples), 50
            )
        result["rate_source"] = "replies"
        if before is not None and after is not None:
            result["server"] = metrics_diff(before, after, seconds)
            server_rate = result["server"]["server_tokens_per_s"]
            if server_rate and reply_rate_is_coarse(spec, len(samples)):
                result["reply_tokens_per_s"] = rate
                result["useful_tokens_per_s"] = server_rate
                result["rate_source"] = "server metrics"
        return result


async def serve_commands() -> None:
    loop = asyncio.get_running_loop()
    gen: LoadGen | None = None
    known = {f.name for f in fields(PhaseSpec)}
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        try:
            if cmd["op"] == "workload":
                if gen is not None:
                    await gen.close()
                with open(cmd["path"]) as f:
                    gen = LoadGen(json.load(f))
                reply: dict[str, Any] = {"ok": True}
            elif cmd["op"] == "target":
                assert gen is not None, "send the workload first"
                await gen.set_target(cmd["name"], cmd["target"], cmd.get("metrics_url"))
                reply = {"ok": True}
            elif cmd["op"] == "phase":
                assert gen is not None, "send the workload first"
                spec = PhaseSpec(**{k: v for k, v in cmd["spec"].items() if k in known})
                reply = {"ok": True, "result": await gen.run_phase(spec)}
            elif cmd["op"] == "quit":
                break
            else:
                reply = {"ok": False, "error": f"unknown op {cmd['op']!r}"}
        except Exception as exc:  # reported to the orchestrator, which decides
            log.exception("command failed")
            reply = {"ok": False, "error": repr(exc)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    if gen is not None:
        await gen.close()


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s loadgen: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(serve_commands())
    return 0


if __name__ == "__main__":
    sys.exit(main())
