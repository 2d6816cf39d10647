"""Reading and writing RoBERTa checkpoints: fairseq `model.pt` of every era, HuggingFace directories.

Every format is mapped onto one internal layout (`model.Roberta`'s state dict), sized from the
checkpoint's own tensors. fairseq key names changed three times (see docs in README "Checkpoints"):

| era | fairseq | prefix | attention | embedding LayerNorm |
|---|---|---|---|---|
| A | <= 0.8 | `decoder.` | fused `in_proj_weight` | `emb_layer_norm` |
| B | 0.9 | `decoder.` | `q_proj` / `k_proj` / `v_proj` | `emb_layer_norm` |
| C | 0.10 | `encoder.` | q / k / v | `emb_layer_norm` |
| D | >= 0.12 | `encoder.` | q / k / v | `layernorm_embedding` (+ `version` buffer) |

A-C store hyper-parameters in an `argparse.Namespace` (`args`), D in a `cfg` dict.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import Roberta, RobertaConfig
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

MNLI_LABELS = ["contradiction", "neutral", "entailment"]
ERAS = ("A", "B", "C", "D")
_SE = "encoder.sentence_encoder."


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or of an unsupported variant."""


@dataclass
class Checkpoint:
    """A model with its tokenizer, and where it came from."""

    model: Roberta
    tokenizer: Tokenizer
    source: str  # "fairseq:<path>", "huggingface:<path>", "random:<size>"


# --------------------------------------------------------------------------------------------
# fairseq


def _to_era_d(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename any era's keys to era D's, as fairseq's own upgrade_state_dict_named does."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("decoder."):
            key = "encoder." + key[len("decoder.") :]
        key = key.replace(".emb_layer_norm.", ".layernorm_embedding.")
        key = key.replace(".layer_norms.0.", ".self_attn_layer_norm.")
        key = key.replace(".layer_norms.1.", ".final_layer_norm.")
        if key.endswith("self_attn.in_proj_weight") or key.endswith("self_attn.in_proj_bias"):
            base, kind = key.rsplit(".in_proj_", 1)
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3), strict=True):
                out[f"{base}.{name}.{kind}"] = chunk
            continue
        out[key] = value
    return out


def _from_era_d(state: dict[str, torch.Tensor], era: str) -> dict[str, torch.Tensor]:
    """Era D keys -> the keys of an older era (for writing checkpoints old fairseq can read)."""
    if era == "D":
        return dict(state, **{_SE + "version": torch.tensor([3.0])})
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.replace(".layernorm_embedding.", ".emb_layer_norm.")
        if era in ("A", "B") and key.startswith("encoder."):
            key = "decoder." + key[len("encoder.") :]
        out[key] = value
    if era == "A":
        for key in [k for k in out if k.endswith("self_attn.q_proj.weight")]:
            base = key[: -len(".q_proj.weight")]
            for kind in ("weight", "bias"):
                parts = [out.pop(f"{base}.{p}_proj.{kind}") for p in "qkv"]
                out[f"{base}.in_proj_{kind}"] = torch.cat(parts)
    return out


def _hparams(ckpt: dict) -> dict:
    args = ckpt.get("args")
    if args is not None:
        return vars(args)
    cfg = ckpt.get("cfg") or {}
    model = cfg.get("model") or {}
    model = vars(model) if isinstance(model, argparse.Namespace) else dict(model)
    task = cfg.get("task") or {}
    task = vars(task) if isinstance(task, argparse.Namespace) else dict(task)
    for key in ("max_positions", "tokens_per_sample", "classification_head_name"):
        model.setdefault(key, task.get(key))
    return model


def _config_from_shapes(state: dict[str, torch.Tensor], hp: dict, eps: float) -> RobertaConfig:
    emb = state.get(_SE + "embed_tokens.weight")
    pos = state.get(_SE + "embed_positions.weight")
    if emb is None or pos is None:
        raise CheckpointError("not a RoBERTa checkpoint: no sentence_encoder embeddings found")
    layers = {int(k[len(_SE + "layers.") :].split(".")[0]) for k in state if ".layers." in k}
    hidden = emb.shape[1]
    heads = hp.get("encoder_attention_heads") or {768: 12, 1024: 16, 1280: 16}.get(hidden)
    if heads is None:
        raise CheckpointError("the checkpoint does not say its number of attention heads")
    max_positions = hp.get("max_positions") or hp.get("tokens_per_sample") or pos.shape[0] - 2
    return RobertaConfig(
        vocab_size=emb.shape[0],
        hidden_size=hidden,
        num_layers=len(layers),
        num_heads=int(heads),
        ffn_size=state[_SE + "layers.0.fc1.weight"].shape[0],
        max_positions=min(int(max_positions), pos.shape[0] - 2),
        layer_norm_eps=eps,
    )


