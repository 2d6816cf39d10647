"""Client SDK tests that need no model: tensor encoding, input conversion, and both clients and the
CLI against an in-process fake of the Roberta service."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import roberta_client
from roberta_client import (
    DTYPE_NAMES,
    DTYPES,
    AsyncRobertaClient,
    ClientConfig,
    RobertaClient,
    float32_to_bfloat16_bits,
    numpy_to_tensor,
    parse_dtype,
    tensor_to_numpy,
    to_input,
)
from roberta_client._proto.roberta.v1 import roberta_pb2, roberta_pb2_grpc
from roberta_client.cli import main as cli_main

# -- tensors ---------------------------------------------------------------------------------


def _buffer_owner(array: np.ndarray) -> object:
    while isinstance(array, np.ndarray):
        array = array.base
    return array


def test_float32_round_trip_is_zero_copy() -> None:
    array = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    tensor = numpy_to_tensor(array, roberta_pb2.DTYPE_FLOAT32)
    assert list(tensor.shape) == [3, 5, 7]
    assert tensor.dtype == roberta_pb2.DTYPE_FLOAT32
    assert len(tensor.data) == array.nbytes
    decoded = tensor_to_numpy(tensor)
    np.testing.assert_array_equal(decoded, array)
    assert decoded.dtype == np.dtype("<f4")
    # A view over the bytes protobuf handed out, not a copy of them.
    owner = _buffer_owner(decoded)
    assert isinstance(owner, bytes) and len(owner) == array.nbytes
    assert not decoded.flags.writeable


def test_float16_round_trip() -> None:
    values = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    tensor = numpy_to_tensor(values, "float16")
    assert len(tensor.data) == values.size * 2
    decoded = tensor_to_numpy(tensor)
    assert decoded.dtype == np.dtype("<f2")
    np.testing.assert_array_equal(decoded, values.astype(np.float16))
    assert isinstance(_buffer_owner(decoded), bytes)
    # float16 input goes through unchanged.
    np.testing.assert_array_equal(tensor_to_numpy(numpy_to_tensor(decoded, "float16")), decoded)


def _bf16_test_values() -> np.ndarray:
    rng = np.random.default_rng(2)
    specials = np.array(
        [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 3.4028235e38, -3.4028235e38,
         1e-45, -1e-45, 1.17549435e-38, 65504.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8],
        dtype=np.float32,
    )  # fmt: skip
    # Exact ties (low half 0x8000) with even and odd kept parts, and their neighbours.
    upper = rng.integers(0, 0x7F7F, size=200, dtype=np.uint32) << 16
    ties = np.concatenate([upper | 0x8000, upper | 0x18000, upper | 0x7FFF, upper | 0x8001])
    ties = np.concatenate([ties, ties | 0x80000000]).view(np.float32)
    random = (rng.standard_normal(2000) * 10.0 ** rng.integers(-40, 38, 2000)).astype(np.float32)
    return np.concatenate([specials, ties, random])


def test_bfloat16_rounding_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    values = _bf16_test_values()
    expected_bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    expected_bits = expected_bits.view(np.uint16)
    bits = float32_to_bfloat16_bits(values)
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(bits[finite], expected_bits[finite])
    # NaN stays NaN (torch's NaN bit pattern is not part of the format).
    assert np.isnan((bits[~finite].astype(np.uint32) << 16).view(np.float32)).all()

    tensor = numpy_to_tensor(values.reshape(2, -1), roberta_pb2.DTYPE_BFLOAT16)
    assert len(tensor.data) == values.size * 2
    decoded = tensor_to_numpy(tensor)
    assert decoded.dtype == np.float32 and decoded.shape == (2, values.size // 2)
    widened = torch.from_numpy(values).to(torch.bfloat16).float().numpy().reshape(2, -1)
    np.testing.assert_array_equal(decoded, widened)


def test_bfloat16_without_torch_is_round_to_nearest_even() -> None:
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even kept part, 1.0.
    values = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-9], dtype=np.float32)
    np.testing.assert_array_equal(
        float32_to_bfloat16_bits(values), np.array([0x3F80, 0x3F82, 0x3F80], dtype=np.uint16)
    )


def test_bfloat16_bits_pass_through() -> None:
    bits = np.array([[0x3F80, 0xC000], [0x7F80, 0x0001]], dtype=np.uint16)
    tensor = numpy_to_tensor(bits, "bfloat16")
    assert tensor.data == bits.astype("<u2").tobytes()
    np.testing.assert_array_equal(
        tensor_to_numpy(tensor), np.array([[1.0, -2.0], [np.inf, 2.0**-133]], dtype=np.float32)
    )
    with pytest.raises(TypeError):
        numpy_to_tensor(np.array([1, 2], dtype=np.int32), "bfloat16")


def test_tensor_shapes_and_checks() -> None:
    empty = tensor_to_numpy(numpy_to_tensor(np.zeros((0, 4), np.float32)))
    assert empty.shape == (0, 4)
    unspecified = roberta_pb2.Tensor(shape=[2], data=np.array([1, 2], "<f4").tobytes())
    np.testing.assert_array_equal(tensor_to_numpy(unspecified), [1.0, 2.0])
    # Non-contiguous and big-endian inputs are laid out as the wire format demands.
    strided = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    np.testing.assert_array_equal(tensor_to_numpy(numpy_to_tensor(strided)), strided)
    bad = roberta_pb2.Tensor(shape=[2, 3], dtype=roberta_pb2.DTYPE_FLOAT16, data=b"\0" * 10)
    with pytest.raises(ValueError, match="needs 12 bytes"):
        tensor_to_numpy(bad)


def test_dtype_names() -> None:
    assert set(DTYPES) == {"float32", "float16", "bfloat16"}
    for name, value in DTYPES.items():
        assert DTYPE_NAMES[value] == name
        assert parse_dtype(name) == parse_dtype(value) == value
    assert DTYPE_NAMES[roberta_pb2.DTYPE_UNSPECIFIED] == "float32"
    with pytest.raises(ValueError):
        parse_dtype("float64")


# -- inputs ----------------------------------------------------------------------------------


def test_to_input() -> None:
    assert to_input("Hello world!") == roberta_pb2.Input(text="Hello world!")
    pair = roberta_pb2.Input(pair=roberta_pb2.TextPair(text="a", text_pair="b"))
    assert to_input(("a", "b")) == pair
    assert to_input(["a", "b"]) == pair
    ids = roberta_pb2.Input(ids=roberta_pb2.TokenIds(ids=[0, 31414, 232, 2]))
    assert to_input([0, 31414, 232, 2]) == ids
    assert to_input(np.array([0, 31414, 232, 2], dtype=np.int32)) == ids
    assert to_input(np.array([[0, 31414, 232, 2]])) == ids
    assert to_input(ids) is ids
    torch = pytest.importorskip("torch")
    assert to_input(torch.tensor([0, 31414, 232, 2])) == ids


@pytest.mark.parametrize(
    ("item", "error"),
    [
        (np.array([1.5, 2.0]), ValueError),
        (np.zeros((2, 3), dtype=np.int64), ValueError),
        (("a", "b", "c"), TypeError),
        ({"text": "a"}, TypeError),
        (b"bytes", TypeError),
    ],
)
def test_to_input_rejects(item: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        to_input(item)  # type: ignore[arg-type]


def test_import_without_torch() -> None:
    client_dir = Path(roberta_client.__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(client_dir), env.get("PYTHONPATH")]))
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import roberta_client, roberta_client.cli\n"
        "assert roberta_client.RobertaClient and roberta_client.AsyncRobertaClient\n"
        "print(roberta_client.__version__)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_channel_options() -> None:
    config = ClientConfig(max_message_bytes=123, options=(("grpc.max_send_message_length", 7),))
    options = dict(config.channel_options())
    assert options["grpc.max_send_message_length"] == 7
    assert options["grpc.max_receive_message_length"] == 123
    policy = json.loads(options["grpc.service_config"])["methodConfig"][0]["retryPolicy"]
    assert policy["maxAttempts"] == 4 and policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "grpc.service_config" not in dict(ClientConfig(retry=False).channel_options())


# -- clients against a fake server -----------------------------------------------------------

_LAYERS = 3  # embedding output + 2 layers
_HIDDEN = 4
_MAX_POSITIONS = 8
_MAX_ITEMS = 3


class FakeRoberta(roberta_pb2_grpc.RobertaServicer):
    """Whitespace "tokenizer" and arithmetic "features", enough to check what the client does."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.words: dict[int, str] = {}
        self.heads = {"mnli": ["contradiction", "neutral", "entailment"]}
        self.calls: list[tuple[str, int, dict[str, str]]] = []
        self._lock = threading.Lock()

    def _record(self, method: str, items: int, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls.append((method, items, dict(context.invocation_metadata())))

    def _bpe(self, text: str) -> list[int]:
        with self._lock:
            for word in text.split():
                if word not in self.vocab:
                    self.vocab[word] = 10 + len(self.vocab)
                    self.words[self.vocab[word]] = word
            return [self.vocab[word] for word in text.split()]

    def _encode(
        self, item: roberta_pb2.Input, options: roberta_pb2.EncodeOptions, context
    ) -> tuple[list[int], bool]:
        kind = item.WhichOneof("kind")
        if kind == "ids":
            ids = list(item.ids.ids)
        elif kind == "pair":
            separator = [] if options.no_separator else [2]
            ids = [0, *self._bpe(item.pair.text), 2, *separator, *self._bpe(item.pair.text_pair), 2]
        else:
            ids = [0, *self._bpe(item.text), 2]
        if len(ids) <= _MAX_POSITIONS:
            return ids, False
        if not options.truncate:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(ids)} > {_MAX_POSITIONS}")
        return [*ids[: _MAX_POSITIONS - 1], 2], True

    def Tokenize(self, request, context):
        self._record("Tokenize", len(request.inputs), context)
        results = []
        for item in request.inputs:
            if item.WhichOneof("kind") == "ids":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Tokenize takes texts")
            ids, truncated = self._encode(item, request.options, context)
            tokens = [self.words.get(i, "</s>" if i == 2 else "<s>") for i in ids]
            results.append(
                roberta_pb2.Tokenization(
                    ids=ids, tokens=tokens, special=[i in (0, 2) for i in ids], truncated=truncated
                )
            )
        return roberta_pb2.TokenizeResponse(results=results)

    def Decode(self, request, context):
        self._record("Decode", len(request.sequences), context)
        results = []
        for sequence in request.sequences:
            ids = list(sequence.ids)
            if ids and ids[0] == 0:
                ids = ids[1:]
            pieces, current = [], []
            for position, token in enumerate(ids):
                current.append(token)
                if token == 2 and position + 1 < len(ids) and ids[position + 1] == 2:
                    pieces.append(current)
                    current = []
            pieces.append(current)
            segments = [" ".join(self.words[i] for i in piece if i > 2) for piece in pieces]
            results.append(roberta_pb2.DecodedText(segments=segments))
        return roberta_pb2.DecodeResponse(results=results)

    @staticmethod
    def hidden(ids: list[int]) -> np.ndarray:
        """The fake's [layers, T, H] hidden states of a sequence."""
        layer = np.arange(_LAYERS, dtype=np.float32)[:, None, None] * 100
        token = np.asarray(ids, dtype=np.float32)[None, :, None]
        return layer + token + np.arange(_HIDDEN, dtype=np.float32) / 8

    def ExtractFeatures(self, request, context):
        self._record("ExtractFeatures", len(request.inputs), context)
        options = request.options
        if options.all_layers:
            layers = list(range(_LAYERS))
        else:
            layers = [layer % _LAYERS for layer in options.layers] or [_LAYERS - 1]
        results = []
        for item in request.inputs:
            ids, truncated = self._encode(item, options.encode, context)
            hidden = self.hidden(ids)[layers]
            if options.pooling == roberta_pb2.POOLING_CLS:
                hidden = hidden[:, 0]
            elif options.pooling == roberta_pb2.POOLING_MEAN:
                hidden = hidden.mean(axis=1)
            tensor = numpy_to_tensor(hidden, options.dtype or roberta_pb2.DTYPE_FLOAT32)
            results.append(
                roberta_pb2.Features(
                    tensor=tensor, layers=layers, num_tokens=len(ids), truncated=truncated
                )
            )
        return roberta_pb2.ExtractFeaturesResponse(results=results)

    def Classify(self, request, context):
        self._record("Classify", len(request.inputs), context)
        if request.head not in self.heads:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no head {request.head!r}")
        labels = self.heads[request.head]
        results = []
        for item in request.inputs:
            ids, truncated = self._encode(item, request.options, context)
            logits = np.arange(len(labels), dtype=np.float32) * len(ids) / 10
            log_probs = logits - np.log(np.exp(logits).sum())
            index = int(np.argmax(logits))
            results.append(
                roberta_pb2.Classification(
                    logits=logits,
                    log_probs=log_probs,
                    label_index=index,
                    label=labels[index],
                    truncated=truncated,
                )
            )
        return roberta_pb2.ClassifyResponse(results=results)

    def FillMask(self, request, context):
        self._record("FillMask", len(request.texts), context)
        results = []
        for text in request.texts:
            if text.count("<mask>") != 1:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "need exactly one <mask>")
            masked = " <mask>" if " <mask>" in text else "<mask>"
            candidates = [
                roberta_pb2.MaskCandidate(
                    sequence=text.replace(masked, f" w{k}"),
                    score=1 / (k + 2),
                    token=f" w{k}",
                    token_id=100 + k,
                )
                for k in range(request.topk or 5)
            ]
            results.append(roberta_pb2.FillMaskResult(candidates=candidates))
        return roberta_pb2.FillMaskResponse(results=results)

    def RegisterClassificationHead(self, request, context):
        self._record("RegisterClassificationHead", 1, context)
        labels = list(request.labels) or [str(i) for i in range(request.num_classes)]
        self.heads[request.name] = labels
        head = roberta_pb2.HeadInfo(name=request.name, num_classes=len(labels), labels=labels)
        return roberta_pb2.RegisterClassificationHeadResponse(head=head)

    def GetModelInfo(self, request, context):
        self._record("GetModelInfo", 0, context)
        return roberta_pb2.ModelInfo(
            name="fake",
            hidden_size=_HIDDEN,
            num_layers=_LAYERS - 1,
            max_positions=_MAX_POSITIONS,
            heads=[
                roberta_pb2.HeadInfo(name=name, num_classes=len(labels), labels=labels)
                for name, labels in sorted(self.heads.items())
            ],
            limits=roberta_pb2.ServerLimits(
                max_batch_tokens=1 << 40, max_items_per_request=_MAX_ITEMS
            ),
        )


