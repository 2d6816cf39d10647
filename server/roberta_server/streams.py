"""Transport for the bidirectional streams: flow control, per-item results, response packing.

A stream reads request messages only while fewer than `window` of its items are in flight, so a
client streaming a whole corpus holds at most `window` items of server memory, however fast it
sends. Each item's result is queued as soon as it is computed; the writer packs what is ready
into one response message, so results go out in completion order, several per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from roberta_client._proto.roberta.v1 import roberta_pb2 as pb

from .errors import NotReady
from .scheduler import DeadlineExceeded, Ticket

log = logging.getLogger(__name__)

# Results packed into one response message, and roughly how many bytes of them.
MAX_RESULTS_PER_MESSAGE = 256
MESSAGE_BYTES = 4 << 20


def item_error_message(exc: Exception, status: dict[type, grpc.StatusCode]) -> pb.ItemError:
    if isinstance(exc, DeadlineExceeded):
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        code = status.get(type(exc), grpc.StatusCode.INTERNAL)
    if code is grpc.StatusCode.INTERNAL:
        log.error("stream item failed: %r", exc)
    return pb.ItemError(code=code.value[0], message=str(exc))


class ItemStream:
    """The state of one bidi stream: items in flight, results ready to send, live tickets."""

    def __init__(self, window: int):
        self.window = window
        self.in_flight = 0
        self.results: list[Any] = []
        self.tickets: set[Ticket] = set()
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    async def reserve(self, n: int) -> None:
        """Wait until `n` more items fit in the window (a message larger than it waits for 0)."""
        while self.in_flight and self.in_flight + n > self.window:
            self._space.clear()
            await self._space.wait()
        self.in_flight += n

    def release(self, n: int) -> None:
        """Give back places reserved for items that were not accepted after all."""
        self.in_flight -= n
        self._space.set()

    def put(self, result: Any, size: int = 0) -> None:
        """One item's result (or error), ready to send; frees its place in the window."""
        self.results.append((result, size))
        self.in_flight -= 1
        self._ready.set()
        if self.in_flight < self.window:
            self._space.set()

    def take(self) -> list[Any]:
        """Results for one response message: what is ready, up to the packing limits."""
        n, size = 0, 0
        while n < len(self.results) and n < MAX_RESULTS_PER_MESSAGE and size < MESSAGE_BYTES:
            size += self.results[n][1]
            n += 1
        out = [r for r, _ in self.results[:n]]
        del self.results[:n]
        if not self.results:
            self._ready.clear()
        return out

    async def wait_ready(self) -> None:
        await self._ready.wait()


async def run_stream(
    requests: AsyncIterator[Any],
    context: grpc.aio.ServicerContext,
    stream: ItemStream,
    handle: Callable[[Any, ItemStream], Awaitable[None]],
    make_response: Callable[..., Any],
    window: pb.StreamWindow,
    cancel: Callable[[Ticket], None],
    closing: asyncio.Event,
) -> AsyncIterator[Any]:
    """Yield the response messages of one stream.

    `handle(request, stream)` validates and queues one request message's items, reserving their
    place in the window first; their results reach `stream.put` as they finish. Once `closing`
    is set (shutdown) no further message is read; the items already accepted are answered and
    the stream then ends with UNAVAILABLE, so the client resends the rest elsewhere.
    """
    handling = False

    async def read() -> bool:
        """Handle request messages; True when reading stopped for a shutdown."""
        nonlocal handling
        async for request in requests:
            handling = True
            await handle(request, stream)
            handling = False
            if closing.is_set():
                return True
        return False

    reader = asyncio.ensure_future(read())
    stop = asyncio.ensure_future(closing.wait())
    try:
        yield make_response(window=window)
        while True:
            if stream.results:
                yield make_response(results=stream.take())
                continue
            if closing.is_set() and not reader.done() and not handling:
                # Between messages: nothing half-accepted is lost by no longer reading.
                reader.cancel()
            if reader.done() and not stream.in_flight:
                # Everything accepted is answered; now report what ended the reading, if
                # anything (a shutdown ends the stream with UNAVAILABLE only after its items).
                if reader.cancelled() or reader.result():
                    raise NotReady("server is shutting down: resend unanswered items")
                return
            ready = asyncio.ensure_future(stream.wait_ready())
            waiting = {ready}
            if not reader.done():
                waiting.add(reader)
            if not closing.is_set():
                waiting.add(stop)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
    finally:
        reader.cancel()
        stop.cancel()
        # The client went away, or the stream failed: queued items of this stream must not run.
        for ticket in list(stream.tickets):
            cancel(ticket)
        stream.tickets.clear()
