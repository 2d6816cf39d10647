"""Tokenization in worker processes (`--tokenizer-processes`) answers exactly as in threads:
two real servers, one of each, get the same requests; and the workers go when the server does."""

from __future__ import annotations

import asyncio
import os
import pickle
import re
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from roberta_client._proto.roberta.v1 import roberta_pb2 as pb
from roberta_client._proto.roberta.v1 import roberta_pb2_grpc
from roberta_client.tensors import tensor_to_numpy
from roberta_server.errors import InvalidInput
from roberta_server.launcher import ServerProcess
from roberta_server.tokenize_workers import (
    INLINE_MAX_SIZE,
    PROCESS_MIN_TEXTS,
    Preparer,
    TokenizeWorkers,
    input_size,
)

pytestmark = pytest.mark.timeout(240)

# Distinct made-up words, so the BPE really works (its caches do not answer) in the workers.
WORDS = " ".join(f"zq{i * 7919 % 100003:x}vex" for i in range(3000))
TEXTS = ["Hello world!", "Emoji 🎉 and CJK 漢字 and accents café.", "a " * 600, WORDS]
MANY = PROCESS_MIN_TEXTS  # requests of this many texts go to the processes
MEDIUM = "Hello world! " * 30  # MANY of them are too much to prepare on the event loop


def test_tokenizer_pickles_without_its_caches(tokenizer):
    tokenizer.encode("warm the caches")
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.cache_info().currsize == 0
    for text in TEXTS:
        assert copy.encode(text) == tokenizer.encode(text)
    assert copy.cache_info().currsize > 0  # the copy has working caches of its own


def test_small_requests_are_prepared_on_the_event_loop(tokenizer):
    preparer = Preparer(tokenizer, 50265, 512)
    workers = TokenizeWorkers(preparer, threads=1, processes=0)
    threads = []
    prepare = preparer.prepare

    def spy(*args):
        threads.append(threading.get_ident())
        return prepare(*args)

    preparer.prepare = spy
    small = ["Hello world!", [0, 31414, 2]]
    large = [MEDIUM] * MANY
    assert input_size(small) <= INLINE_MAX_SIZE < input_size(large)

    async def run() -> int:
        for inputs in (small, large):
            await workers.run(inputs, "prepare", inputs, False, False)
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(run())
    finally:
        workers.shutdown()
    assert threads[0] == loop_thread != threads[1]


def test_model_inputs_get_the_ids_of_the_tokenize_rpc(tokenizer):
    # Model RPCs tokenize without offsets; they must still get the Tokenize RPC's ids, the same
    # truncation and the same refusals.
    preparer = Preparer(tokenizer, 50265, 40)
    inputs = [*TEXTS[:2], ("Hello world!", "a " * 50), "b " * 39]
    refused = truncated = 0
    for truncate in (False, True):
        for no_sep in (False, True):
            for x in inputs:
                try:
                    enc = preparer.encode_one("inputs[0]", x, truncate, no_sep)
                except InvalidInput as exc:
                    with pytest.raises(InvalidInput, match=re.escape(str(exc))):
                        preparer.prepare([x], truncate, no_sep)
                    refused += 1
                    continue
                prepared = preparer.prepare([x], truncate, no_sep)
                assert (prepared.ids, prepared.truncated) == ([enc.ids], [enc.truncated])
                truncated += enc.truncated
    assert refused == 4 and truncated == 4  # the pair and the 41-token text, each way


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(entry))
    return out