def _check_supported(state: dict[str, torch.Tensor], hp: dict) -> None:
    if _SE + "layer_norm.weight" in state:
        raise CheckpointError("pre-LN RoBERTa variants (roberta_prenorm) are not supported")
    activation = hp.get("activation_fn") or "gelu"
    if activation != "gelu":
        raise CheckpointError(f"activation {activation!r} is not supported (RoBERTa uses gelu)")
    lm_w = state.get("encoder.lm_head.weight")
    emb = state[_SE + "embed_tokens.weight"]
    if lm_w is not None and not torch.equal(lm_w, emb):
        raise CheckpointError("untied LM head weights (untie_weights_roberta) are not supported")


def _internal_from_era_d(state: dict[str, torch.Tensor], num_layers: int) -> dict:
    out = {
        "embed_tokens.weight": state[_SE + "embed_tokens.weight"],
        "embed_positions.weight": state[_SE + "embed_positions.weight"],
        "embed_layer_norm.weight": state[_SE + "layernorm_embedding.weight"],
        "embed_layer_norm.bias": state[_SE + "layernorm_embedding.bias"],
    }
    for i in range(num_layers):
        p = f"{_SE}layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{p}self_attn.{n}_proj.{kind}"] for n in "qkv"]
            out[f"layers.{i}.qkv.{kind}"] = torch.cat(qkv)
            out[f"layers.{i}.out_proj.{kind}"] = state[f"{p}self_attn.out_proj.{kind}"]
            out[f"layers.{i}.attn_layer_norm.{kind}"] = state[f"{p}self_attn_layer_norm.{kind}"]
            for name in ("fc1", "fc2", "final_layer_norm"):
                out[f"layers.{i}.{name}.{kind}"] = state[f"{p}{name}.{kind}"]
    if "encoder.lm_head.bias" in state:
        for name in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias"):
            out[f"lm_head.{name}"] = state[f"encoder.lm_head.{name}"]
        out["lm_head.bias"] = state["encoder.lm_head.bias"]
    for key, value in state.items():
        if key.startswith("classification_heads."):
            out["heads." + key[len("classification_heads.") :]] = value
    return out


def _era_d_from_internal(model: Roberta) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    h = model.cfg.hidden_size
    out = {
        _SE + "embed_tokens.weight": sd["embed_tokens.weight"],
        _SE + "embed_positions.weight": sd["embed_positions.weight"],
        _SE + "layernorm_embedding.weight": sd["embed_layer_norm.weight"],
        _SE + "layernorm_embedding.bias": sd["embed_layer_norm.bias"],
    }
    for i in range(model.cfg.num_layers):
        p = f"{_SE}layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"layers.{i}.qkv.{kind}"].split(h)
            out[f"{p}self_attn.q_proj.{kind}"] = q.clone()
            out[f"{p}self_attn.k_proj.{kind}"] = k.clone()
            out[f"{p}self_attn.v_proj.{kind}"] = v.clone()
            out[f"{p}self_attn.out_proj.{kind}"] = sd[f"layers.{i}.out_proj.{kind}"]
            out[f"{p}self_attn_layer_norm.{kind}"] = sd[f"layers.{i}.attn_layer_norm.{kind}"]
            for name in ("fc1", "fc2", "final_layer_norm"):
                out[f"{p}{name}.{kind}"] = sd[f"layers.{i}.{name}.{kind}"]
    if model.lm_head is not None:
        for name in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias"):
            out[f"encoder.lm_head.{name}"] = sd[f"lm_head.{name}"]
        out["encoder.lm_head.weight"] = sd["embed_tokens.weight"]
        out["encoder.lm_head.bias"] = sd["lm_head.bias"]
    for key, value in sd.items():
        if key.startswith("heads."):
            out["classification_heads." + key[len("heads.") :]] = value
    return out


