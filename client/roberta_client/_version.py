"""The installed distribution's version, kept apart so that every module can import it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("roberta-grpc")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
