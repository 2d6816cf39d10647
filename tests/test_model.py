"""The model and the fairseq-like hub API: seed examples, parity with HuggingFace transformers,
packed-batch invariance and half-precision numerics. Random weights, small shapes, CPU only."""

from __future__ import annotations

import logging

import pytest
import roberta_server
import torch
import torch.nn.functional as F
from conftest import SMALL, build_model, run_packed, token_seqs
from roberta_server import checkpoints
from roberta_server.hub import RobertaHub
from roberta_server.model import (
    KEY_BLOCK,
    PackedLayout,
    Roberta,
    cu_seqlens_of,
    gelu,
    layer_norm,
    layout_attention,
)
from torch import nn

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The seed examples (pytorch hub page) that need no trained weights


@pytest.fixture(scope="module")
def hub() -> RobertaHub:
    return roberta_server.load("random:tiny")


def test_encode_decode_seed_example(hub):
    tokens = hub.encode("Hello world!")
    assert tokens.dtype == torch.long
    assert tokens.tolist() == [0, 31414, 232, 328, 2]
    assert hub.decode(tokens) == "Hello world!"
    pair = hub.encode("Hello world!", "Second one.")
    assert pair[:6].tolist() == [0, 31414, 232, 328, 2, 2]
    assert hub.decode(pair) == ["Hello world!", "Second one."]


def test_extract_features_seed_example(hub):
    tokens = hub.encode("Hello world!")
    hidden = hub.model.cfg.hidden_size
    last_layer_features = hub.extract_features(tokens)
    assert last_layer_features.size() == torch.Size([1, 5, hidden])
    all_layers = hub.extract_features(tokens, return_all_hiddens=True)
    assert len(all_layers) == hub.model.cfg.num_layers + 1
    assert all(x.size() == torch.Size([1, 5, hidden]) for x in all_layers)
    assert torch.all(all_layers[-1] == last_layer_features)
    # Layer 0 is the embedding output, not a copy of the last layer.
    assert not torch.allclose(all_layers[0], all_layers[-1])


def test_extract_features_base_shapes():
    roberta = roberta_server.load("random:base")
    tokens = roberta.encode("Hello world!")
    assert roberta.extract_features(tokens).size() == torch.Size([1, 5, 768])
    all_layers = roberta.extract_features(tokens, return_all_hiddens=True)
    assert len(all_layers) == 13


def test_predict_mnli(hub):
    tokens = hub.encode(
        "Roberta is a heavily optimized version of BERT.", "Roberta is not very optimized."
    )
    logprobs = hub.predict("mnli", tokens)
    assert logprobs.shape == (1, 3)
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(1), atol=1e-6)
    assert 0 <= logprobs.argmax().item() <= 2
    logits = hub.predict("mnli", tokens, return_logits=True)
    assert torch.allclose(F.log_softmax(logits, -1), logprobs, atol=1e-6)


def test_register_classification_head(hub):
    tokens = hub.encode(
        "Roberta is a heavily optimized version of BERT.", "Roberta is based on BERT."
    )
    hub.register_classification_head("new_task", num_classes=3)
    logprobs = hub.predict("new_task", tokens)
    assert logprobs.shape == (1, 3)
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(1), atol=1e-6)
    assert not torch.equal(logprobs, hub.predict("mnli", tokens))
    with pytest.raises(KeyError, match="new_task2"):
        hub.predict("new_task2", tokens)


