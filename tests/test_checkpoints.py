"""Checkpoint formats: fairseq model.pt of every era and HuggingFace folders, written from one
random model and read back to identical outputs; head labels; safe loading; bad files."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil

import pytest
import torch
from conftest import build_model, max_diff, run_packed, token_seqs
from roberta_server import checkpoints
from roberta_server.checkpoints import MNLI_LABELS, Checkpoint, CheckpointError
from safetensors.torch import load_file, save_file

SEQS = token_seqs([1, 6, 13, 2, 30], seed=3)


def _raw(path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_model(loaded: Checkpoint, original: Checkpoint, heads=("mnli", "extra")):
    assert loaded.model.cfg == original.model.cfg
    assert sorted(loaded.model.heads) == sorted(heads)
    want = original.model.state_dict()
    got = loaded.model.state_dict()
    assert sorted(got) == sorted(
        k for k in want if not k.startswith("heads.") or k.split(".")[1] in heads
    )
    for key, value in got.items():
        assert torch.equal(value, want[key]), key
    ours = run_packed(loaded.model, SEQS)
    ref = [
        {k: v for k, v in o.items() if not str(k).startswith("head:") or k[5:] in heads}
        for o in run_packed(original.model, SEQS)
    ]
    assert max_diff(ours, ref) <= 1e-6


@pytest.fixture(scope="module")
def written(small_ckpt, tmp_path_factory):
    """{era: folder} for A-D, and "hf"."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {
        era: checkpoints.save_fairseq(small_ckpt, root / era, era=era) for era in checkpoints.ERAS
    }
    out["hf"] = checkpoints.save_hf(small_ckpt, root / "hf")
    return out


@pytest.mark.parametrize("era", checkpoints.ERAS)
def test_fairseq_era_round_trip(small_ckpt, written, era):
    folder = written[era]
    for loaded in (
        checkpoints.load_fairseq(folder),
        checkpoints.load_fairseq(folder / "model.pt"),
        checkpoints.load_checkpoint(str(folder)),
    ):
        _assert_same_model(loaded, small_ckpt)
        assert loaded.source == f"fairseq:{folder / 'model.pt'}"
        assert loaded.model.head_labels["mnli"] == MNLI_LABELS
        assert loaded.model.head_labels["extra"] == ["0", "1", "2", "3", "4"]
        assert loaded.tokenizer.vocab_size == small_ckpt.tokenizer.vocab_size


def test_hf_round_trip(small_ckpt, written):
    for loaded in (
        checkpoints.load_hf(written["hf"]),
        checkpoints.load_checkpoint(str(written["hf"])),
    ):
        # HF holds one classifier: the mnli head is kept, "extra" is dropped.
        _assert_same_model(loaded, small_ckpt, heads=("mnli",))
        assert loaded.source.startswith("huggingface:")
        assert loaded.model.head_labels["mnli"] == MNLI_LABELS


@pytest.mark.parametrize("era", checkpoints.ERAS)
def test_era_key_names(small_ckpt, written, era):
    raw = _raw(written[era] / "model.pt")
    keys = set(raw["model"])
    h = small_ckpt.model.cfg.hidden_size
    prefix = "decoder." if era in "AB" else "encoder."
    se = prefix + "sentence_encoder."
    assert all(k.startswith((prefix, "classification_heads.")) for k in keys)
    assert {
        "classification_heads.mnli.dense.weight",
        "classification_heads.extra.out_proj.weight",
        se + "embed_tokens.weight",
        se + "embed_positions.weight",
        prefix + "lm_head.weight",
        prefix + "lm_head.bias",
        prefix + "lm_head.dense.weight",
        se + "layers.2.fc1.weight",
        se + "layers.0.self_attn.out_proj.weight",
        se + "layers.0.self_attn_layer_norm.weight",
        se + "layers.0.final_layer_norm.bias",
    } <= keys
    ln = "layernorm_embedding" if era == "D" else "emb_layer_norm"
    other_ln = "emb_layer_norm" if era == "D" else "layernorm_embedding"
    assert {se + ln + ".weight", se + ln + ".bias"} <= keys
    assert not any(other_ln in k for k in keys)
    attn = se + "layers.0.self_attn."
    if era == "A":
        assert raw["model"][attn + "in_proj_weight"].shape == (3 * h, h)
        assert raw["model"][attn + "in_proj_bias"].shape == (3 * h,)
        assert not any("q_proj" in k for k in keys)
    else:
        assert raw["model"][attn + "q_proj.weight"].shape == (h, h)
        assert {attn + "k_proj.bias", attn + "v_proj.weight"} <= keys
        assert not any("in_proj" in k for k in keys)
    assert (se + "version" in keys) == (era == "D")
    # The LM output matrix is the token embedding (tied).
    assert torch.equal(
        raw["model"][prefix + "lm_head.weight"], raw["model"][se + "embed_tokens.weight"]
    )
    if era == "D":
        assert raw["args"] is None
        assert isinstance(raw["cfg"], dict)
        assert raw["cfg"]["model"]["encoder_layers"] == small_ckpt.model.cfg.num_layers
        assert raw["cfg"]["model"]["encoder_attention_heads"] == small_ckpt.model.cfg.num_heads
    else:
        assert isinstance(raw["args"], argparse.Namespace)
        assert "cfg" not in raw
        assert raw["args"].encoder_embed_dim == h
        assert raw["args"].encoder_attention_heads == small_ckpt.model.cfg.num_heads
    assert (written[era] / "dict.txt").is_file()


