"""The Python API, named and shaped as fairseq's RobertaHubInterface.

    roberta = roberta_server.load("roberta.large")   # or a path, or "random:base"
    tokens = roberta.encode("Hello world!")
    features = roberta.extract_features(tokens)        # [1, 5, 1024]
    roberta.predict("mnli", roberta.encode(a, b)).argmax()

Inputs of different lengths given as a list run as packed batches (`extract_features_batch`,
`predict_batch`); a 2-D input is a right-padded batch as fairseq's `collate_tokens` builds it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .checkpoints import Checkpoint, load_checkpoint
from .cpu_prepack import prepack_linears
from .model import Roberta, cu_seqlens_of
from .tokenizer import Tokenizer

# Sequences of one packed batch in the batched forms: large enough to keep the matmuls efficient.
BATCH_TOKENS = 8192

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or auto, got {dtype!r}")
    return DTYPES[dtype]


def fill_mask_candidates(
    tokenizer: Tokenizer, masked_input: str, probs: Sequence[float], ids: Sequence[int]
) -> list[tuple[str, float, str, int]]:
    """fairseq's fill_mask tuples (filled text, probability, token text) plus the token id, from
    the top-k probabilities at the mask position."""
    out = []
    for p, i in zip(probs, ids, strict=True):
        token = tokenizer.token_text(i)
        if " <mask>" in masked_input:
            filled = masked_input.replace(" <mask>", token)
        else:
            filled = masked_input.replace("<mask>", token)
        out.append((filled, float(p), token, int(i)))
    return out


class RobertaHub:
    """A loaded model with fairseq's hub-interface methods."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, name: str):
        self.name = name
        self.source = ckpt.source
        self.tokenizer = ckpt.tokenizer
        self.model: Roberta = ckpt.model.to(device=device, dtype=dtype).eval()
        # After this the model's device and dtype are final: packed weights would go stale.
        self.prepacked = prepack_linears(self.model.layers)
        self.device = device
        self.dtype = dtype

    @property
    def max_positions(self) -> int:
        return self.model.cfg.max_positions

    def eval(self) -> RobertaHub:
        """Kept for fairseq's examples: the model always runs in eval mode."""
        return self

    # ---- tokenization

    def encode(
        self, sentence: str, *addl_sentences: str, no_separator: bool = False
    ) -> torch.Tensor:
        ids = self.tokenizer.encode(sentence, *addl_sentences, no_separator=no_separator)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 1:
            raise ValueError("decode takes a 1-D tensor of token ids")
        return self.tokenizer.decode(tokens.tolist())

    # ---- encoder

    def _split_batch(self, tokens: torch.Tensor | Sequence[int]) -> list[list[int]]:
        """A 1-D sequence or a right-padded 2-D batch -> one id list per sequence."""
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.size(-1) > self.max_positions:
            raise ValueError(
                f"tokens exceeds maximum length: {tokens.size(-1)} > {self.max_positions}"
            )
        pad = self.model.cfg.padding_idx
        return [row[row != pad].tolist() for row in tokens.cpu()]

    def _check(self, seqs: list[list[int]]) -> None:
        vocab = self.model.cfg.vocab_size
        for ids in seqs:
            if not ids:
                raise ValueError("empty token sequence")
            if len(ids) > self.max_positions:
                raise ValueError(
                    f"tokens exceeds maximum length: {len(ids)} > {self.max_positions}"
                )
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"token ids must be in [0, {vocab})")

    @torch.inference_mode()
    def _run(self, seqs: list[list[int]], keep_layers: Sequence[int] = ()) -> list[dict]:
        """Packed forward passes over `seqs` in length-sorted chunks; per-sequence layer outputs."""
        self._check(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        results: list[dict] = [{} for _ in seqs]
        start = 0
        while start < len(order):
            end, longest = start, 0
            while end < len(order):
                longest = max(longest, len(seqs[order[end]]))
                if end > start and longest * (end - start + 1) > BATCH_TOKENS:
                    break
                end += 1
            chunk = order[start:end]
            flat = torch.tensor(
                [t for i in chunk for t in seqs[i]], dtype=torch.long, device=self.device
            )
            lengths = [len(seqs[i]) for i in chunk]
            cu = cu_seqlens_of(lengths, self.device)
            hidden = self.model(flat, cu, max(lengths), keep_layers)
            for j, i in enumerate(chunk):
                a, b = int(cu[j]), int(cu[j + 1])
                results[i] = {layer: h[a:b] for layer, h in hidden.items()}
            start = end
        return results

    def _layers(self, return_all_hiddens: bool) -> list[int]:
        last = self.model.cfg.num_layers
        return list(range(last + 1)) if return_all_hiddens else [last]

    def extract_features_batch(
        self, sequences: Sequence[torch.Tensor | Sequence[int]], return_all_hiddens: bool = False
    ) -> list[torch.Tensor] | list[list[torch.Tensor]]:
        """Features of each sequence alone: [T_i, H] each (a list of L+1 of them with all hiddens)."""
        seqs = [torch.as_tensor(s).tolist() for s in sequences]
        layers = self._layers(return_all_hiddens)
        outs = self._run(seqs, layers)
        if return_all_hiddens:
            return [[o[layer] for layer in layers] for o in outs]
        return [o[layers[0]] for o in outs]

    def extract_features(
        self, tokens: torch.Tensor | Sequence[int], return_all_hiddens: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """[B, T, H] features (B = 1 for a 1-D input); all L+1 hidden states if asked.

        Positions that were padding in a 2-D input are zeros.
        """
        seqs = self._split_batch(tokens)
        layers = self._layers(return_all_hiddens)
        outs = self._run(seqs, layers)
        t = max(len(s) for s in seqs)
        stacked = []
        for layer in layers:
            grid = torch.zeros(len(seqs), t, self.model.cfg.hidden_size, dtype=self.dtype)
            grid = grid.to(self.device)
            for i, o in enumerate(outs):
                grid[i, : len(seqs[i])] = o[layer]
            stacked.append(grid)
        return stacked if return_all_hiddens else stacked[0]

    # ---- heads

    def register_classification_head(
        self,
        name: str,
        num_classes: int | None = None,
        embedding_size: int | None = None,
        inner_dim: int | None = None,
        labels: Sequence[str] | None = None,
        **kwargs: object,
    ) -> None:
        """Add a randomly initialised head (fairseq ignores `embedding_size`; so do we)."""
        if num_classes is None:
            raise ValueError("num_classes is required")
        self.model.register_classification_head(
            name, num_classes, inner_dim, list(labels) if labels else None
        )

    def _head(self, head: str) -> torch.nn.Module:
        if head not in self.model.heads:
            known = ", ".join(sorted(self.model.heads)) or "none"
            raise KeyError(f"unknown classification head {head!r} (known: {known})")
        return self.model.heads[head]

    @torch.inference_mode()
    def predict_batch(
        self,
        head: str,
        sequences: Sequence[torch.Tensor | Sequence[int]],
        return_logits: bool = False,
    ) -> torch.Tensor:
        """[B, num_classes] log-probabilities (or logits) for sequences of any lengths."""
        module = self._head(head)
        seqs = [torch.as_tensor(s).tolist() for s in sequences]
        last = self.model.cfg.num_layers
        cls = torch.stack([o[last][0] for o in self._run(seqs)])
        logits = module(cls)
        return logits if return_logits else F.log_softmax(logits, dim=-1)

    def predict(
        self, head: str, tokens: torch.Tensor | Sequence[int], return_logits: bool = False
    ) -> torch.Tensor:
        return self.predict_batch(head, self._split_batch(tokens), return_logits)

    @torch.inference_mode()
    def fill_mask(self, masked_input: str, topk: int = 5) -> list[tuple[str, float, str]]:
        """The `topk` most probable fillers of the single `<mask>` in `masked_input`."""
        ids = self.tokenizer.encode_masked(masked_input)
        hidden = self._run([ids])[0][self.model.cfg.num_layers]
        pos = ids.index(self.tokenizer.mask)
        probs = self.model.lm_logits(hidden[pos : pos + 1]).softmax(dim=-1)[0]
        values, index = probs.float().topk(min(topk, probs.numel()))
        cands = fill_mask_candidates(self.tokenizer, masked_input, values.tolist(), index.tolist())
        return [c[:3] for c in cands]


def load(
    name_or_path: str = "roberta.base",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
) -> RobertaHub:
    """Load a named model (`roberta.base`, `roberta.large`, `roberta.large.mnli`), a fairseq or
    HuggingFace checkpoint path, or `random:tiny|base|large`.

    `device` defaults to CUDA when available; `dtype` to float32 (`"auto"`: bfloat16 on CUDA).
    """
    dev = resolve_device(device)
    return RobertaHub(load_checkpoint(name_or_path), dev, resolve_dtype(dtype, dev), name_or_path)
