"""Bulk streams and scheduling priority, measured against the model's own ceiling.

In one run on one machine, with the standard workload (`bench/workload.py`) and `random:base`:

* ceiling: the model alone, fixed 16 x 64 batches, no padding (useful tokens/s);
* bulk: one ExtractFeaturesStream (pooled `<s>` vectors, 16 items per message) from a separate
  load-generator process, saturating the server; useful tokens/s over the ceiling (target 0.9);
* interactive: unary single-text ExtractFeatures requests at a modest open-loop rate, alone and
  then while the bulk stream saturates the server; their p99 latency with bulk over without
  (target <= 2), and the bulk throughput with the interactive traffic over without.

    python bench/bench_stream.py [--quick] [--dtypes float32,bfloat16] [--model random:base]

Prints a table and writes bench/results/stream-latest.json. Compare ratios inside one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_model import CEILING_BATCH, CEILING_LEN, Runner  # noqa: E402
from roberta_server.launcher import ServerProcess  # noqa: E402
from workload import (  # noqa: E402
    random_token_seqs,
    single_token_words,
    standard_lengths,
    texts_of_lengths,
)

log = logging.getLogger("bench_stream")


@dataclass
class Config:
    model: str = "random:base"
    dtypes: str = "float32,bfloat16"
    seconds: float = 40.0  # per measured phase
    warmup: float = 5.0
    interactive_rps: float = 2.0  # modest: a small fraction of what the server can answer
    out: str = str(Path(__file__).resolve().parent / "results")


# ---- the load generator (a separate process)


async def _stream(target: str, texts: list[str], end: float, warm_end: float, out: dict) -> None:
    from roberta_client import AsyncRobertaClient

    def source():
        i = 0
        while time.monotonic() < end:
            yield f"{i}", texts[i % len(texts)]
            i += 1

    tokens = items = 0
    async with AsyncRobertaClient(target, timeout=None) as client:
        async for result in client.stream_features(source(), pooling="cls", items_per_message=16):
            now = time.monotonic()
            if warm_end <= now <= end:
                tokens += result.num_tokens
                items += 1
    out["stream_tokens"] = tokens
    out["stream_items"] = items
    out["stream_seconds"] = end - warm_end


async def _interactive(
    target: str, texts: list[str], rps: float, end: float, warm_end: float, out: dict
) -> None:
    import grpc
    from roberta_client._proto.roberta.v1 import roberta_pb2 as pb
    from roberta_client._proto.roberta.v1 import roberta_pb2_grpc

    rng = random.Random(1)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = roberta_pb2_grpc.RobertaStub(channel)
        options = pb.FeatureOptions(pooling=pb.POOLING_CLS)

        async def one(text: str) -> None:
            t0 = time.monotonic()
            await stub.ExtractFeatures(
                pb.ExtractFeaturesRequest(inputs=[pb.Input(text=text)], options=options)
            )
            if t0 >= warm_end:
                latencies.append(time.monotonic() - t0)

        tasks = []
        while time.monotonic() < end:
            tasks.append(asyncio.ensure_future(one(rng.choice(texts))))
            await asyncio.sleep(rng.expovariate(rps))  # open loop: Poisson arrivals
        await asyncio.gather(*tasks)
    out["latencies"] = latencies


def loadgen(target: str, texts: list[str], phase: str, cfg: Config, conn) -> None:
    async def main() -> dict:
        start = time.monotonic()
        warm_end, end = start + cfg.warmup, start + cfg.warmup + cfg.seconds
        out: dict = {}
        jobs = []
        if "bulk" in phase:
            jobs.append(_stream(target, texts, end, warm_end, out))
        if "interactive" in phase:
            jobs.append(_interactive(target, texts, cfg.interactive_rps, end, warm_end, out))
        await asyncio.gather(*jobs)
        return out

    conn.send(asyncio.run(main()))


def run_phase(target: str, texts: list[str], phase: str, cfg: Config) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=loadgen, args=(target, texts, phase, cfg, child))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


# ---- measurement


def ceiling(model: str, dtype: str, seconds: float) -> float:
    from roberta_server import load
    from roberta_server.cpu_memory import retain_freed_memory

    retain_freed_memory()  # as the server does
    hub = load(model, device="cpu", dtype=dtype)
    runner = Runner(hub.model, torch.device("cpu"))
    batch = random_token_seqs([CEILING_LEN] * CEILING_BATCH)
    warm_until = time.monotonic() + 3.0  # the first passes of a process run far slower
    while time.monotonic() < warm_until:
        runner.run(batch)
    spent, tokens = 0.0, 0
    while spent < seconds:
        spent += runner.run(batch)
        tokens += CEILING_BATCH * CEILING_LEN
    return tokens / spent


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


def bench_dtype(cfg: Config, dtype: str, texts: list[str]) -> dict:
    top = ceiling(cfg.model, dtype, max(5.0, cfg.seconds / 4))
    log.info("%s ceiling %.0f tokens/s", dtype, top)
    server = ServerProcess("--model", cfg.model, "--dtype", dtype, "--metrics-port", "-1")
    server.wait_ready()
    try:
        bulk = run_phase(server.target, texts, "bulk", cfg)
        alone = run_phase(server.target, texts, "interactive", cfg)
        both = run_phase(server.target, texts, "bulk+interactive", cfg)
    finally:
        server.terminate()
    bulk_rate = bulk["stream_tokens"] / bulk["stream_seconds"]
    shared_rate = both["stream_tokens"] / both["stream_seconds"]
    result = {
        "dtype": dtype,
        "ceiling_tokens_per_s": round(top),
        "stream_tokens_per_s": round(bulk_rate),
        "stream_over_ceiling": round(bulk_rate / top, 3),
        "interactive_requests": [len(alone["latencies"]), len(both["latencies"])],
        "interactive_p50_ms": [
            round(1e3 * float(np.median(alone["latencies"])), 1),
            round(1e3 * float(np.median(both["latencies"])), 1),
        ],
        "interactive_p99_ms": [
            round(1e3 * p99(alone["latencies"]), 1),
            round(1e3 * p99(both["latencies"]), 1),
        ],  # fmt: skip
        "interactive_p99_ratio": round(p99(both["latencies"]) / p99(alone["latencies"]), 2),
        "stream_tokens_per_s_with_interactive": round(shared_rate),
        "stream_share_kept": round(shared_rate / bulk_rate, 3),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=Config.model)
    parser.add_argument("--dtypes", default=Config.dtypes)
    parser.add_argument("--seconds", type=float, default=Config.seconds)
    parser.add_argument("--rps", type=float, default=Config.interactive_rps)
    parser.add_argument("--quick", action="store_true", help="short phases (about 3 minutes)")
    parser.add_argument("--out", default=Config.out)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = Config(
        model=args.model,
        dtypes=args.dtypes,
        seconds=12.0 if args.quick else args.seconds,
        warmup=3.0 if args.quick else Config.warmup,
        interactive_rps=args.rps,
        out=args.out,
    )
    torch.set_num_threads(os.cpu_count() or 1)
    from roberta_server.tokenizer import Tokenizer

    texts = texts_of_lengths(single_token_words(Tokenizer.default()), standard_lengths(4000))
    results = [bench_dtype(cfg, dtype, texts) for dtype in cfg.dtypes.split(",")]
    report = {"config": asdict(cfg), "results": results}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stream-latest.json").write_text(json.dumps(report, indent=2))
    print(f"{'dtype':9} {'ceiling':>8} {'stream':>8} {'s/ceil':>7} {'p99 alone':>10} "
          f"{'p99 +bulk':>10} {'ratio':>6} {'bulk kept':>9}")  # fmt: skip
    for r in results:
        print(
            f"{r['dtype']:9} {r['ceiling_tokens_per_s']:>8} {r['stream_tokens_per_s']:>8} "
            f"{r['stream_over_ceiling']:>7.3f} {r['interactive_p99_ms'][0]:>10.1f} "
            f"{r['interactive_p99_ms'][1]:>10.1f} {r['interactive_p99_ratio']:>6.2f} "
            f"{r['stream_share_kept']:>9.3f}"
        )
    ok = all(r["stream_over_ceiling"] >= 0.9 and r["interactive_p99_ratio"] <= 2.0 for r in results)
    print("targets: stream/ceiling >= 0.9, interactive p99 with bulk <= 2x without:",
          "PASS" if ok else "FAIL")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
