"""RoBERTa (Liu et al., 2019, arXiv:1907.11692) as fairseq computes it, inference only, in plain PyTorch.

A batch is *packed*: the real tokens of all sequences are concatenated into one [N] tensor and
`cu_seqlens` ([B+1], int32) marks where each sequence starts. Linear layers, LayerNorm and GELU see
only the N real tokens. Attention uses flash varlen attention on CUDA when PyTorch has it; on the
CPU it runs once per run of equal-length sequences, on their rows; elsewhere it scatters q/k/v into
a padded [B, heads, T, d] grid for the attention kernel alone.

Checked against fairseq (`fairseq/models/roberta/model.py`, `fairseq/modules/transformer_layer.py`,
`multihead_attention.py`): post-LN layers, learned positions that start at padding_idx + 1, an
embedding LayerNorm, exact-erf GELU, a tanh classification head on `<s>`, an LM head tied to the
token embedding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # PyTorch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on the installed PyTorch
    varlen_attn = None


class NoLMHeadError(RuntimeError):
    """The model was loaded without an LM head."""


@dataclass(frozen=True)
class RobertaConfig:
    """Shape of a RoBERTa encoder; the defaults are roberta.base."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    # Longest sequence, <s> and </s> included (fairseq's `max_positions`, not the table's 514 rows).
    max_positions: int = 512
    padding_idx: int = 1
    layer_norm_eps: float = 1e-5

    @property
    def position_rows(self) -> int:
        # fairseq numbers real tokens from padding_idx + 1, so the table has two extra rows.
        return self.max_positions + self.padding_idx + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


SIZES = {
    "tiny": RobertaConfig(hidden_size=64, num_layers=2, num_heads=4, ffn_size=256),
    "base": RobertaConfig(),
    "large": RobertaConfig(hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096),
}


def gelu(x: torch.Tensor) -> torch.Tensor:
    # fairseq computes GELU in float32 for half types; PyTorch's kernels already widen bfloat16 and
    # float16 to float32 internally (tests/test_model.py checks the two agree bit for bit).
    return F.gelu(x)


def layer_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    # Statistics are accumulated in float32 for half inputs by PyTorch's LayerNorm kernels.
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


# PyTorch's CPU flash-attention kernel is fastest when the key count is a multiple of 16: for
# 12 heads of 64 in bfloat16, 40 keys took 62 us and 48 keys 49 us, 56 keys 82 us and 64 keys 54.
KEY_BLOCK = 16


@dataclass(frozen=True)
class KeySpan:
    """`count` packed sequences of `length` tokens each, side by side from row `start`: one
    attention call takes them as a batch. Each reads `keys` rows of keys and values from its own
    first row; past `length` they are the next sequence's rows, which `key_mask` ([1, 1, 1,
    keys], True for the sequence's own keys) hides: rounding the key count up to KEY_BLOCK this
    way costs no copy."""

    start: int
    count: int
    length: int
    keys: int
    key_mask: torch.Tensor | None


