"""Bulk streams against a real server: exactly-once results, flow control, disconnects, restarts."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from roberta_client import RobertaClient
from roberta_client._proto.roberta.v1 import roberta_pb2 as pb
from roberta_client._proto.roberta.v1 import roberta_pb2_grpc
from roberta_server.launcher import ServerProcess, scrape_metrics
from roberta_server.scheduler import INTERACTIVE_RECENT_S

WINDOW = 64


def _texts(n: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "stream", "item", "Über", "naïve", "東京", "!"]
    return [
        (f"doc-{i}", " ".join(rng.choice(words, size=int(rng.integers(1, 40))))) for i in range(n)
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", "random:tiny", "--stream-window", str(WINDOW)) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with RobertaClient(server.target) as c:
        yield c


def test_thousands_of_items_come_back_once_and_equal_unary(client):
    items = _texts(3000)
    seen: dict[str, np.ndarray] = {}
    for result in client.stream_features(iter(items), pooling="cls", items_per_message=16):
        assert result.ok, result.error
        assert result.id not in seen, f"{result.id} answered twice"
        seen[result.id] = result.value
    assert set(seen) == {i for i, _ in items}
    unary = client.extract_features_batch([t for _, t in items], pooling="cls")
    for (item_id, _), expected in zip(items, unary, strict=True):
        np.testing.assert_allclose(seen[item_id], expected, rtol=0, atol=1e-5)


def test_per_token_features_and_classes_equal_unary(client):
    items = _texts(200)
    streamed = {r.id: r for r in client.stream_features(items, layers=[0, -1], dtype="float16")}
    unary = client.extract_features_batch([t for _, t in items], layers=[0, -1], dtype="float16")
    for (item_id, _), expected in zip(items, unary, strict=True):
        got = streamed[item_id]
        assert got.value.shape == expected.shape and got.value.dtype == np.float16
        assert got.num_tokens == expected.shape[1]
        # Different batch neighbours round float32 sums differently: one float16 ulp of slack.
        np.testing.assert_allclose(got.value, expected, rtol=2e-3, atol=1e-3)
    classes = {r.id: r.value for r in client.stream_classify("mnli", items)}
    unary_classes = client.classify("mnli", [t for _, t in items])
    for (item_id, _), expected in zip(items, unary_classes, strict=True):
        assert classes[item_id].label == expected.label
        np.testing.assert_allclose(classes[item_id].logits, expected.logits, atol=1e-5)


def test_bad_items_fail_alone_and_the_stream_goes_on(client):
    items = [
        ("ok-1", "fine"),
        ("empty-ids", []),
        ("out-of-vocab", [0, 10**9, 2]),
        ("too-long", "word " * 600),
        ("ok-2", ("a premise", "a hypothesis")),
    ]
    results = {r.id: r for r in client.stream_features(items, pooling="mean")}
    assert results["ok-1"].ok and results["ok-2"].ok
    assert results["empty-ids"].error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "ids is empty" in results["empty-ids"].error.message
    assert "out of range" in results["out-of-vocab"].error.message
    assert "set truncate" in results["too-long"].error.message
    unknown = list(client.stream_classify("no-such-head", [("x", "text")]))
    assert unknown[0].error.code is grpc.StatusCode.NOT_FOUND
    assert "no-such-head" in unknown[0].error.message


def test_duplicate_ids_in_flight_are_refused_by_the_client(client):
    with pytest.raises(ValueError, match="used twice"):
        list(client.stream_features([("same", "a"), ("same", "b")], items_per_message=2))


def test_window_is_advertised_and_bounds_what_the_server_holds(server):
    channel = server.channel()
    stub = roberta_pb2_grpc.RobertaStub(channel)
    total = WINDOW * 12

    def requests():
        for i in range(total):
            yield pb.ExtractFeaturesStreamRequest(
                items=[pb.StreamItem(id=str(i), input=pb.Input(text="hello " * 100))],
                options=pb.FeatureOptions(pooling=pb.POOLING_CLS),
            )

    call = stub.ExtractFeaturesStream(requests())
    first = next(call)
    assert first.window.max_in_flight == WINDOW
    assert first.window.max_items_per_message > 0
    answered, most_queued = 0, 0
    for response in call:
        answered += len(response.results)
        queued = scrape_metrics(server.metrics_port)["roberta_queue_items"]
        most_queued = max(most_queued, queued)
    assert answered == total
    # The client offered everything at once; the server took no more than its window.
    assert 0 < most_queued <= WINDOW
    channel.close()


def test_a_client_that_disconnects_frees_the_server(tmp_path):
    # A small batch budget makes the queue deep, so the cancelled items are still waiting.
    with ServerProcess(
        "--model", "random:tiny", "--max-batch-tokens", "512", "--max-batch-size", "2"
    ) as srv:
        srv.wait_ready()
        channel = srv.channel()
        stub = roberta_pb2_grpc.RobertaStub(channel)
        items = [pb.StreamItem(id=str(i), input=pb.Input(text="word " * 400)) for i in range(600)]
        requests = iter(
            [pb.ExtractFeaturesStreamRequest(items=items[i : i + 100]) for i in range(0, 600, 100)]
        )
        call = stub.ExtractFeaturesStream(requests)
        next(call)  # the window
        deadline = time.monotonic() + 30
        while scrape_metrics(srv.metrics_port)["roberta_queue_items"] < 100:
            assert time.monotonic() < deadline, "items never queued"
            time.sleep(0.05)
        call.cancel()
        deadline = time.monotonic() + 60
        while True:
            m = scrape_metrics(srv.metrics_port)
            if m["roberta_queue_items"] == 0 and m["roberta_streams_open"] == 0:
                break
            assert time.monotonic() < deadline, f"queue never emptied: {m['roberta_queue_items']}"
            time.sleep(0.1)
        assert m['roberta_items_dropped_total{reason="cancelled"}'] >= 100
        assert m["roberta_queue_tokens"] == 0
        assert m["roberta_requests_in_flight"] == 0
        channel.close()


def _start_on(port: int) -> ServerProcess:
    return ServerProcess("--model", "random:tiny", "--port", str(port)).wait_ready()


def test_the_client_resumes_after_a_server_restart_without_duplicates():
    port = _free_port()
    srv = _start_on(port)
    items = _texts(1500)
    seen: list[str] = []
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            with RobertaClient(f"127.0.0.1:{port}") as c:
                for result in c.stream_features(iter(items), pooling="cls", max_attempts=50):
                    assert result.ok, result.error
                    seen.append(result.id)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(seen) < 200:
            assert time.monotonic() < deadline and not failure, failure
            time.sleep(0.01)
        srv.terminate(signal.SIGKILL)
        srv = _start_on(port)
        thread.join(180)
        assert not thread.is_alive()
    finally:
        srv.terminate(signal.SIGKILL)
    assert not failure, failure
    assert len(seen) == len(set(seen)) == len(items)
    assert 200 <= len(seen)


def _extract(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "roberta_client.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _read_shards(out: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    entries, vectors = [], {}
    for index in sorted(out.glob("shard-*.jsonl")):
        data = np.load(index.with_suffix(".npy"))
        for line in index.read_text().splitlines():
            entry = json.loads(line)
            entries.append(entry)
            vectors[entry["id"]] = data[entry["start"]]
    return entries, vectors


def test_extract_survives_a_server_kill_and_completes_on_rerun(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    items = _texts(1200)
    with open(corpus, "w") as f:
        for item_id, text in items:
            f.write(json.dumps({"id": item_id, "text": text}) + "\n")
    out = tmp_path / "features"
    port = _free_port()
    target = f"127.0.0.1:{port}"
    args = ["--server", target, "extract", "--input", str(corpus), "--out", str(out),
            "--shard-size", "100", "--max-attempts", "1", "--no-progress"]  # fmt: skip
    srv = _start_on(port)
    try:
        job = subprocess.Popen(
            [sys.executable, "-m", "roberta_client.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while len(list(out.glob("shard-*.jsonl"))) < 2:
            assert time.monotonic() < deadline and job.poll() is None, job.stderr
            time.sleep(0.02)
        srv.terminate(signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
        assert job.returncode == grpc.StatusCode.UNAVAILABLE.value[0], stderr
        partial, _ = _read_shards(out)
        assert 200 <= len(partial) < len(items)

        srv = _start_on(port)
        rerun = _extract(args)
        assert rerun.returncode == 0, rerun.stderr
        summary = json.loads(rerun.stdout)
        assert summary["skipped"] == len(partial)
        assert summary["written"] == len(items) - len(partial)
        entries, vectors = _read_shards(out)
        ids = [e["id"] for e in entries]
        assert sorted(ids) == sorted(i for i, _ in items), "lost or duplicated ids"
        assert not [e for e in entries if "error" in e]
        again = _extract(args)
        assert json.loads(again.stdout)["written"] == 0
        with RobertaClient(target) as c:
            sample = items[::97]
            expected = c.extract_features_batch([t for _, t in sample], pooling="cls")
        for (item_id, _), vec in zip(sample, expected, strict=True):
            np.testing.assert_allclose(vectors[item_id], vec[0], atol=1e-5)
    finally:
        srv.terminate(signal.SIGKILL)


def test_extract_reads_text_lines_and_stores_tokens(server, tmp_path):
    corpus = tmp_path / "lines.txt"
    corpus.write_text("first line\n\nsecond, longer line of text\n")
    out = tmp_path / "tok"
    run = _extract(["--server", server.target, "extract", "--input", str(corpus), "--out",
                    str(out), "--pooling", "none", "--dtype", "float16", "--no-progress"])  # fmt: skip
    assert run.returncode == 0, run.stderr
    index = [json.loads(x) for x in (out / "shard-00000.jsonl").read_text().splitlines()]
    data = np.load(out / "shard-00000.npy")
    assert [e["id"] for e in index] == ["0", "2"]
    assert data.dtype == np.float16
    assert data.shape[0] == sum(e["length"] for e in index)
    assert [e["length"] for e in index] == [e["num_tokens"] for e in index]
    assert re.fullmatch(r"\d+", str(index[1]["start"])) and index[1]["start"] == index[0]["length"]


def test_a_stream_right_after_start_gets_full_size_batches():
    # Stream batches are capped at --bulk-batch-tokens while interactive callers are about; the
    # server's own warm-up is no such caller.
    with ServerProcess("--model", "random:tiny", "--bulk-batch-tokens", "64") as srv:
        srv.wait_ready()
        ready = time.monotonic()
        before = scrape_metrics(srv.metrics_port)
        items = [(f"doc-{i}", "stream item " * 9) for i in range(800)]  # 20 tokens each
        with RobertaClient(srv.target) as client:
            results = client.stream_features(iter(items), pooling="cls", items_per_message=64)
            assert sum(r.ok for r in results) == len(items)
        assert time.monotonic() - ready < INTERACTIVE_RECENT_S  # the warm-up was that recent
        after = scrape_metrics(srv.metrics_port)
        small, total = (
            'roberta_batch_size_tokens_bucket{le="64.0"}',
            "roberta_batch_size_tokens_count",
        )
        assert after[total] - before[total] > after[small] - before[small]  # some held more