def test_save_fairseq_rejects_unknown_era(small_ckpt, tmp_path):
    with pytest.raises(ValueError, match="era"):
        checkpoints.save_fairseq(small_ckpt, tmp_path, era="E")


# ---------------------------------------------------------------------------------------------
# Head labels


def test_hf_config_labels(written):
    config = json.loads((written["hf"] / "config.json").read_text())
    assert config["id2label"] == {"0": "CONTRADICTION", "1": "NEUTRAL", "2": "ENTAILMENT"}
    assert config["label2id"] == {"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2}
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.from_pretrained(written["hf"])
    assert hf_config.id2label == {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}


def test_hf_label_round_trip_and_head_name(tokenizer, tmp_path):
    model = build_model(extra_head=False)
    del model.heads["mnli"]
    model.register_classification_head("sentiment", 2, labels=["negative", "positive"])
    folder = checkpoints.save_hf(Checkpoint(model, tokenizer, "x"), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    loaded = checkpoints.load_hf(folder)
    # Not an MNLI label set: the HF classifier keeps HF's name.
    assert list(loaded.model.heads) == ["classifier"]
    assert loaded.model.head_labels["classifier"] == ["negative", "positive"]
    want = run_packed(model, SEQS[:2])[1]["head:sentiment"]
    assert torch.equal(run_packed(loaded.model, SEQS[:2])[1]["head:classifier"], want)

    # A 3-class head under roberta-large-mnli's label config (upper case) is named "mnli".
    config["id2label"] = {"0": "CONTRADICTION", "1": "NEUTRAL", "2": "ENTAILMENT"}
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    three = build_model(extra_head=False)
    folder3 = checkpoints.save_hf(Checkpoint(three, tokenizer, "x"), tmp_path / "hf3")
    (folder3 / "config.json").write_text(json.dumps(config))
    assert list(checkpoints.load_hf(folder3).model.heads) == ["mnli"]
    # transformers' default names (no id2label saved): "classifier" with LABEL_i names.
    config["id2label"] = {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    (folder3 / "config.json").write_text(json.dumps(config))
    loaded3 = checkpoints.load_hf(folder3)
    assert list(loaded3.model.heads) == ["classifier"]
    assert loaded3.model.head_labels["classifier"] == ["LABEL_0", "LABEL_1", "LABEL_2"]


def test_fairseq_label_dictionary(tokenizer, tmp_path):
    """A GLUE-style fine-tune: head `sentence_classification_head`, names from label/dict.txt."""
    model = build_model(extra_head=False)
    model.register_classification_head("sentence_classification_head", 2)
    folder = checkpoints.save_fairseq(Checkpoint(model, tokenizer, "x"), tmp_path, era="C")
    (folder / "label").mkdir()
    (folder / "label" / "dict.txt").write_text("positive 1200\nnegative 1100\n")
    loaded = checkpoints.load_fairseq(folder)
    assert loaded.model.head_labels["sentence_classification_head"] == ["positive", "negative"]
    assert loaded.model.head_labels["mnli"] == MNLI_LABELS


# ---------------------------------------------------------------------------------------------
# Safe loading: weights_only=True wherever the format allows it


@pytest.fixture
def torch_load_calls(monkeypatch):
    """Record the `weights_only` argument of every torch.load call."""
    calls = []
    real = torch.load

    def recording(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    return calls


@pytest.mark.parametrize("era", checkpoints.ERAS)
def test_fairseq_loads_weights_only(written, era, torch_load_calls, caplog):
    with caplog.at_level(logging.WARNING):
        checkpoints.load_fairseq(written[era])
    assert torch_load_calls == [True]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_hf_pytorch_model_bin(small_ckpt, written, tmp_path, torch_load_calls, caplog):
    folder = tmp_path / "hf-bin"
    shutil.copytree(written["hf"], folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with caplog.at_level(logging.WARNING):
        loaded = checkpoints.load_checkpoint(str(folder))
    assert torch_load_calls == [True]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    _assert_same_model(loaded, small_ckpt, heads=("mnli",))


def test_full_unpickling_fallback_warns(small_ckpt, written, tmp_path, caplog):
    """A training checkpoint pickling other objects still loads (an operator-named file), with a
    warning that full unpickling was needed."""
    raw = _raw(written["C"] / "model.pt")
    raw["extra_state"] = {"saved_on": datetime.date(2019, 7, 28)}
    folder = tmp_path / "train"
    folder.mkdir()
    torch.save(raw, folder / "model.pt")
    shutil.copy(written["C"] / "dict.txt", folder)
    with caplog.at_level(logging.WARNING):
        loaded = checkpoints.load_fairseq(folder)
    assert "full unpickling" in caplog.text
    _assert_same_model(loaded, small_ckpt)


# ---------------------------------------------------------------------------------------------
# Dictionaries and bad files


def test_smaller_dictionary_loads(small_ckpt, written, tmp_path):
    folder = tmp_path / "small-dict"
    shutil.copytree(written["D"], folder)
    lines = (folder / "dict.txt").read_text().splitlines(keepends=True)
    (folder / "dict.txt").write_text("".join(lines[:1000]))
    loaded = checkpoints.load_fairseq(folder)
    # 4 specials + 1000 symbols + <mask>, the embedding keeps its 50265 rows.
    assert loaded.tokenizer.vocab_size == 1005 < loaded.model.cfg.vocab_size
    assert loaded.tokenizer.mask == 1004
    _assert_same_model(loaded, small_ckpt)


def _corrupt(written, tmp_path, what: str):
    """A copy of the era D folder (or HF folder) with one defect."""
    src = written["hf" if what.startswith("hf") else "D"]
    folder = tmp_path / what
    shutil.copytree(src, folder)
    model_pt = folder / "model.pt"
    if what == "garbage":
        model_pt.write_bytes(b"this is not a checkpoint\n" * 40)
    elif what == "empty":
        model_pt.write_bytes(b"")
    elif what == "truncated":
        model_pt.write_bytes(model_pt.read_bytes()[:4096])
    elif what == "no-model-entry":
        torch.save({"args": None, "cfg": {}}, model_pt)
    elif what in ("not-roberta", "missing-key", "wrong-shape"):
        raw = _raw(model_pt)
        state = raw["model"]
        if what == "not-roberta":
            raw["model"] = {"bert.embeddings.word_embeddings.weight": torch.zeros(4, 4)}
        elif what == "missing-key":
            del state["encoder.sentence_encoder.layers.1.fc1.bias"]
        else:
            state["encoder.sentence_encoder.layers.1.fc1.bias"] = torch.zeros(7)
        torch.save(raw, model_pt)
    elif what == "bad-dict":
        (folder / "dict.txt").write_text("hello\n")
    elif what == "big-dict":
        extra = "".join(f"extra{i} 0\n" for i in range(5))
        (folder / "dict.txt").write_text((folder / "dict.txt").read_text() + extra)
    elif what == "no-dict":
        (folder / "dict.txt").unlink()
    elif what == "hf-garbage-weights":
        (folder / "model.safetensors").write_bytes(b"garbage")
    elif what == "hf-bad-config":
        (folder / "config.json").write_text("{not json")
    elif what == "hf-no-weights":
        (folder / "model.safetensors").unlink()
    elif what == "hf-missing-key":
        state = load_file(folder / "model.safetensors")
        del state["roberta.encoder.layer.0.intermediate.dense.weight"]
        save_file(state, folder / "model.safetensors")
    else:  # pragma: no cover
        raise AssertionError(what)
    return folder


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("garbage", "model.pt"),
        ("empty", "model.pt"),
        ("truncated", "model.pt"),
        ("no-model-entry", "no 'model' entry"),
        ("not-roberta", "not a RoBERTa checkpoint"),
        ("missing-key", "layers.1.fc1.bias"),
        ("wrong-shape", "fc1.bias"),
        ("bad-dict", "dict.txt"),
        ("big-dict", "50270 symbols but the embedding only 50265 rows"),
        ("no-dict", "no dict.txt"),
        ("hf-garbage-weights", "safetensors"),
        ("hf-bad-config", "config.json"),
        ("hf-no-weights", "neither model.safetensors nor pytorch_model.bin"),
        ("hf-missing-key", "intermediate.dense.weight"),
    ],
)
def test_bad_files_raise_checkpoint_error(written, tmp_path, what, message):
    folder = _corrupt(written, tmp_path, what)
    with pytest.raises(CheckpointError, match=message):
        checkpoints.load_checkpoint(str(folder))


def test_unknown_spec_is_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="neither a named model"):
        checkpoints.load_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="unknown random model size"):
        checkpoints.load_checkpoint("random:huge")