def key_spans(bounds: list[int], device: torch.device) -> list[KeySpan]:
    """KeySpans of packed sequences with these offsets (cu_seqlens as a host list): a span for
    each run of equal lengths, so pack sequences in length order. A call of the CPU flash kernel
    costs about 25 us however small, and the server's batches of 64-text requests (about 45
    sequences of 11-21 lengths, grouped by length) took 0.7x the attention time of one call per
    sequence in bfloat16."""
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    masks: dict[tuple[int, int], torch.Tensor] = {}
    spans = []
    i = 0
    while i < len(lengths):
        start, n = bounds[i], lengths[i]
        count = 1
        while i + count < len(lengths) and lengths[i + count] == n:
            count += 1
        i += count
        keys = -(-n // KEY_BLOCK) * KEY_BLOCK
        last_keys_end = start + (count - 1) * n + keys
        if keys == n or last_keys_end > bounds[-1]:  # aligned already, or no rows to borrow
            spans.append(KeySpan(start, count, n, n, None))
            continue
        if (n, keys) not in masks:
            masks[n, keys] = (torch.arange(keys, device=device) < n).view(1, 1, 1, keys)
        spans.append(KeySpan(start, count, n, keys, masks[n, keys]))
    return spans


def _heads(x: torch.Tensor, span: KeySpan, rows: int) -> torch.Tensor:
    """`rows` rows of each of the span's sequences in packed [N, heads, d] `x`, as one
    [count, heads, rows, d] view (4-D: the CPU flash kernel takes no 3-D inputs, and falls back
    to the unfused math path, several times slower in bfloat16)."""
    row, head, d = x.stride()
    return x.as_strided(
        (span.count, x.shape[1], rows, x.shape[2]),
        (span.length * row, head, row, d),
        x.storage_offset() + span.start * row,
    )


@dataclass
class PackedLayout:
    """How attention finds each sequence in the packed rows, built once per batch for all layers.

    Two ways without varlen kernels. On a CPU each run of equal-length sequences gets its own
    attention call on their rows (`spans`): no padding is computed. Elsewhere q/k/v are
    scattered into a padded [B, heads, T, d] grid for the kernel alone (`flat_index`,
    `key_mask`): one launch per layer.
    """

    batch_size: int
    max_len: int
    flat_index: torch.Tensor | None = None  # [N] row of each token in [B*T]
    key_mask: torch.Tensor | None = None  # [B, 1, 1, T] True for real keys
    spans: list[KeySpan] | None = None  # attention per run of equal lengths, in batch order

    @classmethod
    def build(
        cls, cu_seqlens: torch.Tensor, max_len: int, per_sequence: bool | None = None
    ) -> PackedLayout:
        """`per_sequence` defaults to True on the CPU, where small calls on the sequences' own
        rows cost far less than the padded rows they save (padded batches ran at 0.78x the rate
        of unpadded ones on the standard mix); on a GPU kernel launches cost more than the
        padding."""
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        batch_size = lengths.numel()
        if int(cu_seqlens[-1]) == batch_size * max_len:
            return cls(batch_size, max_len)  # equal lengths: the packed rows are already a grid
        if per_sequence is None:
            per_sequence = cu_seqlens.device.type == "cpu"
        if per_sequence:
            return cls(batch_size, max_len, spans=key_spans(cu_seqlens.tolist(), cu_seqlens.device))
        starts = torch.repeat_interleave(cu_seqlens[:-1], lengths)
        n = int(cu_seqlens[-1])
        offsets = torch.arange(n, device=cu_seqlens.device) - starts
        rows = torch.repeat_interleave(torch.arange(batch_size, device=cu_seqlens.device), lengths)
        flat_index = rows * max_len + offsets
        positions = torch.arange(max_len, device=cu_seqlens.device)
        key_mask = (positions[None, :] < lengths[:, None])[:, None, None, :]
        return cls(batch_size, max_len, flat_index, key_mask)


def layout_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout
) -> torch.Tensor:
    """Attention over packed [N, heads, d] inputs without varlen kernels (see PackedLayout)."""
    if layout.spans is not None:
        out = torch.empty_like(q)
        for span in layout.spans:
            qi = _heads(q, span, span.length)
            ki, vi = _heads(k, span, span.keys), _heads(v, span, span.keys)
            attn = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=span.key_mask)
            _heads(out, span, span.length).copy_(attn)
        return out
    n, heads, d = q.shape
    b, t = layout.batch_size, layout.max_len

    def to_padded(x: torch.Tensor) -> torch.Tensor:
        if layout.flat_index is None:
            return x.view(b, t, heads, d).transpose(1, 2)
        grid = x.new_zeros(b * t, heads, d)
        grid[layout.flat_index] = x
        return grid.view(b, t, heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        to_padded(q), to_padded(k), to_padded(v), attn_mask=layout.key_mask
    )
    out = out.transpose(1, 2).reshape(b * t, heads, d)
    return out if layout.flat_index is None else out[layout.flat_index]


