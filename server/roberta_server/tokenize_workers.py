"""Validation and tokenization of request inputs: small requests on the event loop, larger ones
off it, in threads or in worker processes.

The BPE is pure Python, so a thread that tokenizes holds the GIL, and the event loop and the
device thread (which needs the GIL between kernel launches) wait for it. On a CPU host the model
keeps the cores busy anyway and threads are enough. On a GPU host tokenization becomes the bound:
on an H200 with RoBERTa-large, requests of 64 texts were served at 98,500 tokens/s, and the same
requests as token ids at 352,800 (`bench/gpu.sh`); with 8 worker processes the texts went as
fast as the ids. Each worker holds a copy of the tokenizer and returns token ids; requests with
few texts, or only token ids, never leave the server process.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import InvalidInput, ServiceError
from .tokenizer import Encoding, SequenceTooLongError, Tokenizer

log = logging.getLogger(__name__)

# One input: a text, a (text, text_pair) pair, or token ids.
Input = str | tuple[str, str] | Sequence[int]
T = TypeVar("T")


@dataclass
class Prepared:
    """Tokenized inputs of one request."""

    ids: list[list[int]]
    truncated: list[bool]
    seconds: float


@dataclass
class Preparer:
    """Turns inputs into model-ready token ids, raising InvalidInput with the caller's message."""

    tokenizer: Tokenizer
    vocab_size: int
    max_positions: int

    def encode_one(
        self, where: str, x: Input, truncate: bool, no_separator: bool, limit: bool = True
    ) -> Encoding:
        """The Tokenize RPC's encoding of one input, with offsets."""
        # Without `limit` an over-long text comes back whole, as fairseq's `encode` returns it.
        max_len = self.max_positions if limit or truncate else None
        return self._tokenize(
            self.tokenizer.encode_with_offsets, where, x, truncate, no_separator, max_len
        )

    def _tokenize(
        self,
        encode: Callable[..., T],
        where: str,
        x: Input,
        truncate: bool,
        no_separator: bool,
        max_len: int | None,
    ) -> T:
        try:
            if isinstance(x, str):
                return encode(x, truncate=truncate, max_positions=max_len)
            if isinstance(x, tuple):
                return encode(
                    *x, no_separator=no_separator, truncate=truncate, max_positions=max_len
                )
        except SequenceTooLongError as exc:
            raise InvalidInput(f"{where}: {exc}; set truncate to cut it") from exc
        raise InvalidInput(f"{where}: token ids cannot be tokenized; send text")

    def check_ids(self, where: str, ids: Sequence[int], truncate: bool) -> tuple[list[int], bool]:
        ids = list(ids)
        if not ids:
            raise InvalidInput(f"{where}: ids is empty")
        bad = [t for t in ids if t < 0 or t >= self.vocab_size]
        if bad:
            raise InvalidInput(f"{where}: token id {bad[0]} is out of range [0, {self.vocab_size})")
        if self.tokenizer.pad in ids:
            raise InvalidInput(
                f"{where}: id {self.tokenizer.pad} (<pad>) may not appear inside a sequence"
            )
        if len(ids) <= self.max_positions:
            return ids, False
        if not truncate:
            raise InvalidInput(
                f"{where}: tokens exceeds maximum length: {len(ids)} > {self.max_positions}; "
                "set truncate to cut it"
            )
        return ids[: self.max_positions - 1] + ids[-1:], True

    def prepare_one(
        self, where: str, x: Input, truncate: bool, no_sep: bool
    ) -> tuple[list[int], bool]:
        if isinstance(x, (str, tuple)):
            # Ids alone: the offsets that the Tokenize RPC returns would triple the cost.
            return self._tokenize(
                self.tokenizer.encode_with_truncation,
                where,
                x,
                truncate,
                no_sep,
                self.max_positions,
            )
        return self.check_ids(where, x, truncate)

    def prepare(self, inputs: Sequence[Input], truncate: bool, no_sep: bool) -> Prepared:
        """Every input of a model RPC; the first bad one fails the request."""
        t0 = time.perf_counter()
        ids, truncated = [], []
        for i, x in enumerate(inputs):
            seq, cut = self.prepare_one(f"inputs[{i}]", x, truncate, no_sep)
            ids.append(seq)
            truncated.append(cut)
        return Prepared(ids, truncated, time.perf_counter() - t0)

    def prepare_items(
        self, inputs: Sequence[tuple[str, Input]], truncate: bool, no_sep: bool
    ) -> list[tuple[list[int], bool] | ServiceError]:
        """Stream items: a bad item gets its error in place of its ids."""
        out: list[tuple[list[int], bool] | ServiceError] = []
        for item_id, x in inputs:
            try:
                out.append(self.prepare_one(f"item {item_id!r}", x, truncate, no_sep))
            except ServiceError as exc:
                out.append(exc)
        return out

    def encode_all(
        self, inputs: Sequence[Input], truncate: bool, no_separator: bool
    ) -> list[Encoding]:
        """The Tokenize RPC: encodings with offsets; over-long texts come back whole."""
        return [
            self.encode_one(f"inputs[{i}]", x, truncate, no_separator, limit=False)
            for i, x in enumerate(inputs)
        ]

    def encode_masked(self, texts: Sequence[str]) -> Prepared:
        """Fill-mask texts, each holding one `<mask>`."""
        t0 = time.perf_counter()
        ids = []
        for i, text in enumerate(texts):
            try:
                seq = self.tokenizer.encode_masked(text)
            except ValueError as exc:
                raise InvalidInput(f"texts[{i}]: {exc}") from exc
            if len(seq) > self.max_positions:
                raise InvalidInput(
                    f"texts[{i}]: tokens exceeds maximum length: {len(seq)} > {self.max_positions}"
                )
            ids.append(seq)
        return Prepared(ids, [False] * len(ids), time.perf_counter() - t0)


