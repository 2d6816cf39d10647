"""Transport: the gRPC servicer. Protobuf in, plain values to the service, protobuf out; service
errors become status codes; every RPC is counted and timed."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from roberta_client._proto.roberta.v1 import roberta_pb2 as pb
from roberta_client._proto.roberta.v1 import roberta_pb2_grpc
from roberta_client.tensors import numpy_to_tensor

from .batch import ClassifySpec, FeatureSpec
from .errors import (
    Forbidden,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
    ServiceError,
    TooLarge,
    Unsupported,
)
from .metrics import Metrics
from .scheduler import DeadlineExceeded
from .service import Input, RobertaService, Usage, item_error
from .streams import ItemStream, item_error_message, run_stream

log = logging.getLogger(__name__)

# Shutdown stops the listener only after this long without a new call (see RobertaServicer.drain).
DRAIN_QUIET_S = 0.25

STATUS = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    Unsupported: grpc.StatusCode.FAILED_PRECONDITION,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
}


def _trailers(exc: Exception) -> tuple[tuple[str, str], ...]:
    if isinstance(exc, Overloaded):
        return (("retry-after-ms", str(exc.retry_after_ms)),)
    return ()


_CODES = {c.value[0]: c for c in grpc.StatusCode}
POOLING = {pb.POOLING_NONE: "none", pb.POOLING_CLS: "cls", pb.POOLING_MEAN: "mean"}
DTYPE = {
    pb.DTYPE_UNSPECIFIED: "float32",
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_BFLOAT16: "bfloat16",
}
DTYPE_ENUM = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}

Handler = Callable[["RobertaServicer", object, grpc.aio.ServicerContext], Awaitable[object]]

# What to change when a unary response would be over the message limit.
SHRINK_HINTS = {
    "Tokenize": "send fewer or shorter texts",
    "Decode": "send fewer or shorter sequences",
    "ExtractFeatures": "send fewer items, fewer layers, pool, or ask for float16",
    "Classify": "send fewer items",
    "FillMask": "send fewer texts or a smaller topk",
    "RegisterClassificationHead": "use fewer classes or shorter labels",
    "GetModelInfo": "register heads with fewer classes or shorter labels",
}


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and details an exception escaping a handler becomes."""
    if isinstance(exc, ServiceError):
        return STATUS[type(exc)], str(exc)
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {exc!r}"