@pytest.fixture(scope="module")
def fake_server():
    servicer = FakeRoberta()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    roberta_pb2_grpc.add_RobertaServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def fake(fake_server):
    servicer, target = fake_server
    servicer.calls.clear()
    return servicer, target


def test_hub_interface(fake) -> None:
    servicer, target = fake
    with RobertaClient(target, timeout=10, metadata=[("x-token", "secret")]) as roberta:
        tokens = roberta.encode("Hello world!")
        assert tokens.dtype == np.int64 and tokens.ndim == 1
        hello, world = servicer.vocab["Hello"], servicer.vocab["world!"]
        assert tokens.tolist() == [0, hello, world, 2]
        assert roberta.decode(tokens) == "Hello world!"

        pair = roberta.encode("Hello world!", "Bye")
        bye = servicer.vocab["Bye"]
        assert pair.tolist() == [0, hello, world, 2, 2, bye, 2]
        assert roberta.decode(pair) == ["Hello world!", "Bye"]
        assert roberta.encode("a", "b", no_separator=True).tolist()[-3:] == [
            2,
            servicer.vocab["b"],
            2,
        ]
        # Three sentences are spliced from single encodings, as fairseq's BPE does them.
        triple = roberta.encode("Hello", "Bye", "Hello", no_separator=False)
        h = servicer.vocab["Hello"]
        assert triple.tolist() == [0, h, 2, 2, bye, 2, 2, h, 2]
        assert roberta.encode("Hello", "Bye", "Hello", no_separator=True).tolist() == [
            0, h, 2, bye, 2, h, 2,
        ]  # fmt: skip

        last = roberta.extract_features(tokens)
        assert last.shape == (1, 4, _HIDDEN) and last.dtype == np.float32
        np.testing.assert_array_equal(last[0], FakeRoberta.hidden(tokens.tolist())[-1])
        all_layers = roberta.extract_features(tokens.reshape(1, -1), return_all_hiddens=True)
        assert len(all_layers) == _LAYERS
        assert all(layer.shape == (1, 4, _HIDDEN) for layer in all_layers)
        np.testing.assert_array_equal(all_layers[-1], last)

        log_probs = roberta.predict("mnli", tokens)
        assert log_probs.shape == (1, 3)
        np.testing.assert_allclose(np.exp(log_probs).sum(), 1.0, rtol=1e-6)
        logits = roberta.predict("mnli", tokens, return_logits=True)
        np.testing.assert_allclose(logits[0], [0.0, 0.4, 0.8], rtol=1e-6)

        head = roberta.register_classification_head("new_task", num_classes=2)
        assert head == {"name": "new_task", "num_classes": 2, "labels": ["0", "1"]}
        assert roberta.predict("new_task", tokens).shape == (1, 2)

        filled = roberta.fill_mask("The first Star wars movie came out in <mask>", topk=3)
        assert filled[0] == ("The first Star wars movie came out in w0", 0.5, " w0")
        assert len(filled) == 3
    assert all(metadata.get("x-token") == "secret" for _, _, metadata in servicer.calls)


