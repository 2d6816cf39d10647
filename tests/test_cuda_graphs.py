"""CUDA graphs over bucketed shapes: the bucket layout on any machine; capture, replay and a
server that replays them on a GPU (skipped without CUDA and varlen attention)."""

from __future__ import annotations

import numpy as np
import pytest
import roberta_server
import torch
from conftest import build_model, token_seqs
from roberta_client import RobertaClient
from roberta_server.cuda_graphs import (
    EncoderGraphs,
    bucketed_inputs,
    buckets_up_to,
    slots_for,
)
from roberta_server.launcher import ServerProcess
from roberta_server.model import cu_seqlens_of, varlen_attn

pytestmark = pytest.mark.timeout(300)

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or varlen_attn is None,
    reason="needs a CUDA device and torch.nn.attention.varlen",
)


def test_buckets():
    assert buckets_up_to(512, 512) == [32, 64, 128, 256, 512]
    assert buckets_up_to(100, 512) == [32, 64]
    assert buckets_up_to(4096, 512)[-1] == 512  # positions bound the bucket, not the flag
    assert buckets_up_to(16, 512) == []


def test_bucketed_inputs_layout():
    lengths = [5, 2, 9]
    seqs = token_seqs(lengths, seed=1)
    flat = torch.tensor([t for s in seqs for t in s])
    tokens, cu = bucketed_inputs(flat, lengths, 32, pad=1)
    assert tokens.tolist() == flat.tolist() + [1] * 16
    # Real offsets, then the padding sequence (16..32), then empty ones: 17 slots, 18 offsets.
    assert slots_for(32) == 17
    assert cu.tolist() == [0, 5, 7, 16] + [32] * 14
    assert cu.dtype == torch.int32
    with pytest.raises(ValueError):
        bucketed_inputs(torch.zeros(33, dtype=torch.long), [33], 32, pad=1)
    with pytest.raises(ValueError):  # more sequences than slots (only 1-token ones can be)
        bucketed_inputs(torch.zeros(17, dtype=torch.long), [1] * 17, 32, pad=1)


@pytest.mark.parametrize("lengths", [[5, 2, 9], [32], [2] * 16, [30, 2]])
def test_bucketed_batch_leaves_real_rows_unchanged(lengths):
    """The padding sequence and the empty ones change nothing for the real tokens (on the CPU,
    through the per-sequence attention, which takes the same cu_seqlens as the varlen kernel)."""
    model = build_model(seed=2)
    seqs = token_seqs(lengths, seed=3)
    flat = torch.tensor([t for s in seqs for t in s])
    n = flat.numel()
    tokens, cu = bucketed_inputs(flat, lengths, 32, model.cfg.padding_idx)
    with torch.inference_mode():
        want = model(flat, cu_seqlens_of(lengths), max(lengths))[model.cfg.num_layers]
        got = model(tokens, cu, 32)[model.cfg.num_layers][:n]
    assert torch.allclose(got, want, atol=1e-5)


# ---- on a GPU


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_cuda
def test_graph_replays_match_eager_and_float32():
    device = torch.device("cuda")
    reference = build_model(seed=4)
    model = build_model(seed=4).to(device=device, dtype=torch.bfloat16)
    graphs = EncoderGraphs(model, device, 512)
    graphs.capture()
    last = model.cfg.num_layers
    gen = torch.Generator().manual_seed(11)
    # Buckets in an order that reuses the shared memory pool: large, small, large again.
    for round_ in range(6):
        count = int(torch.randint(1, 9, (1,), generator=gen))
        limit = [400, 20, 200, 500, 40, 60][round_]
        lengths = torch.randint(2, max(3, limit // count), (count,), generator=gen).tolist()
        seqs = token_seqs(lengths, seed=round_)
        flat = torch.tensor([t for s in seqs for t in s])
        bucket = graphs.bucket_for(lengths)
        assert bucket is not None and sum(lengths) <= bucket
        with torch.inference_mode():
            got = graphs.run(flat, lengths, bucket).clone()
            eager = model(flat.to(device), cu_seqlens_of(lengths, device), max(lengths))[last]
            want = reference(flat, cu_seqlens_of(lengths), max(lengths))[last]
        assert got.shape == (sum(lengths), model.cfg.hidden_size)
        assert torch.isfinite(got).all()
        assert _rel(got, eager) < 1e-2, (lengths, bucket)
        assert _rel(got.float().cpu(), want) < 3e-2, (lengths, bucket)
    assert graphs.bucket_for([300, 300]) is None  # over the largest bucket: eager


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
        assert captured["buckets"] == [32, 64, 128, 256, 512]
        with RobertaClient(server.target, timeout=60) as client:
            info = client.model_info()
            assert info["dtype"] == "bfloat16" and info["device"].startswith("cuda")
            # One at a time (each its own small batch: a graph replay), then all together.
            alone = [client.extract_features_batch([t], pooling="cls")[0][0] for t in texts]
            together = [f[0] for f in client.extract_features_batch(texts, pooling="cls")]
            per_token = client.extract_features_batch(texts)  # [1, T, H] each
            several = client.extract_features_batch(texts, layers=[0, -1])  # eager: layer 0
    for got in (alone, together, [f[0, 0] for f in per_token], [f[1, 0] for f in several]):
        for g, w in zip(got, want, strict=True):
            assert np.linalg.norm(g - w) / np.linalg.norm(w) < 3e-2