def rpc(name: str) -> Callable[[Handler], Handler]:
    """Count, time and map the errors of one unary RPC handler."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(self: RobertaServicer, request: object, context) -> object:
            m = self.metrics
            m.in_flight.inc()
            self._handler_started()
            t0 = time.perf_counter()
            code = grpc.StatusCode.OK
            counted = False
            recorded = False

            def done() -> None:
                nonlocal recorded
                if recorded:
                    return
                recorded = True
                self.unary_in_flight -= counted
                self._handler_ended()
                m.in_flight.dec()
                m.requests.labels(name, code.name).inc()
                m.request_seconds.labels(name).observe(time.perf_counter() - t0)

            try:
                if self.service is None:
                    raise NotReady("the model is still loading; retry shortly")
                if self.unary_in_flight >= self.max_unary:
                    raise Overloaded(
                        f"{self.unary_in_flight} requests in flight (limit {self.max_unary})",
                        self.service.scheduler.retry_after_ms(),
                    )
                self.unary_in_flight += 1
                counted = True
                response = await handler(self, request, context)
                self._check_response_size(name, response)
                return response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                code, details = _status(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", name)
                # Counted before the status goes out, so a scrape right after the caller saw
                # the error already includes it.
                done()
                await context.abort(code, details, trailing_metadata=_trailers(exc))
            finally:
                done()

        return wrapper

    return wrap


def stream_rpc(name: str) -> Callable:
    """Count, time and map the errors of one bidi-stream handler (an async generator)."""

    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        async def wrapper(self: RobertaServicer, requests, context) -> AsyncIterator[object]:
            m = self.metrics
            m.in_flight.inc()
            m.streams_open.inc()
            self.streams += 1
            self._handler_started()
            t0 = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if self.service is None:
                    raise NotReady("the model is still loading; retry shortly")
                if self.streams > self.max_streams:
                    raise Overloaded(
                        f"{self.streams - 1} streams open (limit {self.max_streams})", 1000
                    )
                async for response in handler(self, requests, context):
                    yield response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code, details = _status(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", name)
                context.set_code(code)
                context.set_details(details)
                if _trailers(exc):
                    context.set_trailing_metadata(_trailers(exc))
            finally:
                self.streams -= 1
                self._handler_ended()
                m.in_flight.dec()
                m.streams_open.dec()
                m.requests.labels(name, code.name).inc()
                m.request_seconds.labels(name).observe(time.perf_counter() - t0)

        return wrapper

    return wrap


def _input(i: int | str, x: pb.Input) -> Input:
    where = f"inputs[{i}]" if isinstance(i, int) else f"item {i!r}"
    kind = x.WhichOneof("kind")
    if kind == "text":
        return x.text
    if kind == "pair":
        return (x.pair.text, x.pair.text_pair)
    if kind == "ids":
        return list(x.ids.ids)  # a plain list can travel to tokenizer processes
    raise InvalidInput(f"{where} is empty: set one of text, pair or ids")


def _inputs(inputs) -> list[Input]:
    return [_input(i, x) for i, x in enumerate(inputs)]


ENUM_TYPES = {"pooling": pb.Pooling, "dtype": pb.DType}


def _enum(value: int, table: dict, what: str):
    if value not in table:
        names = ", ".join(f"{ENUM_TYPES[what].Name(v)} ({v})" for v in table)
        raise InvalidInput(f"unknown {what} value {value}; use one of {names}")
    return table[value]


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _usage(u: Usage) -> pb.Usage:
    return pb.Usage(
        tokens=u.tokens,
        truncated_items=u.truncated,
        tokenize_ms=u.tokenize_seconds * 1e3,
        queue_ms=u.queue_seconds * 1e3,
        inference_ms=u.inference_seconds * 1e3,
    )


def features_message(out, num_tokens: int, truncated: bool) -> pb.Features:
    return pb.Features(
        tensor=numpy_to_tensor(out.array, DTYPE_ENUM[out.dtype]),
        layers=out.layers,
        num_tokens=num_tokens,
        truncated=truncated,
    )


class RobertaServicer(roberta_pb2_grpc.RobertaServicer):
    def __init__(self, metrics: Metrics, limits: pb.ServerLimits, max_unary: int, max_streams: int):
        self.metrics = metrics
        self.limits = limits
        self.max_unary = max_unary
        self.max_streams = max_streams
        self.unary_in_flight = 0
        self.streams = 0
        self._handlers = 0  # unary and stream handlers running, refused ones included
        self._no_handlers = asyncio.Event()
        self._no_handlers.set()
        self._last_call = 0.0  # loop time the latest handler started
        # Set once the model is loaded and warmed up; until then every RPC is UNAVAILABLE.
        self.service: RobertaService | None = None

    def _handler_started(self) -> None:
        self._handlers += 1
        self._last_call = asyncio.get_running_loop().time()
        self._no_handlers.clear()

    def _handler_ended(self) -> None:
        self._handlers -= 1
        if not self._handlers:
            self._no_handlers.set()

    async def drain(self, timeout: float, quiet: float = DRAIN_QUIET_S) -> bool:
        """Wait until no handler runs and no call has come for `quiet` seconds (new calls are
        refused with UNAVAILABLE meanwhile); False if `timeout` passes first.

        Shutdown waits for this before it stops the service, so an accepted request (perhaps
        still tokenizing, not yet queued) is answered rather than cancelled; and before it stops
        the listener, because grpc cancels (CANCELLED, not UNAVAILABLE) a call that reached it
        just before it stopped, such as the next call of a client that was just answered."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while True:
            try:
                await asyncio.wait_for(self._no_handlers.wait(), until - loop.time())
            except TimeoutError:
                return False
            calm = self._last_call + quiet - loop.time()
            if calm <= 0:
                return True
            if loop.time() + calm > until:
                return False
            await asyncio.sleep(calm)

    def _check_response_size(self, rpc_name: str, response) -> None:
        """Refuse a response grpc would fail to send, saying what to change (grpc itself would
        answer RESOURCE_EXHAUSTED "Sent message larger than max" and log a traceback)."""
        limit = self.limits.max_message_bytes
        size = response.ByteSize()
        if limit and size > limit:
            raise TooLarge(
                f"the response would be {size} bytes, over the {limit}-byte message limit: "
                f"{SHRINK_HINTS[rpc_name]}"
            )

    def _account(self, rpc_name: str, usage: Usage) -> None:
        self.metrics.tokens.labels(rpc_name).inc(usage.tokens)
        if usage.truncated:
            self.metrics.truncations.inc(usage.truncated)

    @rpc("Tokenize")
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        inputs = _inputs(request.inputs)
        encs, usage = await self.service.tokenize(
            inputs, request.options.truncate, request.options.no_separator
        )
        self._account("Tokenize", usage)
        results = [
            pb.Tokenization(
                ids=e.ids,
                tokens=e.tokens,
                segments=e.segments,
                starts=e.starts,
                ends=e.ends,
                special=e.special,
                truncated=e.truncated,
            )
            for e in encs
        ]
        return pb.TokenizeResponse(results=results, usage=_usage(usage))

    @rpc("Decode")
    async def Decode(self, request: pb.DecodeRequest, context) -> pb.DecodeResponse:
        texts = self.service.decode([s.ids for s in request.sequences])
        return pb.DecodeResponse(results=[pb.DecodedText(segments=t) for t in texts])

    @rpc("ExtractFeatures")
    async def ExtractFeatures(
        self, request: pb.ExtractFeaturesRequest, context
    ) -> pb.ExtractFeaturesResponse:
        o = request.options
        outs, usage = await self.service.extract_features(
            _inputs(request.inputs),
            layers=list(o.layers),
            all_layers=o.all_layers,
            pooling=_enum(o.pooling, POOLING, "pooling"),
            dtype=_enum(o.dtype, DTYPE, "dtype"),
            truncate=o.encode.truncate,
            no_separator=o.encode.no_separator,
            deadline=_deadline(context),
        )
        self._account("ExtractFeatures", usage)
        results = [features_message(out, n, cut) for out, n, cut in outs]
        return pb.ExtractFeaturesResponse(results=results, usage=_usage(usage))

    @rpc("Classify")
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        results, usage = await self.service.classify(
            request.head,
            _inputs(request.inputs),
            request.options.truncate,
            request.options.no_separator,
            deadline=_deadline(context),
        )
        self._account("Classify", usage)
        msgs = [
            pb.Classification(logits=lg, log_probs=lp, label_index=i, label=name, truncated=cut)
            for lg, lp, i, name, cut in results
        ]
        return pb.ClassifyResponse(results=msgs, usage=_usage(usage))

    @rpc("FillMask")
    async def FillMask(self, request: pb.FillMaskRequest, context) -> pb.FillMaskResponse:
        outs, usage = await self.service.fill_mask(
            list(request.texts), request.topk, deadline=_deadline(context)
        )
        self._account("FillMask", usage)
        results = [
            pb.FillMaskResult(
                candidates=[
                    pb.MaskCandidate(sequence=s, score=p, token=t, token_id=i)
                    for s, p, t, i in out.candidates
                ]
            )
            for out in outs
        ]
        return pb.FillMaskResponse(results=results, usage=_usage(usage))

    @rpc("RegisterClassificationHead")
    async def RegisterClassificationHead(
        self, request: pb.RegisterClassificationHeadRequest, context
    ) -> pb.RegisterClassificationHeadResponse:
        def check_fits(labels: list[str]) -> None:
            n = request.num_classes
            self._check_head_fits(pb.HeadInfo(name=request.name, num_classes=n, labels=labels))

        name, n, labels = await self.service.register_head(
            request.name, request.num_classes, list(request.labels), check_fits
        )
        head = pb.HeadInfo(name=name, num_classes=n, labels=labels)
        return pb.RegisterClassificationHeadResponse(head=head)

    @rpc("GetModelInfo")
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        return self._model_info()

    def _model_info(self, replace: pb.HeadInfo | None = None) -> pb.ModelInfo:
        """ModelInfo, with `replace` in place of any head of the same name."""
        heads = [pb.HeadInfo(name=n, num_classes=c, labels=lb) for n, c, lb in self.service.heads()]
        if replace is not None:
            heads = [h for h in heads if h.name != replace.name] + [replace]
        return pb.ModelInfo(**self.service.model_info(), heads=heads, limits=self.limits)

    def _check_head_fits(self, head: pb.HeadInfo) -> None:
        """Refuse, before it is registered, a head that GetModelInfo or one Classify result
        could not carry within the message limit: registered, it would break both for good."""
        limit = self.limits.max_message_bytes
        n = head.num_classes
        one_result = pb.ClassifyResponse(
            results=[
                pb.Classification(
                    logits=[1.0] * n, log_probs=[-1.0] * n, label_index=n - 1,
                    label=max(head.labels, key=len), truncated=True,
                )
            ],
            usage=pb.Usage(tokens=1 << 40, truncated_items=1 << 20, tokenize_ms=1.0,
                           queue_ms=1.0, inference_ms=1.0),
        )  # fmt: skip
        size = max(self._model_info(replace=head).ByteSize(), one_result.ByteSize())
        if limit and size > limit:
            raise TooLarge(
                f"a head with {n} classes does not fit the {limit}-byte message limit "
                f"(ModelInfo or one Classify result would be {size} bytes): use fewer classes "
                "or shorter labels"
            )

    # ---- streams

    async def _stream_items(
        self,
        rpc_name: str,
        request,
        stream: ItemStream,
        make_spec: Callable[[], object],
        truncate: bool,
        no_separator: bool,
        result: Callable[[str, object, int, bool], tuple[object, int]],
        error: Callable[[str, pb.ItemError], object],
        deadline: float | None,
    ) -> None:
        """Validate, tokenize and queue the items of one stream request message."""
        service = self.service
        if not service.accepting:
            raise NotReady("server is shutting down")
        items = request.items
        n = len(items)
        await stream.reserve(n)
        counts = self.metrics.stream_items

        def fail(item_id: str, exc: Exception) -> None:
            err = item_error_message(exc, STATUS)
            counts.labels(rpc_name, _CODES[err.code].name).inc()
            stream.put(error(item_id, err))

        try:
            if n > self.limits.max_items_per_request:
                raise TooLarge(
                    f"{n} items in one stream message; the limit is "
                    f"{self.limits.max_items_per_request}: send fewer per message"
                )
            spec = make_spec()
        except ServiceError as exc:
            for it in items:
                fail(it.id, exc)
            return
        inputs, good = [], []
        for it in items:
            try:
                inputs.append((it.id, _input(it.id, it.input)))
            except ServiceError as exc:
                fail(it.id, exc)
        try:
            prepared = await service.prepare_stream(inputs, truncate, no_separator)
        except NotReady:
            stream.release(len(inputs))  # never accepted: the client resends them elsewhere
            raise
        for (item_id, _), p in zip(inputs, prepared, strict=True):
            if isinstance(p, ServiceError):
                fail(item_id, p)
                continue
            if isinstance(spec, FeatureSpec):
                try:
                    service.check_response_size([p[0]], spec)
                except ServiceError as exc:
                    fail(item_id, exc)
                    continue
            good.append((item_id, p))
        if not good:
            return
        meta = [(item_id, len(seq), cut) for item_id, (seq, cut) in good]
        ids = [seq for _, (seq, _) in good]
        holder: list = []

        def on_output(index: int, out: object) -> None:
            item_id, num_tokens, cut = meta[index]
            if isinstance(out, Exception):
                fail(item_id, item_error(out))
            else:
                msg, size = result(item_id, out, num_tokens, cut)
                counts.labels(rpc_name, "OK").inc()
                stream.put(msg, size)
            if holder and holder[0].remaining == 0:
                stream.tickets.discard(holder[0])

        # Backpressure: past the queue limit a stream waits here (and so stops reading) instead
        # of being refused.
        await service.scheduler.wait_for_room(sum(len(seq) for seq in ids))
        try:
            ticket = service.submit_stream(ids, [spec] * len(ids), on_output, deadline)
        except NotReady:
            stream.release(len(ids))
            raise
        holder.append(ticket)
        stream.tickets.add(ticket)
        tokens = sum(len(seq) for seq in ids)
        self.metrics.tokens.labels(rpc_name).inc(tokens)
        truncated = sum(cut for _, _, cut in meta)
        if truncated:
            self.metrics.truncations.inc(truncated)

    def _window(self) -> pb.StreamWindow:
        return pb.StreamWindow(
            max_in_flight=self.limits.stream_window,
            max_items_per_message=self.limits.max_items_per_request,
        )

    @stream_rpc("ExtractFeaturesStream")
    async def ExtractFeaturesStream(self, requests, context) -> AsyncIterator[object]:
        deadline = _deadline(context)
        stream = ItemStream(self.limits.stream_window)

        async def handle(request: pb.ExtractFeaturesStreamRequest, stream: ItemStream) -> None:
            o = request.options

            def make_spec() -> FeatureSpec:
                return self.service.feature_spec(
                    list(o.layers),
                    o.all_layers,
                    _enum(o.pooling, POOLING, "pooling"),
                    _enum(o.dtype, DTYPE, "dtype"),
                )

            def result(item_id: str, out, num_tokens: int, cut: bool) -> tuple[object, int]:
                msg = features_message(out, num_tokens, cut)
                return pb.FeaturesStreamResult(id=item_id, features=msg), len(msg.tensor.data)

            def error(item_id: str, err: pb.ItemError) -> object:
                return pb.FeaturesStreamResult(id=item_id, error=err)

            await self._stream_items(
                "ExtractFeaturesStream", request, stream, make_spec, o.encode.truncate,
                o.encode.no_separator, result, error, deadline,
            )  # fmt: skip

        async for response in run_stream(
            requests, context, stream, handle, pb.ExtractFeaturesStreamResponse, self._window(),
            self.service.cancel, self.service.closing,
        ):  # fmt: skip
            yield response

    @stream_rpc("ClassifyStream")
    async def ClassifyStream(self, requests, context) -> AsyncIterator[object]:
        deadline = _deadline(context)
        stream = ItemStream(self.limits.stream_window)
        service = self.service

        async def handle(request: pb.ClassifyStreamRequest, stream: ItemStream) -> None:
            head = request.head

            def make_spec() -> ClassifySpec:
                service.check_head(head)
                return ClassifySpec(head)

            def result(item_id: str, out, num_tokens: int, cut: bool) -> tuple[object, int]:
                labels = service.hub.model.head_labels[head]
                lg, lp, i, name = service.classifications([out], labels)[0]
                msg = pb.Classification(
                    logits=lg, log_probs=lp, label_index=i, label=name, truncated=cut
                )
                return pb.ClassifyStreamResult(id=item_id, classification=msg), 0

            def error(item_id: str, err: pb.ItemError) -> object:
                return pb.ClassifyStreamResult(id=item_id, error=err)

            await self._stream_items(
                "ClassifyStream", request, stream, make_spec, request.options.truncate,
                request.options.no_separator, result, error, deadline,
            )  # fmt: skip

        async for response in run_stream(
            requests, context, stream, handle, pb.ClassifyStreamResponse, self._window(),
            service.cancel, service.closing,
        ):  # fmt: skip
            yield response
