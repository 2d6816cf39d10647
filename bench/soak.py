"""`make soak`: mixed unary and stream traffic with random cancellations against one server.

Bounded in time (default 5 minutes) and load; not part of `make test`. Reports requests and
stream items by status code, unary p50/p99 latency, and the server's RSS at start and end (and its
peak), then checks that the server is still healthy with an empty queue.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from roberta_client import AsyncRobertaClient
from roberta_client._proto.roberta.v1 import roberta_pb2 as pb
from roberta_client._proto.roberta.v1 import roberta_pb2_grpc
from roberta_server.launcher import ServerProcess, scrape_metrics

log = logging.getLogger("soak")

WORDS = "the a model server stream batch token layer head mask text of and to in is".split()


@dataclass
class SoakConfig:
    model: str = "random:base"
    duration: float = 300.0
    unary_workers: int = 8
    stream_workers: int = 2
    cancel_probability: float = 0.1
    seed: int = 0
    out: str = str(Path(__file__).resolve().parent / "results")


@dataclass
class Tally:
    unary: collections.Counter = field(default_factory=collections.Counter)
    stream_items: collections.Counter = field(default_factory=collections.Counter)
    streams: collections.Counter = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120)))


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def unary_worker(stub, rng: random.Random, cfg: SoakConfig, end: float, t: Tally) -> None:
    while time.monotonic() < end:
        kind = rng.choice(["features", "classify", "tokenize", "fill"])
        inputs = [pb.Input(text=_text(rng)) for _ in range(rng.choice([1, 1, 1, 4, 16]))]
        if kind == "features":
            call = stub.ExtractFeatures(
                pb.ExtractFeaturesRequest(
                    inputs=inputs, options=pb.FeatureOptions(pooling=rng.choice([0, 1, 2]))
                ),
                timeout=rng.choice([0.05, 5, 30]),
            )
        elif kind == "classify":
            call = stub.Classify(pb.ClassifyRequest(head="mnli", inputs=inputs), timeout=30)
        elif kind == "tokenize":
            call = stub.Tokenize(pb.TokenizeRequest(inputs=inputs), timeout=30)
        else:
            call = stub.FillMask(pb.FillMaskRequest(texts=["a <mask> here"], topk=5), timeout=30)
        t0 = time.perf_counter()
        if rng.random() < cfg.cancel_probability:
            await asyncio.sleep(rng.random() * 0.05)
            call.cancel()
        try:
            await call
            t.unary["OK"] += 1
            t.latencies.append(time.perf_counter() - t0)
        except asyncio.CancelledError:
            t.unary["CANCELLED (by the client)"] += 1
        except grpc.aio.AioRpcError as err:
            t.unary[err.code().name] += 1


async def stream_worker(target: str, rng: random.Random, end: float, t: Tally) -> None:
    n = 0
    async with AsyncRobertaClient(target) as client:
        while time.monotonic() < end:
            n += 1
            size = rng.randint(50, 2000)
            stop_after = size if rng.random() > 0.3 else rng.randint(1, size)
            items = ((f"{n}-{i}", _text(rng)) for i in range(size))
            seen = 0
            try:
                async for result in client.stream_features(items, pooling="cls"):
                    t.stream_items["OK" if result.ok else result.error.code.name] += 1
                    seen += 1
                    if seen >= stop_after or time.monotonic() >= end:
                        break  # leaving the loop cancels the stream mid-way
                t.streams["completed" if seen == size else "cancelled by the client"] += 1
            except grpc.aio.AioRpcError as err:
                t.streams[err.code().name] += 1


async def run(cfg: SoakConfig, server: ServerProcess) -> Tally:
    tally = Tally()
    end = time.monotonic() + cfg.duration
    rng = random.Random(cfg.seed)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = roberta_pb2_grpc.RobertaStub(channel)
        tasks = [
            unary_worker(stub, random.Random(rng.random()), cfg, end, tally)
            for _ in range(cfg.unary_workers)
        ]
        tasks += [
            stream_worker(server.target, random.Random(rng.random()), end, tally)
            for _ in range(cfg.stream_workers)
        ]
        await asyncio.gather(*tasks)
    return tally


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    defaults = SoakConfig()
    for name, value in asdict(defaults).items():
        env = os.environ.get("ROBERTA_SOAK_" + name.upper())
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=type(value),
            default=type(value)(env) if env is not None else value,
            help=f"[env ROBERTA_SOAK_{name.upper()}; default {value}]",
        )
    cfg = SoakConfig(**vars(parser.parse_args(argv)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = ServerProcess("--model", cfg.model).wait_ready()
    rss_start, peak = _rss_mib(server.proc.pid), [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(2.0):
            peak[0] = max(peak[0], _rss_mib(server.proc.pid))

    threading.Thread(target=sample, daemon=True).start()
    log.info("soaking %s for %.0fs", cfg.model, cfg.duration)
    tally = asyncio.run(run(cfg, server))
    done.set()
    time.sleep(2.0)  # let cancelled work drain
    metrics = scrape_metrics(server.metrics_port)
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    rss_end = _rss_mib(server.proc.pid)
    exit_code = server.terminate(timeout=120)
    report = {
        "config": asdict(cfg),
        "unary_requests": dict(tally.unary),
        "stream_items": dict(tally.stream_items),
        "streams": dict(tally.streams),
        "unary_p50_ms": round(1e3 * (_percentile(tally.latencies, 0.5) or 0), 1),
        "unary_p99_ms": round(1e3 * (_percentile(tally.latencies, 0.99) or 0), 1),
        "rss_mib": {"start": round(rss_start), "peak": round(peak[0]), "end": round(rss_end)},
        "after": {
            "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
            "queue_items": metrics.get("roberta_queue_items"),
            "requests_in_flight": metrics.get("roberta_requests_in_flight"),
            "items_dropped": {
                k: v for k, v in metrics.items() if k.startswith("roberta_items_dropped_total")
            },
            "exit_code": exit_code,
        },
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    healthy = (
        report["after"]["health"] == "SERVING"
        and report["after"]["queue_items"] == 0
        and exit_code == 0
        and "INTERNAL" not in tally.unary
        and "UNKNOWN" not in tally.unary
    )
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
