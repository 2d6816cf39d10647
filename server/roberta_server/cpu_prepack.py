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
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class PrepackedLinear(nn.Linear):
    """An nn.Linear that multiplies by a oneDNN-packed copy of its weight. The parameters stay
    (state_dict and export see a plain Linear); changing them afterwards leaves the copy stale."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, "meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = _pack(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    for layer in layers:
        for name, child in list(layer.named_children()):
            if type(child) is nn.Linear:
                setattr(layer, name, PrepackedLinear(child))
    log.info("encoder linear weights packed for oneDNN", extra={"dtype": str(weight.dtype)})
    return True
