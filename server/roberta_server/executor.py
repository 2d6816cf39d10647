"""Execution: one thread owns the device and runs batches, one at a time, in the order given.

A batch is packed into one [N] token tensor, run through the encoder once, and every item's output
is cut from the result: feature slices, pooled vectors, head logits and fill-mask candidates are
each gathered for the whole batch and copied to the host in one transfer. When a forward pass fails
(out of memory on a big batch, say), the batch is split in halves and retried, so in the end only
the items that fail alone fail.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .batch import (
    Batch,
    BatchResult,
    Classification,
    ClassifySpec,
    Features,
    FeatureSpec,
    FillMask,
    FillMaskSpec,
    Item,
    Output,
)
from .cuda_graphs import EncoderGraphs
from .hub import RobertaHub, fill_mask_candidates
from .model import cu_seqlens_of, varlen_attn

log = logging.getLogger(__name__)
T = TypeVar("T")

# Shape buckets for the CPU's half-precision matmuls (see `shape_bucket`).
BUCKETS_PER_OCTAVE = 32
MAX_BUCKET_STEP = 256

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """Host array in the wire dtype; bfloat16 travels as its raw 16 bits (numpy has no bf16)."""
    t = t.to(_TORCH_DTYPES[dtype])
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    arr = t.cpu().numpy()
    return arr.view(np.uint16) if dtype == "bfloat16" else arr


def shape_bucket(tokens: int, max_step: int = MAX_BUCKET_STEP) -> int:
    """Rows to run for a packed batch of `tokens` real tokens on the CPU in half precision.

    oneDNN compiles its bfloat16 matmul kernels for each row count it sees, and a stream of
    mixed-length batches rarely repeats one: on the standard mix, batches of new sizes ran at
    0.85x the rate of the same batches run again. Rounding up to one of 32 sizes per power of
    two keeps the compiled kernels reusable for under 1/32 extra rows (1.5% on average); batches
    under 64 tokens stay exact. The padding rows form a sequence of their own, so `max_step`
    must not exceed the model's max_positions.
    """
    step = 1
    while step * 2 * BUCKETS_PER_OCTAVE <= tokens and step < max_step:
        step *= 2
    return -(-tokens // step) * step


def injected_faults(oom_tokens: int, poison_id: int) -> Callable[[list[Item]], None]:
    """A fault injector for tests: passes over `oom_tokens` tokens fail as out of memory, and
    passes holding the token id `poison_id` fail outright."""

    def inject(items: list[Item]) -> None:
        tokens = sum(len(it.ids) for it in items)
        if oom_tokens and tokens > oom_tokens:
            raise torch.cuda.OutOfMemoryError(f"injected: {tokens} tokens > {oom_tokens}")
        if poison_id >= 0 and any(poison_id in it.ids for it in items):
            raise RuntimeError(f"injected fault: token id {poison_id}")

    return inject


class Executor:
    """Runs batches on a single device thread; `submit` returns a future of the BatchResult."""

    def __init__(self, hub: RobertaHub, cuda_graph_tokens: int = 0, max_batch_size: int = 256):
        self.hub = hub
        self.model = hub.model
        self.device = hub.device
        # Packed varlen attention costs the sum of lengths; the padded fallback costs B x longest.
        self.varlen = self.device.type == "cuda" and varlen_attn is not None
        self.varlen = self.varlen and hub.dtype != torch.float32
        # On the CPU attention runs on the sequences' own rows (model.PackedLayout): no padding.
        self.unpadded = self.varlen or self.device.type == "cpu"
        # float32 runs through MKL, which compiles nothing per shape.
        self.shape_buckets = self.device.type == "cpu" and hub.dtype != torch.float32
        # The padding sequence is shorter than a step, and no sequence outgrows the positions.
        max_positions = self.model.cfg.max_positions
        self.max_bucket_step = min(MAX_BUCKET_STEP, 1 << (max_positions.bit_length() - 1))
        # Batches replay captured graphs (varlen only: the padded path syncs on lengths).
        self.graphs = (
            EncoderGraphs(self.model, self.device, cuda_graph_tokens, max_batch_size)
            if self.varlen and cuda_graph_tokens
            else None
        )
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roberta-device")
        self._thread_ident: int | None = None
        # Test hook: called with each batch before its forward pass, to inject faults.
        self.fault_injector: Callable[[list[Item]], None] | None = None
        # False once a batch failed item by item and a one-sequence probe failed too.
        self.usable = True

    def submit(self, batch: Batch) -> Future[BatchResult]:
        return self._pool.submit(self.run_batch, batch)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the device thread between batches (e.g. to add a head)."""
        return self._pool.submit(fn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    def computed_tokens(self, items: list[Item]) -> int:
        lengths = [len(it.ids) for it in items]
        bucket = self._graph_bucket(items, lengths)
        if bucket is not None:
            return bucket
        return self.batch_cost(len(lengths), sum(lengths), max(lengths))

    def batch_cost(self, count: int, total: int, longest: int) -> int:
        """Tokens a batch of `count` sequences computes, from their sum and longest length."""
        if self.shape_buckets:
            return shape_bucket(total, self.max_bucket_step)
        return total if self.unpadded else count * longest

    # ---- on the device thread

    def run_batch(self, batch: Batch) -> BatchResult:
        self._thread_ident = threading.get_ident()
        started = time.monotonic()
        outputs = self._run_or_split(batch.items)
        if all(isinstance(out, Exception) for out in outputs):
            # Every item failed alone: bad inputs, or a broken device? A known-good probe tells.
            self.usable = self.probe()
        else:
            self.usable = True
        return BatchResult(
            outputs, started, time.monotonic() - started, self.computed_tokens(batch.items)
        )

    def probe(self) -> bool:
        """Whether a tiny known-good sequence still runs (on the device thread)."""
        spec = FeatureSpec((self.model.cfg.num_layers,), "cls", "float32")
        try:
            self._forward([Item([self.hub.tokenizer.bos, self.hub.tokenizer.eos], spec)])
        except Exception as exc:
            log.error("the model fails even on a probe sequence: %r", exc)
            return False
        return True

    def _graph_bucket(self, items: list[Item], lengths: list[int]) -> int | None:
        """The graph bucket these items replay in, or None: they run eagerly."""
        if self.graphs is None:
            return None
        last = self.model.cfg.num_layers
        if any(isinstance(it.spec, FeatureSpec) and set(it.spec.layers) - {last} for it in items):
            return None  # the graphs keep the last layer only
        return self.graphs.bucket_for(lengths)

    def _run_or_split(self, items: list[Item]) -> list[Output | Exception]:
        try:
            return self._forward(items)
        except Exception as exc:  # any failure of the pass: isolate the items that cause it
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) == 1:
                log.warning("item of %d tokens failed: %r", len(items[0].ids), exc)
                return [exc]
            log.warning("batch of %d items failed (%r); retrying in halves", len(items), exc)
            half = len(items) // 2
            return self._run_or_split(items[:half]) + self._run_or_split(items[half:])

    @torch.inference_mode()
    def _forward(self, items: list[Item]) -> list[Output | Exception]:
        if self.fault_injector is not None:
            self.fault_injector(items)
        # Packed in length order: on the CPU, sequences of equal length side by side share one
        # attention call (model.key_spans).
        order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
        outputs = self._forward_packed([items[i] for i in order])
        in_order: list[Output | Exception] = [None] * len(items)  # type: ignore[list-item]
        for j, i in enumerate(order):
            in_order[i] = outputs[j]
        return in_order

    def _forward_packed(self, items: list[Item]) -> list[Output | Exception]:
        lengths = [len(it.ids) for it in items]
        # 0.3 ms for 16,000 tokens, against 1.2 ms through a list and torch.tensor.
        flat = np.fromiter(
            itertools.chain.from_iterable(it.ids for it in items), np.int64, sum(lengths)
        )
        bucket = self._graph_bucket(items, lengths)
        if bucket is not None:
            hidden = {self.model.cfg.num_layers: self.graphs.run(flat, lengths, bucket)}
        else:
            hidden = self._eager(items, torch.from_numpy(flat), lengths)
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        outputs: list[Output | Exception | None] = [None] * len(items)
        self._features(items, hidden, starts, outputs)
        self._classify(items, hidden, starts, outputs)
        self._fill_mask(items, hidden, starts, outputs)
        return outputs  # type: ignore[return-value]

    def _eager(
        self, items: list[Item], flat: torch.Tensor, lengths: list[int]
    ) -> dict[int, torch.Tensor]:
        if self.shape_buckets:
            pad = shape_bucket(flat.numel(), self.max_bucket_step) - flat.numel()
            if pad:  # one more sequence: no real token attends to the padding rows
                flat = torch.cat([flat, flat.new_full((pad,), self.model.cfg.padding_idx)])
                lengths = [*lengths, pad]
        cu = cu_seqlens_of(lengths)
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
            cu = cu.pin_memory().to(self.device, non_blocking=True)
        keep = {
            layer for it in items if isinstance(it.spec, FeatureSpec) for layer in it.spec.layers
        }
        return self.model(flat, cu, max(lengths), keep)

    def _features(self, items, hidden, starts, outputs) -> None:
        groups: dict[FeatureSpec, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            if isinstance(it.spec, FeatureSpec):
                groups[it.spec].append(i)
        for spec, idx in groups.items():
            if spec.pooling == "none":
                rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in idx])
                rows = rows.to(self.device)
                stacked = torch.stack(
                    [hidden[layer].index_select(0, rows) for layer in spec.layers]
                )
                host = _to_numpy(stacked, spec.dtype)  # [layers, sum T, H]
                offset = 0
                for i in idx:
                    n = starts[i + 1] - starts[i]
                    arr = np.ascontiguousarray(host[:, offset : offset + n])
                    outputs[i] = Features(arr, spec.layers, spec.dtype)
                    offset += n
                continue
            if spec.pooling == "cls":
                rows = torch.tensor([starts[i] for i in idx], device=self.device)
                pooled = [hidden[layer].index_select(0, rows) for layer in spec.layers]
            else:  # mean over the real tokens, accumulated in float32
                pooled = [
                    torch.stack(
                        [hidden[layer][starts[i] : starts[i + 1]].float().mean(0) for i in idx]
                    )
                    for layer in spec.layers
                ]
            host = _to_numpy(torch.stack(pooled, dim=1), spec.dtype)  # [items, layers, H]
            for j, i in enumerate(idx):
                outputs[i] = Features(host[j], spec.layers, spec.dtype)

    def _classify(self, items, hidden, starts, outputs) -> None:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            if isinstance(it.spec, ClassifySpec):
                groups[it.spec.head].append(i)
        last = hidden[self.model.cfg.num_layers]
        for head, idx in groups.items():
            module = self.model.heads[head] if head in self.model.heads else None
            if module is None:  # removed between validation and execution
                for i in idx:
                    outputs[i] = KeyError(f"unknown classification head {head!r}")
                continue
            cls = last.index_select(0, torch.tensor([starts[i] for i in idx], device=self.device))
            logits = module(cls).float().cpu().numpy()
            for j, i in enumerate(idx):
                outputs[i] = Classification(logits[j])

    def _fill_mask(self, items, hidden, starts, outputs) -> None:
        idx = [i for i, it in enumerate(items) if isinstance(it.spec, FillMaskSpec)]
        if not idx:
            return
        last = hidden[self.model.cfg.num_layers]
        rows = torch.tensor([starts[i] + items[i].spec.position for i in idx], device=self.device)
        probs = F.softmax(self.model.lm_logits(last.index_select(0, rows)).float(), dim=-1)
        k = max(items[i].spec.topk for i in idx)
        values, index = probs.topk(min(k, probs.shape[-1]), dim=-1)
        values, index = values.cpu(), index.cpu()
        for j, i in enumerate(idx):
            spec = items[i].spec
            values_i, index_i = values[j, : spec.topk].tolist(), index[j, : spec.topk].tolist()
            outputs[i] = FillMask(
                fill_mask_candidates(self.hub.tokenizer, spec.masked_input, values_i, index_i)
            )
