"""CUDA graphs over bucketed shapes: the bucket layout on any machine; capture, replay and a
server that replays them on a GPU (skipped without CUDA and varlen attention)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import roberta_server
import torch
from conftest import build_model, token_seqs
from roberta_client import RobertaClient
from roberta_server.batch import (
    Batch,
    Classification,
    ClassifySpec,
    Features,
    FeatureSpec,
    FillMaskSpec,
    Item,
)
from roberta_server.config import ServerConfig
from roberta_server.cuda_graphs import (
    PAD_SEQUENCE,
    EncoderGraphs,
    bucketed_inputs,
    buckets_up_to,
    fits,
    slots_for,
)
from roberta_server.executor import Executor
from roberta_server.launcher import ServerProcess
from roberta_server.model import cu_seqlens_of, varlen_attn

pytestmark = pytest.mark.timeout(300)

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or varlen_attn is None,
    reason="needs a CUDA device and torch.nn.attention.varlen",
)


def test_buckets():
    assert buckets_up_to(128) == [32, 64, 128]
    assert buckets_up_to(100) == [32, 64, 100]  # the flag's own size is the last bucket
    assert buckets_up_to(16) == []
    fine = buckets_up_to(16384)
    assert fine[:5] == [32, 64, 128, 256, 288] and fine[-1] == 16384
    assert len(fine) == 52
    # Above 256, no bucket is more than 1/8 above the one before it, and all hold whole tokens.
    assert all(b - a <= a // 8 for a, b in itertools.pairwise(fine[3:]))
    assert all(b > a for a, b in itertools.pairwise(fine))


def _layout(lengths: list[int], bucket: int, max_sequences: int = 256) -> np.ndarray:
    seqs = token_seqs(lengths, seed=1)
    flat = np.array([t for s in seqs for t in s], dtype=np.int64)
    slots = slots_for(bucket, max_sequences)
    out = np.full(bucket + slots + 1, -7, dtype=np.int64)
    bucketed_inputs(flat, lengths, bucket, slots, 1, out)
    assert out[: flat.size].tolist() == flat.tolist()
    return out


def test_bucketed_inputs_layout():
    out = _layout([5, 2, 9], 32)
    assert out[16:32].tolist() == [1] * 16
    # Real offsets, then the padding sequence (16..32), then empty ones: 17 slots, 18 offsets.
    assert slots_for(32, 256) == 17
    assert out[32:].tolist() == [0, 5, 7, 16] + [32] * 14
    # Padding over PAD_SEQUENCE tokens forms several sequences: 1,000 tokens in 1,536.
    out = _layout([500, 500], 1536)
    cu = out[1536:]
    assert cu[:7].tolist() == [0, 500, 1000, 1256, 1512, 1536, 1536]
    assert np.diff(cu).max() <= 512 and np.diff(cu).min() >= 0 and cu[-1] == 1536
    # Few sequences allowed: the slots follow max_sequences, not the bucket.
    assert slots_for(16384, 256) == 256 + 16384 // PAD_SEQUENCE
    with pytest.raises(ValueError):
        bucketed_inputs(np.zeros(33, np.int64), [33], 32, 17, 1, np.empty(50, np.int64))
    with pytest.raises(ValueError):  # more sequences than slots (only 1-token ones can be)
        bucketed_inputs(np.zeros(17, np.int64), [1] * 17, 32, 17, 1, np.empty(50, np.int64))


def test_batches_fit_the_smallest_bucket_with_room():
    assert fits([5, 2, 9], 32, 256)
    assert not fits([20, 20], 32, 256)
    assert not fits([2] * 5, 32, max_sequences=4)  # 5 real sequences, 4 + 1 slots, 1 for padding
    assert fits([2] * 4, 32, max_sequences=4)


@pytest.mark.parametrize(
    ("lengths", "bucket"),
    [([5, 2, 9], 32), ([32], 32), ([2] * 16, 32), ([30, 2], 32), ([300, 200, 7], 1152)],
)
def test_bucketed_batch_leaves_real_rows_unchanged(lengths, bucket):
    """The padding sequences and the empty ones change nothing for the real tokens (on the CPU,
    through the per-sequence attention, which takes the same cu_seqlens as the varlen kernel)."""
    model = build_model(seed=2)
    seqs = token_seqs(lengths, seed=3)
    flat = np.array([t for s in seqs for t in s], dtype=np.int64)
    n = flat.size
    slots = slots_for(bucket, 256)
    layout = np.empty(bucket + slots + 1, dtype=np.int64)
    bucketed_inputs(flat, lengths, bucket, slots, model.cfg.padding_idx, layout)
    tokens, cu = torch.from_numpy(layout[:bucket]), torch.from_numpy(layout[bucket:]).int()
    with torch.inference_mode():
        want = model(torch.from_numpy(flat), cu_seqlens_of(lengths), max(lengths))
        got = model(tokens, cu, min(bucket, model.cfg.max_positions))
    last = model.cfg.num_layers
    assert torch.allclose(got[last][:n], want[last], atol=1e-5)


def test_cuda_defaults_replay_every_batch_and_shorten_the_gil_switch_interval():
    cuda = ServerConfig().resolved("cuda")
    assert cuda.cuda_graph_tokens == cuda.max_batch_tokens == 16384
    assert cuda.gil_switch_interval_ms == 0.1
    assert cuda.max_batch_size == 512
    assert ServerConfig(max_batch_tokens=4096).resolved("cuda").cuda_graph_tokens == 4096
    assert ServerConfig(cuda_graph_tokens=0).resolved("cuda").cuda_graph_tokens == 0  # off
    assert ServerConfig().resolved("cpu").gil_switch_interval_ms == 0  # Python's own


# ---- on a GPU


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_cuda
def test_graph_replays_match_eager_and_float32():
    device = torch.device("cuda")
    reference = build_model(seed=4)
    model = build_model(seed=4).to(device=device, dtype=torch.bfloat16)
    graphs = EncoderGraphs(model, device, 2048, max_sequences=64)
    graphs.capture()
    last = model.cfg.num_layers
    gen = torch.Generator().manual_seed(11)
    # Buckets in an order that reuses the shared memory pool: large, small, large again; the
    # 2,000-token batches have padding of several sequences and sequences up to 512 tokens.
    for round_ in range(8):
        count = int(torch.randint(1, 9, (1,), generator=gen))
        limit = [400, 20, 2000, 200, 1300, 500, 40, 60][round_]
        high = min(max(3, limit // count), model.cfg.max_positions)
        lengths = torch.randint(2, high + 1, (count,), generator=gen).tolist()
        seqs = token_seqs(lengths, seed=round_)
        flat = np.array([t for s in seqs for t in s], dtype=np.int64)
        bucket = graphs.bucket_for(lengths)
        assert bucket is not None and sum(lengths) <= bucket
        host = torch.from_numpy(flat)
        with torch.inference_mode():
            got = graphs.run(flat, lengths, bucket).clone()
            eager = model(host.to(device), cu_seqlens_of(lengths, device), max(lengths))[last]
            want = reference(host, cu_seqlens_of(lengths), max(lengths))[last]
        assert got.shape == (sum(lengths), model.cfg.hidden_size)
        assert torch.isfinite(got).all()
        assert _rel(got, eager) < 1e-2, (lengths, bucket)
        assert _rel(got.float().cpu(), want) < 3e-2, (lengths, bucket)
    assert graphs.bucket_for([500] * 5) is None  # over the largest bucket: eager
    assert graphs.bucket_for([1] * 80) is None  # more sequences than any bucket's slots: eager


@needs_cuda
def test_server_on_cuda_replays_graphs_and_matches_the_cpu():
    texts = ["Hello world!", "A somewhat longer sentence, " * 6, "x"]
    hub = roberta_server.load("random:tiny", device="cpu")
    want = [
        hub.extract_features(hub.encode(t))[0, 0].detach().numpy() for t in texts
    ]  # <s> vectors
    with ServerProcess("--model", "random:tiny", "--device", "cuda") as server:
        server.wait_ready()
        captured = server.wait_for("captured CUDA graphs")
        # Every batch the scheduler forms (up to --max-batch-tokens, 16,384 on CUDA) replays.
        assert captured["largest"] == 16384
        assert captured["buckets"] == len(buckets_up_to(16384))
        assert server.wait_for("GIL switch interval set")["ms"] == 0.1
        with RobertaClient(server.target, timeout=60) as client:
            info = client.model_info()
            assert info["dtype"] == "bfloat16" and info["device"].startswith("cuda")
            # One at a time (each its own small batch: a graph replay), then all together.
            alone = [client.extract_features_batch([t], pooling="cls")[0][0] for t in texts]
            together = [f[0] for f in client.extract_features_batch(texts, pooling="cls")]
            per_token = client.extract_features_batch(texts)  # [1, T, H] each
            several = client.extract_features_batch(texts, layers=[0, -1])  # eager: layer 0
            # ~1,000 tokens in one batch: a bucket above 512, padding of several sequences.
            many = [f[0] for f in client.extract_features_batch(texts * 20, pooling="cls")]
    for got, wanted in (
        (alone, want),
        (together, want),
        ([f[0, 0] for f in per_token], want),
        ([f[1, 0] for f in several], want),
        (many, want * 20),
    ):
        for g, w in zip(got, wanted, strict=True):
            assert np.linalg.norm(g - w) / np.linalg.norm(w) < 3e-2


@needs_cuda
def test_batches_queued_back_to_back_on_cuda_match_batches_run_alone():
    """The device thread queues the next batch's replay before it reads the current batch's
    outputs, and both replay the same graph: the outputs must be gathered first."""
    hub = roberta_server.load("random:tiny", device="cuda", dtype="bfloat16")
    solo, executor = Executor(hub, 2048, 64), Executor(hub, 2048, 64)
    executor.overlap_min_tokens = 0  # these batches are small: queue them ahead all the same
    solo.graphs.capture()
    executor.graphs.capture()
    last = hub.model.cfg.num_layers
    specs = [
        FeatureSpec((last,), "cls", "float32"),
        FeatureSpec((last,), "none", "bfloat16"),
        ClassifySpec("mnli"),
        FillMaskSpec(1, 3, "x"),
    ]
    batches = [
        Batch([Item(ids, specs[i % 4]) for i, ids in enumerate(token_seqs([60, 70, 80, 90], k))])
        for k in range(6)
    ]  # 300 tokens each: the same bucket every time
    alone = [solo.run_batch(Batch(list(b.items))) for b in batches]
    results = [f.result(timeout=120) for f in [executor.submit(b) for b in batches]]
    executor.shutdown()
    solo.shutdown()
    for got, want in zip(results, alone, strict=True):
        for g, w in zip(got.outputs, want.outputs, strict=True):
            if isinstance(w, Features):
                np.testing.assert_array_equal(g.array, w.array)
            elif isinstance(w, Classification):
                np.testing.assert_array_equal(g.logits, w.logits)
            else:
                assert g.candidates == w.candidates
