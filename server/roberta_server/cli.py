"""`roberta-server serve` (the default) and `roberta-server export`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import dataclass, field

from .config import ServerConfig, add_config_args, config_from_args

log = logging.getLogger("roberta_server")

_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """The classic one-line format, with the `extra=` fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}
        line = super().format(record)
        return line + "".join(f" {k}={v}" for k, v in extra.items())


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


@dataclass
class ExportConfig:
    model: str = field(default="random:base", metadata={"help": "model to export"})
    format: str = field(default="fairseq", metadata={"help": "fairseq or hf"})
    out: str = field(default="", metadata={"help": "output folder"})
    fairseq_era: str = field(
        default="D", metadata={"help": "fairseq key layout A|B|C|D (D: fairseq >= 0.12)"}
    )


def export(cfg: ExportConfig) -> int:
    from .checkpoints import load_checkpoint, save_fairseq, save_hf

    if not cfg.out:
        raise SystemExit("export needs --out DIR")
    ckpt = load_checkpoint(cfg.model)
    if cfg.format == "fairseq":
        path = save_fairseq(ckpt, cfg.out, era=cfg.fairseq_era)
    elif cfg.format == "hf":
        path = save_hf(ckpt, cfg.out)
    else:
        raise SystemExit(f"--format must be fairseq or hf, got {cfg.format!r}")
    log.info("exported", extra={"model": cfg.model, "format": cfg.format, "path": str(path)})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roberta-server", description="RoBERTa over gRPC. Flags also read ROBERTA_* env."
    )
    sub = parser.add_subparsers(dest="command")
    add_config_args(sub.add_parser("serve", help="run the gRPC server (default)"), ServerConfig)
    add_config_args(sub.add_parser("export", help="write a model as a checkpoint"), ExportConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"), getattr(args, "log_format", "text"))
    if args.command == "export":
        return export(config_from_args(args, ExportConfig))
    return asyncio.run(serve_main(config_from_args(args, ServerConfig)))


async def serve_main(cfg: ServerConfig) -> int:
    from .server import serve

    return await serve(cfg)