@pytest.mark.parametrize(
    "masked", ["The first Star wars movie came out in <mask>", "<mask> is the common currency."]
)
def test_fill_mask(hub, masked):
    topk = 5
    results = hub.fill_mask(masked, topk=topk)
    assert len(results) == topk
    probs = [p for _, p, _ in results]
    assert probs == sorted(probs, reverse=True)
    assert all(0 < p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
    for filled, _, token in results:
        assert token in filled
        old = " <mask>" if " <mask>" in masked else "<mask>"
        assert filled == masked.replace(old, token)
    # The probabilities are the softmax of the LM logits at the mask position.
    ids = hub.tokenizer.encode_masked(masked)
    pos = ids.index(hub.tokenizer.mask)
    h = run_packed(hub.model, [ids])[0]["lm"][pos]
    want_p, want_ids = h.softmax(-1).topk(topk)
    assert [t for _, _, t in results] == [hub.tokenizer.token_text(i) for i in want_ids.tolist()]
    assert probs == pytest.approx(want_p.tolist(), abs=1e-6)


def test_too_long_input_raises_fairseq_message(hub):
    tokens = torch.tensor([0] + [31414] * 548 + [2])
    with pytest.raises(ValueError, match="tokens exceeds maximum length: 550 > 512"):
        hub.extract_features(tokens)
    with pytest.raises(ValueError, match="tokens exceeds maximum length: 550 > 512"):
        hub.predict("mnli", tokens)
    # 512 tokens, `<s>` and `</s>` included, is the longest accepted input.
    assert hub.extract_features(tokens[:512]).shape == (1, 512, hub.model.cfg.hidden_size)


# ---------------------------------------------------------------------------------------------
# Parity with HuggingFace transformers (float32, random weights)

PARITY_TOL = 1e-4


@pytest.fixture(scope="module")
def hf_dir(small_ckpt, tmp_path_factory):
    return checkpoints.save_hf(small_ckpt, tmp_path_factory.mktemp("hf"))


def _hf_models(hf_dir):
    transformers = pytest.importorskip("transformers")
    kw = {"attn_implementation": "eager"}
    mlm = transformers.RobertaForMaskedLM.from_pretrained(hf_dir, **kw).float().eval()
    cls = transformers.RobertaForSequenceClassification.from_pretrained(hf_dir, **kw).float().eval()
    return mlm, cls


def _padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq collate_tokens: right-padded with pad=1, and the matching attention mask."""
    ids = torch.ones(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, (ids != 1).long()


def test_hf_parity(small_ckpt, hf_dir):
    mlm, cls = _hf_models(hf_dir)
    model = small_ckpt.model
    seqs = token_seqs([1, 2, 5, 12, 3, 40, 17], seed=11)
    seqs[3][4] = 50264  # a <mask> inside one sequence, as fill-mask feeds it
    ids, attention_mask = _padded(seqs)
    with torch.inference_mode():
        hf = mlm(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
        hf_cls = cls(input_ids=ids, attention_mask=attention_mask).logits
    ours = run_packed(model, seqs)
    errors = {}
    real = attention_mask.bool()
    for layer in range(model.cfg.num_layers + 1):
        packed = torch.cat([o[layer] for o in ours])
        errors[f"layer {layer}"] = (hf.hidden_states[layer][real] - packed).abs().max().item()
    errors["lm logits"] = (hf.logits[real] - torch.cat([o["lm"] for o in ours])).abs().max().item()
    ours_cls = torch.stack([o["head:mnli"] for o in ours])
    errors["mnli logits"] = (hf_cls - ours_cls).abs().max().item()
    log.warning("max abs error vs transformers (float32): %s", errors)
    print(f"\nmax abs error vs transformers (float32): {errors}")
    assert max(errors.values()) < PARITY_TOL, errors
    # The outputs are not trivially equal: different inputs give different logits.
    assert (ours_cls[0] - ours_cls[1]).abs().max() > 1e-2

    # fill-mask: the top-k predicted ids at the mask position.
    hf_top = hf.logits[3, 4].topk(10).indices
    assert torch.equal(ours[3]["lm"][4].topk(10).indices, hf_top)


def test_hf_parity_through_hub_api(hf_dir):
    """The padded 2-D input and fill_mask of a hub loaded from the HF folder, against transformers."""
    mlm, _ = _hf_models(hf_dir)
    roberta = roberta_server.load(str(hf_dir))
    seqs = token_seqs([3, 9, 25], seed=12)
    ids, attention_mask = _padded(seqs)
    with torch.inference_mode():
        hf = mlm(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
    all_layers = roberta.extract_features(ids, return_all_hiddens=True)
    real = attention_mask.bool()
    worst = max(
        (a[real] - b[real]).abs().max().item()
        for a, b in zip(all_layers, hf.hidden_states, strict=True)
    )
    assert worst < PARITY_TOL

    masked = "The first Star wars movie came out in <mask>"
    masked_ids = roberta.tokenizer.encode_masked(masked)
    pos = masked_ids.index(roberta.tokenizer.mask)
    with torch.inference_mode():
        logits = mlm(input_ids=torch.tensor([masked_ids])).logits[0, pos]
    want = [roberta.tokenizer.token_text(i) for i in logits.topk(5).indices.tolist()]
    assert [token for _, _, token in roberta.fill_mask(masked, topk=5)] == want


# ---------------------------------------------------------------------------------------------
# Packed batches: each sequence's outputs do not depend on what it is packed with

MIXED = [1, 2, 3, 4, 7, 16, 33, 300]


def _scaled_error(a: list[dict], b: list[dict]) -> float:
    """Max abs difference, relative to the output's own scale when above 1 (LM logits are ~30)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for key in x:
            scale = max(1.0, y[key].abs().max().item())
            worst = max(worst, (x[key].double() - y[key].double()).abs().max().item() / scale)
    return worst


def _rel_l2(a: list[dict], b: list[dict]) -> float:
    """Largest relative L2 error of `a` against `b` over the outputs (each output's values of
    all sequences taken together)."""
    worst = 0.0
    for key in b[0]:
        x = torch.cat([o[key].double().flatten() for o in a])
        y = torch.cat([o[key].double().flatten() for o in b])
        worst = max(worst, ((x - y).norm() / y.norm()).item())
    return worst


@pytest.fixture(scope="module")
def mixed_float32():
    model = build_model(seed=5)
    seqs = token_seqs(MIXED, seed=5)
    return model, seqs, run_packed(model, seqs)


def test_packed_equals_alone_float32(mixed_float32):
    model, seqs, packed = mixed_float32
    alone = [run_packed(model, [s])[0] for s in seqs]
    assert _scaled_error(packed, alone) < 1e-5
    # Equal lengths take the no-padding path of the attention.
    same = token_seqs([24] * 4, seed=6)
    assert _scaled_error(run_packed(model, same), [run_packed(model, [s])[0] for s in same]) < 1e-5
    # The batch order does not matter either.
    reordered = run_packed(model, seqs[::-1])[::-1]
    assert _scaled_error(reordered, packed) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sequence_and_padded_attention_agree(dtype):
    """Both ways of running attention without varlen kernels give the same result per sequence."""
    lengths = [3, 3, 3, 17, 1, 9, 9]
    cu = cu_seqlens_of(lengths)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(sum(lengths), 4, 8, generator=gen).to(dtype) for _ in range(3))
    per_seq = PackedLayout.build(cu, max(lengths))
    padded = PackedLayout.build(cu, max(lengths), per_sequence=False)
    # A call per run of equal lengths. Each sequence reads a multiple of KEY_BLOCK keys, the
    # rows past its own masked (the next sequence's), while there are rows to borrow: the last
    # run of 9s has no 16-row block left before the end of the batch.
    assert KEY_BLOCK == 16
    spans = [(s.start, s.count, s.length, s.keys) for s in per_seq.spans]
    assert spans == [(0, 3, 3, 16), (9, 1, 17, 32), (26, 1, 1, 16), (27, 2, 9, 9)]
    assert per_seq.spans[0].key_mask.flatten().tolist() == [True] * 3 + [False] * 13
    assert per_seq.spans[3].key_mask is None
    assert padded.spans is None
    a = layout_attention(q, k, v, per_seq)
    b = layout_attention(q, k, v, padded)
    assert a.shape == q.shape
    assert (a.float() - b.float()).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
    # And each equals plain attention over that sequence alone.
    for start, n in zip(cu[:-1].tolist(), lengths, strict=True):
        qi, ki, vi = (x[start : start + n].float().transpose(0, 1) for x in (q, k, v))
        ref = torch.softmax(qi @ ki.transpose(1, 2) / 8**0.5, -1) @ vi
        assert (a[start : start + n].float() - ref.transpose(0, 1)).abs().max() < (
            1e-5 if dtype == torch.float32 else 2e-2
        )


