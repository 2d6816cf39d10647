"""roberta_server: fairseq's RoBERTa in plain PyTorch, served over gRPC."""

from importlib.metadata import PackageNotFoundError, version

from .hub import RobertaHub, load

try:
    __version__ = version("roberta-grpc")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["RobertaHub", "load", "__version__"]
