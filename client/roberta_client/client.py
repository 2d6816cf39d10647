"""Synchronous and asyncio clients of the `roberta.v1.Roberta` service.

The main surface mirrors fairseq's `RobertaHubInterface` (`encode`, `decode`, `extract_features`,
`predict`, `register_classification_head`, `fill_mask`) and returns numpy arrays shaped as fairseq's
tensors. List forms (`encode_batch`, `extract_features_batch`, `classify`, ...) take many items
and split them into requests of at most the server's `max_items_per_request`.

Errors: the hub-interface methods raise ValueError for INVALID_ARGUMENT (as fairseq raises for an
over-long sequence) and KeyError for NOT_FOUND (an unknown head), with the server's message and the
`grpc.RpcError` as `__cause__`. Every other failure, and every failure of the other methods,
propagates as the `grpc.RpcError` itself: its `code()` and `details()` are the API.

Both clients run the same "plans": generators that yield the RPCs they need and receive the
responses, so the synchronous and asynchronous methods cannot drift apart.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import sys
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from roberta_client._proto.roberta.v1 import roberta_pb2, roberta_pb2_grpc
from roberta_client._version import __version__
from roberta_client.inputs import InputLike, TextOrPair, as_token_ids, to_input
from roberta_client.streaming import (
    DEFAULT_ITEMS_PER_MESSAGE,
    StreamResult,
    features_value,
    run_async,
    run_sync,
)
from roberta_client.tensors import parse_dtype, tensor_to_numpy

__all__ = [
    "AsyncRobertaClient",
    "Classification",
    "ClientConfig",
    "FillMaskCandidate",
    "POOLINGS",
    "RobertaClient",
]

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 30.0
# All 25 float32 layers of one 512-token roberta.large sequence are 50 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Requests of one split call kept in flight together: enough to keep the server's batcher fed,
# few enough not to trip its admission limit on our own.
_MAX_REQUESTS_IN_FLIGHT = 4

_SERVICE = "roberta.v1.Roberta"
_RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": _SERVICE}],
            # gRPC retries only until response headers arrive, so a call the server already
            # started is never run twice; UNAVAILABLE covers restarts and dropped connections.
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}

#: Pooling names accepted by `extract_features_batch` to enum values.
POOLINGS: dict[str, int] = {
    "none": roberta_pb2.POOLING_NONE,
    "cls": roberta_pb2.POOLING_CLS,
    "mean": roberta_pb2.POOLING_MEAN,
}

_INT64_CPPTYPES = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)

#: One fill_mask candidate as fairseq returns it: (filled sentence, probability, token text).
FillMaskCandidate: TypeAlias = tuple[str, float, str]

T = TypeVar("T")


@dataclass(frozen=True)
class ClientConfig:
    """Connection settings shared by both clients; see `RobertaClient` for their meaning."""

    target: str = DEFAULT_TARGET
    timeout: float | None = DEFAULT_TIMEOUT_S
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    retry: bool = True
    options: tuple[tuple[str, Any], ...] = ()
    credentials: grpc.ChannelCredentials | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    max_items_per_request: int | None = None

    def channel_options(self) -> list[tuple[str, Any]]:
        """gRPC channel arguments; entries of `options` override the computed ones."""
        merged: dict[str, Any] = {
            "grpc.max_send_message_length": self.max_message_bytes,
            "grpc.max_receive_message_length": self.max_message_bytes,
            "grpc.primary_user_agent": f"roberta-client/{__version__}",
        }
        if self.retry:
            merged["grpc.enable_retries"] = 1
            merged["grpc.service_config"] = json.dumps(_RETRY_SERVICE_CONFIG)
        merged.update(self.options)
        return list(merged.items())


@dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise and fail
class Classification:
    """One classified sequence."""

    #: Raw head outputs, float32 [num_classes] (fairseq's `return_logits=True`).
    logits: np.ndarray
    #: log_softmax of the logits, float32 [num_classes] (fairseq's `predict`).
    log_probs: np.ndarray
    #: Index of the largest logit.
    label_index: int
    #: Name of that class, or its index as text when the head has no label names.
    label: str
    #: True when the input was cut to fit `max_positions`.
    truncated: bool


class _Rpc(NamedTuple):
    method: str  # attribute of the generated stub, such as "Tokenize"
    request: Message


# A plan yields the RPCs it needs, a list at a time (sent concurrently when there are several),
# receives their responses in the same order, and returns the method's result.
_Plan: TypeAlias = Generator[list[_Rpc], list[Any], T]


def _one(method: str, request: Message) -> _Plan[Any]:
    (response,) = yield [_Rpc(method, request)]
    return response


def _as_list(items: Iterable[T], what: str) -> list[T]:
    # A lone str is iterable too, and would silently become one item per character.
    if isinstance(items, (str, bytes)):
        raise TypeError(f"{what} takes a list of items, not a single {type(items).__name__}")
    return list(items)


def _segments(result: roberta_pb2.DecodedText) -> str | list[str]:
    segments = list(result.segments)
    if len(segments) == 1:
        return segments[0]
    return segments or ""


def _classification(result: roberta_pb2.Classification) -> Classification:
    return Classification(
        logits=np.asarray(result.logits, dtype=np.float32),
        log_probs=np.asarray(result.log_probs, dtype=np.float32),
        label_index=result.label_index,
        label=result.label,
        truncated=result.truncated,
    )


def _feature_options(
    layers: Sequence[int] | None,
    all_layers: bool,
    pooling: str,
    dtype: str,
    truncate: bool,
    no_separator: bool,
) -> roberta_pb2.FeatureOptions:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {sorted(POOLINGS)}")
    return roberta_pb2.FeatureOptions(
        layers=list(layers or ()),
        all_layers=all_layers,
        pooling=POOLINGS[pooling],
        dtype=parse_dtype(dtype),
        encode=roberta_pb2.EncodeOptions(truncate=truncate, no_separator=no_separator),
    )


def _classification_value(message: roberta_pb2.ClassifyStreamResult) -> tuple[Classification, int]:
    return _classification(message.classification), 0


def _candidates(result: roberta_pb2.FillMaskResult) -> list[FillMaskCandidate]:
    return [(c.sequence, float(c.score), c.token) for c in result.candidates]


def _message_to_dict(message: Message) -> dict[str, Any]:
    """MessageToDict with proto field names and defaults, but with int64 fields as ints.

    proto3's JSON mapping writes 64-bit integers as strings, which is awkward in Python.
    """
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _restore_int64(message.DESCRIPTOR, data)
    return data


def _restore_int64(descriptor: Descriptor, data: dict[str, Any]) -> None:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        values = value if isinstance(value, list) else [value]
        if field.message_type is not None:
            for item in values:
                _restore_int64(field.message_type, item)
        elif field.cpp_type in _INT64_CPPTYPES:
            ints = [int(v) for v in values]
            data[field.name] = ints if isinstance(value, list) else ints[0]


def _hub_error(error: grpc.RpcError) -> Exception | None:
    """The exception fairseq's hub interface would raise for this status, if any."""
    code = error.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(error.details())
    if code == grpc.StatusCode.NOT_FOUND:
        return KeyError(error.details())
    return None