def test_forward_keeps_requested_layers(mixed_float32):
    model, seqs, packed = mixed_float32
    flat = torch.tensor([t for s in seqs for t in s])
    cu = cu_seqlens_of(map(len, seqs))
    with torch.inference_mode():
        out = model(flat, cu, max(MIXED), keep_layers=[1])
    assert sorted(out) == [1, model.cfg.num_layers]
    assert out[1].shape == (sum(MIXED), model.cfg.hidden_size)
    assert torch.equal(out[1][: MIXED[0]], packed[0][1])


def _half_model(dtype: torch.dtype) -> Roberta:
    model = build_model(seed=5).to(dtype)
    try:
        run_packed(model, token_seqs([3, 5]))
    except (RuntimeError, NotImplementedError) as exc:  # pragma: no cover - depends on the CPU
        pytest.skip(f"{dtype} does not run on this CPU: {exc}")
    return model


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.bfloat16, 0.03), (torch.float16, 0.005)], ids=["bf16", "fp16"]
)
def test_packed_half_precision(mixed_float32, dtype, tol):
    _, seqs, reference = mixed_float32
    model = _half_model(dtype)
    packed = run_packed(model, seqs)
    alone = [run_packed(model, [s])[0] for s in seqs]
    assert all(o[model.cfg.num_layers].dtype == dtype for o in packed)
    # Relative L2 error against float32 (bf16 keeps ~3 significant digits, fp16 ~4).
    err_packed, err_alone = _rel_l2(packed, reference), _rel_l2(alone, reference)
    print(f"\n{dtype}: relative error vs float32 packed {err_packed:.2e} alone {err_alone:.2e}")
    assert err_packed < tol and err_alone < tol
    assert _rel_l2(packed, alone) < tol


