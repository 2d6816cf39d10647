"""`roberta-client`: the SDK from the shell, one JSON document on stdout (see `--help`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import numpy as np

from roberta_client._version import __version__
from roberta_client.client import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET, POOLINGS, RobertaClient
from roberta_client.extract import ExtractConfig, run_extract
from roberta_client.inputs import InputLike
from roberta_client.tensors import DTYPES

logger = logging.getLogger("roberta_client.cli")

_TRUE = {"1", "true", "yes", "on"}

_EPILOG = """\
Inputs come from positional arguments, or from '-' (stdin) and --input FILE, one per line: a plain
text, or a JSON object {"text": ..., "text_pair": ...} or {"ids": [...]}. Blank lines are skipped.
Every option can also be set with a ROBERTA_<OPTION> environment variable (ROBERTA_SERVER,
ROBERTA_TIMEOUT, ROBERTA_TOPK, ...; switches take 1/true/yes/on).

Exit status: 0 on success, 2 for bad usage or input, and the numeric gRPC status code when a call
fails (14 UNAVAILABLE, 3 INVALID_ARGUMENT, 5 NOT_FOUND, 4 DEADLINE_EXCEEDED, ...).
"""


def _add(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """`add_argument` whose default comes from ROBERTA_<DEST> when that variable is set."""
    dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
    env = f"ROBERTA_{dest.upper()}"
    value = os.environ.get(env)
    if value is not None:
        if kwargs.get("action") == "store_true":
            kwargs["default"] = value.strip().lower() in _TRUE
        else:
            # argparse runs `type` over string defaults, so the variable is parsed like the flag.
            kwargs["default"] = value
        kwargs["required"] = False
    kwargs["help"] = f"{kwargs.get('help', '')} [env {env}]".strip()
    parser.add_argument(*flags, **kwargs)


def _timeout(value: str) -> float | None:
    seconds = float(value)
    return seconds if seconds > 0 else None


def _int_list(value: str) -> list[int]:
    return [int(part) for part in re.split(r"[,\s]+", value.strip()) if part]


def _token_ids(value: str) -> list[int]:
    """Token ids written as `0,31414,2`, `0 31414 2`, a JSON list or `{"ids": [...]}`."""
    value = value.strip()
    if value.startswith(("[", "{")):
        parsed = json.loads(value)
        ids = parsed["ids"] if isinstance(parsed, dict) else parsed
        return [int(i) for i in ids]
    return _int_list(value)


def _parse_line(line: str) -> InputLike:
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return line  # a text that merely starts with a brace
        if isinstance(record, dict):
            if "ids" in record:
                return [int(i) for i in record["ids"]]
            if "text" in record:
                if record.get("text_pair") is not None:
                    return (str(record["text"]), str(record["text_pair"]))
                return str(record["text"])
            raise ValueError(f"JSON input needs a 'text' or 'ids' key: {line[:80]}")
    return line


def _lines(stream: Iterable[str]) -> list[str]:
    return [line.rstrip("\r\n") for line in stream if line.strip()]


def _read_raw(args: argparse.Namespace) -> list[tuple[str, bool]]:
    """(value, from_a_file) pairs: positional values are used as given, file lines are parsed."""
    raw: list[tuple[str, bool]] = []
    for value in args.texts:
        if value == "-":
            raw.extend((line, True) for line in _lines(sys.stdin))
        else:
            raw.append((value, False))
    if args.input == "-":
        raw.extend((line, True) for line in _lines(sys.stdin))
    elif args.input:
        with open(args.input, encoding="utf-8") as handle:
            raw.extend((line, True) for line in _lines(handle))
    if not raw:
        raise ValueError("no input: give texts, '-' for stdin or --input FILE")
    return raw


def _read_items(args: argparse.Namespace) -> list[InputLike]:
    return [_parse_line(value) if from_file else value for value, from_file in _read_raw(args)]


def _jsonable(item: InputLike) -> Any:
    if isinstance(item, str):
        return item
    return list(item)


def _norms(array: np.ndarray) -> Any:
    return np.linalg.norm(array.astype(np.float32), axis=-1).tolist()


def _cmd_tokenize(client: RobertaClient, args: argparse.Namespace) -> Any:
    items = _read_items(args)
    results = client.tokenize(items, truncate=args.truncate, no_separator=args.no_separator)
    return [
        {
            "input": _jsonable(item),
            "ids": list(result.ids),
            "tokens": list(result.tokens),
            "segments": list(result.segments),
            "starts": list(result.starts),
            "ends": list(result.ends),
            "special": list(result.special),
            "truncated": result.truncated,
        }
        for item, result in zip(items, results, strict=True)
    ]


def _cmd_features(client: RobertaClient, args: argparse.Namespace) -> Any:
    items = _read_items(args)
    arrays = client.extract_features_batch(
        items,
        layers=args.layers,
        all_layers=args.all_layers,
        pooling=args.pooling,
        dtype=args.dtype,
        truncate=args.truncate,
        no_separator=args.no_separator,
    )
    output = []
    for item, array in zip(items, arrays, strict=True):
        entry = {"input": _jsonable(item), "shape": list(array.shape), "norms": _norms(array)}
        if not args.summary:
            entry["vectors"] = array.tolist()
        output.append(entry)
    return output


def _cmd_classify(client: RobertaClient, args: argparse.Namespace) -> Any:
    items = _read_items(args)
    results = client.classify(
        args.head, items, truncate=args.truncate, no_separator=args.no_separator
    )
    return [
        {
            "input": _jsonable(item),
            "label": result.label,
            "label_index": result.label_index,
            "logits": result.logits.tolist(),
            "log_probs": result.log_probs.tolist(),
            "truncated": result.truncated,
        }
        for item, result in zip(items, results, strict=True)
    ]


def _cmd_fill_mask(client: RobertaClient, args: argparse.Namespace) -> Any:
    texts = _read_items(args)
    if not all(isinstance(text, str) for text in texts):
        raise ValueError("fill-mask takes single texts, not pairs or token ids")
    results = client.fill_mask_batch(texts, topk=args.topk)
    return [
        {
            "input": text,
            "candidates": [
                {"sequence": sequence, "score": score, "token": token}
                for sequence, score, token in candidates
            ],
        }
        for text, candidates in zip(texts, results, strict=True)
    ]


def _cmd_decode(client: RobertaClient, args: argparse.Namespace) -> Any:
    sequences = [_token_ids(value) for value, _ in _read_raw(args)]
    texts = client.decode_batch(sequences)
    return [{"ids": ids, "text": text} for ids, text in zip(sequences, texts, strict=True)]


def _cmd_extract(client: RobertaClient | None, args: argparse.Namespace) -> Any:
    cfg = ExtractConfig(
        input=args.input,
        out=args.out,
        # Several comma-separated servers share the work, one stream each (round-robin).
        servers=[s.strip() for s in args.server.split(",") if s.strip()],
        pooling=args.pooling,
        layers=args.layers,
        dtype=args.dtype,
        truncate=args.truncate,
        shard_size=args.shard_size,
        streams_per_server=args.streams_per_server,
        items_per_message=args.items_per_message,
        max_attempts=args.max_attempts,
        progress=not args.no_progress,
    )
    return run_extract(cfg, _client_kwargs(args))


def _cmd_info(client: RobertaClient, args: argparse.Namespace) -> Any:
    return client.model_info()


def _add_inputs(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("texts", nargs="*", metavar="INPUT", help=f"{what}; '-' reads stdin")
    _add(parser, "--input", metavar="FILE", help=f"file of {what}, one per line ('-' = stdin)")


def _add_encode_options(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--truncate", action="store_true", help="cut over-long inputs to fit")
    _add(parser, "--no-separator", action="store_true", help="join pairs with one </s>")


def build_parser() -> argparse.ArgumentParser:
    """The `roberta-client` argument parser."""
    parser = argparse.ArgumentParser(
        prog="roberta-client",
        description="Query a roberta-grpc server; prints JSON.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add(
        parser,
        "--server",
        default=DEFAULT_TARGET,
        help="gRPC target host:port (extract: several, comma-separated)",
    )
    _add(parser, "--timeout", type=_timeout, default="30", help="deadline per call, s (0: none)")
    _add(
        parser,
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest gRPC message sent or received",
    )
    _add(parser, "--tls", action="store_true", help="use TLS (system root certificates)")
    _add(parser, "--ca-cert", metavar="PEM", help="root certificates for TLS; implies --tls")
    _add(parser, "--client-cert", metavar="PEM", help="client certificate for mutual TLS")
    _add(parser, "--client-key", metavar="PEM", help="private key of --client-cert")
    _add(parser, "--auth-token-file", metavar="FILE", help="bearer token to send")
    _add(
        parser,
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="diagnostics on stderr",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[..., Any], summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("tokenize", _cmd_tokenize, "token ids, strings and offsets of texts or pairs")
    _add_inputs(sub, "texts")
    _add_encode_options(sub)

    sub = command("features", _cmd_features, "encoder features of texts, pairs or token ids")
    _add_inputs(sub, "texts")
    _add_encode_options(sub)
    _add(
        sub,
        "--layers",
        type=_int_list,
        help="comma-separated, 0 = embeddings; negatives as --layers=-2,-1",
    )
    _add(sub, "--all-layers", action="store_true", help="every layer, 0..num_layers")
    _add(sub, "--pooling", choices=sorted(POOLINGS), default="none", help="per token or pooled")
    _add(sub, "--dtype", choices=sorted(DTYPES), default="float32", help="wire element type")
    _add(sub, "--summary", action="store_true", help="shapes and vector norms only")

    sub = command("classify", _cmd_classify, "apply a classification head")
    _add_inputs(sub, "texts")
    _add_encode_options(sub)
    _add(sub, "--head", required=True, help="classification head name, e.g. mnli")

    sub = command("fill-mask", _cmd_fill_mask, "top-k fillers of the one <mask> in each text")
    _add_inputs(sub, "texts")
    _add(sub, "--topk", type=int, default=5, help="candidates per text")

    sub = command("decode", _cmd_decode, "token ids back to text")
    _add_inputs(sub, "token id lists (0,31414,2 or a JSON list)")

    command("info", _cmd_info, "the served model, its heads and the server's limits")

    sub = command(
        "extract",
        _cmd_extract,
        "bulk features of a corpus into .npy shards, resumable (see roberta_client.extract)",
    )
    _add(sub, "--input", required=True, help="JSONL (id, text, text_pair) or text lines; - stdin")
    _add(sub, "--out", required=True, help="output directory; a rerun skips what it holds")
    _add(sub, "--pooling", choices=sorted(POOLINGS), default="cls", help="per token or pooled")
    _add(sub, "--layers", type=_int_list, help="comma-separated, 0 = embeddings (default: last)")
    _add(sub, "--dtype", choices=["float32", "float16"], default="float32", help="stored type")
    _add(sub, "--truncate", action="store_true", help="cut over-long inputs instead of failing")
    _add(sub, "--shard-size", type=int, default=10000, help="items per shard")
    _add(sub, "--streams-per-server", type=int, default=1, help="parallel streams per server")
    _add(sub, "--items-per-message", type=int, default=16, help="items packed per message")
    _add(sub, "--max-attempts", type=int, default=8, help="stream reopenings without progress")
    _add(sub, "--no-progress", action="store_true", help="no progress line on stderr")
    return parser


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not (args.tls or args.ca_cert or args.client_cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(args.ca_cert),
        private_key=_read(args.client_key),
        certificate_chain=_read(args.client_cert),
    )


def _client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "timeout": args.timeout,
        "max_message_bytes": args.max_message_bytes,
        "credentials": _credentials(args),
        "auth_token": _token(args.auth_token_file),
    }


def _token(path: str | None) -> str | None:
    if not path:
        return None
    token = (_read(path) or b"").decode().strip()
    if not token:
        raise ValueError(f"--auth-token-file {path} is empty")
    return token


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logger.debug("connecting to %s (timeout %s s)", args.server, args.timeout)
    try:
        if args.handler is _cmd_extract:
            result = _cmd_extract(None, args)
        else:
            with RobertaClient(args.server, **_client_kwargs(args)) as client:
                result = args.handler(client, args)
    except grpc.RpcError as error:
        code = error.code()
        logger.error("%s failed: %s: %s", args.command, code.name, error.details())
        return code.value[0] or 1
    except (OSError, ValueError, TypeError, KeyError) as error:
        logger.error("%s: %s", args.command, error)
        return 2
    json.dump(result, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
