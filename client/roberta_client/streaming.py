"""Bulk streams: keep the server's window full, resume after a broken connection.

Items are `(id, input)` pairs. Every item sent and not yet answered stays in a ledger; when the
stream breaks with a retryable status, a new stream resends exactly those items and then goes on
with the source. A result is yielded only when its id is still in the ledger, so nothing is lost
and nothing is yielded twice, whatever the server computed before the break.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from roberta_client._proto.roberta.v1 import roberta_pb2
from roberta_client.inputs import InputLike, to_input
from roberta_client.tensors import tensor_to_numpy

logger = logging.getLogger(__name__)

#: Status codes after which a stream is reopened and its unanswered items resent.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
#: Items per request message: one per message caps a Python stream at a fraction of the rate.
DEFAULT_ITEMS_PER_MESSAGE = 16


@dataclass(frozen=True)
class ItemError:
    """Why one stream item failed; the stream itself went on."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True, eq=False)
class StreamResult:
    """The answer to one stream item."""

    #: The item's id, as a str.
    id: str
    #: Features (numpy array) or a `Classification`; None when the item failed.
    value: Any
    #: Set when the item failed.
    error: ItemError | None
    #: Real tokens in the item's sequence.
    num_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def result_from_message(message: Any, convert: Callable[[Any], tuple[Any, int]]) -> StreamResult:
    """A FeaturesStreamResult / ClassifyStreamResult as a StreamResult."""
    if message.WhichOneof("outcome") == "error":
        err = message.error
        code = _CODES.get(err.code, grpc.StatusCode.UNKNOWN)
        return StreamResult(message.id, None, ItemError(code, err.message))
    value, num_tokens = convert(message)
    return StreamResult(message.id, value, None, num_tokens)


