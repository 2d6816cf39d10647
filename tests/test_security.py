"""Who may call: TLS, mutual TLS and bearer tokens against a real server process, plus the switches
that narrow what a caller may do (head registration, the metrics bind address, checkpoint paths).

Every certificate is made here with `cryptography`: a CA, a server certificate for 127.0.0.1 /
localhost, a client certificate the CA signed, and an unrelated rogue CA with its own client.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from roberta_client import RobertaClient
from roberta_client._proto.roberta.v1 import roberta_pb2 as pb
from roberta_server.launcher import ServerProcess

HELLO_IDS = [0, 31414, 232, 328, 2]
TOKEN = "s3cret-Token_42"
TINY_HIDDEN = 64
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# -- certificates -----------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(cn, _name(cn), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(cn, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def creds(self, ca: str = "ca.pem", client: str | None = None) -> grpc.ChannelCredentials:
        """Channel credentials trusting `ca`, presenting `<client>.pem/.key` when given."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.read(ca),
            private_key=self.read(f"{client}.key") if client else None,
            certificate_chain=self.read(f"{client}.pem") if client else None,
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca = _make_ca("roberta-test-ca")
    rogue = _make_ca("rogue-ca")
    files = {
        "ca": ca,
        "server": _make_leaf(ca, "localhost", server=True),
        "client": _make_leaf(ca, "good-client", server=False),
        "rogue-ca": rogue,
        "rogue-client": _make_leaf(rogue, "rogue-client", server=False),
    }
    for name, (key, cert) in files.items():
        (out / f"{name}.pem").write_bytes(_pem_cert(cert))
        (out / f"{name}.key").write_bytes(_pem_key(key))
    return Pki(out)


def test_server_certificate_names_loopback(pki):
    """The target is 127.0.0.1:PORT, so the certificate must name that IP (and localhost)."""
    cert = x509.load_pem_x509_certificate(pki.read("server.pem"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


# -- servers ------------------------------------------------------------------------------------


def _start(*args: str):
    proc = ServerProcess("--model", "random:tiny", "--shutdown-grace", "2", *args)
    try:
        proc.wait_ready(timeout=120)
    except BaseException:
        proc.__exit__()
        raise
    return proc


@pytest.fixture(scope="module")
def tls_server(pki):
    with _start("--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key")) as s:
        yield s
        assert s.terminate() == 0


@pytest.fixture(scope="module")
def mtls_server(pki):
    with _start(
        "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key"),
        "--tls-client-ca", pki.path("ca.pem"),
    ) as s:  # fmt: skip
        yield s
        assert s.terminate() == 0


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "token"
    path.write_text(f"  {TOKEN}\n", encoding="utf-8")  # surrounding whitespace is stripped
    return path


@pytest.fixture(scope="module")
def token_server(token_file):
    """Bearer token, head registration off, metrics bound to loopback only."""
    with _start(
        "--auth-token-file", str(token_file), "--allow-register-head", "false",
        "--metrics-host", "127.0.0.1",
    ) as s:  # fmt: skip
        yield s
        assert s.terminate() == 0


def _client(target: str, **kwargs) -> RobertaClient:
    # No retries and a short deadline: a refused handshake must fail at once, not after backoff.
    kwargs.setdefault("timeout", 10)
    kwargs.setdefault("retry", False)
    return RobertaClient(target, **kwargs)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "roberta_client.cli", "--timeout", "10", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _works(client: RobertaClient) -> None:
    assert client.encode("Hello world!").tolist() == HELLO_IDS
    features = client.extract_features(client.encode("Hello world!"))
    assert features.shape == (1, len(HELLO_IDS), TINY_HIDDEN)
    assert np.isfinite(features).all()


