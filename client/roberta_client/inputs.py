"""Conversion of Python values to `roberta.v1.Input` messages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np

from roberta_client._proto.roberta.v1 import roberta_pb2

__all__ = ["InputLike", "TextOrPair", "as_token_ids", "to_input"]

#: A text or a (text, text_pair) pair.
TextOrPair: TypeAlias = str | tuple[str, str]
#: Anything `to_input` accepts: a text, a pair, token ids (a sequence, a numpy array or anything
#: `np.asarray` understands, such as a CPU torch tensor) or an Input message.
InputLike: TypeAlias = str | tuple[str, str] | Sequence[int] | np.ndarray | roberta_pb2.Input


def as_token_ids(tokens: Any) -> np.ndarray:
    """Token ids as a 1-D int64 array; a [1, T] array is accepted, as fairseq's methods do.

    Raises ValueError for other shapes and for non-integer values.
    """
    array = np.asarray(tokens)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1:
        raise ValueError(f"token ids must have shape [T] or [1, T], got {list(array.shape)}")
    # np.asarray([]) is float64; an empty sequence is still a valid (if useless) id list.
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], str)
    )


def to_input(item: InputLike) -> roberta_pb2.Input:
    """An Input message: a str is a text, a (str, str) tuple or list a text pair, and an integer
    sequence or array the token ids (`<s>` and `</s>` included), used as given by the server.
    """
    if isinstance(item, roberta_pb2.Input):
        return item
    if isinstance(item, str):
        return roberta_pb2.Input(text=item)
    if _is_pair(item):
        return roberta_pb2.Input(pair=roberta_pb2.TextPair(text=item[0], text_pair=item[1]))
    array = np.asarray(item)
    # Strings, bytes and ragged or mixed containers end up as these kinds.
    if array.dtype.kind in "USO":
        raise TypeError(
            "an input is a str, a (str, str) pair or a sequence of token ids, "
            f"got {type(item).__name__}"
        )
    return roberta_pb2.Input(ids=roberta_pb2.TokenIds(ids=as_token_ids(array).tolist()))