def test_hub_errors_map_to_python_exceptions(fake) -> None:
    _, target = fake
    with RobertaClient(target, timeout=10) as roberta:
        with pytest.raises(ValueError, match="> 8") as raised:
            roberta.extract_features(list(range(20)))
        assert raised.value.__cause__.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(KeyError, match="no head"):
            roberta.predict("missing", [0, 2])
        with pytest.raises(ValueError, match="exactly one"):
            roberta.fill_mask("no mask here")
        # The list forms leave the RpcError alone.
        with pytest.raises(grpc.RpcError) as raised:
            roberta.classify("missing", ["a"])
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(TypeError):
            roberta.encode_batch("not a list")


def test_lists_split_into_requests(fake) -> None:
    servicer, target = fake
    texts = [" ".join(["w"] * (n % 6 + 1)) for n in range(7)]  # up to 8 tokens, the fake's max
    with RobertaClient(target, timeout=10) as roberta:
        encoded = roberta.encode_batch(texts)
        assert [len(ids) for ids in encoded] == [n % 6 + 3 for n in range(7)]
        tokenize_calls = [items for method, items, _ in servicer.calls if method == "Tokenize"]
        # Up to four requests are in flight at once, so they may arrive in any order.
        assert sorted(tokenize_calls) == [1, 3, 3]
        # The limit is asked once, then remembered.
        assert [method for method, _, _ in servicer.calls].count("GetModelInfo") == 1
        assert roberta.decode_batch(encoded) == texts

        long_text = " ".join(["w"] * 20)
        features = roberta.extract_features_batch([long_text, "w"], truncate=True, all_layers=True)
        assert [f.shape for f in features] == [(_LAYERS, 8, _HIDDEN), (_LAYERS, 3, _HIDDEN)]
        pooled = roberta.extract_features_batch(
            [texts[0], ("a", "b"), [0, 5, 2]], layers=[0, -1], pooling="mean", dtype="float16"
        )
        assert [p.shape for p in pooled] == [(2, _HIDDEN)] * 3 and pooled[0].dtype == np.float16
        np.testing.assert_allclose(
            pooled[2], FakeRoberta.hidden([0, 5, 2])[[0, 2]].mean(axis=1), rtol=1e-3
        )
        cls = roberta.extract_features_batch(["a"], pooling="cls", dtype="bfloat16")
        assert cls[0].shape == (1, _HIDDEN) and cls[0].dtype == np.float32
        with pytest.raises(ValueError):
            roberta.extract_features_batch(["a"], pooling="max")

        results = roberta.classify("mnli", [*texts, long_text, ("a", "b")], truncate=True)
        assert len(results) == 9 and results[-1].label == "entailment"
        assert results[-1].truncated is False and results[-2].truncated is True
        assert results[0].logits.shape == (3,)

        filled = roberta.fill_mask_batch([f"x{i} <mask>" for i in range(5)], topk=2)
        assert [c[0][0] for c in filled] == [f"x{i} w0" for i in range(5)]
        assert roberta.encode_batch([]) == []

        info = roberta.model_info()
        assert info["name"] == "fake" and info["limits"]["max_batch_tokens"] == 1 << 40
        assert info["heads"][0]["name"] == "mnli"

    with RobertaClient(target, timeout=10, max_items_per_request=2) as roberta:
        servicer.calls.clear()
        roberta.encode_batch(texts[:5])
        assert sorted(items for _, items, _ in servicer.calls) == [1, 2, 2]


