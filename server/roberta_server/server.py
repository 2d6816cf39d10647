"""The server process: gRPC listener, health and reflection, metrics, model loading, shutdown.

Start-up order: metrics and the gRPC port come up first with health NOT_SERVING (so orchestrators
can watch the model load), then the model is loaded and warmed up off the event loop, and only
then does health turn SERVING. On SIGTERM/SIGINT health turns NOT_SERVING, new RPCs get
UNAVAILABLE, queued work gets `shutdown_grace` seconds to finish, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from roberta_client._proto.roberta.v1 import roberta_pb2 as pb
from roberta_client._proto.roberta.v1 import roberta_pb2_grpc

from . import __version__
from .auth import BearerTokenInterceptor, read_token, server_credentials
from .config import ServerConfig
from .cpu_memory import MMAP_THRESHOLD_MAX, retain_freed_memory
from .hub import RobertaHub, load
from .metrics import Metrics
from .service import RobertaService
from .servicer import RobertaServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Roberta"].full_name


def channel_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
    ]


def validate(cfg: ServerConfig, hub: RobertaHub) -> None:
    """Refuse configurations under which some valid request could never be scheduled."""
    if cfg.max_batch_tokens < hub.model.cfg.max_positions:
        raise SystemExit(
            f"--max-batch-tokens {cfg.max_batch_tokens} is below the model's maximum sequence "
            f"length {hub.model.cfg.max_positions}: a long input could never be scheduled"
        )
    if min(cfg.max_batch_size, cfg.max_items_per_request, cfg.lookahead, cfg.stream_window) < 1:
        raise SystemExit(
            "--max-batch-size, --max-items-per-request, --lookahead and --stream-window "
            "must be >= 1"
        )
    if cfg.max_queued_tokens < hub.model.cfg.max_positions:
        raise SystemExit("--max-queued-tokens must be at least the maximum sequence length")


async def watch_health(
    service: RobertaService, health: health_aio.HealthServicer, metrics: Metrics
) -> None:
    """Health follows whether the model really runs: NOT_SERVING only after a batch failed item
    by item and a probe sequence failed too; SERVING again once a probe or a batch succeeds."""
    executor = service.executor
    serving = True
    while True:
        await asyncio.sleep(1.0)
        if not executor.usable:
            executor.usable = await asyncio.wrap_future(executor.call(executor.probe))
        if executor.usable != serving:
            serving = executor.usable
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else (health_pb2.HealthCheckResponse.NOT_SERVING)
            )
            for name in ("", SERVICE_NAME):
                await health.set(name, status)
            metrics.ready.set(int(serving))
            log.warning("model usable: %s", serving)


async def serve(cfg: ServerConfig) -> int:
    # Before the model loads, so its weights and every batch's activations get the settings.
    if retain_freed_memory():
        log.info("malloc keeps freed memory", extra={"mmap_threshold": MMAP_THRESHOLD_MAX})
    metrics = Metrics()
    if cfg.metrics_port >= 0:
        port = metrics.serve(cfg.metrics_host, cfg.metrics_port)
        log.info(
            "metrics listening", extra={"metrics_host": cfg.metrics_host, "metrics_port": port}
        )

    interceptors = (
        [BearerTokenInterceptor(read_token(cfg.auth_token_file))] if (cfg.auth_token_file) else []
    )
    server = grpc.aio.server(options=channel_options(cfg), interceptors=interceptors)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )  # fmt: skip
    servicer = RobertaServicer(metrics, pb.ServerLimits(), cfg.max_concurrent_rpcs, cfg.max_streams)
    roberta_pb2_grpc.add_RobertaServicer_to_server(servicer, server)
    address = f"{cfg.host}:{cfg.port}"
    credentials = server_credentials(cfg)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    await server.start()
    log.info(
        "grpc listening",
        extra={
            "host": cfg.host,
            "port": port,
            "tls": credentials is not None,
            "mtls": bool(cfg.tls_client_ca),
            "auth": bool(cfg.auth_token_file),
        },
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # A thread of its own that ends once the model is loaded: libgomp gives every thread that runs
    # a parallel op its own pool of workers, and while two pools outnumber the cores it stops
    # spinning between ops (GOMP_SPINCOUNT is throttled), which makes every forward pass on the
    # device thread slower (bench_server: a 32-token bfloat16 pass 29 ms instead of 20 ms).
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roberta-load")
    load_task = loop.run_in_executor(loader, load, cfg.model, cfg.device, cfg.dtype)
    loader.shutdown(wait=False)
    done, _ = await asyncio.wait(
        [load_task, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    if load_task not in done:
        log.info("stopped while loading the model")
        await server.stop(0)
        metrics.close()
        return 0
    try:
        hub = load_task.result()
        cfg = cfg.resolved(hub.device.type)
        validate(cfg, hub)
        if cfg.gil_switch_interval_ms > 0:
            sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000)
            log.info("GIL switch interval set", extra={"ms": cfg.gil_switch_interval_ms})
        service = RobertaService(hub, cfg, metrics)
        await service.start()
    except BaseException:
        # Close the listeners before the loop goes away, so the failure is all that is reported.
        await server.stop(0)
        metrics.close()
        raise
    servicer.limits.CopyFrom(
        pb.ServerLimits(
            max_batch_tokens=cfg.max_batch_tokens,
            max_batch_size=cfg.max_batch_size,
            max_items_per_request=cfg.max_items_per_request,
            max_message_bytes=cfg.max_message_bytes,
            stream_window=cfg.stream_window,
        )
    )
    servicer.service = service
    # What start-up made (the model, the tokenizer's tables, the warm-up's caches) lives as long
    # as the server: out of the collector's sight, a full collection on the event loop took
    # 0.8 ms instead of 110 ms (random:base, bfloat16, under 32 one-text clients).
    gc.collect()
    gc.freeze()
    log.info("start-up objects frozen", extra={"objects": gc.get_freeze_count()})
    info = service.model_info()
    metrics.model_info.info({k: str(v) for k, v in info.items()})
    metrics.ready.set(1)
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    # "name" is reserved in a LogRecord, so the model's fields go under their own key.
    log.info("serving", extra={"model": info, "port": port, "version": __version__})

    watcher = asyncio.ensure_future(watch_health(service, health, metrics))
    await stop.wait()
    watcher.cancel()
    log.info("shutting down", extra={"grace_seconds": cfg.shutdown_grace})
    await health.enter_graceful_shutdown()
    metrics.ready.set(0)
    # New calls are refused with UNAVAILABLE from here on; accepted ones finish first, then the
    # scheduler and device stop, then the listener (nothing is left for its grace to cut short).
    service.stop_accepting()
    until = loop.time() + cfg.shutdown_grace
    if not await servicer.drain(cfg.shutdown_grace):
        log.warning("shutdown grace of %.1fs passed with requests unanswered", cfg.shutdown_grace)
    await service.close(max(0.0, until - loop.time()))
    await server.stop(max(0.0, until - loop.time()))
    metrics.close()
    log.info("stopped")
    return 0
