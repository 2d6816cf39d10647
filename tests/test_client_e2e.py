"""The client SDK end to end: fairseq's hub-page examples run through `RobertaClient` against a
real server process, compared with the in-process hub; the async client; the `roberta-client` CLI;
the committed stubs; and health across model loading."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest
import roberta_server
import torch
from conftest import export_checkpoint
from grpc_health.v1 import health_pb2, health_pb2_grpc
from roberta_client import AsyncRobertaClient, RobertaClient
from roberta_client._proto.roberta.v1 import roberta_pb2 as pb
from roberta_client._proto.roberta.v1 import roberta_pb2_grpc
from roberta_server.launcher import ServerProcess

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "random:tiny"
SERVICE = "roberta.v1.Roberta"
ATOL = 1e-5
BERT = "Roberta is a heavily optimized version of BERT."
NOT_OPTIMIZED = "Roberta is not very optimized."
BASED_ON_BERT = "Roberta is based on BERT."
MASKED = "The first Star wars movie came out in <mask>"
TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Emoji 🎉 and CJK 漢字 and accents café.",
    "RoBERTa is a robustly optimized BERT pretraining approach. " * 4,
]


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", MODEL) as proc:
        proc.wait_ready()
        yield proc
        assert proc.terminate() == 0, proc.tail()


@pytest.fixture(scope="module")
def hub():
    """The in-process hub on the same deterministic random weights."""
    return roberta_server.load(MODEL, device="cpu")


@pytest.fixture(scope="module")
def roberta(server):
    with RobertaClient(server.target, timeout=60) as client:
        yield client


def close(got, want, atol=ATOL):
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, atol=atol, rtol=1e-4)


# -- the hub page, through the SDK ----------------------------------------------------------


def test_hub_page_examples(roberta, hub):
    hidden, layers = hub.model.cfg.hidden_size, hub.model.cfg.num_layers

    # Apply Byte-Pair Encoding (BPE) to input text
    tokens = roberta.encode("Hello world!")
    assert tokens.tolist() == [0, 31414, 232, 328, 2]
    assert roberta.decode(tokens) == "Hello world!"

    # Extract features (numpy arrays: `.shape` where the page uses torch's `.size()`)
    last_layer_features = roberta.extract_features(tokens)
    assert last_layer_features.shape == (1, 5, hidden)
    all_layers = roberta.extract_features(tokens, return_all_hiddens=True)
    assert len(all_layers) == layers + 1
    assert np.all(all_layers[-1] == last_layer_features)
    assert all(layer.shape == (1, 5, hidden) for layer in all_layers)

    want = hub.extract_features(hub.encode("Hello world!"), return_all_hiddens=True)
    close(last_layer_features, want[-1])
    for got, expected in zip(all_layers, want, strict=True):
        close(got, expected)

    # Sentence-pair classification
    with torch.no_grad():
        tokens = roberta.encode(BERT, NOT_OPTIMIZED)
        prediction = roberta.predict("mnli", tokens).argmax().item()
        assert prediction in range(3)
        close(roberta.predict("mnli", tokens), hub.predict("mnli", hub.encode(BERT, NOT_OPTIMIZED)))

        tokens = roberta.encode(BERT, BASED_ON_BERT)
        logprobs = roberta.predict("mnli", tokens)
        want = hub.predict("mnli", hub.encode(BERT, BASED_ON_BERT))
        close(logprobs, want)
        top2 = np.sort(want.numpy()[0])[-2:]
        if top2[1] - top2[0] > 1e-4:  # a clear winner must be the same winner
            assert logprobs.argmax().item() == want.argmax().item()

    # Register a new (randomly initialized) classification head
    head = roberta.register_classification_head("new_task", num_classes=3)
    assert head["name"] == "new_task" and head["num_classes"] == 3
    logprobs = roberta.predict("new_task", tokens)
    assert logprobs.shape == (1, 3) and logprobs.dtype == np.float32
    assert math.isclose(float(np.exp(logprobs).sum()), 1.0, rel_tol=1e-5)
    assert (logprobs <= 0).all()
    logits = roberta.predict("new_task", tokens, return_logits=True)
    close(logprobs, torch.log_softmax(torch.from_numpy(logits), dim=-1))
    assert "new_task" in {h["name"] for h in roberta.model_info()["heads"]}


def test_eval_is_a_noop_returning_the_client(roberta):
    assert roberta.eval() is roberta


def test_pair_encoding_and_decoding(roberta, hub):
    a, b = BERT, NOT_OPTIMIZED
    pair = roberta.encode(a, b)
    single_a, single_b = roberta.encode(a), roberta.encode(b)
    # <s> A </s></s> B </s>
    assert pair.tolist() == [0, *single_a[1:-1], 2, 2, *single_b[1:-1], 2]
    assert pair.tolist() == hub.encode(a, b).tolist()
    assert roberta.decode(pair) == [a, b]
    joined = roberta.encode(a, b, no_separator=True)
    assert joined.tolist() == [0, *single_a[1:-1], 2, *single_b[1:-1], 2]
    assert joined.tolist() == hub.encode(a, b, no_separator=True).tolist()
    # More than two sentences: spliced by the client, as fairseq encodes them.
    three = roberta.encode("one", "two", "three")
    assert three.tolist() == hub.encode("one", "two", "three").tolist()
    # Token ids as a [1, T] array or a torch tensor, as fairseq's methods accept.
    close(roberta.extract_features(pair[np.newaxis]), hub.extract_features(hub.encode(a, b)))
    close(roberta.predict("mnli", torch.tensor(pair)), hub.predict("mnli", hub.encode(a, b)))


def test_fill_mask(roberta, hub):
    got = roberta.fill_mask(MASKED, topk=3)
    want = hub.fill_mask(MASKED, topk=3)
    assert len(got) == 3
    for (sequence, score, token), (w_seq, w_score, w_token) in zip(got, want, strict=True):
        assert isinstance(sequence, str) and isinstance(score, float) and isinstance(token, str)
        assert sequence == MASKED.replace(" <mask>", token)
        assert (sequence, token) == (w_seq, w_token)
        assert math.isclose(score, w_score, rel_tol=1e-4)
    scores = [score for _, score, _ in got]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    assert len(roberta.fill_mask(MASKED)) == 5  # fairseq's default topk


def test_hub_errors_map_to_python_exceptions(roberta):
    tokens = roberta.encode("Hello world!")
    with pytest.raises(KeyError, match="no_such_head"):
        roberta.predict("no_such_head", tokens)
    with pytest.raises(ValueError):
        roberta.extract_features([0] + [31414] * 600 + [2])  # over max_positions
    # As in fairseq, encode returns an over-long text whole; using it is what fails.
    long_ids = roberta.encode(" ".join(["word"] * 700))
    assert len(long_ids) == 702
    with pytest.raises(ValueError, match="exceeds maximum length"):
        roberta.extract_features(long_ids)
    with pytest.raises(ValueError, match="<mask>"):
        roberta.fill_mask("no mask here")
    with pytest.raises(TypeError):
        roberta.encode_batch("a lone string")


# -- list forms ------------------------------------------------------------------------------


def test_list_forms_match_the_hub(server, hub):
    items = [*TEXTS, (BERT, NOT_OPTIMIZED)]
    hub_ids = [hub.encode(t) for t in TEXTS] + [hub.encode(BERT, NOT_OPTIMIZED)]
    # Three items per request: six items become two requests whose results must stay in order.
    with RobertaClient(server.target, timeout=60, max_items_per_request=3) as roberta:
        ids = roberta.encode_batch(items)
        assert [x.tolist() for x in ids] == [x.tolist() for x in hub_ids]
        assert roberta.decode_batch(ids) == [*TEXTS, [BERT, NOT_OPTIMIZED]]

        feats = roberta.extract_features_batch(items)
        want = hub.extract_features_batch(hub_ids)
        for got, w in zip(feats, want, strict=True):
            assert got.shape == (1, *w.shape)  # the layer axis is kept
            close(got[0], w)

        all_layers = hub.extract_features_batch(hub_ids, return_all_hiddens=True)
        picked = roberta.extract_features_batch(ids, layers=[0, -1])
        for got, w in zip(picked, all_layers, strict=True):
            close(got[0], w[0])
            close(got[1], w[-1])

        for pooling in ("cls", "mean"):
            pooled = roberta.extract_features_batch(items, pooling=pooling)
            for got, w in zip(pooled, want, strict=True):
                assert got.shape == (1, hub.model.cfg.hidden_size)
                close(got[0], w[0] if pooling == "cls" else w.mean(0))

        halves = roberta.extract_features_batch(items[:2], dtype="float16")
        assert all(h.dtype == np.float16 for h in halves)
        close(halves[0][0], want[0], atol=1e-2)

        results = roberta.classify("mnli", items)
        log_probs = hub.predict_batch("mnli", hub_ids)
        logits = hub.predict_batch("mnli", hub_ids, return_logits=True)
        for res, lp, lg in zip(results, log_probs, logits, strict=True):
            close(res.log_probs, lp)
            close(res.logits, lg)
            assert res.label_index == int(np.argmax(res.logits))
            assert res.label == ["contradiction", "neutral", "entailment"][res.label_index]
            assert not res.truncated

        masked = [MASKED, "<mask> is the capital of France.", "Hello <mask>!"]
        batched = roberta.fill_mask_batch(masked, topk=2)
        for got, text in zip(batched, masked, strict=True):
            alone = roberta.fill_mask(text, topk=2)  # batched with others: equal within float
            assert [(c[0], c[2]) for c in got] == [(c[0], c[2]) for c in alone]
            close([c[1] for c in got], [c[1] for c in alone])
        assert [c[0] for c in batched[0]] == [c[0] for c in hub.fill_mask(MASKED, topk=2)]


def test_truncation_is_reported(roberta):
    long_text = "word " * 700
    tok = roberta.tokenize([long_text], truncate=True)[0]
    assert len(tok.ids) == 512 and tok.truncated
    assert tok.ids[0] == 0 and tok.ids[-1] == 2
    (feats,) = roberta.extract_features_batch([long_text], truncate=True)
    assert feats.shape[1] == 512
    with pytest.raises(grpc.RpcError) as err:
        roberta.extract_features_batch([long_text])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- asyncio client --------------------------------------------------------------------------


def test_async_client(server, roberta, hub):
    async def main():
        async with AsyncRobertaClient(server.target, timeout=60) as client:
            tokens = await client.encode("Hello world!")
            features, logprobs, info = await asyncio.gather(
                client.extract_features(tokens),
                client.predict("mnli", await client.encode(BERT, BASED_ON_BERT)),
                client.model_info(),
            )
            batch = await client.extract_features_batch(TEXTS, pooling="mean")
            return tokens, features, logprobs, info, batch

    tokens, features, logprobs, info, batch = asyncio.run(asyncio.wait_for(main(), 60))
    assert tokens.tolist() == [0, 31414, 232, 328, 2]
    assert features.shape == (1, 5, hub.model.cfg.hidden_size)
    close(features, hub.extract_features(hub.encode("Hello world!")))
    close(logprobs, hub.predict("mnli", hub.encode(BERT, BASED_ON_BERT)))
    assert info["num_layers"] == hub.model.cfg.num_layers and info["untrained"] is True
    assert len(batch) == len(TEXTS)
    close(batch[1], roberta.extract_features_batch(TEXTS[1:2], pooling="mean")[0])


# -- the roberta-client CLI ------------------------------------------------------------------


def _cli_command() -> list[str]:
    script = Path(sys.executable).parent / "roberta-client"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "roberta_client.cli"]


def cli(server, *args: str, stdin: str | None = None, rc: int = 0, env=None):
    proc = subprocess.run(
        [*_cli_command(), "--server", server.target, *args],
        input=stdin, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, **(env or {})),
    )  # fmt: skip
    assert proc.returncode == rc, proc.stderr
    return json.loads(proc.stdout) if rc == 0 else proc


def test_cli_tokenize(server):
    out = cli(server, "tokenize", "Hello world!", "--truncate")
    assert len(out) == 1
    assert out[0]["input"] == "Hello world!"
    assert out[0]["ids"] == [0, 31414, 232, 328, 2]
    assert out[0]["tokens"] == ["<s>", "Hello", "Ġworld", "!", "</s>"]
    assert out[0]["special"] == [True, False, False, False, True]
    assert not out[0]["truncated"]


def test_cli_features(server, hub):
    out = cli(server, "features", "--summary", "Hello world!", "a")
    hidden = hub.model.cfg.hidden_size
    assert [o["shape"] for o in out] == [[1, 5, hidden], [1, 3, hidden]]
    assert "vectors" not in out[0]
    want = hub.extract_features(hub.encode("Hello world!"))[0]
    close(out[0]["norms"][0], want.norm(dim=-1), atol=1e-4)

    (pooled,) = cli(server, "features", "--pooling", "cls", "--layers=0,-1", "Hello world!")
    assert pooled["shape"] == [2, hidden]
    layers = hub.extract_features(hub.encode("Hello world!"), return_all_hiddens=True)
    close(pooled["vectors"][0], layers[0][0, 0])
    close(pooled["vectors"][1], layers[-1][0, 0])


def test_cli_classify_reads_stdin(server, hub):
    lines = "\n".join(
        [json.dumps({"text": BERT, "text_pair": NOT_OPTIMIZED}), "plain text", ""]
    )  # fmt: skip
    out = cli(server, "classify", "--head", "mnli", "-", stdin=lines)
    assert [o["input"] for o in out] == [[BERT, NOT_OPTIMIZED], "plain text"]
    want = hub.predict_batch("mnli", [hub.encode(BERT, NOT_OPTIMIZED), hub.encode("plain text")])
    for entry, w in zip(out, want, strict=True):
        close(entry["log_probs"], w)
        assert entry["label"] == ["contradiction", "neutral", "entailment"][entry["label_index"]]
    failed = cli(server, "classify", "--head", "no_such_head", "x", rc=5)  # NOT_FOUND
    assert "NOT_FOUND" in failed.stderr


def test_cli_info_and_env_server(server, hub):
    proc = subprocess.run(
        [*_cli_command(), "info"], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, ROBERTA_SERVER=server.target),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    cfg = hub.model.cfg
    assert info["name"] == MODEL and info["untrained"] is True
    assert (info["hidden_size"], info["num_layers"], info["vocab_size"]) == (
        cfg.hidden_size,
        cfg.num_layers,
        cfg.vocab_size,
    )
    assert info["limits"]["max_items_per_request"] == 1024
    assert isinstance(info["limits"]["max_message_bytes"], int)  # int64 as an int, not a str
    assert "mnli" in {h["name"] for h in info["heads"]}


def test_cli_unreachable_server_exits_unavailable():
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [*_cli_command(), "--server", f"127.0.0.1:{port}", "--timeout", "5", "info"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == grpc.StatusCode.UNAVAILABLE.value[0], proc.stderr
    assert proc.stdout == ""


# -- generated stubs -------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_stubs_are_not_stale(tmp_path):
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpc_tools is not installed")
    out = tmp_path / "stubs"
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), str(out)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    generated = _tree(out)
    committed = _tree(ROOT / "client" / "roberta_client" / "_proto")
    assert "roberta/v1/roberta_pb2.py" in generated
    assert sorted(generated) == sorted(committed), "stub files differ: run 'make protos'"
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run 'make protos' and commit the result"


# -- health across model loading -------------------------------------------------------------


def _health(channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _ready_gauge(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read().decode()
    (line,) = [x for x in body.splitlines() if x.startswith("roberta_ready ")]
    return float(line.split()[1])


def test_health_serving(server):
    with server.channel() as channel:
        for service in ("", SERVICE):
            assert _health(channel, service) == health_pb2.HealthCheckResponse.SERVING
    assert _ready_gauge(server.metrics_port) == 1


class _BlockingArchive(BaseHTTPRequestHandler):
    """Serves the archive only once the test sets `release`; `requested` marks the first GET."""

    def do_GET(self):  # noqa: N802 - the http.server API
        state = self.server.state
        state["paths"].append(self.path)
        state["requested"].set()
        if self.path != state["path"] or not state["release"].wait(60):
            self.send_error(404 if self.path != state["path"] else 503)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(state["body"])))
        self.end_headers()
        self.wfile.write(state["body"])

    def log_message(self, *args):
        pass


def _archive(folder: Path) -> bytes:
    """The official layout: one top folder `roberta.base/` holding model.pt and dict.txt."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for name in ("model.pt", "dict.txt"):
            tar.add(folder / name, arcname=f"roberta.base/{name}")
    return buf.getvalue()