def _torch_load_fairseq(path: Path) -> dict:
    """Load a pickled fairseq checkpoint.

    `argparse.Namespace` is allow-listed so that era A-C files load with `weights_only=True`.
    Training checkpoints that pickle other objects (fairseq meters, optimizer classes) need full
    unpickling, which can run arbitrary code: it is only ever done for a file the operator named
    on the command line or in `load()`, never for anything a client sends.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; files of PyTorch < 1.6 start with a pickle protocol byte.
    if not (magic == b"PK\x03\x04" or magic[:1] == b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither zip nor pickle)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        log.warning(
            "%s needs full unpickling (%s); loading it as an operator-named file", path, exc
        )
    except (EOFError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch file: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        raise CheckpointError(
            f"{path} pickles objects of a module that is not installed ({exc.name}); "
            "re-save it with only the 'model' and 'args'/'cfg' entries"
        ) from exc
    except Exception as exc:  # a corrupt pickle can fail in any way
        raise CheckpointError(f"{path} is not a readable PyTorch file: {exc!r}") from exc


def _fairseq_head_labels(directory: Path, name: str, num_classes: int, hp: dict) -> list[str]:
    if name == "mnli" and num_classes == 3:
        return list(MNLI_LABELS)
    label_dict = directory / "label" / "dict.txt"
    if label_dict.is_file() and name == (
        hp.get("classification_head_name") or "sentence_classification_head"
    ):
        labels = [line.rsplit(" ", 1)[0] for line in label_dict.read_text().splitlines() if line]
        if len(labels) == num_classes:
            return labels
    return [str(i) for i in range(num_classes)]


def load_fairseq(path: str | Path) -> Checkpoint:
    """Load a fairseq `model.pt` (or a directory holding one) and the `dict.txt` beside it."""
    path = Path(path)
    model_file = path / "model.pt" if path.is_dir() else path
    directory = model_file.parent
    if not model_file.is_file():
        raise CheckpointError(f"no fairseq checkpoint at {model_file}")
    dict_file = next(
        (p for p in (directory / "dict.txt", directory / "input0" / "dict.txt") if p.is_file()),
        None,
    )
    if dict_file is None:
        raise CheckpointError(f"no dict.txt next to {model_file} (nor in input0/)")
    ckpt = _torch_load_fairseq(model_file)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{model_file} has no 'model' entry: not a fairseq checkpoint")
    hp = _hparams(ckpt)
    state = _to_era_d(ckpt["model"])
    try:
        cfg = _config_from_shapes(state, hp, eps=1e-5)  # first: it says "not a RoBERTa checkpoint"
        _check_supported(state, hp)
        internal = _internal_from_era_d(state, cfg.num_layers)
    except KeyError as exc:
        raise CheckpointError(
            f"{model_file} lacks {exc.args[0]!r}: an incomplete or non-RoBERTa checkpoint"
        ) from exc
    model = _build(cfg, internal)
    for name, head in model.heads.items():
        model.head_labels[name] = _fairseq_head_labels(directory, name, head.num_classes, hp)
    try:
        tokenizer = Tokenizer.from_fairseq(dict_file)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"bad dictionary {dict_file}: {exc}") from exc
    _check_vocab(tokenizer, cfg)
    return Checkpoint(model, tokenizer, f"fairseq:{model_file}")


def save_fairseq(ckpt: Checkpoint, directory: str | Path, era: str = "D") -> Path:
    """Write `model.pt` + `dict.txt` as fairseq of the given era saves them."""
    if era not in ERAS:
        raise ValueError(f"era must be one of {ERAS}, got {era!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = ckpt.model.cfg
    arch = {1024: "roberta_large"}.get(cfg.hidden_size, "roberta_base")
    hp = {
        "arch": arch,
        "encoder_layers": cfg.num_layers,
        "encoder_embed_dim": cfg.hidden_size,
        "encoder_ffn_embed_dim": cfg.ffn_size,
        "encoder_attention_heads": cfg.num_heads,
        "activation_fn": "gelu",
        "pooler_activation_fn": "tanh",
        "max_positions": cfg.max_positions,
        "encoder_normalize_before": False,
        "untie_weights_roberta": False,
    }
    state = _from_era_d(_era_d_from_internal(ckpt.model), era)
    if era == "D":
        payload = {
            "args": None,
            "cfg": {
                "model": dict(hp, _name=arch),
                "task": {"_name": "masked_lm", "tokens_per_sample": cfg.max_positions},
            },
            "model": state,
        }
    else:
        payload = {"args": argparse.Namespace(task="masked_lm", **hp), "model": state}
    torch.save(payload, directory / "model.pt")
    ckpt.tokenizer.save_fairseq(directory)
    return directory


# --------------------------------------------------------------------------------------------
# HuggingFace

_HF_LAYER = {
    "attention.output.dense": "out_proj",
    "attention.output.LayerNorm": "attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "final_layer_norm",
}


def _read_hf_state(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        try:
            return load_file(directory / "model.safetensors")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(
                f"{directory / 'model.safetensors'} is not a readable safetensors file: {exc}"
            ) from exc
    if (directory / "pytorch_model.bin").is_file():
        try:
            return torch.load(
                directory / "pytorch_model.bin", map_location="cpu", weights_only=True
            )
        except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as exc:
            raise CheckpointError(
                f"{directory / 'pytorch_model.bin'} is not a readable weights file: {exc}"
            ) from exc
    raise CheckpointError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def _hf_head_name(config: dict) -> str:
    labels = {str(v).lower() for v in (config.get("id2label") or {}).values()}
    return "mnli" if labels == set(MNLI_LABELS) else "classifier"


def load_hf(directory: str | Path) -> Checkpoint:
    """Load a HuggingFace RoBERTa directory (config.json, weights, vocab.json, merges.txt)."""
    try:
        return _load_hf(Path(directory))
    except KeyError as exc:
        raise CheckpointError(
            f"{directory} lacks {exc.args[0]!r}: an incomplete or non-RoBERTa checkpoint"
        ) from exc


def _load_hf(directory: Path) -> Checkpoint:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / 'config.json'} is unreadable: {exc}") from exc
    if config.get("model_type", "roberta") != "roberta":
        raise CheckpointError(f"model_type {config.get('model_type')!r} is not roberta")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"hidden_act {config['hidden_act']!r} is not supported")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError("only absolute position embeddings are supported")
    if config.get("pad_token_id", 1) != 1:
        raise CheckpointError("only pad_token_id 1 (RoBERTa's) is supported")
    raw = _read_hf_state(directory)
    state = {k[len("roberta.") :] if k.startswith("roberta.") else k: v for k, v in raw.items()}
    emb = state["embeddings.word_embeddings.weight"]
    pos = state["embeddings.position_embeddings.weight"].clone()
    # RoBERTa's single token-type row is added to every token; folding it into the position table
    # keeps third-party checkpoints whose row is not zero exact.
    token_type = state.get("embeddings.token_type_embeddings.weight")
    if token_type is not None:
        pos += token_type[0]
    cfg = RobertaConfig(
        vocab_size=emb.shape[0],
        hidden_size=emb.shape[1],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        ffn_size=config["intermediate_size"],
        max_positions=pos.shape[0] - 2,
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
    )
    internal = {
        "embed_tokens.weight": emb,
        "embed_positions.weight": pos,
        "embed_layer_norm.weight": state["embeddings.LayerNorm.weight"],
        "embed_layer_norm.bias": state["embeddings.LayerNorm.bias"],
    }
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            parts = [state[f"{p}attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
            internal[f"layers.{i}.qkv.{kind}"] = torch.cat(parts)
            for hf, ours in _HF_LAYER.items():
                internal[f"layers.{i}.{ours}.{kind}"] = state[f"{p}{hf}.{kind}"]
    if "lm_head.dense.weight" in state:
        for name in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias"):
            internal[f"lm_head.{name}"] = state[f"lm_head.{name}"]
        internal["lm_head.bias"] = state.get("lm_head.bias", state.get("lm_head.decoder.bias"))
    head = _hf_head_name(config)
    if "classifier.out_proj.weight" in state:
        for name in ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"):
            internal[f"heads.{head}.{name}"] = state[f"classifier.{name}"]
    model = _build(cfg, internal)
    if head in model.heads:
        id2label = config.get("id2label") or {}
        n = model.heads[head].num_classes
        labels = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(n)]
        model.head_labels[head] = [x.lower() if head == "mnli" else x for x in labels]
    try:
        tokenizer = Tokenizer.from_hf(directory / "vocab.json", directory / "merges.txt")
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"bad vocab.json / merges.txt in {directory}: {exc}") from exc
    _check_vocab(tokenizer, cfg)
    return Checkpoint(model, tokenizer, f"huggingface:{directory}")


def save_hf(ckpt: Checkpoint, directory: str | Path) -> Path:
    """Write a HuggingFace directory that `transformers` loads as RobertaForMaskedLM and, when the
    model has a classification head, RobertaForSequenceClassification (HF holds one head: `mnli`
    if present, else the first by name)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, cfg = ckpt.model, ckpt.model.cfg
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    h = cfg.hidden_size
    out = {
        "roberta.embeddings.word_embeddings.weight": sd["embed_tokens.weight"],
        "roberta.embeddings.position_embeddings.weight": sd["embed_positions.weight"],
        "roberta.embeddings.token_type_embeddings.weight": torch.zeros(
            1, h, dtype=sd["embed_tokens.weight"].dtype
        ),
        "roberta.embeddings.LayerNorm.weight": sd["embed_layer_norm.weight"],
        "roberta.embeddings.LayerNorm.bias": sd["embed_layer_norm.bias"],
    }
    for i in range(cfg.num_layers):
        p = f"roberta.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip(
                ("query", "key", "value"), sd[f"layers.{i}.qkv.{kind}"].split(h), strict=True
            ):
                out[f"{p}attention.self.{name}.{kind}"] = part.contiguous()
            for hf, ours in _HF_LAYER.items():
                out[f"{p}{hf}.{kind}"] = sd[f"layers.{i}.{ours}.{kind}"]
    architectures = []
    if model.lm_head is not None:
        architectures.append("RobertaForMaskedLM")
        for name in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias"):
            out[f"lm_head.{name}"] = sd[f"lm_head.{name}"]
        out["lm_head.bias"] = sd["lm_head.bias"]
    config = {
        "model_type": "roberta",
        "architectures": architectures,
        "vocab_size": cfg.vocab_size,
        "hidden_size": h,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.ffn_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": cfg.position_rows,
        "type_vocab_size": 1,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "position_embedding_type": "absolute",
        "torch_dtype": str(sd["embed_tokens.weight"].dtype).replace("torch.", ""),
    }
    if model.heads:
        head = "mnli" if "mnli" in model.heads else sorted(model.heads)[0]
        if len(model.heads) > 1:
            log.warning("HF holds one classifier: saving head %r, dropping the others", head)
        for name in ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"):
            out[f"classifier.{name}"] = sd[f"heads.{head}.{name}"]
        labels = model.head_labels[head]
        labels = [x.upper() for x in labels] if head == "mnli" else labels
        config["architectures"].append("RobertaForSequenceClassification")
        config["id2label"] = {str(i): x for i, x in enumerate(labels)}
        config["label2id"] = {x: i for i, x in enumerate(labels)}
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    ckpt.tokenizer.save_hf(directory)
    ckpt.tokenizer.save_fairseq(directory)
    return directory