class _ClientBase:
    """Configuration and the plans behind every public method of both clients."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry: bool = True,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        max_items_per_request: int | None = None,
        auth_token: str | None = None,
    ) -> None:
        if auth_token:
            metadata = (*metadata, ("authorization", f"Bearer {auth_token}"))
        self.config = ClientConfig(
            target=target,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            retry=retry,
            options=tuple(options),
            credentials=credentials,
            metadata=tuple(metadata),
            max_items_per_request=max_items_per_request,
        )
        self._max_items = max_items_per_request
        self._channel = self._open_channel()
        self._stub = roberta_pb2_grpc.RobertaStub(self._channel)

    def _open_channel(self) -> Any:
        raise NotImplementedError

    def eval(self) -> _ClientBase:
        """A no-op for fairseq's `roberta.eval()`: the server only ever runs inference."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.target!r})"

    @property
    def _call_kwargs(self) -> dict[str, Any]:
        return {"timeout": self.config.timeout, "metadata": self.config.metadata or None}

    # -- plans shared by both clients -------------------------------------------------------

    def _remember_limits(self, info: roberta_pb2.ModelInfo) -> None:
        if self.config.max_items_per_request is None:
            # 0 means the server sets no cap.
            self._max_items = info.limits.max_items_per_request or sys.maxsize

    def _plan_items_limit(self, count: int) -> _Plan[int]:
        if count > 1 and self._max_items is None:
            self._remember_limits(
                (yield from _one("GetModelInfo", roberta_pb2.GetModelInfoRequest()))
            )
        return self._max_items or count

    def _plan_batched(
        self, method: str, items: list[Any], build: Callable[[list[Any]], Message]
    ) -> _Plan[list[Any]]:
        """The `results` of `build(chunk)` requests over `items`, concatenated in order."""
        if not items:
            return []
        limit = yield from self._plan_items_limit(len(items))
        rpcs = [_Rpc(method, build(items[i : i + limit])) for i in range(0, len(items), limit)]
        if len(rpcs) > 1:
            logger.debug("%s: %d items split into %d requests", method, len(items), len(rpcs))
        responses = yield rpcs
        results = [result for response in responses for result in response.results]
        if len(results) != len(items):
            raise RuntimeError(f"{method}: server returned {len(results)} results for {len(items)}")
        return results

    def _plan_tokenize(
        self, items: Iterable[TextOrPair], truncate: bool, no_separator: bool
    ) -> _Plan[list[roberta_pb2.Tokenization]]:
        inputs = [to_input(item) for item in _as_list(items, "tokenize")]
        options = roberta_pb2.EncodeOptions(truncate=truncate, no_separator=no_separator)
        return (
            yield from self._plan_batched(
                "Tokenize", inputs, lambda c: roberta_pb2.TokenizeRequest(inputs=c, options=options)
            )
        )

    def _plan_encode_batch(
        self, items: Iterable[TextOrPair], truncate: bool, no_separator: bool
    ) -> _Plan[list[np.ndarray]]:
        results = yield from self._plan_tokenize(items, truncate, no_separator)
        return [np.asarray(result.ids, dtype=np.int64) for result in results]

    def _plan_encode(
        self, sentence: str, addl_sentences: tuple[str, ...], no_separator: bool
    ) -> _Plan[np.ndarray]:
        if len(addl_sentences) <= 1:
            item = (sentence, *addl_sentences) if addl_sentences else sentence
            return (yield from self._plan_encode_batch([item], False, no_separator))[0]
        # The proto knows one or two segments. fairseq BPE-encodes every sentence on its own, so
        # a longer chain is the single encodings spliced: `<s> A </s> [</s>] B </s> [</s>] C </s>`.
        first, *rest = yield from self._plan_encode_batch([sentence, *addl_sentences], False, False)
        separator = [] if no_separator else [first[-1]]
        pieces = [first]
        for ids in rest:
            pieces.append(np.asarray(separator, dtype=np.int64))
            pieces.append(ids[1:])
        return np.concatenate(pieces)

    def _plan_decode_batch(self, sequences: Iterable[Any]) -> _Plan[list[str | list[str]]]:
        ids = [
            roberta_pb2.TokenIds(ids=as_token_ids(s).tolist())
            for s in _as_list(sequences, "decode_batch")
        ]
        results = yield from self._plan_batched(
            "Decode", ids, lambda c: roberta_pb2.DecodeRequest(sequences=c)
        )
        return [_segments(result) for result in results]

    def _plan_features(
        self, items: Iterable[InputLike], options: roberta_pb2.FeatureOptions
    ) -> _Plan[list[roberta_pb2.Features]]:
        inputs = [to_input(item) for item in _as_list(items, "extract_features_batch")]
        return (
            yield from self._plan_batched(
                "ExtractFeatures",
                inputs,
                lambda c: roberta_pb2.ExtractFeaturesRequest(inputs=c, options=options),
            )
        )

    def _plan_extract_features(
        self, tokens: Any, return_all_hiddens: bool
    ) -> _Plan[np.ndarray | list[np.ndarray]]:
        options = roberta_pb2.FeatureOptions(
            all_layers=return_all_hiddens, dtype=roberta_pb2.DTYPE_FLOAT32
        )
        (features,) = yield from self._plan_features([as_token_ids(tokens)], options)
        stacked = tensor_to_numpy(features.tensor)  # [layers, T, H]
        # Slicing keeps a leading axis of 1, fairseq's batch axis, without copying.
        if return_all_hiddens:
            return [stacked[i : i + 1] for i in range(stacked.shape[0])]
        return stacked[-1:]

    def _plan_extract_features_batch(
        self,
        items: Iterable[InputLike],
        layers: Sequence[int] | None,
        all_layers: bool,
        pooling: str,
        dtype: str,
        truncate: bool,
        no_separator: bool,
    ) -> _Plan[list[np.ndarray]]:
        options = _feature_options(layers, all_layers, pooling, dtype, truncate, no_separator)
        results = yield from self._plan_features(items, options)
        return [tensor_to_numpy(features.tensor) for features in results]

    def _plan_classify(
        self, head: str, items: Iterable[InputLike], truncate: bool, no_separator: bool
    ) -> _Plan[list[Classification]]:
        inputs = [to_input(item) for item in _as_list(items, "classify")]
        options = roberta_pb2.EncodeOptions(truncate=truncate, no_separator=no_separator)
        results = yield from self._plan_batched(
            "Classify",
            inputs,
            lambda c: roberta_pb2.ClassifyRequest(head=head, inputs=c, options=options),
        )
        return [_classification(result) for result in results]

    def _plan_predict(self, head: str, tokens: Any, return_logits: bool) -> _Plan[np.ndarray]:
        (result,) = yield from self._plan_classify(head, [as_token_ids(tokens)], False, False)
        values = result.logits if return_logits else result.log_probs
        return values[np.newaxis, :]

    def _plan_fill_mask_batch(
        self, texts: Iterable[str], topk: int
    ) -> _Plan[list[list[FillMaskCandidate]]]:
        texts = _as_list(texts, "fill_mask_batch")
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"fill_mask takes texts, got {type(text).__name__}")
        results = yield from self._plan_batched(
            "FillMask", texts, lambda c: roberta_pb2.FillMaskRequest(texts=c, topk=topk)
        )
        return [_candidates(result) for result in results]

    def _plan_register_classification_head(
        self, name: str, num_classes: int | None, labels: Sequence[str] | None
    ) -> _Plan[dict[str, Any]]:
        if num_classes is None:
            if not labels:
                raise ValueError("register_classification_head needs num_classes or labels")
            num_classes = len(labels)
        request = roberta_pb2.RegisterClassificationHeadRequest(
            name=name, num_classes=num_classes, labels=list(labels or ())
        )
        response = yield from _one("RegisterClassificationHead", request)
        return _message_to_dict(response.head)

    def _plan_model_info(self) -> _Plan[dict[str, Any]]:
        info = yield from _one("GetModelInfo", roberta_pb2.GetModelInfoRequest())
        self._remember_limits(info)
        return _message_to_dict(info)


