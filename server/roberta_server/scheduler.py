"""Scheduling: the item queue, batch formation, priorities, deadlines and cancellation.

Requests are split into items (one sequence each) that wait in a queue per priority class. When
the executor can take another batch, one is formed at once, save for one short bounded wait
(`refill_wait_ms`, below) for callers that were answered a moment ago:

* its *anchor* is the oldest waiting item of the most urgent class, so every item is in the first
  batch formed after the items ahead of it in its class have gone: nothing starves;
* the rest are the items closest in length to the anchor within a bounded look-ahead window, added
  while the batch stays within `max_batch_size` items and `max_batch_tokens` computed tokens
  (sum of lengths with varlen attention, items x longest when attention is padded). Interactive
  items come first; bulk (stream) items fill the capacity they leave: in batches of their own,
  kept under `bulk_batch_tokens` while interactive traffic is about.

Items whose request was cancelled or whose deadline passed are dropped before they reach the model.
Outputs go back to each request's future; one request's items may span several batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from .batch import Batch, BatchResult, Item, Output
from .errors import Overloaded
from .metrics import Metrics

log = logging.getLogger(__name__)

INTERACTIVE, BULK = 0, 1
# Interactive traffic counts as present for this long after its last item arrived: long enough
# to span the gaps of sparse traffic, so its next request does not meet a full-size bulk batch.
INTERACTIVE_RECENT_S = 10.0
# The refill wait (SchedulerConfig.refill_wait_ms) costs at most this share of throughput.
REFILL_FRACTION = 0.1


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 4096
    max_batch_size: int = 64
    # Wait up to this long for a batch to fill while the model is idle; 0 = never wait.
    max_queue_delay_ms: float = 0.0
    # Token budget of batches that carry bulk items while interactive traffic is present.
    bulk_batch_tokens: int = 4096
    # How many waiting items batch formation looks at when grouping by length.
    lookahead: int = 1024
    # Batches handed to the executor before the previous ones finish. 1 forms each batch at the
    # last moment (best grouping when batches are long, as on a CPU); 2 lets the device thread
    # start the next batch without waiting for the event loop (GPU).
    pipeline_depth: int = 1
    # Closed-loop callers (each waits for its reply before sending the next item) split into two
    # halves that take turns: a batch is formed the moment the device is free, from the items
    # that arrived while the previous batch ran, so it holds about half of the callers. Instead,
    # after a batch of n items, wait until n more items than were then queued have arrived (the
    # callers just answered), for at most this many ms and REFILL_FRACTION of that batch's time.
    refill_wait_ms: float = 25.0
    # Admission: waiting tokens beyond which unary requests are refused with RESOURCE_EXHAUSTED
    # (counting interactive items only, so bulk streams never lock interactive callers out) and
    # stream items wait for room (counting everything).
    max_queued_tokens: int = 1 << 20


@dataclass(eq=False)  # compared and hashed by identity: streams keep sets of live tickets
class Ticket:
    """A request's items in flight: collects their outputs and timings."""

    size: int
    future: asyncio.Future
    priority: int = INTERACTIVE
    deadline: float | None = None  # time.monotonic() after which unstarted items are dropped
    outputs: list[Output | Exception | None] = field(default_factory=list)
    remaining: int = 0
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    batches: set[int] = field(default_factory=set)
    # Streams get each item's output as it arrives instead of one result at the end.
    on_output: Callable[[int, Output | Exception], None] | None = None

    def __post_init__(self) -> None:
        self.outputs = [None] * self.size
        self.remaining = self.size

    @property
    def abandoned(self) -> bool:
        return self.future.done()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


class DeadlineExceeded(Exception):
    """The item's deadline passed before it reached the model."""