def test_async_client(fake) -> None:
    servicer, target = fake

    async def scenario() -> None:
        async with AsyncRobertaClient(target, timeout=10) as roberta:
            tokens = await roberta.encode("Hello world!")
            assert await roberta.decode(tokens) == "Hello world!"
            features = await roberta.extract_features(tokens, return_all_hiddens=True)
            assert len(features) == _LAYERS and features[0].shape == (1, 4, _HIDDEN)
            batch = await roberta.extract_features_batch([f"t{i}" for i in range(10)])
            assert [b.shape for b in batch] == [(1, 3, _HIDDEN)] * 10
            for i, array in enumerate(batch):
                assert array[0, 1, 0] == 200 + servicer.vocab[f"t{i}"]
            assert (await roberta.predict("mnli", tokens)).shape == (1, 3)
            with pytest.raises(KeyError):
                await roberta.predict("missing", tokens)
            assert len(await roberta.fill_mask("a <mask>")) == 5
            assert (await roberta.model_info())["limits"]["max_items_per_request"] == _MAX_ITEMS

    asyncio.run(scenario())
    # The split requests run concurrently, so they may reach the server in any order.
    sizes = [items for method, items, _ in servicer.calls if method == "ExtractFeatures"]
    assert sorted(sizes) == [1, 1, 3, 3, 3]


