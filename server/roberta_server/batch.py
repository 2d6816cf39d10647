"""The one contract between scheduling and execution: a batch of items and their outputs.

The scheduler decides *which* sequences run together; the executor decides *how* (packing, device
copies, kernels). An item is one sequence and what to compute from the encoder's output for it;
items of different RPCs run in the same forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FeatureSpec:
    """Hidden states of `layers` (0 = embeddings), pooled or per token, returned as `dtype`."""

    layers: tuple[int, ...]
    pooling: str  # "none" | "cls" | "mean"
    dtype: str  # "float32" | "float16" | "bfloat16"


@dataclass(frozen=True)
class ClassifySpec:
    """Logits of the named classification head on the `<s>` vector."""

    head: str


@dataclass(frozen=True)
class FillMaskSpec:
    """Top-k fillers of the `<mask>` at `position` in the sequence."""

    position: int
    topk: int
    masked_input: str


Spec = FeatureSpec | ClassifySpec | FillMaskSpec


@dataclass
class Item:
    """One sequence to run. `ids` holds `<s>`/`</s>` and no `<pad>`."""

    ids: list[int]
    spec: Spec
    # Set by the scheduler: monotonic enqueue time, used for queue-wait accounting and fairness.
    enqueued: float = 0.0
    # Opaque to execution: lets the scheduler route the output back to its request.
    owner: object = field(default=None, repr=False)
    index: int = 0


@dataclass
class Features:
    # [layers, tokens, hidden] or [layers, hidden]; bfloat16 is carried as its raw uint16 bits.
    array: np.ndarray
    layers: tuple[int, ...]
    dtype: str


@dataclass
class Classification:
    logits: np.ndarray  # float32 [num_classes]


@dataclass
class FillMask:
    candidates: list[tuple[str, float, str, int]]  # (filled text, probability, token, token id)


Output = Features | Classification | FillMask


@dataclass
class Batch:
    items: list[Item]

    @property
    def num_tokens(self) -> int:
        return sum(len(it.ids) for it in self.items)

    @property
    def max_len(self) -> int:
        return max(len(it.ids) for it in self.items)


@dataclass
class BatchResult:
    """One output or exception per item, in the batch's order, and when the batch ran."""

    outputs: list[Output | Exception]
    started: float  # time.monotonic() when the forward pass began
    # Its duration, retries of split halves included; from the previous batch's end where the
    # two overlapped (batches launched ahead), so each moment counts once.
    seconds: float
    computed_tokens: int  # tokens the kernels processed, padding included
