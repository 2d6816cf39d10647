"""CUDA graphs of the encoder for packed batches, one graph per bucket of token counts.

An eager forward pass of RoBERTa-large launches some 300 kernels, and for a short request the
launches, not the arithmetic, set the time: 4.6 ms eager against 0.9 ms for a replayed graph for
one 32-token sequence on an H100 (`../shared/reference/measurements.md`). Under load, large
batches too: each launch releases Python's GIL and must take it back from the event loop, so a
device thread that makes hundreds of calls a batch waits behind the event loop hundreds of times.
A replay is one call. With graphs for batches of up to 512 tokens only, a server on an H200
(RoBERTa-large, 16 clients of 64-text requests) computed at 0.54 of the model's own rate while
busy; with graphs for every batch (and a 0.1 ms GIL switch interval), at 0.81. A graph replays
fixed shapes, so a batch of n real tokens runs in the graph of the smallest bucket N >= n:

- the buckets are the powers of two from SMALLEST_BUCKET to 256, then 8 per octave (256, 288, 320,
  ..., 512, 576, ...), so a batch computes at most 1/8 more tokens than it holds (3-4% on bulk
  batches of the standard mix);
- the tokens are padded with `<pad>` to N; the padding forms sequences of its own, each at most
  PAD_SEQUENCE tokens (the positions table ends at max_positions), so no real token attends to
  it;
- `cu_seqlens` has a fixed number of slots per bucket: the real sequences (at most
  `max_sequences`, and at most N // 2 since each holds `<s>` and `</s>`) plus the padding ones;
  unused slots repeat N, which makes empty sequences that the varlen kernel skips;
- the kernels' longest-sequence bound is min(N, max_positions), which holds for any batch.

Only the varlen path (CUDA, half precision) can be captured: the padded fallback reads lengths back
to the host. The graphs keep the last layer only; a batch that asks for other layers runs eagerly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from .model import Roberta

log = logging.getLogger(__name__)

SMALLEST_BUCKET = 32
# Above this many tokens buckets grow by 1/8 instead of doubling: replays of large batches cost
# in proportion to their tokens, padding included.
FINE_FROM = 256
FINE_PER_OCTAVE = 8
PAD_SEQUENCE = 256


def buckets_up_to(max_tokens: int) -> list[int]:
    """Bucket sizes from SMALLEST_BUCKET to `max_tokens`, which is the last."""
    out, n = [], SMALLEST_BUCKET
    while n < max_tokens:
        out.append(n)
        n += n if n < FINE_FROM else (1 << (n.bit_length() - 1)) // FINE_PER_OCTAVE
    return [*out, max_tokens] if max_tokens >= SMALLEST_BUCKET else []


def pad_sequences(pad: int) -> int:
    """Sequences the padding of `pad` tokens forms."""
    return -(-pad // PAD_SEQUENCE)


def slots_for(bucket: int, max_sequences: int) -> int:
    """Sequences a bucket's cu_seqlens describes: the real ones at most, plus the padding ones."""
    return min(bucket // 2, max_sequences) + pad_sequences(bucket)


def fits(lengths: list[int], bucket: int, max_sequences: int) -> bool:
    n = sum(lengths)
    return n <= bucket and len(lengths) + pad_sequences(bucket - n) <= slots_for(
        bucket, max_sequences
    )


def bucketed_inputs(
    tokens: np.ndarray, lengths: list[int], bucket: int, slots: int, pad: int, out: np.ndarray
) -> None:
    """Lay `tokens` ([n] real tokens of sequences of `lengths`) out for a graph in `out`:
    [bucket] tokens, padded, then [slots + 1] offsets (see the module docstring)."""
    n = tokens.shape[0]
    pads = [PAD_SEQUENCE] * ((bucket - n) // PAD_SEQUENCE)
    if (bucket - n) % PAD_SEQUENCE:
        pads.append((bucket - n) % PAD_SEQUENCE)
    if n > bucket or len(lengths) + len(pads) > slots:
        raise ValueError(f"{len(lengths)} sequences of {n} tokens do not fit a {bucket} bucket")
    out[:n] = tokens
    out[n:bucket] = pad
    cu = out[bucket:]
    cu[0] = 0
    used = len(lengths) + len(pads)
    np.cumsum(lengths + pads, out=cu[1 : used + 1])
    cu[used + 1 :] = bucket


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # static input: [bucket] tokens, then [slots + 1] offsets (int64)
    out: torch.Tensor  # static output: last layer [bucket, H]


class EncoderGraphs:
    """One captured forward pass per bucket; `run` replays the smallest that fits a batch."""

    def __init__(self, model: Roberta, device: torch.device, max_tokens: int, max_sequences: int):
        self.model = model
        self.device = device
        self.pad = model.cfg.padding_idx
        self.max_sequences = max_sequences
        # The padding's sequences must fit the positions table (every RoBERTa has 512).
        self.buckets = buckets_up_to(max_tokens) if model.cfg.max_positions >= PAD_SEQUENCE else []
        self._graphs: dict[int, _Captured] = {}
        # The inputs of a replay are written here and copied in one transfer.
        largest = self.buckets[-1] if self.buckets else 0
        self._host = torch.empty(
            largest + slots_for(largest, max_sequences) + 1, dtype=torch.long, pin_memory=True
        )
        self._host_np = self._host.numpy()
        self._copied = torch.cuda.Event()

    def _forward(self, inputs: torch.Tensor, bucket: int) -> torch.Tensor:
        tokens, cu = inputs[:bucket], inputs[bucket:].to(torch.int32)
        max_len = min(bucket, self.model.cfg.max_positions)
        return self.model(tokens, cu, max_len)[self.model.cfg.num_layers]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, all in one memory pool: replays never overlap
        (one device thread), so the buckets can share their activations' memory."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for bucket in sorted(self.buckets, reverse=True):
            slots = slots_for(bucket, self.max_sequences)
            layout = np.empty(bucket + slots + 1, dtype=np.int64)
            bucketed_inputs(np.empty(0, np.int64), [], bucket, slots, self.pad, layout)
            inputs = torch.from_numpy(layout).to(self.device)
            # Warm-up passes on a side stream first, as torch.cuda.graph asks: kernel selection
            # and workspace allocation must not happen during capture.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(inputs, bucket)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(inputs, bucket)
            self._graphs[bucket] = _Captured(graph, inputs, out)
        torch.cuda.synchronize(self.device)
        log.info(
            "captured CUDA graphs",
            extra={
                "buckets": len(self.buckets),
                "largest": self.buckets[-1] if self.buckets else 0,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )

    def bucket_for(self, lengths: list[int]) -> int | None:
        """The smallest captured bucket that holds these sequences, or None (run eagerly)."""
        n = sum(lengths)
        for bucket in self.buckets:
            if n <= bucket and bucket in self._graphs and fits(lengths, bucket, self.max_sequences):
                return bucket
        return None

    def run(self, tokens: np.ndarray, lengths: list[int], bucket: int) -> torch.Tensor:
        """Last-layer hidden states [n, H] of the packed host `tokens`, by replaying `bucket`'s
        graph. The result is a view of the graph's static output: read it before the next run."""
        captured = self._graphs[bucket]
        size = captured.inputs.numel()
        self._copied.synchronize()  # the previous replay's inputs have left the host buffer
        bucketed_inputs(tokens, lengths, bucket, size - bucket - 1, self.pad, self._host_np[:size])
        captured.inputs.copy_(self._host[:size], non_blocking=True)
        self._copied.record()
        captured.graph.replay()
        return captured.out[: tokens.shape[0]]
