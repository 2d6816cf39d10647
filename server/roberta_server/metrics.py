"""Prometheus metrics, all registered at start-up so that the first scrape already lists them.

Ratios (packing efficiency, average batch size) are exported as pairs of counters as well as
histograms, so they can be summed across replicas before dividing.
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

log = logging.getLogger(__name__)

RPCS = (
    "Tokenize",
    "Decode",
    "ExtractFeatures",
    "Classify",
    "FillMask",
    "RegisterClassificationHead",
    "GetModelInfo",
    "ExtractFeaturesStream",
    "ClassifyStream",
)
STREAM_RPCS = ("ExtractFeaturesStream", "ClassifyStream")
# Seconds, from sub-millisecond unary calls on a GPU to multi-second CPU bulk requests.
LATENCY_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """The server's metrics in a registry of their own (several servers can share a process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "roberta_requests", "Finished RPCs by method and gRPC status code", ["rpc", "code"],
            registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "roberta_request_duration_seconds", "RPC latency, receipt to response", ["rpc"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("roberta_requests_in_flight", "RPCs being handled now", registry=r)
        self.queue_seconds = Histogram(
            "roberta_queue_wait_seconds", "Time an item waited from enqueueing to its batch's start",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokenize_seconds = Histogram(
            "roberta_tokenize_duration_seconds", "Tokenization time of one request",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "roberta_inference_duration_seconds", "Forward time of one batch",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_items = Histogram(
            "roberta_batch_size_items", "Sequences in a batch", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "roberta_batch_size_tokens", "Real tokens in a batch", buckets=TOKEN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.packing = Histogram(
            "roberta_batch_packing_efficiency", "Real tokens over computed tokens, per batch",
            buckets=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0), registry=r,
        )  # fmt: skip
        self.real_tokens = Counter(
            "roberta_batch_real_tokens", "Real tokens run, summed over batches", registry=r
        )
        self.computed_tokens = Counter(
            "roberta_batch_computed_tokens", "Tokens computed (padding included)", registry=r
        )
        self.batches = Counter("roberta_batches", "Forward batches run", registry=r)
        self.queue_items = Gauge("roberta_queue_items", "Items waiting for a batch", registry=r)
        self.queue_tokens = Gauge("roberta_queue_tokens", "Tokens waiting for a batch", registry=r)
        self.tokens = Counter(
            "roberta_tokens_processed", "Tokens of requests answered, by RPC", ["rpc"], registry=r
        )
        self.truncations = Counter(
            "roberta_truncations", "Inputs cut to the maximum length", registry=r
        )
        self.item_failures = Counter(
            "roberta_item_failures", "Items whose forward pass failed", registry=r
        )
        self.items_dropped = Counter(
            "roberta_items_dropped", "Queued items dropped before compute, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.stream_items = Counter(
            "roberta_stream_items", "Stream items answered, by RPC and item status code",
            ["rpc", "code"], registry=r,
        )  # fmt: skip
        self.streams_open = Gauge("roberta_streams_open", "Bidi streams open now", registry=r)
        self.model_info = Info("roberta_model", "The served model", registry=r)
        self.ready = Gauge("roberta_ready", "1 once the model is loaded and warmed up", registry=r)
        for rpc in RPCS:
            self.request_seconds.labels(rpc)
            self.tokens.labels(rpc)
            self.requests.labels(rpc, "OK")
        for rpc in STREAM_RPCS:
            self.stream_items.labels(rpc, "OK")
        for reason in ("cancelled", "deadline"):
            self.items_dropped.labels(reason)
        self._http: WSGIServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP listener; returns the bound port (useful with port 0)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
