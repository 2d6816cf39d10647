"""Overload, deadlines, injected faults, start-up refusals and graceful shutdown, on real servers."""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from roberta_client import RobertaClient
from roberta_client._proto.roberta.v1 import roberta_pb2 as pb
from roberta_client._proto.roberta.v1 import roberta_pb2_grpc
from roberta_server.launcher import ServerProcess, scrape_metrics

log = logging.getLogger(__name__)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _features_request(texts: list[str]) -> pb.ExtractFeaturesRequest:
    return pb.ExtractFeaturesRequest(
        inputs=[pb.Input(text=t) for t in texts],
        options=pb.FeatureOptions(pooling=pb.POOLING_CLS),
    )


async def _fire(target: str, requests: list, concurrency: int, timeout: float = 60) -> list:
    """Send the requests with `concurrency` in flight; returns (code, details, trailers, reply)
    per request, in order."""
    results: list = [None] * len(requests)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = roberta_pb2_grpc.RobertaStub(channel)
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int, request) -> None:
            async with slots:
                call = stub.ExtractFeatures(request, timeout=timeout)
                try:
                    reply = await call
                    results[i] = (grpc.StatusCode.OK, "", (), reply)
                except grpc.aio.AioRpcError as err:
                    trailers = tuple(err.trailing_metadata() or ())
                    results[i] = (err.code(), err.details(), trailers, None)

        await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return results


def test_overload_fails_fast_with_a_retry_hint_and_memory_stays_bounded():
    # Capacity here: a few short batches in flight and 2000 queued tokens. The load offers
    # 300 requests at once, over 10x what the queue admits.
    with ServerProcess(
        "--model", "random:tiny", "--max-queued-tokens", "2000", "--max-concurrent-rpcs", "64",
        "--max-batch-size", "4", "--max-batch-tokens", "512",
    ) as srv:  # fmt: skip
        srv.wait_ready()
        rss_start = _rss_mib(srv.proc.pid)
        texts = ["overload " * 60] * 4
        rounds = []
        for _ in range(3):
            rounds.append(asyncio.run(_fire(srv.target, [_features_request(texts)] * 300, 300)))
        rss_end = _rss_mib(srv.proc.pid)
        codes = collections.Counter(code for r in rounds for code, *_ in r)
        log.info("overload: %s; RSS %.0f -> %.0f MiB", dict(codes), rss_start, rss_end)
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        refused = [r for rnd in rounds for r in rnd if r[0] is grpc.StatusCode.RESOURCE_EXHAUSTED]
        for _, details, trailers, _ in refused:
            assert "retry in about" in details, details
            hint = dict(trailers)["retry-after-ms"]
            assert int(hint) > 0
        for code, _, _, reply in (r for rnd in rounds for r in rnd):
            if code is grpc.StatusCode.OK:
                assert len(reply.results) == 4 and list(reply.results[0].tensor.shape) == [1, 64]
        # Three rounds of 10x overload leave the server's memory where one round put it.
        assert rss_end - rss_start < 150, (rss_start, rss_end)
        m = scrape_metrics(srv.metrics_port)
        assert m["roberta_queue_items"] == 0 and m["roberta_requests_in_flight"] == 0
        with RobertaClient(srv.target) as c:
            assert c.encode("Hello world!").tolist() == [0, 31414, 232, 328, 2]


