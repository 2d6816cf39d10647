"""Prepacked oneDNN linears: used for half precision on the CPU, same results as nn.Linear,
and plain layers whenever the operators are missing."""

from __future__ import annotations

import copy

import pytest
import roberta_server
import torch
from conftest import build_model, token_seqs
from roberta_server import cpu_prepack
from roberta_server.cpu_prepack import PrepackedLinear, prepack_linears
from roberta_server.model import cu_seqlens_of
from torch import nn


def _linears(model) -> list[nn.Module]:
    return [m for layer in model.layers for m in layer.children() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prepacked_model_computes_what_the_plain_one_does(dtype):
    plain = build_model(seed=7).to(dtype)
    packed = copy.deepcopy(plain)
    assert prepack_linears(packed.layers)
    linears = _linears(packed)
    assert len(linears) == 4 * packed.cfg.num_layers
    assert all(type(m) is PrepackedLinear for m in linears)
    assert packed.state_dict().keys() == plain.state_dict().keys()  # export sees plain Linears
    seqs = token_seqs([9, 30, 2, 17], seed=8)
    flat = torch.tensor([t for s in seqs for t in s])
    cu = cu_seqlens_of([len(s) for s in seqs])
    layers = range(packed.cfg.num_layers + 1)
    with torch.inference_mode():
        want = plain(flat, cu, 30, layers)
        got = packed(flat, cu, 30, layers)
    for layer in layers:
        torch.testing.assert_close(got[layer], want[layer], rtol=0, atol=0)


def test_only_half_precision_on_the_cpu_is_packed():
    assert not prepack_linears(build_model().layers)  # float32
    hub = roberta_server.load("random:tiny", "cpu", "bfloat16")
    assert hub.prepacked
    assert all(type(m) is PrepackedLinear for m in _linears(hub.model))
    assert not roberta_server.load("random:tiny", "cpu", "float32").prepacked


def test_missing_operators_keep_plain_layers(monkeypatch):
    def missing(weight):
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute")

    monkeypatch.setattr(cpu_prepack, "_pack", missing)
    model = build_model().to(torch.bfloat16)
    assert not prepack_linears(model.layers)
    assert all(type(m) is nn.Linear for m in _linears(model))
