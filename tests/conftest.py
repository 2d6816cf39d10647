"""Shared fixtures: small random RoBERTa models with the real vocabulary, and helpers to run them."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from roberta_server.checkpoints import MNLI_LABELS, Checkpoint
from roberta_server.model import Roberta, RobertaConfig, cu_seqlens_of
from roberta_server.tokenizer import Tokenizer

# The real 50265-entry vocabulary with a small encoder: embeddings stay at 50265 x 32.
SMALL = RobertaConfig(hidden_size=32, num_layers=3, num_heads=4, ffn_size=64)


def build_model(cfg: RobertaConfig = SMALL, seed: int = 0, extra_head: bool = True) -> Roberta:
    """A random model whose every parameter matters: init_random, then unit-variance matrices,
    LayerNorm weights around 1, and non-zero biases (init_random leaves them at 1 and 0, which
    would hide a swapped weight/bias or a missing bias). Padding rows of the tables stay zero."""
    model = Roberta(cfg)
    model.register_classification_head("mnli", 3, labels=MNLI_LABELS)
    if extra_head:
        model.register_classification_head("extra", 5, inner_dim=24)
    model.init_random(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name in ("embed_tokens.weight", "embed_positions.weight"):
                p.mul_(1 / 0.02)  # unit variance rows; the padding row stays zero
            elif p.dim() == 2:
                p.mul_(1 / (0.02 * math.sqrt(p.shape[1])))
            elif name.endswith("layer_norm.weight"):
                p.copy_(1 + 0.3 * noise)
            elif name == "lm_head.bias":
                p.copy_(noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def token_seqs(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Random sequences `<s> ... </s>` of ordinary tokens (a length-1 sequence is just `<s>`)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        body = torch.randint(4, 50261, (max(n - 2, 0),), generator=gen).tolist()
        out.append(([0] + body + [2])[:n])
    return out


@torch.inference_mode()
def run_packed(model: Roberta, seqs: list[list[int]], layers=None) -> list[dict]:
    """Each sequence's {layer: [T, H]} (all layers by default), "lm": [T, V] and head logits."""
    layers = range(model.cfg.num_layers + 1) if layers is None else layers
    device = model.embed_tokens.weight.device
    lengths = [len(s) for s in seqs]
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)
    cu = cu_seqlens_of(lengths, device)
    hidden = model(flat, cu, max(lengths), layers)
    last = hidden[model.cfg.num_layers]
    lm = model.lm_logits(last) if model.lm_head is not None else None
    out = []
    for i in range(len(seqs)):
        a, b = int(cu[i]), int(cu[i + 1])
        o = {layer: h[a:b] for layer, h in hidden.items()}
        if lm is not None:
            o["lm"] = lm[a:b]
        for name, head in model.heads.items():
            o[f"head:{name}"] = head(last[a])
        out.append(o)
    return out


def max_diff(a: list[dict], b: list[dict]) -> float:
    """Largest absolute difference over every output of every sequence (same keys required)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            worst = max(worst, (x[key].double() - y[key].double()).abs().max().item())
    return worst


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="session")
def small_ckpt(tokenizer) -> Checkpoint:
    """One shared random model with an `mnli` and an `extra` head. Do not modify it."""
    return Checkpoint(build_model(), tokenizer, "random:test-small")


def export_checkpoint(model: str, out: Path, fmt: str = "fairseq") -> Path:
    """Write a checkpoint with the project's own export command."""
    subprocess.run(
        [sys.executable, "-m", "roberta_server", "export", "--model", model, "--format", fmt,
         "--out", str(out)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out