def _cpu_ticks(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def _outcome(call, request) -> tuple:
    """A response without its timings, or the error's code and message."""
    try:
        resp = call(request)
    except grpc.RpcError as exc:
        return (exc.code(), exc.details())
    if resp.HasField("usage"):
        resp.usage.Clear()
    return (grpc.StatusCode.OK, resp)


def _requests() -> list[tuple[str, object]]:
    """Requests with MANY texts (tokenized in processes, where there are any) and with few."""
    texts = [pb.Input(text=t) for t in TEXTS] * 2
    pair = pb.Input(pair=pb.TextPair(text="a b", text_pair="c"))
    ids = pb.Input(ids=pb.TokenIds(ids=[0, 31414, 232, 2]))
    cls = pb.FeatureOptions(pooling=pb.POOLING_CLS, encode=pb.EncodeOptions(truncate=True))
    masked = ["Hello <mask>! " + MEDIUM] * MANY
    return [
        ("Tokenize", pb.TokenizeRequest(inputs=[*texts, pair])),
        ("Tokenize", pb.TokenizeRequest(inputs=[ids])),  # token ids are refused
        ("ExtractFeatures", pb.ExtractFeaturesRequest(inputs=[*texts, pair, ids], options=cls)),
        ("ExtractFeatures", pb.ExtractFeaturesRequest(inputs=[ids, ids])),
        ("ExtractFeatures", pb.ExtractFeaturesRequest(inputs=texts)),  # too long, not truncated
        ("Classify", pb.ClassifyRequest(head="mnli", inputs=[texts[0], pair])),
        ("Classify", pb.ClassifyRequest(head="mnli", inputs=[pb.Input(text=MEDIUM)] * MANY)),
        ("FillMask", pb.FillMaskRequest(texts=masked, topk=3)),
        ("FillMask", pb.FillMaskRequest(texts=["Hello <mask>!", *masked, "no mask here"])),
    ]


def _stream_outcomes(stub) -> dict[str, tuple]:
    """One stream message: texts, one too long, and token ids: {id: outcome}."""
    items = [pb.StreamItem(id=f"t{i}", input=pb.Input(text=TEXTS[1])) for i in range(MANY)]
    items += [
        pb.StreamItem(id="long", input=pb.Input(text=TEXTS[2])),
        pb.StreamItem(id="ids", input=pb.Input(ids=pb.TokenIds(ids=[0, 31414, 2]))),
    ]
    request = pb.ExtractFeaturesStreamRequest(
        items=items, options=pb.FeatureOptions(pooling=pb.POOLING_CLS)
    )
    call = stub.ExtractFeaturesStream(iter([request]))
    out = {}
    for resp in call:
        for r in resp.results:
            if r.HasField("error"):
                out[r.id] = (r.error.code, r.error.message)
            else:
                out[r.id] = tensor_to_numpy(r.features.tensor)
    return out


def _features(resp) -> list[np.ndarray]:
    return [tensor_to_numpy(f.tensor) for f in resp.results]


def test_processes_answer_as_threads_do():
    common = ("--model", "random:tiny", "--device", "cpu")
    with (
        ServerProcess(*common, "--tokenizer-processes", "0") as threads,
        ServerProcess(*common, "--tokenizer-processes", "2") as processes,
    ):
        threads.wait_ready()
        processes.wait_ready()
        started = processes.wait_for("tokenizer processes started")
        assert started["processes"] == 2
        workers = _children(processes.proc.pid)
        assert len(workers) >= 2
        worker_ticks = _cpu_ticks(workers)
        outcomes, streams = [], []
        for server in (threads, processes):
            with server.channel() as channel:
                stub = roberta_pb2_grpc.RobertaStub(channel)
                outcomes.append([_outcome(getattr(stub, m), r) for m, r in _requests()])
                streams.append(_stream_outcomes(stub))
        codes = [code for code, _ in outcomes[0]]
        assert codes == [code for code, _ in outcomes[1]]
        assert grpc.StatusCode.INVALID_ARGUMENT in codes and grpc.StatusCode.OK in codes
        for (method, _), (code, a), (_, b) in zip(_requests(), *outcomes, strict=True):
            if code != grpc.StatusCode.OK:
                assert a == b  # the same message
            elif method == "ExtractFeatures":
                for x, y in zip(_features(a), _features(b), strict=True):
                    np.testing.assert_allclose(x, y, atol=1e-5)
                assert [r.num_tokens for r in a.results] == [r.num_tokens for r in b.results]
            elif method == "Classify":
                assert [r.label for r in a.results] == [r.label for r in b.results]
            else:
                assert a == b
        assert (
            streams[0].keys()
            == streams[1].keys()
            == {*(f"t{i}" for i in range(MANY)), "long", "ids"}
        )
        assert streams[0]["long"] == streams[1]["long"]
        assert "exceeds maximum length" in streams[1]["long"][1]
        for key in streams[0].keys() - {"long"}:
            np.testing.assert_allclose(streams[0][key], streams[1][key], atol=1e-5)
        # The texts were tokenized in the workers: they used CPU time, the server's threads not.
        assert _cpu_ticks(workers) > worker_ticks
        assert processes.terminate() == 0
    deadline = time.monotonic() + 10
    while workers & {int(p) for p in os.listdir("/proc") if p.isdigit()}:
        assert time.monotonic() < deadline, "tokenizer processes outlived the server"
        time.sleep(0.1)


def test_tokenizer_processes_default_to_none_on_the_cpu():
    with ServerProcess("--model", "random:tiny", "--device", "cpu") as server:
        server.wait_ready()
        assert not any(r.get("message") == "tokenizer processes started" for r in server.logs)
        assert not _children(server.proc.pid)


def test_a_dead_worker_leaves_tokenization_to_threads():
    many = pb.ExtractFeaturesRequest(
        inputs=[pb.Input(text=t) for t in (MEDIUM, TEXTS[1])] * MANY,
        options=pb.FeatureOptions(pooling=pb.POOLING_CLS),
    )
    with ServerProcess("--model", "random:tiny", "--tokenizer-processes", "2") as server:
        server.wait_ready()
        server.wait_for("tokenizer processes started")
        with server.channel() as channel:
            stub = roberta_pb2_grpc.RobertaStub(channel)
            before = _features(stub.ExtractFeatures(many))
            workers = [
                pid
                for pid in _children(server.proc.pid)
                if b"resource_tracker" not in open(f"/proc/{pid}/cmdline", "rb").read()
            ]
            os.kill(workers[0], signal.SIGKILL)
            for _ in range(3):  # the request that finds the pool broken, and later ones
                after = _features(stub.ExtractFeatures(many))
                for x, y in zip(before, after, strict=True):
                    np.testing.assert_allclose(x, y, atol=1e-5)
        server.wait_for("a tokenizer process died; tokenizing in threads from now on", 10)
        assert server.terminate() == 0