class Ledger:
    """Items sent and not yet answered, and the source they come from."""

    def __init__(self) -> None:
        self.pending: dict[str, roberta_pb2.StreamItem] = {}
        self.exhausted = False
        self.lock = threading.Lock()

    def add(self, item_id: Any, item: InputLike) -> roberta_pb2.StreamItem:
        key = str(item_id)
        if key in self.pending:
            raise ValueError(f"stream item id {key!r} is used twice while unanswered")
        message = roberta_pb2.StreamItem(id=key, input=to_input(item))
        self.pending[key] = message
        return message

    def resolve(self, item_id: str) -> bool:
        """True the first time an answer for a pending item arrives."""
        return self.pending.pop(item_id, None) is not None

    @property
    def done(self) -> bool:
        return self.exhausted and not self.pending


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _Window:
    """Client side of the flow control: items in flight against the server's window."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.size: int | None = None
        self.per_message = DEFAULT_ITEMS_PER_MESSAGE
        self.in_flight = 0
        self.closed = False

    def open(self, window: roberta_pb2.StreamWindow, per_message: int) -> None:
        with self.cond:
            self.size = max(1, window.max_in_flight)
            self.per_message = max(1, min(per_message, window.max_items_per_message or per_message))
            self.cond.notify_all()

    def answered(self, n: int) -> None:
        with self.cond:
            self.in_flight -= n
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def acquire(self, n: int) -> bool:
        """Wait for room for `n` items; False once the stream is closed."""
        with self.cond:
            while not self.closed and (
                self.size is None or (self.in_flight and self.in_flight + n > self.size)
            ):
                self.cond.wait(0.5)
            if self.closed:
                return False
            self.in_flight += n
            return True


class _Backoff:
    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max_attempts
        self.failures = 0

    def progress(self) -> None:
        self.failures = 0

    def delay(self, error: grpc.RpcError) -> float:
        """Seconds to wait before reopening; re-raises when retrying is pointless."""
        if error.code() not in RETRYABLE:
            raise error
        self.failures += 1
        if self.failures > self.max_attempts:
            raise error
        delay = min(5.0, 0.2 * 2 ** (self.failures - 1))
        logger.warning(
            "stream broke (%s: %s); resuming in %.1fs", error.code().name, error.details(), delay
        )
        return delay


def run_sync(
    open_stream: Callable[[Iterator[Any]], Iterator[Any]],
    make_request: Callable[[list[roberta_pb2.StreamItem]], Any],
    convert: Callable[[Any], tuple[Any, int]],
    source: Iterable[tuple[Any, InputLike]],
    items_per_message: int,
    max_attempts: int,
) -> Iterator[StreamResult]:
    """The blocking stream loop behind `RobertaClient.stream_features` / `stream_classify`."""
    ledger = Ledger()
    items = iter(source)
    backoff = _Backoff(max_attempts)

    failed: list[BaseException] = []

    def requests(window: _Window, resend: list[roberta_pb2.StreamItem]) -> Iterator[Any]:
        # Runs on gRPC's sending thread; it blocks while the server's window is full.
        if not window.acquire(0):
            return
        for chunk in _chunks(resend, window.per_message):
            if not window.acquire(len(chunk)):
                return
            yield make_request(chunk)
        while not ledger.exhausted:
            chunk = []
            # Pulling and recording happen together, and never after the stream was closed, so
            # the next stream's resend list holds every item taken from the source.
            with ledger.lock:
                if window.closed:
                    return
                try:
                    for item_id, item in items:
                        chunk.append(ledger.add(item_id, item))
                        if len(chunk) >= window.per_message:
                            break
                    else:
                        ledger.exhausted = True
                except Exception as exc:  # the caller's source failed: finish and re-raise it
                    failed.append(exc)
                    ledger.exhausted = True
            if chunk:
                if not window.acquire(len(chunk)):
                    return
                yield make_request(chunk)

    while True:
        window = _Window()
        with ledger.lock:
            resend = list(ledger.pending.values())
        call = open_stream(requests(window, resend))
        try:
            for response in call:
                if response.HasField("window"):
                    window.open(response.window, items_per_message)
                window.answered(len(response.results))
                for message in response.results:
                    if ledger.resolve(message.id):
                        backoff.progress()
                        yield result_from_message(message, convert)
            if failed:
                raise failed[0]
            if ledger.done:
                return
            # The server ended the stream with items unanswered (it is shutting down).
            error: grpc.RpcError = _StreamEnded()
        except grpc.RpcError as exc:
            error = exc
        finally:
            with ledger.lock:
                window.close()
            call.cancel()
        time.sleep(backoff.delay(error))


class _StreamEnded(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the server closed the stream with items unanswered"


async def run_async(
    open_stream: Callable[[], Any],
    make_request: Callable[[list[roberta_pb2.StreamItem]], Any],
    convert: Callable[[Any], tuple[Any, int]],
    source: Iterable[tuple[Any, InputLike]] | AsyncIterable[tuple[Any, InputLike]],
    items_per_message: int,
    max_attempts: int,
) -> AsyncIterator[StreamResult]:
    """The asyncio stream loop behind `AsyncRobertaClient.stream_features` / `stream_classify`."""
    ledger = Ledger()
    backoff = _Backoff(max_attempts)
    if isinstance(source, AsyncIterable):
        aitems = aiter(source)
    else:
        sync_items = iter(source)

        async def from_sync() -> AsyncIterator[tuple[Any, InputLike]]:
            for pair in sync_items:
                yield pair

        aitems = from_sync()

    failed: list[BaseException] = []

    async def send(call: Any, window: asyncio.Condition, state: dict, resend: list) -> None:
        try:
            await send_all(call, window, state, resend)
        except Exception as exc:  # the caller's source failed: stop the call and re-raise it
            failed.append(exc)
            call.cancel()

    async def send_all(call: Any, window: asyncio.Condition, state: dict, resend: list) -> None:
        async def acquire(n: int) -> None:
            async with window:
                await window.wait_for(
                    lambda: (
                        state["size"] is not None
                        and (not state["in_flight"] or state["in_flight"] + n <= state["size"])
                    )
                )
                state["in_flight"] += n

        await acquire(0)
        for chunk in _chunks(resend, state["per_message"]):
            await acquire(len(chunk))
            await call.write(make_request(chunk))
        while not ledger.exhausted:
            chunk = []
            while len(chunk) < state["per_message"]:
                try:
                    item_id, item = await anext(aitems)
                except StopAsyncIteration:
                    ledger.exhausted = True
                    break
                chunk.append(ledger.add(item_id, item))
            if chunk:
                await acquire(len(chunk))
                await call.write(make_request(chunk))
        await call.done_writing()

    while True:
        window = asyncio.Condition()
        state: dict[str, Any] = {"size": None, "in_flight": 0, "per_message": items_per_message}
        call = open_stream()
        sender = asyncio.ensure_future(send(call, window, state, list(ledger.pending.values())))
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                async with window:
                    if response.HasField("window"):
                        w = response.window
                        state["size"] = max(1, w.max_in_flight)
                        cap = w.max_items_per_message or items_per_message
                        state["per_message"] = max(1, min(items_per_message, cap))
                    state["in_flight"] -= len(response.results)
                    window.notify_all()
                for message in response.results:
                    if ledger.resolve(message.id):
                        backoff.progress()
                        yield result_from_message(message, convert)
            if ledger.done:
                return
            error: grpc.RpcError = _StreamEnded()
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            if failed:
                raise failed[0] from None
            if isinstance(exc, asyncio.CancelledError):
                raise
            error = exc
        finally:
            sender.cancel()
            call.cancel()
        await asyncio.sleep(backoff.delay(error))


def features_value(message: roberta_pb2.FeaturesStreamResult) -> tuple[np.ndarray, int]:
    return tensor_to_numpy(message.features.tensor), message.features.num_tokens
