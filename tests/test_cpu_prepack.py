"""Prepacked oneDNN linears: used for half precision on the CPU, same results as nn.Linear,
whole or in pieces of rows, whichever a row count runs faster,
and plain layers whenever the operators are missing."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import pytest
import roberta_server
import torch
from conftest import build_model, token_seqs
from roberta_server import cpu_prepack
from roberta_server.cpu_prepack import (
    PIECE_ROWS,
    TRIALS,
    PrepackedLinear,
    RowPlans,
    prepack_linears,
)
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


def test_layers_of_one_shape_share_their_row_plans():
    model = build_model().to(torch.bfloat16)
    assert prepack_linears(model.layers)
    by_shape: dict[tuple[int, int], set[int]] = {}
    for m in _linears(model):
        by_shape.setdefault((m.in_features, m.out_features), set()).add(id(m.plans))
    assert all(len(ids) == 1 for ids in by_shape.values())
    # qkv, out_proj, fc1 and fc2 of the tiny model: four shapes (out_proj and fc2 differ by K).
    assert len({id(m.plans) for m in _linears(model)}) == len(by_shape) == 4


def test_pieces_compute_what_the_whole_matmul_does():
    linear = PrepackedLinear(nn.Linear(96, 80).to(torch.bfloat16))
    x = torch.randn(3 * PIECE_ROWS + 40, 96, generator=torch.Generator().manual_seed(3))
    x = x.to(torch.bfloat16)
    with torch.inference_mode():
        whole = linear._matmul(x)
        pieces = cpu_prepack._in_pieces(linear._matmul, x)
        # Through forward, while the row count is on trial, either way gives the same rows.
        tried = [linear(x) for _ in range(2 * TRIALS)]
    torch.testing.assert_close(pieces, whole, rtol=2**-7, atol=2**-6)
    for out in tried:
        torch.testing.assert_close(out, whole, rtol=2**-7, atol=2**-6)
    assert x.shape[0] in linear.plans.in_pieces


def _slow_when(slow: Callable[[int], bool], calls: list[int]) -> Callable:
    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        if slow(x.shape[0]):
            time.sleep(0.02)
        return x * 2

    return fn


@pytest.mark.parametrize("whole_is_slow", [True, False])
def test_each_row_count_keeps_the_faster_way(whole_is_slow):
    plans = RowPlans()
    rows = 2 * PIECE_ROWS + 1
    calls: list[int] = []
    # Either the whole matmul is slow, or each piece is (three pieces: slower in all).
    fn = _slow_when((lambda n: n == rows) if whole_is_slow else (lambda n: n < rows), calls)
    x = torch.ones(rows, 4)
    for _ in range(2 * TRIALS):
        torch.testing.assert_close(plans.run(fn, x), x * 2)
    assert plans.in_pieces == {rows: whole_is_slow}
    assert calls.count(rows) == TRIALS  # each way timed TRIALS times, alternately
    calls.clear()
    plans.run(fn, x)
    assert calls == ([PIECE_ROWS, PIECE_ROWS, 1] if whole_is_slow else [rows])


def test_small_inputs_always_run_whole():
    plans = RowPlans()
    calls: list[int] = []
    fn = _slow_when(lambda n: False, calls)
    for _ in range(2 * TRIALS):
        plans.run(fn, torch.ones(PIECE_ROWS, 4))
    assert calls == [PIECE_ROWS] * (2 * TRIALS)
    assert plans.in_pieces == {}