def _info_ok(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["name"] == "random:tiny"
    return info


# -- TLS ----------------------------------------------------------------------------------------


def test_tls_listener_logs_its_mode(tls_server, mtls_server, token_server):
    modes = [s.wait_for("grpc listening") for s in (tls_server, mtls_server, token_server)]
    assert [(m["tls"], m["mtls"], m["auth"]) for m in modes] == [
        (True, False, False),
        (True, True, False),
        (False, False, True),
    ]


def test_tls_client_trusting_the_ca_works(tls_server, pki):
    with _client(tls_server.target, credentials=pki.creds()) as client:
        _works(client)


def test_tls_refuses_plaintext_clients(tls_server):
    with _client(tls_server.target) as client:
        assert _code(lambda: client.encode("Hello world!")) == UNAVAILABLE


def test_tls_client_trusting_a_rogue_ca_fails(tls_server, pki):
    with _client(tls_server.target, credentials=pki.creds(ca="rogue-ca.pem")) as client:
        assert _code(lambda: client.encode("Hello world!")) == UNAVAILABLE


def test_tls_cli_with_ca_cert(tls_server, pki):
    _info_ok(_cli("--server", tls_server.target, "--ca-cert", pki.path("ca.pem"), "info"))
    # Without --ca-cert the CLI speaks plaintext, which the TLS server refuses.
    assert _cli("--server", tls_server.target, "info").returncode == UNAVAILABLE.value[0]


# -- mutual TLS ---------------------------------------------------------------------------------


def test_mtls_client_with_ca_signed_cert_works(mtls_server, pki):
    with _client(mtls_server.target, credentials=pki.creds(client="client")) as client:
        _works(client)


def test_mtls_refuses_a_client_without_a_certificate(mtls_server, pki):
    with _client(mtls_server.target, credentials=pki.creds()) as client:
        assert _code(lambda: client.encode("Hello world!")) == UNAVAILABLE


def test_mtls_refuses_a_client_cert_of_another_ca(mtls_server, pki):
    with _client(mtls_server.target, credentials=pki.creds(client="rogue-client")) as client:
        assert _code(lambda: client.encode("Hello world!")) == UNAVAILABLE


def test_mtls_cli_with_client_cert(mtls_server, pki):
    common = ("--server", mtls_server.target, "--ca-cert", pki.path("ca.pem"))
    ok = _cli(
        *common, "--client-cert", pki.path("client.pem"), "--client-key", pki.path("client.key"),
        "info",
    )  # fmt: skip
    _info_ok(ok)
    assert _cli(*common, "info").returncode == UNAVAILABLE.value[0]


# -- bearer token -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer wrong-token",
        TOKEN,  # no scheme
        f"Bearer {TOKEN}x",  # a longer token is not the token
        f"Bearer {TOKEN[:-1]}",  # nor is a prefix of it
        f"Basic {TOKEN}",
    ],
)
def test_token_refuses_unary_calls_without_the_right_token(token_server, header):
    metadata = [("authorization", header)] if header is not None else []
    with _client(token_server.target, metadata=metadata) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.encode("Hello world!")
    assert info.value.code() == UNAUTHENTICATED
    assert "bearer token" in info.value.details()


def test_token_refuses_streams_without_a_token(token_server):
    with _client(token_server.target) as client:
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for result in client.stream_features([("a", "Hello world!")], max_attempts=2):
                got.append(result)
    assert got == []
    assert info.value.code() == UNAUTHENTICATED


def test_token_refuses_streams_with_a_wrong_token(token_server):
    with _client(token_server.target, auth_token="nope") as client:
        stream = client.stream_classify("mnli", [("a", "Hello world!")], max_attempts=2)
        assert _code(lambda: list(stream)) == UNAUTHENTICATED


def test_token_scheme_is_case_insensitive(token_server):
    for scheme in ("bearer", "BEARER", "Bearer"):
        with _client(token_server.target, metadata=[("authorization", f"{scheme} {TOKEN}")]) as c:
            assert c.encode("Hello world!").tolist() == HELLO_IDS


