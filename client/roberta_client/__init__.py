"""Client SDK of roberta-grpc: fairseq's RoBERTa hub interface over gRPC, returning numpy arrays.

    from roberta_client import RobertaClient

    with RobertaClient("localhost:50051") as roberta:
        tokens = roberta.encode("Hello world!")          # array([0, 31414, 232, 328, 2])
        features = roberta.extract_features(tokens)      # float32 [1, 5, H]

Needs grpcio, protobuf and numpy only; torch is never imported.
"""

from roberta_client._version import __version__
from roberta_client.client import (
    POOLINGS,
    AsyncRobertaClient,
    Classification,
    ClientConfig,
    FillMaskCandidate,
    RobertaClient,
)
from roberta_client.inputs import InputLike, TextOrPair, as_token_ids, to_input
from roberta_client.streaming import ItemError, StreamResult
from roberta_client.tensors import (
    DTYPE_NAMES,
    DTYPES,
    bfloat16_bits_to_float32,
    float32_to_bfloat16_bits,
    numpy_to_tensor,
    parse_dtype,
    tensor_to_numpy,
)

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "POOLINGS",
    "AsyncRobertaClient",
    "Classification",
    "ClientConfig",
    "FillMaskCandidate",
    "InputLike",
    "ItemError",
    "RobertaClient",
    "StreamResult",
    "TextOrPair",
    "__version__",
    "as_token_ids",
    "bfloat16_bits_to_float32",
    "float32_to_bfloat16_bits",
    "numpy_to_tensor",
    "parse_dtype",
    "tensor_to_numpy",
    "to_input",
]
