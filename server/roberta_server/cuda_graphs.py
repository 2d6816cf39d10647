"""CUDA graphs of the encoder for small packed batches, one graph per bucket of token counts.

An eager forward pass of RoBERTa-large launches some 300 kernels, and for a short request the
launches, not the arithmetic, set the time: 4.6 ms eager against 0.9 ms for a replayed graph for
one 32-token sequence on an H100 (`../shared/reference/measurements.md`). A graph replays fixed
shapes, so a batch of n real tokens runs in the graph of the smallest bucket N >= n:

- the tokens are padded with `<pad>` to N; the padding forms one extra sequence of its own, so no
  real token attends to it;
- `cu_seqlens` has N // 2 + 2 entries whatever the batch holds (every sequence has at least `<s>`
  and `</s>`, so at most N // 2 real sequences, plus the padding one); the unused ones repeat N,
  which makes empty sequences that the varlen kernel skips;
- the kernels' longest-sequence bound is N itself (every bucket is <= max_positions), so it holds
  for any batch in the bucket, the padding sequence included.

Only the varlen path (CUDA, half precision) can be captured: the padded fallback reads lengths back
to the host. The graphs keep the last layer only; a batch that asks for other layers runs eagerly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .model import Roberta, cu_seqlens_of

log = logging.getLogger(__name__)

SMALLEST_BUCKET = 32


def buckets_up_to(max_tokens: int, max_positions: int) -> list[int]:
    """Powers of two from SMALLEST_BUCKET to `max_tokens`, none beyond `max_positions`."""
    out, n = [], SMALLEST_BUCKET
    while n <= min(max_tokens, max_positions):
        out.append(n)
        n *= 2
    return out


def slots_for(bucket: int) -> int:
    """Sequences a bucket's cu_seqlens describes: the real ones at most, plus the padding one."""
    return bucket // 2 + 1


def bucketed_inputs(
    tokens: torch.Tensor, lengths: list[int], bucket: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens` ([n] real tokens of sequences of `lengths`) laid out for the graph of `bucket`:
    [bucket] tokens and [slots_for(bucket) + 1] int32 offsets (see the module docstring)."""
    n = tokens.numel()
    if n > bucket or len(lengths) >= slots_for(bucket):
        raise ValueError(f"{len(lengths)} sequences of {n} tokens do not fit a {bucket} bucket")
    padded = torch.full((bucket,), pad, dtype=torch.long)
    padded[:n] = tokens
    cu = torch.full((slots_for(bucket) + 1,), bucket, dtype=torch.int32)
    cu[: len(lengths) + 1] = cu_seqlens_of(lengths)
    return padded, cu


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # static input [bucket]
    cu_seqlens: torch.Tensor  # static input [slots + 1]
    out: torch.Tensor  # static output: last layer [bucket, H]


class EncoderGraphs:
    """One captured forward pass per bucket; `run` replays the smallest that fits a batch."""

    def __init__(self, model: Roberta, device: torch.device, max_tokens: int):
        self.model = model
        self.device = device
        self.pad = model.cfg.padding_idx
        self.buckets = buckets_up_to(max_tokens, model.cfg.max_positions)
        self._graphs: dict[int, _Captured] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, all in one memory pool: replays never overlap
        (one device thread), so the buckets can share their activations' memory."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        last = self.model.cfg.num_layers
        for bucket in sorted(self.buckets, reverse=True):
            tokens = torch.full((bucket,), self.pad, dtype=torch.long, device=self.device)
            cu = torch.full((slots_for(bucket) + 1,), bucket, dtype=torch.int32, device=self.device)
            cu[0] = 0
            # Warm-up passes on a side stream first, as torch.cuda.graph asks: kernel selection
            # and workspace allocation must not happen during capture.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model(tokens, cu, bucket)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(tokens, cu, bucket)[last]
            self._graphs[bucket] = _Captured(graph, tokens, cu, out)
        torch.cuda.synchronize(self.device)
        log.info(
            "captured CUDA graphs",
            extra={"buckets": self.buckets, "seconds": round(time.perf_counter() - started, 3)},
        )

    def bucket_for(self, lengths: list[int]) -> int | None:
        """The smallest captured bucket that holds these sequences, or None (run eagerly)."""
        n = sum(lengths)
        for bucket in sorted(self._graphs):
            if n <= bucket and len(lengths) < slots_for(bucket):
                return bucket
        return None

    def run(self, tokens: torch.Tensor, lengths: list[int], bucket: int) -> torch.Tensor:
        """Last-layer hidden states [n, H] of the packed host `tokens`, by replaying `bucket`'s
        graph. The result is a view of the graph's static output: read it before the next run."""
        captured = self._graphs[bucket]
        padded, cu = bucketed_inputs(tokens, lengths, bucket, self.pad)
        captured.tokens.copy_(padded.pin_memory(), non_blocking=True)
        captured.cu_seqlens.copy_(cu.pin_memory(), non_blocking=True)
        captured.graph.replay()
        return captured.out[: tokens.numel()]
