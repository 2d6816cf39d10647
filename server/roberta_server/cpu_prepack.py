"""The encoder's matmuls with weights packed once for oneDNN: half precision on the CPU.

`F.linear` on bfloat16 CPU tensors gives oneDNN a plain row-major weight, which it reorders into
its blocked layout on every call: for RoBERTa-base, 85 M weights rewritten in each forward pass,
whatever the number of tokens. Packing them once at load time made one 40-token sequence run
1.3-1.5x faster on this project's 2-core machines, and batches of 1,024-1,200 tokens 1.05-1.2x
(`bench/bench_model.py`, with and without `--plain-linears`). float32 goes through MKL and gained nothing
on large batches, so it stays as it is. The packed copies take as much memory again as those
weights: 171 MiB more resident memory for RoBERTa-base in bfloat16 (750 against 579 MiB).

PyTorch's own compiler packs weights the same way when it freezes a model on the CPU, through the
two operators used here. They are internal to PyTorch, so each load checks that they exist and
agree with `F.linear`, and keeps the plain layers otherwise.

oneDNN also picks its blocking from the row count, and some row counts get a slow plan: on an
Intel Xeon with AMX (2 cores), the FFN's output projection (3,072 -> 768) ran at 1,000-1,160
GFLOP/s for 512 to 1,280 rows, against 1,900-2,260 for 256 rows or 1,536 and more; cut into
pieces of 384 rows it ran at 1,700-1,850 throughout. Which row counts suffer depends on the CPU
and the shape, so each weight shape times both ways on the first passes of every row count it
meets and keeps the faster (`RowPlans`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)
# Rows per piece when a matmul runs in pieces; smaller inputs always run whole.
PIECE_ROWS = 384
# Timings of each way, per row count, before the faster is kept (the least of them counts, so a
# first call that compiles kernels, or a moment of other load, does not decide).
TRIALS = 3


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class RowPlans:
    """For one weight shape: whether inputs of each row count run whole or in PIECE_ROWS-row
    pieces, chosen by timing both ways TRIALS times (all layers of that shape share the trials,
    so a row count is settled within the first forward pass that has it)."""

    def __init__(self) -> None:
        self.in_pieces: dict[int, bool] = {}
        self._trials: dict[int, tuple[list[float], list[float]]] = {}

    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows <= PIECE_ROWS:
            return fn(x)
        settled = self.in_pieces.get(rows)
        if settled is not None:
            return _in_pieces(fn, x) if settled else fn(x)
        whole, pieces = self._trials.setdefault(rows, ([], []))
        try_pieces = len(pieces) < len(whole)
        started = time.perf_counter()
        out = _in_pieces(fn, x) if try_pieces else fn(x)
        (pieces if try_pieces else whole).append(time.perf_counter() - started)
        # ">=" and pop: threads sharing an in-process hub may both time the last trial.
        if len(pieces) >= TRIALS:
            self.in_pieces[rows] = min(pieces) < min(whole)
            self._trials.pop(rows, None)
        return out


def _in_pieces(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x[i : i + PIECE_ROWS]) for i in range(0, x.shape[0], PIECE_ROWS)])


class PrepackedLinear(nn.Linear):
    """An nn.Linear that multiplies by a oneDNN-packed copy of its weight. The parameters stay
    (state_dict and export see a plain Linear); changing them afterwards leaves the copy stale."""

    def __init__(self, linear: nn.Linear, plans: RowPlans | None = None):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, "meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = _pack(linear.weight)
        self.plans = plans or RowPlans()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plans.run(self._matmul, x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _packing_works(dtype: torch.dtype) -> bool:
    """Whether this PyTorch has the operators and they compute what F.linear computes."""
    if not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    x = torch.randn(5, 64, generator=gen).to(dtype)
    try:
        with torch.inference_mode():
            got = PrepackedLinear(linear)(x)
            want = F.linear(x, linear.weight, linear.bias)
    except (AttributeError, RuntimeError) as exc:
        log.warning("prepacked CPU linears unavailable (%r); using plain ones", exc)
        return False
    if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2):
        log.warning("prepacked CPU linears disagree with F.linear; using plain ones")
        return False
    return True


def prepack_linears(layers: nn.ModuleList) -> bool:
    """Replace every nn.Linear directly inside `layers` (the encoder layers of a model already on
    its device and dtype) by a PrepackedLinear, when they run in half precision on the CPU and
    the operators work. Returns whether it did."""
    weight = next(layers.parameters())
    if weight.device.type != "cpu" or weight.dtype not in HALF:
        return False
    if not _packing_works(weight.dtype):
        return False
    plans: dict[tuple[int, int], RowPlans] = {}
    for layer in layers:
        for name, child in list(layer.named_children()):
            if type(child) is nn.Linear:
                shape = (child.in_features, child.out_features)
                setattr(layer, name, PrepackedLinear(child, plans.setdefault(shape, RowPlans())))
    log.info("encoder linear weights packed for oneDNN", extra={"dtype": str(weight.dtype)})
    return True