def test_health_not_serving_while_the_model_loads(tmp_path, hub):
    state = {
        "path": "/models/roberta.base.tar.gz",
        "body": _archive(export_checkpoint(MODEL, tmp_path / "export")),
        "paths": [],
        "requested": threading.Event(),
        "release": threading.Event(),
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _BlockingArchive)
    httpd.daemon_threads = True
    httpd.state = state
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    cache = tmp_path / "cache"
    env = {
        "ROBERTA_MODEL_BASE_URL": f"http://127.0.0.1:{httpd.server_port}/models",
        "ROBERTA_CACHE": str(cache),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        **{var: "" for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    }
    try:
        with ServerProcess("--model", "roberta.base", env=env) as proc:
            proc.wait_listening()
            assert state["requested"].wait(60), f"no download request:\n{proc.tail()}"
            with proc.channel() as channel:
                # The port is up, the model is not: health says so and RPCs are refused.
                for service in ("", SERVICE):
                    assert _health(channel, service) == health_pb2.HealthCheckResponse.NOT_SERVING
                assert _ready_gauge(proc.metrics_port) == 0
                stub = roberta_pb2_grpc.RobertaStub(channel)
                with pytest.raises(grpc.RpcError) as err:
                    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "loading" in err.value.details()

                state["release"].set()
                proc.wait_ready(timeout=120)
                for service in ("", SERVICE):
                    assert _health(channel, service) == health_pb2.HealthCheckResponse.SERVING
                assert _ready_gauge(proc.metrics_port) == 1

            with RobertaClient(proc.target, timeout=60) as roberta:
                info = roberta.model_info()
                assert info["name"] == "roberta.base"
                assert info["source"] == f"fairseq:{cache / 'roberta.base' / 'model.pt'}"
                tokens = roberta.encode("Hello world!")
                close(
                    roberta.extract_features(tokens),
                    hub.extract_features(hub.encode("Hello world!")),
                )
            assert proc.terminate() == 0, proc.tail()
        assert state["paths"] == [state["path"]]
        assert sorted(p.name for p in cache.iterdir()) == ["roberta.base"]
    finally:
        state["release"].set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
