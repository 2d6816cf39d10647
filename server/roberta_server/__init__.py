"""roberta_server: fairseq's RoBERTa in plain PyTorch, served over gRPC."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("roberta-grpc")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["RobertaHub", "load", "__version__"]

if TYPE_CHECKING:
    from .hub import RobertaHub, load


def __getattr__(name: str) -> Any:
    # The hub (and torch with it) loads on first use, so that tokenizer worker processes, which
    # import only the tokenizer, start in a fraction of a second and without torch's memory.
    if name in ("RobertaHub", "load"):
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