def test_expired_and_cancelled_items_are_dropped_before_compute():
    with ServerProcess(
        "--model", "random:tiny", "--max-batch-size", "1", "--max-batch-tokens", "512"
    ) as srv:  # fmt: skip
        srv.wait_ready()
        before = scrape_metrics(srv.metrics_port)
        channel = srv.channel()
        stub = roberta_pb2_grpc.RobertaStub(channel)
        # A long request keeps the model busy one item at a time...
        busy = stub.ExtractFeatures.future(_features_request(["busy " * 500] * 1000), timeout=120)
        deadline = time.monotonic() + 30
        while scrape_metrics(srv.metrics_port)["roberta_queue_items"] < 500:
            assert time.monotonic() < deadline, "the busy request never queued"
            time.sleep(0.02)
        # ...while these wait behind it and run out of time.
        codes = []
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as err:
                stub.ExtractFeatures(_features_request(["late " * 100] * 8), timeout=0.1)
            codes.append(err.value.code())
        assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert len(busy.result().results) == 1000
        deadline = time.monotonic() + 30
        while True:
            m = scrape_metrics(srv.metrics_port)
            dropped = sum(
                m[k] - before.get(k, 0) for k in m if k.startswith("roberta_items_dropped_total")
            )
            if dropped >= 40 and m["roberta_queue_items"] == 0:
                break
            assert time.monotonic() < deadline, (dropped, m["roberta_queue_items"])
            time.sleep(0.1)
        # None of the 40 late items reached the model: only the busy ones ran, one per batch.
        batches = m["roberta_batches_total"] - before["roberta_batches_total"]
        assert batches == 1000
        channel.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-batch-tokens", "100"], "max-batch-tokens 100 is below"),
        (["--max-batch-size", "-1"], "must be >= 1"),
        (["--stream-window", "0"], "must be >= 1"),
        (["--max-queued-tokens", "10"], "max-queued-tokens must be at least"),
    ],
)
def test_configurations_that_could_hang_are_refused_at_start(args, message):
    run = subprocess.run(
        [sys.executable, "-m", "roberta_server", "serve", "--model", "random:tiny",
         "--port", "0", "--metrics-port", "-1", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode != 0
    assert message in run.stderr


def test_faults_are_isolated_to_the_items_that_cause_them():
    # Passes over 300 tokens fail as out of memory; any pass holding the id 50000 fails.
    with ServerProcess(
        "--model", "random:tiny", "--fault-oom-tokens", "300", "--fault-poison-id", "50000",
        "--max-queue-delay-ms", "50",
    ) as srv:  # fmt: skip
        srv.wait_ready()
        clean = [f"request {i} item {j} " * 6 for i in range(12) for j in range(4)]
        requests = [_features_request(clean[i * 4 : (i + 1) * 4]) for i in range(12)]
        poisoned = pb.ExtractFeaturesRequest(
            inputs=[pb.Input(text="fine text"), pb.Input(ids=pb.TokenIds(ids=[0, 50000, 2]))],
            options=pb.FeatureOptions(pooling=pb.POOLING_CLS),
        )
        results = asyncio.run(_fire(srv.target, [*requests, poisoned], 13))
        codes = collections.Counter(code for code, *_ in results)
        assert codes == {grpc.StatusCode.OK: 12, grpc.StatusCode.INTERNAL: 1}, codes
        bad = results[-1]
        assert bad[0] is grpc.StatusCode.INTERNAL
        assert "injected fault" in bad[1]
        m = scrape_metrics(srv.metrics_port)
        # The big batches really failed and were split: more batches than requests ran.
        assert m["roberta_item_failures_total"] >= 1
        with RobertaClient(srv.target) as c:
            # The results of split-and-retried batches equal those of a calm server.
            alone = c.extract_features_batch(clean[:4], pooling="cls")
            for got, want in zip(results[0][3].results, alone, strict=True):
                got_array = np.frombuffer(got.tensor.data, np.float32).reshape(want.shape)
                np.testing.assert_allclose(got_array, want, atol=1e-5)
            # A stream: the poisoned item fails alone and the stream goes on.
            streamed = {
                r.id: r
                for r in c.stream_features([("a", "fine"), ("b", [0, 50000, 2]), ("c", "ok")])
            }
            assert streamed["a"].ok and streamed["c"].ok
            assert streamed["b"].error.code is grpc.StatusCode.INTERNAL
        # Health stays SERVING: a probe sequence still runs, so the model is usable.
        time.sleep(1.5)
        with srv.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="roberta.v1.Roberta"))
            assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_under_load_loses_no_accepted_request(sig):
    with ServerProcess(
        "--model", "random:tiny", "--max-batch-size", "2", "--shutdown-grace", "60"
    ) as srv:  # fmt: skip
        srv.wait_ready()
        outcomes: list[tuple[grpc.StatusCode, float]] = []
        stop_at: list[float] = []
        done = threading.Event()

        async def client_loop(stub, i: int) -> None:
            while not done.is_set():
                try:
                    reply = await stub.ExtractFeatures(
                        _features_request([f"client {i} " * 30] * 4), timeout=120
                    )
                    assert len(reply.results) == 4
                    outcomes.append((grpc.StatusCode.OK, time.monotonic()))
                except grpc.aio.AioRpcError as err:
                    outcomes.append((err.code(), time.monotonic()))
                    if err.code() is grpc.StatusCode.UNAVAILABLE:
                        return

        async def load() -> None:
            async with grpc.aio.insecure_channel(srv.target) as channel:
                stub = roberta_pb2_grpc.RobertaStub(channel)
                await asyncio.gather(*(client_loop(stub, i) for i in range(16)))

        thread = threading.Thread(target=lambda: asyncio.run(load()))
        thread.start()
        time.sleep(1.5)
        stop_at.append(time.monotonic())
        srv.proc.send_signal(sig)
        assert srv.proc.wait(90) == 0
        done.set()
        thread.join(60)
        codes = collections.Counter(code for code, _ in outcomes)
        log.info("shutdown under load (%s): %s", sig.name, dict(codes))
        # Every request either completed or was refused with UNAVAILABLE: none was lost.
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        assert codes[grpc.StatusCode.OK] > 0
        finished_after = [
            t for code, t in outcomes if code is grpc.StatusCode.OK and t > stop_at[0]
        ]
        assert finished_after, "work in flight at the signal should still complete"
        messages = [r.get("message") for r in srv.logs]
        assert "shutting down" in messages and messages[-1] == "stopped"