def test_cli(fake, capsys, tmp_path) -> None:
    _, target = fake
    assert cli_main(["--server", target, "info"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "fake"

    source = tmp_path / "inputs.jsonl"
    source.write_text('plain text\n\n{"text": "a", "text_pair": "b"}\n{"ids": [0, 7, 2]}\n')
    assert cli_main(["--server", target, "features", "--summary", "--input", str(source)]) == 0
    output = json.loads(capsys.readouterr().out)
    assert [entry["shape"] for entry in output] == [[1, 4, 4], [1, 6, 4], [1, 3, 4]]
    assert output[1]["input"] == ["a", "b"] and "vectors" not in output[0]

    assert cli_main(["--server", target, "features", "--pooling", "cls", "hi"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["vectors"][0]) == _HIDDEN

    assert cli_main(["--server", target, "decode", "0,10,2", "[0, 10, 2, 2, 11, 2]"]) == 0
    decoded = json.loads(capsys.readouterr().out)
    assert isinstance(decoded[0]["text"], str) and len(decoded[1]["text"]) == 2

    assert cli_main(["--server", target, "classify", "--head", "missing", "x"]) == 5  # NOT_FOUND
    assert cli_main(["--server", target, "tokenize"]) == 2


def test_cli_reads_environment(fake, capsys, monkeypatch) -> None:
    _, target = fake
    monkeypatch.setenv("ROBERTA_SERVER", target)
    monkeypatch.setenv("ROBERTA_TOPK", "2")
    assert cli_main(["fill-mask", "the <mask>"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["candidates"]) == 2
    monkeypatch.setenv("ROBERTA_SERVER", "127.0.0.1:1")
    monkeypatch.setenv("ROBERTA_TIMEOUT", "10")
    assert cli_main(["info"]) == grpc.StatusCode.UNAVAILABLE.value[0]