class Scheduler:
    """Forms batches from queued items and hands them to `submit_batch` (the executor)."""

    def __init__(
        self,
        cfg: SchedulerConfig,
        submit_batch: Callable[[Batch], Future[BatchResult]],
        cost: Callable[[int, int, int], int],
        metrics: Metrics,
    ):
        self.cfg = cfg
        self._submit_batch = submit_batch
        self._cost = cost
        self._metrics = metrics
        self._queues: tuple[list[Item], list[Item]] = ([], [])
        self._queued_tokens = 0
        self._class_tokens = [0, 0]  # queued tokens per priority class
        # Queued items per request: finding cancelled and expired ones looks at each request
        # once, not at each item (0.65 ms a batch with 2,000 items queued).
        self._queued_by_ticket: dict[Ticket, int] = {}
        self._room = asyncio.Event()
        # Recent real tokens per second of compute: turns a queue length into a retry hint.
        self._rate = 0.0
        self._last_interactive = -INTERACTIVE_RECENT_S
        self._in_flight = 0
        self._refill_target = 0  # queued items worth waiting for; 0 = none
        self._refill_until = 0.0  # time.monotonic() the wait ends
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self.dropped = 0

    # ---- producer side

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def queued_items(self) -> int:
        return len(self._queues[0]) + len(self._queues[1])

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def enqueue(self, items: list[Item], ticket: Ticket, admit: bool = True) -> None:
        """Queue a request's items; with `admit`, refuse them when the queue is already full."""
        tokens = sum(len(it.ids) for it in items)
        queued = self._class_tokens[ticket.priority]
        if admit and queued and queued + tokens > self.cfg.max_queued_tokens:
            raise Overloaded(
                f"server overloaded: {queued} tokens already queued "
                f"(limit {self.cfg.max_queued_tokens})",
                self.retry_after_ms(),
            )
        now = time.monotonic()
        for i, it in enumerate(items):
            it.owner, it.index, it.enqueued = ticket, i, now
        self._queues[ticket.priority].extend(items)
        if ticket.priority == INTERACTIVE:
            self._last_interactive = now
        self._queued_tokens += tokens
        self._class_tokens[ticket.priority] += tokens
        if items:
            self._queued_by_ticket[ticket] = self._queued_by_ticket.get(ticket, 0) + len(items)
        self._update_gauges()
        self._idle.clear()
        self._wakeup.set()

    def retry_after_ms(self) -> int:
        """About how long the queued work takes to drain."""
        if self._rate <= 0:
            return 1000
        return max(10, min(60_000, int(1000 * self._queued_tokens / self._rate)))

    async def wait_for_room(self, tokens: int) -> None:
        """Until `tokens` more fit under the queue limit (or the queue is empty): streams wait
        here where unary requests would be refused."""
        while self._queued_tokens and self._queued_tokens + tokens > self.cfg.max_queued_tokens:
            self._room.clear()
            await self._room.wait()

    async def run_items(
        self, items: list[Item], priority: int = INTERACTIVE, deadline: float | None = None
    ) -> Ticket:
        """Queue items and wait for all their outputs (in `ticket.outputs`, in order)."""
        ticket = Ticket(len(items), asyncio.get_running_loop().create_future(), priority, deadline)
        if not items:
            return ticket
        self.enqueue(items, ticket)
        try:
            await ticket.future
        except asyncio.CancelledError:
            self.cancel(ticket)
            raise
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The caller went away: its queued items are dropped when the next batch is formed."""
        if not ticket.future.done():
            ticket.future.cancel()
            self._wakeup.set()

    async def wait_idle(self) -> None:
        """Until the queue is empty and no batch is running."""
        await self._idle.wait()

    # ---- batch formation

    def _update_gauges(self) -> None:
        self._room.set()
        self._metrics.queue_items.set(self.queued_items)
        self._metrics.queue_tokens.set(self._queued_tokens)

    def _drop_dead(self) -> None:
        """Remove items whose request is gone or whose deadline passed."""
        now = time.monotonic()
        if not any(t.abandoned or t.expired(now) for t in self._queued_by_ticket):
            return
        for q in self._queues:
            keep = []
            for it in q:
                ticket: Ticket = it.owner
                if ticket.abandoned:
                    self._dropped(it, "cancelled")
                elif ticket.expired(now):
                    self._dropped(it, "deadline")
                    self._deliver(it, DeadlineExceeded("deadline exceeded before compute"), None)
                else:
                    keep.append(it)
            q[:] = keep
        self._update_gauges()

    def _unqueued(self, items: list[Item]) -> None:
        """Account for items that left the queue, into a batch or dropped."""
        for it in items:
            ticket: Ticket = it.owner
            self._queued_tokens -= len(it.ids)
            self._class_tokens[ticket.priority] -= len(it.ids)
            left = self._queued_by_ticket[ticket] - 1
            if left:
                self._queued_by_ticket[ticket] = left
            else:
                del self._queued_by_ticket[ticket]

    def _dropped(self, item: Item, reason: str) -> None:
        self._unqueued([item])
        self.dropped += 1
        self._metrics.items_dropped.labels(reason).inc()

    def _form_batch(self) -> Batch | None:
        self._drop_dead()
        anchor_q = self._queues[INTERACTIVE] or self._queues[BULK]
        if not anchor_q:
            return None
        anchor = anchor_q[0]
        chosen = [anchor]
        chosen_ids = {id(anchor)}
        total = longest = len(anchor.ids)
        # While interactive callers are about, bulk items run only in small batches of their
        # own: an interactive request then waits behind at most one small bulk batch, and its
        # own batch carries no bulk work.
        if anchor_q is self._queues[INTERACTIVE]:
            bulk_budget = 0
        elif time.monotonic() - self._last_interactive < INTERACTIVE_RECENT_S:
            bulk_budget = self.cfg.bulk_batch_tokens
        else:
            bulk_budget = self.cfg.max_batch_tokens
        budgets = (self.cfg.max_batch_tokens, bulk_budget)
        for q, budget in zip(self._queues, budgets, strict=True):
            if len(chosen) >= self.cfg.max_batch_size:
                break
            window = q[: self.cfg.lookahead]
            by_closeness = sorted(
                (it for it in window if id(it) not in chosen_ids),
                key=lambda it: abs(len(it.ids) - len(anchor.ids)),
            )
            for it in by_closeness:
                n = len(it.ids)
                if self._cost(len(chosen) + 1, total + n, max(longest, n)) > budget:
                    continue
                chosen.append(it)
                chosen_ids.add(id(it))
                total += n
                longest = max(longest, n)
                if len(chosen) >= self.cfg.max_batch_size:
                    break
        for i, q in enumerate(self._queues):
            if any(id(it) in chosen_ids for it in q[: self.cfg.lookahead]):
                self._queues[i][:] = [it for it in q if id(it) not in chosen_ids]
        self._unqueued(chosen)
        self._update_gauges()
        return Batch(chosen)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queued_items or self._in_flight >= self.cfg.pipeline_depth:
                if not self.queued_items and not self._in_flight:
                    self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._in_flight and self._queued_tokens < self.cfg.max_batch_tokens:
                # The device is idle and a batch could take more: wait a bounded while for it.
                if await self._more_within(self._fill_wait()):
                    continue
            self._refill_target = 0
            batch = self._form_batch()
            if batch is None:
                continue
            self._in_flight += 1
            future = self._submit_batch(batch)
            future.add_done_callback(
                lambda f, b=batch: loop.call_soon_threadsafe(self._complete, b, f)
            )

    def _fill_wait(self) -> float:
        """Seconds worth waiting for more items: the --max-queue-delay-ms of the oldest waiting
        item, or until the callers just answered have sent again (the refill wait)."""
        now = time.monotonic()
        wait = 0.0
        if self.cfg.max_queue_delay_ms > 0:
            oldest = min(q[0].enqueued for q in self._queues if q)
            wait = oldest + self.cfg.max_queue_delay_ms / 1000 - now
        if self._refill_target and self.queued_items < self._refill_target:
            wait = max(wait, self._refill_until - now)
        return wait

    async def _more_within(self, seconds: float) -> bool:
        """True if new items or a finished batch came within `seconds` (<= 0: no wait)."""
        if seconds <= 0:
            return False
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), seconds)
        except TimeoutError:
            return False
        return True

    # ---- completion (on the event loop)

    def _complete(self, batch: Batch, future: Future[BatchResult]) -> None:
        self._in_flight -= 1
        self._wakeup.set()
        try:
            result = future.result()
        except Exception as exc:  # the executor itself failed: every item gets the error
            log.exception("batch of %d items failed", len(batch.items))
            for it in batch.items:
                self._deliver(it, exc, None)
            return
        m = self._metrics
        real = batch.num_tokens
        m.batches.inc()
        m.batch_items.observe(len(batch.items))
        m.batch_tokens.observe(real)
        m.real_tokens.inc(real)
        m.computed_tokens.inc(result.computed_tokens)
        m.packing.observe(real / result.computed_tokens)
        m.inference_seconds.observe(result.seconds)
        # The callers answered below usually send again within a few ms: worth a short wait.
        self._refill_target = min(self.queued_items + len(batch.items), self.cfg.max_batch_size)
        self._refill_until = time.monotonic() + min(
            self.cfg.refill_wait_ms / 1000, REFILL_FRACTION * result.seconds
        )
        if result.seconds > 0:
            self._rate = (
                0.8 * self._rate + 0.2 * (real / result.seconds)
                if self._rate
                else (real / result.seconds)
            )
        for it, out in zip(batch.items, result.outputs, strict=True):
            m.queue_seconds.observe(result.started - it.enqueued)
            if isinstance(out, Exception):
                m.item_failures.inc()
            self._deliver(it, out, result)

    def _deliver(self, item: Item, out: Output | Exception, result: BatchResult | None) -> None:
        ticket: Ticket = item.owner
        if ticket.abandoned:
            return
        if result is not None:
            ticket.queue_seconds = max(ticket.queue_seconds, result.started - item.enqueued)
            if id(result) not in ticket.batches:
                ticket.batches.add(id(result))
                ticket.inference_seconds += result.seconds
        ticket.outputs[item.index] = out
        ticket.remaining -= 1
        if ticket.on_output is not None:
            ticket.on_output(item.index, out)
        if ticket.remaining == 0:
            ticket.future.set_result(None)
