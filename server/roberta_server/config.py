"""Server configuration: one dataclass, turned into command-line flags that also read ROBERTA_* env.

Each field becomes `--field-name`, whose default comes from `ROBERTA_FIELD_NAME` when that is set,
else from the dataclass. The field's `help` metadata is the flag's help text (and the README table).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field


def _opt(default: object, help: str, **kw: object) -> typing.Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ServerConfig:
    model: str = _opt("roberta.base", "model name, checkpoint path or random:tiny|base|large")
    device: str = _opt("auto", "cuda, cuda:N, cpu, or auto (cuda when available)")
    dtype: str = _opt(
        "auto", "float32, bfloat16, float16, or auto (bfloat16 on CUDA, float32 on CPU)"
    )
    host: str = _opt("0.0.0.0", "address the gRPC server binds")
    port: int = _opt(50051, "gRPC port (0 picks a free port, logged at start)")
    metrics_host: str = _opt("0.0.0.0", "address of the Prometheus /metrics listener")
    metrics_port: int = _opt(9090, "Prometheus port (0 picks a free one; -1 disables it)")
    max_batch_tokens: int = _opt(
        0, "token budget of one forward batch (0: 16384 on CUDA, 2048 on CPU)"
    )
    max_batch_size: int = _opt(0, "most sequences in one forward batch (0: 512 CUDA, 64 CPU)")
    bulk_batch_tokens: int = _opt(
        0, "token budget of batches with stream items while unary calls are about (0: 1/16 of max)"
    )
    max_queue_delay_ms: float = _opt(0.0, "wait this long for a batch to fill when idle")
    refill_wait_ms: float = _opt(
        25.0,
        "after a batch, wait up to this long (and a tenth of its compute time) for the callers it "
        "answered to send again, so they share the next batch (0: off)",
    )
    cuda_graph_tokens: int = _opt(
        -1,
        "CUDA, half precision: batches of up to this many tokens replay captured graphs, one per "
        "bucket of sizes (powers of two from 32 to 256, then 8 per octave; 0: off, -1: up to "
        "--max-batch-tokens)",
    )
    gil_switch_interval_ms: float = _opt(
        -1.0,
        "how long a thread may hold Python's GIL while another waits for it (0: Python's 5 ms; "
        "-1: 0.1 ms on CUDA, where the device thread's many short calls each wait for it, 5 ms "
        "on the CPU)",
    )
    lookahead: int = _opt(1024, "queued items considered when grouping by length")
    max_items_per_request: int = _opt(1024, "most items in one request")
    max_message_bytes: int = _opt(64 << 20, "largest gRPC message received or sent")
    stream_window: int = _opt(1024, "items one stream may have in flight (flow control)")
    max_queued_tokens: int = _opt(1 << 20, "queued tokens beyond which requests are refused")
    max_concurrent_rpcs: int = _opt(
        2048, "unary RPCs handled at once; more get RESOURCE_EXHAUSTED with a retry hint"
    )
    max_streams: int = _opt(256, "bidi streams open at once; more get RESOURCE_EXHAUSTED")
    tokenizer_threads: int = _opt(
        2,
        "threads that tokenize requests of more than 2,048 characters and token ids (smaller "
        "ones: on the event loop); with processes, those of fewer than 8 texts",
    )
    tokenizer_processes: int = _opt(
        -1,
        "worker processes that tokenize requests of 8 or more texts (over 2,048 characters), so "
        "the BPE does not hold the server's GIL (-1: half the cores, at most 8, on CUDA; none on "
        "the CPU)",
    )
    shutdown_grace: float = _opt(30.0, "seconds queued work may take to finish on SIGTERM")
    tls_cert: str = _opt("", "PEM certificate chain: serve TLS (with --tls-key)")
    tls_key: str = _opt("", "PEM private key of --tls-cert")
    tls_client_ca: str = _opt("", "PEM CA bundle: require client certificates it signed (mTLS)")
    auth_token_file: str = _opt(
        "", "file holding the bearer token callers must send (health stays open)"
    )
    allow_register_head: bool = _opt(True, "let clients add heads with RegisterClassificationHead")
    fault_oom_tokens: int = _opt(
        0, "testing only: a forward pass over more tokens fails as out of memory (0: off)"
    )
    fault_poison_id: int = _opt(
        -1, "testing only: a forward pass holding this token id fails (-1: off)"
    )
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _opt("json", "json (one object per line) or text")

    def resolved(self, device_type: str) -> ServerConfig:
        """Fill the device-dependent defaults."""
        cuda = device_type == "cuda"
        return dataclasses.replace(
            self,
            max_batch_tokens=self.max_batch_tokens or (16384 if cuda else 2048),
            # On CUDA, batches of 256 items of the standard mix held ~10,000 of the 16,384
            # tokens: 512 served 64-text requests 1.06-1.19x faster (RoBERTa-large, H200).
            max_batch_size=self.max_batch_size or (512 if cuda else 64),
            cuda_graph_tokens=(
                self.cuda_graph_tokens
                if self.cuda_graph_tokens >= 0
                else self.max_batch_tokens or (16384 if cuda else 2048)
            ),
            bulk_batch_tokens=self.bulk_batch_tokens
            or (self.max_batch_tokens or (16384 if cuda else 2048)) // 16,
            gil_switch_interval_ms=(
                self.gil_switch_interval_ms
                if self.gil_switch_interval_ms >= 0
                else 0.1
                if cuda
                else 0.0
            ),
            tokenizer_processes=(
                self.tokenizer_processes
                if self.tokenizer_processes >= 0
                else min(8, (os.cpu_count() or 2) // 2)
                if cuda
                else 0
            ),
        )


def env_name(field_name: str) -> str:
    return "ROBERTA_" + field_name.upper()


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field; ROBERTA_<FIELD> overrides the default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        convert = _parse_bool if kind is bool else kind
        env = os.environ.get(env_name(f.name))
        try:
            default = f.default if env is None else convert(env)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{env_name(f.name)}={env!r}: {exc}")
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} [env {env_name(f.name)}; default {default}]"
        parser.add_argument(flag, type=convert, default=default, help=help_text, dest=f.name)


def config_from_args(args: argparse.Namespace, cls: type) -> typing.Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
