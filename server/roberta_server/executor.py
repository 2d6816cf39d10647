"""Execution: one thread owns the device and runs batches in the order given.

A batch is packed into one [N] token tensor, run through the encoder once, and every item's output
is cut from the result: feature slices, pooled vectors, head logits and fill-mask candidates are
each gathered for the whole batch and copied to the host in one transfer. When a forward pass fails
(out of memory on a big batch, say), the batch is split in halves and retried, so in the end only
the items that fail alone fail.

On CUDA, behind a batch of OVERLAP_MIN_TOKENS or more, the thread works one batch ahead: it queues
the next batch's copies and kernels before it waits for the current batch's outputs, so the GPU
does not idle while the host turns one batch's outputs into items and lays out the next one's
inputs. Each batch's outputs are gathered into tensors of their own and their copies to the host
queued before the next batch runs, since the graphs of all buckets share one output buffer.
"""

from __future__ import annotations

import itertools
import logging
import queue
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
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
# What a launched batch's host copies fill in: outputs by position in the packed batch.
Fill = Callable[[torch.Tensor, list], None]
# Computed tokens from which the next CUDA batch is launched before this one is collected.
OVERLAP_MIN_TOKENS = 2048


def _wire(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """`t` in the wire dtype; bfloat16 travels as its raw 16 bits (numpy has no bf16)."""
    t = t.to(_TORCH_DTYPES[dtype])
    return t.view(torch.int16) if dtype == "bfloat16" else t


def _wire_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    arr = t.numpy()
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


@dataclass
class _Launched:
    """A batch whose work is queued on the device: `collect` waits for it and gives its outputs
    (or is the exception that stopped its launch)."""

    batch: Batch
    future: Future
    started: float
    tokens: int  # computed
    collect: Callable[[], list] | Exception


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
        # On CUDA, the next batch is queued behind a launched one of at least this many tokens
        # before that one's outputs are collected. It pays where the GPU's time is long against
        # the host's launch: 16 and 64 clients of 64-text requests were served 1.10x and 1.24x
        # faster (RoBERTa-large, H200), but 32 one-text clients, whose batches of ~400 tokens
        # replay in ~1 ms, 0.90x as fast: their callers waited for the next launch.
        self.overlap_min_tokens = OVERLAP_MIN_TOKENS if self.device.type == "cuda" else sys.maxsize
        # Test hook: called with each batch before its forward pass, to inject faults.
        self.fault_injector: Callable[[list[Item]], None] | None = None
        # False once a batch failed item by item and a one-sequence probe failed too.
        self.usable = True
        self._last_end = 0.0  # time.monotonic() the previous batch's outputs were ready
        # (batch, future), (function, future), or None to stop.
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="roberta-device", daemon=True)
        self._thread.start()

    def submit(self, batch: Batch) -> Future[BatchResult]:
        future: Future[BatchResult] = Future()
        self._jobs.put((batch, future))
        return future

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the device thread between batches (e.g. to add a head)."""
        future: Future[T] = Future()
        self._jobs.put((fn, future))
        return future

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join()

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

    def _loop(self) -> None:
        launched: _Launched | None = None  # queued on the device, outputs not yet collected
        while True:
            try:
                job = self._jobs.get(block=launched is None)
            except queue.Empty:  # nothing to queue behind it: collect the launched batch
                self._collect(launched)  # type: ignore[arg-type]
                launched = None
                continue
            if job is not None and isinstance(job[0], Batch):
                batch, future = job
                if not future.set_running_or_notify_cancel():
                    continue
                if launched is not None and launched.tokens < self.overlap_min_tokens:
                    self._collect(launched)  # a short batch: its callers first
                    launched = None
                started = time.monotonic()
                collect: Callable[[], list] | Exception
                try:
                    collect, tokens = self._launch(batch.items)
                except Exception as exc:  # split and retried when it is collected
                    collect, tokens = exc, self.computed_tokens(batch.items)
                if launched is not None:
                    self._collect(launched)
                launched = _Launched(batch, future, started, tokens, collect)
                continue
            if launched is not None:  # calls and the stop run after the batch in flight
                self._collect(launched)
                launched = None
            if job is None:
                return
            fn, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

    def _collect(self, launched: _Launched) -> None:
        collect, items = launched.collect, launched.batch.items
        if isinstance(collect, Exception):
            outputs = self._run_or_split(items, collect)
        else:
            try:
                outputs = collect()
            except Exception as exc:
                outputs = self._run_or_split(items, exc)
        try:
            result = self._result(outputs, launched.started, launched.tokens)
            launched.future.set_result(result)
        except BaseException as exc:
            launched.future.set_exception(exc)

    def run_batch(self, batch: Batch) -> BatchResult:
        """Run one batch to the end on the calling thread."""
        started = time.monotonic()
        outputs = self._run_or_split(batch.items)
        return self._result(outputs, started, self.computed_tokens(batch.items))

    def _result(self, outputs: list, started: float, tokens: int) -> BatchResult:
        if all(isinstance(out, Exception) for out in outputs):
            # Every item failed alone: bad inputs, or a broken device? A known-good probe tells.
            self.usable = self.probe()
        else:
            self.usable = True
        # Launched batches overlap the one before: count each moment once.
        end = time.monotonic()
        seconds = end - max(started, self._last_end)
        self._last_end = end
        return BatchResult(outputs, started, seconds, tokens)

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
        if any(
            isinstance(it.spec, FeatureSpec) and any(layer != last for layer in it.spec.layers)
            for it in items
        ):
            return None  # the graphs keep the last layer only
        return self.graphs.bucket_for(lengths)

    def _run_or_split(
        self, items: list[Item], failure: Exception | None = None
    ) -> list[Output | Exception]:
        """The items' outputs; after a failure of the pass (`failure`: it already failed), the
        halves are run apart, so in the end only the items that fail alone fail."""
        if failure is None:
            try:
                return self._forward(items)
            except Exception as exc:
                failure = exc
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(items) == 1:
            log.warning("item of %d tokens failed: %r", len(items[0].ids), failure)
            return [failure]
        log.warning("batch of %d items failed (%r); retrying in halves", len(items), failure)
        half = len(items) // 2
        return self._run_or_split(items[:half]) + self._run_or_split(items[half:])

    def _forward(self, items: list[Item]) -> list[Output | Exception]:
        return self._launch(items)[0]()

    @torch.inference_mode()
    def _launch(self, items: list[Item]) -> tuple[Callable[[], list[Output | Exception]], int]:
        """Queue a batch's work on the device. Returns a function that waits for it and gives
        each item's output, in the items' order, and the tokens the kernels compute."""
        if self.fault_injector is not None:
            self.fault_injector(items)
        # Packed in length order: on the CPU, sequences of equal length side by side share one
        # attention call (model.key_spans).
        order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
        packed = [items[i] for i in order]
        lengths = [len(it.ids) for it in packed]
        # 0.3 ms for 16,000 tokens, against 1.2 ms through a list and torch.tensor.
        flat = np.fromiter(
            itertools.chain.from_iterable(it.ids for it in packed), np.int64, sum(lengths)
        )
        bucket = self._graph_bucket(packed, lengths)
        if bucket is not None:
            hidden = {self.model.cfg.num_layers: self.graphs.run(flat, lengths, bucket)}
            tokens = bucket
        else:
            hidden = self._eager(packed, torch.from_numpy(flat), lengths)
            tokens = self.batch_cost(len(lengths), len(flat), lengths[-1])
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        fills: list[tuple[torch.Tensor, Fill]] = []
        self._features(packed, hidden, starts, fills)
        self._classify(packed, hidden, starts, fills)
        self._fill_mask(packed, hidden, starts, fills)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()

        @torch.inference_mode()
        def collect() -> list[Output | Exception]:
            if ready is not None:
                ready.synchronize()
            outputs: list = [None] * len(packed)
            for host, fill in fills:
                fill(host, outputs)
            in_order: list = [None] * len(items)
            for j, i in enumerate(order):
                in_order[i] = outputs[j]
            return in_order

        return collect, tokens

    def _to_device(self, values: list[int] | np.ndarray) -> torch.Tensor:
        """Indices on the device, copied without waiting for the work queued before them."""
        t = torch.as_tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of `t`, complete once the batch's `ready` event has passed."""
        if t.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

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

    def _features(self, items, hidden, starts, fills) -> None:
        groups: dict[FeatureSpec, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            if isinstance(it.spec, FeatureSpec):
                groups[it.spec].append(i)
        for spec, idx in groups.items():
            if spec.pooling == "none":
                rows = self._to_device(
                    np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx])
                )
                stacked = torch.stack(
                    [hidden[layer].index_select(0, rows) for layer in spec.layers]
                )

                def fill_tokens(host, outputs, spec=spec, idx=idx) -> None:
                    arr = _wire_numpy(host, spec.dtype)  # [layers, sum T, H]
                    offset = 0
                    for i in idx:
                        n = starts[i + 1] - starts[i]
                        chunk = np.ascontiguousarray(arr[:, offset : offset + n])
                        outputs[i] = Features(chunk, spec.layers, spec.dtype)
                        offset += n

                fills.append((self._to_host(_wire(stacked, spec.dtype)), fill_tokens))
                continue
            if spec.pooling == "cls":
                rows = self._to_device([starts[i] for i in idx])
                pooled = [hidden[layer].index_select(0, rows) for layer in spec.layers]
            else:  # mean over the real tokens, accumulated in float32
                pooled = [
                    torch.stack(
                        [hidden[layer][starts[i] : starts[i + 1]].float().mean(0) for i in idx]
                    )
                    for layer in spec.layers
                ]

            def fill_pooled(host, outputs, spec=spec, idx=idx) -> None:
                arr = _wire_numpy(host, spec.dtype)  # [items, layers, H]
                for j, i in enumerate(idx):
                    outputs[i] = Features(arr[j], spec.layers, spec.dtype)

            stacked = _wire(torch.stack(pooled, dim=1), spec.dtype)
            fills.append((self._to_host(stacked), fill_pooled))

    def _classify(self, items, hidden, starts, fills) -> None:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            if isinstance(it.spec, ClassifySpec):
                groups[it.spec.head].append(i)
        last = hidden[self.model.cfg.num_layers]
        for head, idx in groups.items():
            module = self.model.heads[head] if head in self.model.heads else None
            if module is None:  # removed between validation and execution

                def fill_unknown(host, outputs, head=head, idx=idx) -> None:
                    for i in idx:
                        outputs[i] = KeyError(f"unknown classification head {head!r}")

                fills.append((last.new_empty(0), fill_unknown))
                continue
            logits = module(last.index_select(0, self._to_device([starts[i] for i in idx])))

            def fill_logits(host, outputs, idx=idx) -> None:
                arr = host.numpy()
                for j, i in enumerate(idx):
                    outputs[i] = Classification(arr[j])

            fills.append((self._to_host(logits.float()), fill_logits))

    def _fill_mask(self, items, hidden, starts, fills) -> None:
        idx = [i for i, it in enumerate(items) if isinstance(it.spec, FillMaskSpec)]
        if not idx:
            return
        last = hidden[self.model.cfg.num_layers]
        rows = self._to_device([starts[i] + items[i].spec.position for i in idx])
        probs = F.softmax(self.model.lm_logits(last.index_select(0, rows)).float(), dim=-1)
        k = max(items[i].spec.topk for i in idx)
        values, index = probs.topk(min(k, probs.shape[-1]), dim=-1)
        # One host copy: the scores and, exactly representable in float32, the token ids.
        both = self._to_host(torch.stack([values, index.float()]))

        def fill_candidates(host, outputs) -> None:
            for j, i in enumerate(idx):
                spec = items[i].spec
                values_i = host[0, j, : spec.topk].tolist()
                index_i = [int(x) for x in host[1, j, : spec.topk].tolist()]
                outputs[i] = FillMask(
                    fill_mask_candidates(self.hub.tokenizer, spec.masked_input, values_i, index_i)
                )

        fills.append((both, fill_candidates))
