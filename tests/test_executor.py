"""Execution on the CPU: batches of half-precision rows are rounded up to shape buckets, and the
padding rows change nothing for the real ones."""

from __future__ import annotations

import time

import numpy as np
import pytest
import roberta_server
import torch
from conftest import build_model, token_seqs
from roberta_server.batch import Batch, ClassifySpec, FeatureSpec, Item
from roberta_server.checkpoints import Checkpoint
from roberta_server.executor import BUCKETS_PER_OCTAVE, Executor, injected_faults, shape_bucket
from roberta_server.hub import RobertaHub
from roberta_server.model import PackedLayout, RobertaConfig


def test_shape_buckets_are_few_and_tight():
    assert [shape_bucket(n) for n in (1, 32, 63, 64)] == [1, 32, 63, 64]  # small: exact
    assert [shape_bucket(n) for n in (65, 1023, 1025, 2049)] == [66, 1024, 1056, 2112]
    for lo in (64, 1024, 8192):
        sizes = {shape_bucket(n) for n in range(lo + 1, 2 * lo + 1)}
        assert len(sizes) == BUCKETS_PER_OCTAVE
    for n in range(1, 40_000, 7):
        rows = shape_bucket(n)
        assert n <= rows < n + max(1, n / BUCKETS_PER_OCTAVE)
        assert rows - n < 256  # the padding sequence fits max_positions
        assert shape_bucket(n, 64) - n < 64
    assert shape_bucket(100_000) - 100_000 < 256


def _run(dtype: str, lengths: list[int], hub: RobertaHub | None = None):
    hub = hub or roberta_server.load("random:tiny", "cpu", dtype)
    hub.model.register_classification_head("two", 2)
    last = hub.model.cfg.num_layers
    rows: list[int] = []  # rows of each forward pass
    hub.model.register_forward_pre_hook(lambda _, args: rows.append(args[0].numel()))
    items = []
    for i, ids in enumerate(token_seqs(lengths, seed=5)):
        spec = ClassifySpec("two") if i % 2 else FeatureSpec((0, last), "none", "float32")
        items.append(Item(ids, spec))
    result = Executor(hub).run_batch(Batch(items))
    assert len(rows) == 1
    assert result.computed_tokens == rows[0]
    return hub, result, items


SHORT = RobertaConfig(hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=100)


@pytest.mark.parametrize(
    ("lengths", "cfg"),
    [([30, 42, 7], None), ([100] * 9 + [77], None), ([90] * 51 + [19], SHORT)],
)
def test_padding_rows_leave_real_rows_unchanged(lengths, cfg, tokenizer):
    hub = None
    if cfg is not None:  # positions end at 100: the padding sequence must stay shorter
        ckpt = Checkpoint(build_model(cfg), tokenizer, "random:short")
        hub = RobertaHub(ckpt, torch.device("cpu"), torch.bfloat16, "short")
    hub, result, items = _run("bfloat16", lengths, hub)
    total = sum(lengths)
    step = 64 if cfg is not None else 256
    assert result.computed_tokens == shape_bucket(total, step) > total
    model, last = hub.model, hub.model.cfg.num_layers
    flat = torch.tensor([t for it in items for t in it.ids])
    with torch.inference_mode():  # the same batch without padding rows
        hidden = model(flat, roberta_server.model.cu_seqlens_of(lengths), max(lengths), [0])
    # Up to a bfloat16 rounding step: row counts and masked key blocks change the kernels' order
    # of summation, and a leak from the padding rows would move values far more.
    start = 0
    for it, out in zip(items, result.outputs, strict=True):
        rows = slice(start, start + len(it.ids))
        start += len(it.ids)
        if isinstance(it.spec, FeatureSpec):
            want = torch.stack([hidden[0][rows], hidden[last][rows]]).float().numpy()
            np.testing.assert_allclose(out.array, want, rtol=2**-7, atol=2**-6)
        else:
            with torch.inference_mode():
                want = model.heads["two"](hidden[last][rows][0]).float().numpy()
            np.testing.assert_allclose(out.logits, want, rtol=2**-7, atol=2**-6)


def test_float32_is_not_padded():
    _, result, _ = _run("float32", [30, 42, 7])
    assert result.computed_tokens == 79


def test_equal_lengths_are_packed_side_by_side_and_attended_in_one_call():
    hub = roberta_server.load("random:tiny", "cpu", "float32")
    packed = []  # cu_seqlens of each forward pass
    hub.model.register_forward_pre_hook(lambda _, args: packed.append(args[1]))
    _, result, items = _run("float32", [9, 3, 9, 3, 5], hub)
    cu = packed[0]
    assert (cu[1:] - cu[:-1]).tolist() == [3, 3, 5, 9, 9]
    spans = PackedLayout.build(cu, 9).spans
    assert [(s.count, s.length) for s in spans] == [(2, 3), (1, 5), (2, 9)]
    # Outputs still come back in the batch's own order.
    assert [out.array.shape[1] for out in result.outputs[::2]] == [9, 9, 5]


@pytest.mark.parametrize("ahead", [True, False])
def test_batches_submitted_back_to_back_keep_their_order_and_their_failures(ahead):
    """The device thread may take the next batch before it collects the current one (on CUDA its
    work is then queued behind the current batch's; on the CPU only when told to): results, calls
    between batches and a failing batch must come out as if each ran alone."""
    hub = roberta_server.load("random:tiny", "cpu", "float32")
    spec = FeatureSpec((hub.model.cfg.num_layers,), "cls", "float32")
    batches = [
        Batch([Item(ids, spec) for ids in token_seqs([5 + k, 9, 17], seed=k)]) for k in range(5)
    ]
    batches[2].items[1].ids[3] = 777  # this item fails, and only it
    solo, executor = Executor(hub), Executor(hub)
    solo.fault_injector = executor.fault_injector = injected_faults(0, poison_id=777)
    if ahead:
        executor.overlap_min_tokens = 0
    alone = [solo.run_batch(Batch(list(b.items))) for b in batches]
    seen: list[str] = []
    futures = []
    started = time.monotonic()
    for k, batch in enumerate(batches):
        futures.append(executor.submit(batch))
        futures[-1].add_done_callback(lambda _, k=k: seen.append(f"batch {k}"))
        if k == 1:
            executor.call(lambda: seen.append("call"))
    results = [f.result(timeout=60) for f in futures]
    wall = time.monotonic() - started
    executor.shutdown()
    assert seen == ["batch 0", "batch 1", "call", "batch 2", "batch 3", "batch 4"]
    for got, want in zip(results, alone, strict=True):
        assert got.computed_tokens == want.computed_tokens
        for g, w in zip(got.outputs, want.outputs, strict=True):
            if isinstance(w, Exception):
                assert isinstance(g, RuntimeError) and "777" in str(g)
            else:
                np.testing.assert_array_equal(g.array, w.array)
    assert [isinstance(o, Exception) for o in results[2].outputs] == [False, True, False]
    assert all(isinstance(o, Exception) for o in alone[2].outputs[1:2])
    # Each moment is counted once, though batches overlap.
    assert 0 < sum(r.seconds for r in results) <= wall