# The preparer of a worker process, set once by its initializer.
_worker_preparer: Preparer | None = None


def _init_worker(preparer: Preparer) -> None:
    global _worker_preparer
    _worker_preparer = preparer
    # Ctrl-C reaches the whole process group: the server decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _call_in_worker(method: str, args: tuple) -> Any:
    return getattr(_worker_preparer, method)(*args)


def count_texts(inputs: Sequence[Input]) -> int:
    return sum(isinstance(x, (str, tuple)) for x in inputs)


def input_size(inputs: Sequence[Input]) -> int:
    """Characters of text plus token ids: what preparing the inputs costs, roughly."""
    return sum(sum(map(len, x)) if isinstance(x, tuple) else len(x) for x in inputs)


# Requests with fewer texts tokenize in a thread: the hop to a process costs more than one short
# text. With RoBERTa-large on an H200, one text per request served at 0.80 of the token-id rate
# with threads and 0.71 with processes, while requests of 64 texts went from 0.28 to 1.00.
PROCESS_MIN_TEXTS = 8
# Requests this small are prepared on the event loop itself: the hop to a thread and back cost
# more than the work. 2,048 characters take about 0.1 ms once the BPE has seen their words, and
# 2.6 ms of made-up words: less than a tokenizing thread would hold the GIL before the event
# loop got it back (the 5 ms switch interval). A one-text request of the standard mix has 226
# characters on average. On the 2-core CPU, 32 one-text clients were served 1.05x faster
# in bfloat16 and 1.02x in float32: every hop woke a thread, which took a core from the model.
INLINE_MAX_SIZE = 2048


class TokenizeWorkers:
    """Runs Preparer methods off the event loop: in `processes` worker processes for requests
    with at least PROCESS_MIN_TEXTS texts (when there are processes), else in `threads` threads."""

    def __init__(self, preparer: Preparer, threads: int, processes: int):
        self.preparer = preparer
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="roberta-tok")
        self._processes: Executor | None = None
        if processes > 0:
            # spawn, not fork: the server process has threads (and maybe CUDA) that a forked
            # child must not inherit half-way.
            self._processes = ProcessPoolExecutor(
                processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(preparer,),
            )
        self.processes = processes

    async def start(self) -> None:
        """Start every worker process now rather than under the first requests."""
        if self._processes is None:
            return
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        probe = (["warm-up"], False, False)
        await asyncio.gather(
            *(
                loop.run_in_executor(self._processes, _call_in_worker, "encode_all", probe)
                for _ in range(self.processes)
            )
        )
        log.info(
            "tokenizer processes started",
            extra={"processes": self.processes, "seconds": round(time.perf_counter() - t0, 3)},
        )

    async def run(self, inputs: Sequence[Input], method: str, *args: Any) -> Any:
        """`preparer.method(*args)`, where `inputs` are what it prepares: inline when they are
        at most INLINE_MAX_SIZE characters and ids, in a worker process if there are processes
        and they hold at least PROCESS_MIN_TEXTS texts, else in a thread. The arguments must
        pickle (token ids as lists)."""
        if input_size(inputs) <= INLINE_MAX_SIZE:
            return getattr(self.preparer, method)(*args)
        loop = asyncio.get_running_loop()
        if count_texts(inputs) >= PROCESS_MIN_TEXTS and self._processes is not None:
            try:
                return await loop.run_in_executor(self._processes, _call_in_worker, method, args)
            except BrokenProcessPool:
                # A worker died (killed for memory, say): the pool is unusable from now on, so
                # this request and all later ones tokenize in threads rather than fail.
                log.error("a tokenizer process died; tokenizing in threads from now on")
                self._processes = None
        return await loop.run_in_executor(self._threads, getattr(self.preparer, method), *args)

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)