# ---------------------------------------------------------------------------------------------
# Half-type numerics of the helpers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gelu_half_equals_float32_cast_back(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8192, 64, generator=gen) * 4).to(dtype)
    assert torch.equal(gelu(x), F.gelu(x.float()).to(dtype))
    # Exact erf GELU, not the tanh approximation.
    assert not torch.equal(gelu(x), F.gelu(x.float(), approximate="tanh").to(dtype))


@pytest.mark.parametrize("width", [32, 768])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_layer_norm_half_is_float32_rounded_once(dtype, width):
    """Statistics and the affine step in float32, one rounding at the end. PyTorch's half kernels
    are not bit-identical to `F.layer_norm(x.float(), ...).to(dtype)` (another summation order
    changes the last bit of ~0.01% of the values), so the check is: every value is within one
    unit in the last place (of `dtype`) of the float32 result, plus float32's own cancellation
    error near zero. Computing the statistics or the affine step in the half type is off by
    hundreds of units there."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2048, width, generator=gen) * 3 + 1).to(dtype)
    ln = nn.LayerNorm(width, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.5 * torch.randn(width, generator=gen))
        ln.bias.copy_(torch.randn(width, generator=gen))
    ln = ln.to(dtype)
    got = layer_norm(x, ln)
    assert got.dtype == dtype
    want = F.layer_norm(x.float(), (width,), ln.weight.float(), ln.bias.float(), ln.eps)
    rounded = want.to(dtype)
    up = torch.nextafter(rounded, torch.full_like(rounded, float("inf"))).float()
    down = torch.nextafter(rounded, torch.full_like(rounded, float("-inf"))).float()
    ulp = (up - down) / 2
    assert bool(((got.float() - want).abs() <= ulp + 1e-5).all())
    assert (got != rounded).float().mean().item() < 0.01


# ---------------------------------------------------------------------------------------------
# Right-padded 2-D input (fairseq collate_tokens)


def test_padded_2d_input_equals_per_sequence(small_ckpt):
    roberta = RobertaHub(small_ckpt, torch.device("cpu"), torch.float32, "small")
    seqs = token_seqs([4, 1, 19, 7], seed=21)
    ids, attention_mask = _padded(seqs)
    all_layers = roberta.extract_features(ids, return_all_hiddens=True)
    last = roberta.extract_features(ids)
    assert last.shape == (4, 19, SMALL.hidden_size)
    assert torch.equal(all_layers[-1], last)
    singles = roberta.extract_features_batch(seqs, return_all_hiddens=True)
    for i, s in enumerate(seqs):
        alone = roberta.extract_features(torch.tensor(s), return_all_hiddens=True)
        for layer, grid in enumerate(all_layers):
            assert (grid[i, : len(s)] - alone[layer][0]).abs().max() < 1e-5
            assert (grid[i, : len(s)] - singles[i][layer]).abs().max() < 1e-5
            # Positions that were padding come back as zeros.
            assert not grid[i, len(s) :].any()
    logprobs = roberta.predict("mnli", ids)
    assert logprobs.shape == (4, 3)
    for i, s in enumerate(seqs):
        assert (logprobs[i] - roberta.predict("mnli", torch.tensor(s))[0]).abs().max() < 1e-5
    assert (roberta.predict_batch("extra", seqs) - roberta.predict("extra", ids)).abs().max() < 1e-5