def test_shutdown_answers_a_streams_items_then_ends_it_with_unavailable():
    """An open stream does not hold shutdown for the whole grace: the items it sent are answered,
    then it ends with UNAVAILABLE (the SDK resends anything unanswered elsewhere)."""
    with ServerProcess(
        "--model", "random:tiny", "--max-batch-size", "2", "--shutdown-grace", "120"
    ) as srv:  # fmt: skip
        srv.wait_ready()
        channel = srv.channel()
        stub = roberta_pb2_grpc.RobertaStub(channel)
        sent = threading.Event()
        hold = threading.Event()

        def requests():
            yield pb.ExtractFeaturesStreamRequest(
                items=[
                    pb.StreamItem(id=str(i), input=pb.Input(text="word " * 200)) for i in range(40)
                ],
                options=pb.FeatureOptions(pooling=pb.POOLING_CLS),
            )
            sent.set()
            hold.wait(120)  # the client keeps its side open and sends nothing more

        call = stub.ExtractFeaturesStream(requests())
        assert next(call).window.max_in_flight > 0
        assert sent.wait(30)
        answered: list[str] = []
        t0 = 0.0
        with pytest.raises(grpc.RpcError) as err:
            for response in call:
                answered += [r.id for r in response.results]
                if not t0:  # the first results: all 40 items were accepted; most still queued
                    t0 = time.monotonic()
                    srv.proc.send_signal(signal.SIGTERM)
        assert 0 < len(answered)
        hold.set()
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE, err.value
        assert "shutting down" in err.value.details()
        assert sorted(answered, key=int) == [str(i) for i in range(40)]
        assert srv.proc.wait(60) == 0
        # Well inside the 120 s grace: the idle stream did not hold the server up.
        assert time.monotonic() - t0 < 60
        channel.close()