def test_token_client_with_the_token_works(token_server):
    with _client(token_server.target, auth_token=TOKEN) as client:
        _works(client)
        results = list(client.stream_features([("a", "Hello world!"), ("b", "a")], pooling="cls"))
    assert sorted(r.id for r in results) == ["a", "b"]
    assert all(r.error is None for r in results)
    assert all(r.value.shape == (1, TINY_HIDDEN) for r in results)


def test_token_health_stays_open(token_server):
    with grpc.insecure_channel(token_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "roberta.v1.Roberta"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_token_cli(token_server, token_file, tmp_path):
    target = ("--server", token_server.target)
    _info_ok(_cli(*target, "--auth-token-file", str(token_file), "info"))
    assert _cli(*target, "info").returncode == UNAUTHENTICATED.value[0] == 16
    wrong = tmp_path / "wrong"
    wrong.write_text("not-it\n")
    assert _cli(*target, "--auth-token-file", str(wrong), "info").returncode == 16


# -- head registration switched off ---------------------------------------------------------------


def test_register_head_can_be_switched_off(token_server):
    with _client(token_server.target, auth_token=TOKEN) as client:
        request = pb.RegisterClassificationHeadRequest(name="spam", num_classes=2)
        with pytest.raises(grpc.RpcError) as info:
            client.call("RegisterClassificationHead", request)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "switched off" in info.value.details()
        assert [h["name"] for h in client.model_info()["heads"]] == ["mnli"]
        [result] = client.classify("mnli", [("Roberta is great.", "It is not.")])
    assert result.label in ("contradiction", "neutral", "entailment")
    assert result.logits.shape == (3,)


# -- metrics bind address -------------------------------------------------------------------------


def test_metrics_bind_only_the_named_host(token_server):
    record = token_server.wait_for("metrics listening")
    assert record["metrics_host"] == "127.0.0.1"
    port = token_server.metrics_port
    assert record["metrics_port"] == port
    # The metrics endpoint needs no token (it is plain HTTP, guarded by its bind address).
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert b"# HELP" in resp.read()
    # Bound to 127.0.0.1 only, another loopback address of the same port must be refused
    # (a wildcard 0.0.0.0 bind would accept it; on Linux all of 127/8 is local).
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", port), timeout=2).close()


# -- checkpoints only from operator-named paths ---------------------------------------------------

SUSPICIOUS = ("path", "file", "checkpoint", "ckpt", "url", "uri", "dir", "model_name", "source")


def _reachable(message, seen: set[str]) -> None:
    if message.full_name in seen:
        return
    seen.add(message.full_name)
    for field in message.fields:
        if field.message_type is not None:
            _reachable(field.message_type, seen)


def test_no_request_field_names_a_checkpoint():
    """Full unpickling (weights_only=False) is only for files the operator names: no RPC may take
    a path, file or URL to load. Walk every request type of every roberta.v1 method."""
    seen: set[str] = set()
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            _reachable(method.input_type, seen)
    assert "roberta.v1.RegisterClassificationHeadRequest" in seen
    fields = [
        f"{name}.{field.name}"
        for name in sorted(seen)
        for field in pb.DESCRIPTOR.pool.FindMessageTypeByName(name).fields
    ]
    assert len(fields) > 20
    bad = [f for f in fields if any(word in f.rsplit(".", 1)[1].lower() for word in SUSPICIOUS)]
    assert bad == []


def test_full_unpickling_stays_out_of_the_rpc_layer():
    """torch.load lives in checkpoints.py only; the RPC modules never load a checkpoint."""
    import roberta_server.service
    import roberta_server.servicer
    import roberta_server.streams

    for module in (roberta_server.service, roberta_server.servicer, roberta_server.streams):
        source = Path(module.__file__).read_text(encoding="utf-8")
        for needle in ("torch.load", "load_checkpoint", "load_fairseq", "pickle"):
            assert needle not in source, f"{module.__name__} mentions {needle}"