class EncoderLayer(nn.Module):
    """One post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        # q, k and v in one matrix: one GEMM instead of three (fairseq's v0.8 `in_proj` layout).
        self.qkv = nn.Linear(h, 3 * h)
        self.out_proj = nn.Linear(h, h)
        self.attn_layer_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(h, cfg.ffn_size)
        self.fc2 = nn.Linear(cfg.ffn_size, h)
        self.final_layer_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_len: int,
        layout: PackedLayout | None,
    ) -> torch.Tensor:
        n, h = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, h // self.num_heads).unbind(1)
        # Scaling by d^-0.5 happens inside the kernels (fairseq scales q after its bias: same maths).
        if layout is None:
            attn = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
        else:
            attn = layout_attention(q, k, v, layout)
        x = layer_norm(x + self.out_proj(attn.reshape(n, h)), self.attn_layer_norm)
        x = layer_norm(x + self.fc2(gelu(self.fc1(x))), self.final_layer_norm)
        return x


class ClassificationHead(nn.Module):
    """fairseq's RobertaClassificationHead: dense -> tanh -> out_proj on the `<s>` vector."""

    def __init__(self, hidden_size: int, num_classes: int, inner_dim: int | None = None):
        super().__init__()
        self.dense = nn.Linear(hidden_size, inner_dim or hidden_size)
        self.out_proj = nn.Linear(inner_dim or hidden_size, num_classes)

    @property
    def num_classes(self) -> int:
        return self.out_proj.out_features

    def forward(self, cls_features: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(cls_features)))


class LMHead(nn.Module):
    """Masked-LM head: dense -> GELU -> LayerNorm -> tied output projection + bias."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, features: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
        x = layer_norm(gelu(self.dense(features)), self.layer_norm)
        return F.linear(x, embed_weight, self.bias)


class Roberta(nn.Module):
    """The encoder, its LM head and any number of named classification heads."""

    def __init__(self, cfg: RobertaConfig, with_lm_head: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.padding_idx)
        self.embed_positions = nn.Embedding(cfg.position_rows, cfg.hidden_size, cfg.padding_idx)
        self.embed_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        # Fine-tuned classifiers are often saved without the LM head; fill-mask needs it.
        self.lm_head = LMHead(cfg) if with_lm_head else None
        self.heads = nn.ModuleDict()
        # Class names of each head, index -> name; a head without names gets "0", "1", ...
        self.head_labels: dict[str, list[str]] = {}

    def register_classification_head(
        self,
        name: str,
        num_classes: int,
        inner_dim: int | None = None,
        labels: list[str] | None = None,
    ) -> ClassificationHead:
        """Add (or replace) a head with PyTorch's default init, as fairseq's hub method does."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels given for {num_classes} classes")
        param = self.embed_tokens.weight
        head = ClassificationHead(self.cfg.hidden_size, num_classes, inner_dim)
        head = head.to(device=param.device, dtype=param.dtype).eval()
        self.heads[name] = head
        self.head_labels[name] = list(labels) if labels else [str(i) for i in range(num_classes)]
        return head

    def forward(
        self,
        tokens: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_len: int,
        keep_layers: Iterable[int] = (),
    ) -> dict[int, torch.Tensor]:
        """Run packed sequences; return {layer: [N, H]} for `keep_layers` and the last layer.

        Layer 0 is the embedding output (fairseq's all-hiddens[0]); layer L the last layer.
        `tokens` is [N] int64, `cu_seqlens` [B+1] int32 on the same device, no `<pad>` inside.
        """
        last = self.cfg.num_layers
        keep = set(keep_layers) | {last}
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=tokens.numel())
        positions = torch.arange(tokens.numel(), device=tokens.device) - starts
        positions = positions + (self.cfg.padding_idx + 1)
        x = self.embed_tokens(tokens) + self.embed_positions(positions)
        x = layer_norm(x, self.embed_layer_norm)
        out = {0: x} if 0 in keep else {}
        use_varlen = x.is_cuda and varlen_attn is not None and x.dtype != torch.float32
        layout = None if use_varlen else PackedLayout.build(cu_seqlens, max_len)
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, cu_seqlens, max_len, layout)
            if i in keep:
                out[i] = x
        return out

    def lm_logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            raise NoLMHeadError(
                "this checkpoint has no masked-LM head, so fill-mask is unavailable"
            )
        return self.lm_head(features, self.embed_tokens.weight)

    @torch.no_grad()
    def init_random(self, seed: int) -> None:
        """Deterministic BERT-style init (normal(0, 0.02), zero biases, zero padding rows)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "layer_norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        self.embed_tokens.weight[self.cfg.padding_idx].zero_()
        self.embed_positions.weight[self.cfg.padding_idx].zero_()


def cu_seqlens_of(lengths: Iterable[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[B+1] int32 offsets of packed sequences with the given lengths."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)