class RobertaClient(_ClientBase):
    """Blocking client of a roberta-grpc server.

    Args:
        target: gRPC target, such as `localhost:50051`, `dns:///roberta:50051` or, with
            `options=[("grpc.lb_policy_name", "round_robin")]`,
            `ipv4:10.0.0.1:50051,10.0.0.2:50051`.
        timeout: deadline of every call in seconds; None waits forever.
        max_message_bytes: largest message sent or received (gRPC's own default is 4 MiB).
        retry: retry calls that fail with UNAVAILABLE, up to 4 attempts with exponential backoff.
        options: extra gRPC channel arguments; they override the ones computed from the above.
        credentials: use a secure channel with these credentials (`grpc.ssl_channel_credentials()`).
        metadata: extra metadata sent with every call.
        auth_token: a bearer token for a server started with `--auth-token-file`.
            For TLS pass `credentials=grpc.ssl_channel_credentials(ca, key, cert)` (the key and
            certificate for mutual TLS).
        max_items_per_request: how many items one request may carry; None asks the server
            (`GetModelInfo`, once, on the first list call of more than one item).

    Token ids are taken as a 1-D sequence or array, or a [1, T] array (a CPU torch tensor works
    too). Feature arrays of float32 and float16 are read-only views over the received bytes.
    """

    def _open_channel(self) -> grpc.Channel:
        config = self.config
        if config.credentials is not None:
            return grpc.secure_channel(config.target, config.credentials, config.channel_options())
        return grpc.insecure_channel(config.target, config.channel_options())

    def close(self) -> None:
        """Close the channel; calls in progress are cancelled."""
        self._channel.close()

    def __enter__(self) -> RobertaClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _invoke_all(self, rpcs: list[_Rpc]) -> list[Any]:
        if len(rpcs) == 1:
            method, request = rpcs[0]
            return [getattr(self._stub, method)(request, **self._call_kwargs)]
        responses: list[Any] = []
        in_flight: collections.deque[grpc.Future] = collections.deque()
        try:
            for method, request in rpcs:
                if len(in_flight) == _MAX_REQUESTS_IN_FLIGHT:
                    responses.append(in_flight.popleft().result())
                in_flight.append(getattr(self._stub, method).future(request, **self._call_kwargs))
            while in_flight:
                responses.append(in_flight.popleft().result())
        finally:
            # Only non-empty after a failure: the remaining results would be thrown away.
            for future in in_flight:
                future.cancel()
        return responses

    def _run(self, plan: _Plan[T], hub_errors: bool = False) -> T:
        try:
            rpcs = next(plan)
            while True:
                rpcs = plan.send(self._invoke_all(rpcs))
        except StopIteration as done:
            return done.value
        except grpc.RpcError as error:
            mapped = _hub_error(error) if hub_errors else None
            if mapped is None:
                raise
            raise mapped from error

    def call(self, method: str, request: Message) -> Message:
        """One raw RPC by name (`"ExtractFeatures"`, ...) with the client's deadline and metadata;
        for the fields the numpy methods leave out (usage, layer indices, token counts)."""
        return self._run(_one(method, request))

    # -- fairseq hub interface ---------------------------------------------------------------

    def encode(self, sentence: str, *addl_sentences: str, no_separator: bool = False) -> np.ndarray:
        """fairseq's `encode`: `<s> A </s></s> B </s>` token ids, int64 [T]."""
        return self._run(self._plan_encode(sentence, addl_sentences, no_separator), True)

    def decode(self, tokens: Any) -> str | list[str]:
        """fairseq's `decode`: a str for one segment, a list of str for a pair."""
        return self._run(self._plan_decode_batch([tokens]), True)[0]

    def extract_features(
        self, tokens: Any, return_all_hiddens: bool = False
    ) -> np.ndarray | list[np.ndarray]:
        """fairseq's `extract_features`: float32 [1, T, H] of the last layer or, with
        `return_all_hiddens`, a list of num_layers + 1 such arrays (0 is the embedding output)."""
        return self._run(self._plan_extract_features(tokens, return_all_hiddens), True)

    def predict(self, head: str, tokens: Any, return_logits: bool = False) -> np.ndarray:
        """fairseq's `predict`: float32 [1, num_classes] log-probabilities (or logits)."""
        return self._run(self._plan_predict(head, tokens, return_logits), True)

    def register_classification_head(
        self, name: str, num_classes: int | None = None, labels: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """fairseq's `register_classification_head` (a randomly initialised head); `num_classes`
        defaults to `len(labels)`. Returns the head as a dict (name, num_classes, labels)."""
        return self._run(self._plan_register_classification_head(name, num_classes, labels), True)

    def fill_mask(self, masked_input: str, topk: int = 5) -> list[FillMaskCandidate]:
        """fairseq's `fill_mask`: `topk` (filled sentence, probability, token) tuples."""
        return self._run(self._plan_fill_mask_batch([masked_input], topk), True)[0]

    # -- list forms --------------------------------------------------------------------------

    def tokenize(
        self, items: Iterable[TextOrPair], *, truncate: bool = False, no_separator: bool = False
    ) -> list[roberta_pb2.Tokenization]:
        """Tokenization messages (ids, token strings, offsets) of texts or (text, text_pair)."""
        return self._run(self._plan_tokenize(items, truncate, no_separator))

    def encode_batch(
        self, items: Iterable[TextOrPair], *, truncate: bool = False, no_separator: bool = False
    ) -> list[np.ndarray]:
        """Token ids, int64 [T_i], of each text or (text, text_pair)."""
        return self._run(self._plan_encode_batch(items, truncate, no_separator))

    def decode_batch(self, sequences: Iterable[Any]) -> list[str | list[str]]:
        """`decode` of each token-id sequence."""
        return self._run(self._plan_decode_batch(sequences))

    def extract_features_batch(
        self,
        items: Iterable[InputLike],
        *,
        layers: Sequence[int] | None = None,
        all_layers: bool = False,
        pooling: str = "none",
        dtype: str = "float32",
        truncate: bool = False,
        no_separator: bool = False,
    ) -> list[np.ndarray]:
        """Features of each item (text, (text, text_pair) or token ids).

        Each array keeps the layer axis, even for one layer: [layers, T_i, H] with pooling
        'none', [layers, H] with 'cls' or 'mean'. `layers` are indices as in the proto (0 the
        embedding output, negative from the end; default the last layer); `all_layers` returns
        0..num_layers. dtype 'float16' arrives as float16, 'bfloat16' is widened to float32.
        """
        return self._run(
            self._plan_extract_features_batch(
                items, layers, all_layers, pooling, dtype, truncate, no_separator
            )
        )

    def classify(
        self,
        head: str,
        items: Iterable[InputLike],
        *,
        truncate: bool = False,
        no_separator: bool = False,
    ) -> list[Classification]:
        """The `head` classification of each item."""
        return self._run(self._plan_classify(head, items, truncate, no_separator))

    def fill_mask_batch(self, texts: Iterable[str], topk: int = 5) -> list[list[FillMaskCandidate]]:
        """`fill_mask` of each text."""
        return self._run(self._plan_fill_mask_batch(texts, topk))

    def model_info(self) -> dict[str, Any]:
        """The served model, its heads and the server's limits (ModelInfo as a dict)."""
        return self._run(self._plan_model_info())

    # -- bulk streams ------------------------------------------------------------------------

    def stream_features(
        self,
        items: Iterable[tuple[Any, InputLike]],
        *,
        layers: Sequence[int] | None = None,
        all_layers: bool = False,
        pooling: str = "none",
        dtype: str = "float32",
        truncate: bool = False,
        no_separator: bool = False,
        items_per_message: int = DEFAULT_ITEMS_PER_MESSAGE,
        max_attempts: int = 8,
    ) -> Iterator[StreamResult]:
        """Features of `(id, input)` pairs through one ExtractFeaturesStream, as they finish.

        The source is read lazily, only as fast as the server's flow-control window allows, so
        it may be a generator over a corpus of any size. Results come in completion order with
        `id` as a str; a failed item is a result with `error` set. When the stream breaks with
        UNAVAILABLE or RESOURCE_EXHAUSTED it is reopened (up to `max_attempts` times in a row
        without progress) and the unanswered items are resent: every id is yielded exactly
        once. Arrays are shaped as in `extract_features_batch`. No deadline applies.
        """
        options = _feature_options(layers, all_layers, pooling, dtype, truncate, no_separator)
        metadata = self.config.metadata or None

        def open_stream(requests: Iterator[Any]) -> Iterator[Any]:
            return self._stub.ExtractFeaturesStream(requests, metadata=metadata)

        return run_sync(
            open_stream,
            lambda chunk: roberta_pb2.ExtractFeaturesStreamRequest(items=chunk, options=options),
            features_value,
            items,
            items_per_message,
            max_attempts,
        )

    def stream_classify(
        self,
        head: str,
        items: Iterable[tuple[Any, InputLike]],
        *,
        truncate: bool = False,
        no_separator: bool = False,
        items_per_message: int = DEFAULT_ITEMS_PER_MESSAGE,
        max_attempts: int = 8,
    ) -> Iterator[StreamResult]:
        """`classify` of `(id, input)` pairs through one ClassifyStream; see `stream_features`.
        Each result's `value` is a `Classification`."""
        options = roberta_pb2.EncodeOptions(truncate=truncate, no_separator=no_separator)
        metadata = self.config.metadata or None

        def open_stream(requests: Iterator[Any]) -> Iterator[Any]:
            return self._stub.ClassifyStream(requests, metadata=metadata)

        return run_sync(
            open_stream,
            lambda chunk: roberta_pb2.ClassifyStreamRequest(
                items=chunk, head=head, options=options
            ),
            _classification_value,
            items,
            items_per_message,
            max_attempts,
        )


class AsyncRobertaClient(_ClientBase):
    """asyncio client: the methods of `RobertaClient`, as coroutines.

    Create it inside the event loop that will use it (a grpc.aio channel is bound to its loop).
    The requests of a split list call run concurrently, a few at a time.
    """

    def _open_channel(self) -> grpc.aio.Channel:
        config = self.config
        if config.credentials is not None:
            options = config.channel_options()
            return grpc.aio.secure_channel(config.target, config.credentials, options)
        return grpc.aio.insecure_channel(config.target, config.channel_options())

    async def close(self) -> None:
        """Close the channel; calls in progress are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncRobertaClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _invoke(self, rpc: _Rpc) -> Any:
        return await getattr(self._stub, rpc.method)(rpc.request, **self._call_kwargs)

    async def _invoke_all(self, rpcs: list[_Rpc]) -> list[Any]:
        if len(rpcs) == 1:
            return [await self._invoke(rpcs[0])]
        slots = asyncio.Semaphore(_MAX_REQUESTS_IN_FLIGHT)

        async def bounded(rpc: _Rpc) -> Any:
            async with slots:
                return await self._invoke(rpc)

        tasks = [asyncio.ensure_future(bounded(rpc)) for rpc in rpcs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            # A no-op for finished tasks; after a failure it stops the requests still queued.
            for task in tasks:
                task.cancel()

    async def _run(self, plan: _Plan[T], hub_errors: bool = False) -> T:
        try:
            rpcs = next(plan)
            while True:
                rpcs = plan.send(await self._invoke_all(rpcs))
        except StopIteration as done:
            return done.value
        except grpc.RpcError as error:
            mapped = _hub_error(error) if hub_errors else None
            if mapped is None:
                raise
            raise mapped from error

    async def call(self, method: str, request: Message) -> Message:
        """See `RobertaClient.call`."""
        return await self._run(_one(method, request))

    async def encode(
        self, sentence: str, *addl_sentences: str, no_separator: bool = False
    ) -> np.ndarray:
        """See `RobertaClient.encode`."""
        return await self._run(self._plan_encode(sentence, addl_sentences, no_separator), True)

    async def decode(self, tokens: Any) -> str | list[str]:
        """See `RobertaClient.decode`."""
        return (await self._run(self._plan_decode_batch([tokens]), True))[0]

    async def extract_features(
        self, tokens: Any, return_all_hiddens: bool = False
    ) -> np.ndarray | list[np.ndarray]:
        """See `RobertaClient.extract_features`."""
        return await self._run(self._plan_extract_features(tokens, return_all_hiddens), True)

    async def predict(self, head: str, tokens: Any, return_logits: bool = False) -> np.ndarray:
        """See `RobertaClient.predict`."""
        return await self._run(self._plan_predict(head, tokens, return_logits), True)

    async def register_classification_head(
        self, name: str, num_classes: int | None = None, labels: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """See `RobertaClient.register_classification_head`."""
        return await self._run(
            self._plan_register_classification_head(name, num_classes, labels), True
        )

    async def fill_mask(self, masked_input: str, topk: int = 5) -> list[FillMaskCandidate]:
        """See `RobertaClient.fill_mask`."""
        return (await self._run(self._plan_fill_mask_batch([masked_input], topk), True))[0]

    async def tokenize(
        self, items: Iterable[TextOrPair], *, truncate: bool = False, no_separator: bool = False
    ) -> list[roberta_pb2.Tokenization]:
        """See `RobertaClient.tokenize`."""
        return await self._run(self._plan_tokenize(items, truncate, no_separator))

    async def encode_batch(
        self, items: Iterable[TextOrPair], *, truncate: bool = False, no_separator: bool = False
    ) -> list[np.ndarray]:
        """See `RobertaClient.encode_batch`."""
        return await self._run(self._plan_encode_batch(items, truncate, no_separator))

    async def decode_batch(self, sequences: Iterable[Any]) -> list[str | list[str]]:
        """See `RobertaClient.decode_batch`."""
        return await self._run(self._plan_decode_batch(sequences))

    async def extract_features_batch(
        self,
        items: Iterable[InputLike],
        *,
        layers: Sequence[int] | None = None,
        all_layers: bool = False,
        pooling: str = "none",
        dtype: str = "float32",
        truncate: bool = False,
        no_separator: bool = False,
    ) -> list[np.ndarray]:
        """See `RobertaClient.extract_features_batch`."""
        return await self._run(
            self._plan_extract_features_batch(
                items, layers, all_layers, pooling, dtype, truncate, no_separator
            )
        )

    async def classify(
        self,
        head: str,
        items: Iterable[InputLike],
        *,
        truncate: bool = False,
        no_separator: bool = False,
    ) -> list[Classification]:
        """See `RobertaClient.classify`."""
        return await self._run(self._plan_classify(head, items, truncate, no_separator))

    async def fill_mask_batch(
        self, texts: Iterable[str], topk: int = 5
    ) -> list[list[FillMaskCandidate]]:
        """See `RobertaClient.fill_mask_batch`."""
        return await self._run(self._plan_fill_mask_batch(texts, topk))

    async def model_info(self) -> dict[str, Any]:
        """See `RobertaClient.model_info`."""
        return await self._run(self._plan_model_info())

    # -- bulk streams ------------------------------------------------------------------------

    def stream_features(
        self,
        items: Iterable[tuple[Any, InputLike]] | AsyncIterable[tuple[Any, InputLike]],
        *,
        layers: Sequence[int] | None = None,
        all_layers: bool = False,
        pooling: str = "none",
        dtype: str = "float32",
        truncate: bool = False,
        no_separator: bool = False,
        items_per_message: int = DEFAULT_ITEMS_PER_MESSAGE,
        max_attempts: int = 8,
    ) -> AsyncIterator[StreamResult]:
        """See `RobertaClient.stream_features`; the source may also be an async iterable."""
        options = _feature_options(layers, all_layers, pooling, dtype, truncate, no_separator)
        metadata = self.config.metadata or None
        return run_async(
            lambda: self._stub.ExtractFeaturesStream(metadata=metadata),
            lambda chunk: roberta_pb2.ExtractFeaturesStreamRequest(items=chunk, options=options),
            features_value,
            items,
            items_per_message,
            max_attempts,
        )

    def stream_classify(
        self,
        head: str,
        items: Iterable[tuple[Any, InputLike]] | AsyncIterable[tuple[Any, InputLike]],
        *,
        truncate: bool = False,
        no_separator: bool = False,
        items_per_message: int = DEFAULT_ITEMS_PER_MESSAGE,
        max_attempts: int = 8,
    ) -> AsyncIterator[StreamResult]:
        """See `RobertaClient.stream_classify`."""
        options = roberta_pb2.EncodeOptions(truncate=truncate, no_separator=no_separator)
        metadata = self.config.metadata or None
        return run_async(
            lambda: self._stub.ClassifyStream(metadata=metadata),
            lambda chunk: roberta_pb2.ClassifyStreamRequest(
                items=chunk, head=head, options=options
            ),
            _classification_value,
            items,
            items_per_message,
            max_attempts,
        )