# --------------------------------------------------------------------------------------------


def _build(cfg: RobertaConfig, internal: dict[str, torch.Tensor]) -> Roberta:
    model = Roberta(cfg, with_lm_head="lm_head.bias" in internal)
    heads = {k.split(".")[1] for k in internal if k.startswith("heads.")}
    for name in sorted(heads):
        out_w = internal[f"heads.{name}.out_proj.weight"]
        model.register_classification_head(name, out_w.shape[0], inner_dim=out_w.shape[1])
    try:
        missing, unexpected = model.load_state_dict(
            {k: v.float() for k, v in internal.items()}, strict=False
        )
    except RuntimeError as exc:  # size mismatches
        raise CheckpointError(f"checkpoint tensors do not fit the model: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match: missing {missing}, extra {unexpected}")
    return model.eval()


def _check_vocab(tokenizer: Tokenizer, cfg: RobertaConfig) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"the dictionary has {tokenizer.vocab_size} symbols but the embedding only "
            f"{cfg.vocab_size} rows"
        )


def random_checkpoint(size: str, seed: int = 0) -> Checkpoint:
    """A deterministic random-weight model of a standard shape, with the real vocabulary and a
    3-class `mnli` head. Its outputs mean nothing; it exists to run and test offline."""
    from .model import SIZES

    if size not in SIZES:
        raise CheckpointError(f"unknown random model size {size!r}; choose from {sorted(SIZES)}")
    tokenizer = Tokenizer.default()
    cfg = SIZES[size]
    if cfg.vocab_size != tokenizer.vocab_size:
        raise CheckpointError("the packaged vocabulary does not match the standard shapes")
    model = Roberta(cfg)
    model.register_classification_head("mnli", 3, labels=MNLI_LABELS)
    model.init_random(seed)
    log.warning(
        "random:%s is an UNTRAINED model with random weights: its outputs mean nothing", size
    )
    return Checkpoint(model.eval(), tokenizer, f"random:{size}")


def load_checkpoint(spec: str) -> Checkpoint:
    """`random:tiny|base|large`, a named model (downloaded once), or a path to a fairseq
    `model.pt` / its folder, or a HuggingFace folder."""
    from .download import NAMED_MODELS, fetch

    if spec.startswith("random:"):
        return random_checkpoint(spec.split(":", 1)[1])
    if spec in NAMED_MODELS:
        return load_fairseq(fetch(spec))
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf(path)
    if path.exists():
        return load_fairseq(path)
    raise CheckpointError(
        f"{spec!r} is neither a named model ({', '.join(NAMED_MODELS)}), nor random:SIZE, "
        "nor an existing path"
    )
