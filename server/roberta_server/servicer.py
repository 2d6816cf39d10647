"""Transport: the gRPC servicer. Protobuf in, plain values to the service, protobuf out; service
errors become status codes; every RPC is counted and timed."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from roberta_client._proto.roberta.v1 import roberta_pb2 as pb
from roberta_client._proto.roberta.v1 import roberta_pb2_grpc
from roberta_client.tensors import numpy_to_tensor

from .errors import InvalidInput, NotFound, NotReady, ServiceError, TooLarge, Unsupported
from .metrics import Metrics
from .scheduler import DeadlineExceeded
from .service import Input, RobertaService, Usage

log = logging.getLogger(__name__)

STATUS = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    Unsupported: grpc.StatusCode.FAILED_PRECONDITION,
}
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


def rpc(name: str) -> Callable[[Handler], Handler]:
    """Count, time and map the errors of one RPC handler."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(self: RobertaServicer, request: object, context) -> object:
            m = self.metrics
            m.in_flight.inc()
            t0 = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if self.service is None:
                    raise NotReady("the model is still loading; retry shortly")
                return await handler(self, request, context)
            except ServiceError as exc:
                code = STATUS[type(exc)]
                await context.abort(code, str(exc))
            except DeadlineExceeded as exc:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                await context.abort(code, str(exc))
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                log.exception("%s failed", name)
                code = grpc.StatusCode.INTERNAL
                await context.abort(code, f"internal error: {exc!r}")
            finally:
                m.in_flight.dec()
                m.requests.labels(name, code.name).inc()
                m.request_seconds.labels(name).observe(time.perf_counter() - t0)

        return wrapper

    return wrap


def _input(i: int, x: pb.Input) -> Input:
    kind = x.WhichOneof("kind")
    if kind == "text":
        return x.text
    if kind == "pair":
        return (x.pair.text, x.pair.text_pair)
    if kind == "ids":
        return x.ids.ids
    raise InvalidInput(f"inputs[{i}] is empty: set one of text, pair or ids")


def _inputs(inputs) -> list[Input]:
    return [_input(i, x) for i, x in enumerate(inputs)]


def _enum(value: int, table: dict, what: str):
    if value not in table:
        raise InvalidInput(f"unknown {what} value {value}")
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


def features_message(out, truncated: bool) -> pb.Features:
    arr = out.array
    n = arr.shape[1] if arr.ndim == 3 else 0
    return pb.Features(
        tensor=numpy_to_tensor(arr, DTYPE_ENUM[out.dtype]),
        layers=out.layers,
        num_tokens=n,
        truncated=truncated,
    )


class RobertaServicer(roberta_pb2_grpc.RobertaServicer):
    def __init__(self, metrics: Metrics, limits: pb.ServerLimits):
        self.metrics = metrics
        self.limits = limits
        # Set once the model is loaded and warmed up; until then every RPC is UNAVAILABLE.
        self.service: RobertaService | None = None

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
        truncated = usage.truncated > 0
        results = [features_message(out, truncated) for out in outs]
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
            pb.Classification(logits=lg, log_probs=lp, label_index=i, label=name)
            for lg, lp, i, name in results
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
        name, n, labels = await self.service.register_head(
            request.name, request.num_classes, list(request.labels)
        )
        head = pb.HeadInfo(name=name, num_classes=n, labels=labels)
        return pb.RegisterClassificationHeadResponse(head=head)

    @rpc("GetModelInfo")
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        heads = [pb.HeadInfo(name=n, num_classes=c, labels=lb) for n, c, lb in self.service.heads()]
        return pb.ModelInfo(**self.service.model_info(), heads=heads, limits=self.limits)
