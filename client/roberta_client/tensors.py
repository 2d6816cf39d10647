"""Conversion between `roberta.v1.Tensor` messages and numpy arrays.

A Tensor carries its elements as raw little-endian bytes in row-major order. Decoding float32 and
float16 is zero-copy: the returned array is a read-only view over the `bytes` object that protobuf
hands out for the `data` field (call `.copy()` for a writable array). numpy has no bfloat16, so
bfloat16 tensors are widened to float32, which is exact but allocates a new array.
"""

from __future__ import annotations

import math

import numpy as np

from roberta_client._proto.roberta.v1 import roberta_pb2

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "bfloat16_bits_to_float32",
    "float32_to_bfloat16_bits",
    "numpy_to_tensor",
    "parse_dtype",
    "tensor_to_numpy",
]

#: Element type names, as used by the CLI and `extract_features_batch(dtype=...)`, to enum values.
DTYPES: dict[str, int] = {
    "float32": roberta_pb2.DTYPE_FLOAT32,
    "float16": roberta_pb2.DTYPE_FLOAT16,
    "bfloat16": roberta_pb2.DTYPE_BFLOAT16,
}

#: Enum values to names; DTYPE_UNSPECIFIED means float32 (the proto's default).
DTYPE_NAMES: dict[int, str] = {
    **{value: name for name, value in DTYPES.items()},
    roberta_pb2.DTYPE_UNSPECIFIED: "float32",
}

# Wire element type of each enum value; bfloat16 travels as its 16 raw bits.
_WIRE_DTYPES: dict[int, np.dtype] = {
    roberta_pb2.DTYPE_UNSPECIFIED: np.dtype("<f4"),
    roberta_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    roberta_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    roberta_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),
}

# The quiet NaN that torch and most hardware produce for bfloat16.
_BF16_QNAN = np.uint16(0x7FC0)


def parse_dtype(dtype: str | int) -> int:
    """A `DType` enum value from a name in `DTYPES` or from an enum value itself."""
    if isinstance(dtype, str):
        try:
            return DTYPES[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from None
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown DType enum value {dtype!r}")
    return int(dtype)


def float32_to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of `array` rounded to nearest, ties to even.

    This is the rounding torch uses for `.to(torch.bfloat16)`; plain truncation of the low 16 bits
    would bias every value towards zero. Finite values too large for bfloat16 round to infinity and
    every NaN becomes the quiet NaN 0x7FC0.
    """
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4")
    # Adding 0x7FFF plus the lowest kept bit carries into the kept bits exactly when the dropped
    # half is above one half, or equal to it with an odd kept part. uint32 cannot overflow here
    # for non-NaN inputs (the largest, -inf, is 0xFF800000).
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    out = rounded.astype("<u2")
    out[np.isnan(bits.view("<f4"))] = _BF16_QNAN
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32; exact, bfloat16 is float32's upper half."""
    return (np.asarray(bits, dtype="<u2").astype("<u4") << 16).view("<f4")


def tensor_to_numpy(tensor: roberta_pb2.Tensor) -> np.ndarray:
    """A numpy array of a Tensor message, shaped as `tensor.shape`.

    float32 and float16 arrays are read-only zero-copy views over the message's bytes (dtype
    '<f4' / '<f2'); bfloat16 is widened to a new float32 array because numpy has no bfloat16 type.
    Raises ValueError when the byte count does not match the shape.
    """
    try:
        wire = _WIRE_DTYPES[tensor.dtype]
    except KeyError:
        raise ValueError(f"unknown tensor dtype {tensor.dtype}") from None
    shape = tuple(tensor.shape)
    # Each access to a bytes field builds a new bytes object, so read it once.
    data = tensor.data
    expected = math.prod(shape) * wire.itemsize
    if len(data) != expected:
        raise ValueError(
            f"tensor of shape {list(shape)} and dtype {DTYPE_NAMES[tensor.dtype]} needs "
            f"{expected} bytes, got {len(data)}"
        )
    array = np.frombuffer(data, dtype=wire).reshape(shape)
    if tensor.dtype == roberta_pb2.DTYPE_BFLOAT16:
        return bfloat16_bits_to_float32(array)
    return array


def numpy_to_tensor(
    array: np.ndarray, dtype: str | int = roberta_pb2.DTYPE_FLOAT32
) -> roberta_pb2.Tensor:
    """A Tensor message holding `array` as `dtype` (a `DType` value or a name from `DTYPES`).

    For float32 and float16 the array is cast when its type differs (no copy when it is already a
    C-contiguous little-endian array of that type). For bfloat16 a uint16 array is taken as the raw
    bfloat16 bits (what `torch_tensor.view(torch.int16)` gives), any float array is rounded with
    `float32_to_bfloat16_bits`.
    """
    dtype = parse_dtype(dtype)
    array = np.asarray(array)
    if dtype == roberta_pb2.DTYPE_BFLOAT16:
        if array.dtype == np.uint16:
            wire_array = np.ascontiguousarray(array, dtype="<u2")
        elif array.dtype.kind == "f":
            wire_array = float32_to_bfloat16_bits(array)
        else:
            raise TypeError(f"bfloat16 needs a float or uint16 array, got {array.dtype}")
    else:
        wire_array = np.ascontiguousarray(array, dtype=_WIRE_DTYPES[dtype])
    return roberta_pb2.Tensor(shape=array.shape, dtype=dtype, data=wire_array.tobytes())
