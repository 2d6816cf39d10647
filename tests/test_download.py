"""Named-model download against a local HTTP server: extraction, cache, resume, failures."""

from __future__ import annotations

import io
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import build_model, max_diff, run_packed, token_seqs
from roberta_server import checkpoints, download
from roberta_server.checkpoints import Checkpoint, CheckpointError
from roberta_server.model import RobertaConfig

ARCHIVE = "/models/roberta.base.tar.gz"
TINY = RobertaConfig(hidden_size=16, num_layers=2, num_heads=2, ffn_size=32)
SEQS = token_seqs([3, 11, 1], seed=8)


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def published(tokenizer, tmp_path_factory):
    """(original checkpoint, archive bytes) in the official layout: roberta.base/{model.pt,
    dict.txt,NOTE}, a fairseq v0.8 (era A) checkpoint as the released archives hold."""
    ckpt = Checkpoint(build_model(TINY, seed=4), tokenizer, "original")
    folder = checkpoints.save_fairseq(ckpt, tmp_path_factory.mktemp("pub") / "roberta.base", "A")
    files = {f"roberta.base/{n}": (folder / n).read_bytes() for n in ("model.pt", "dict.txt")}
    files["roberta.base/NOTE"] = b"A tiny random test model in roberta.base's layout.\n"
    return ckpt, _tar_gz(files)


class _Handler(BaseHTTPRequestHandler):
    """GET of in-memory files; `Range: bytes=N-` answered with 206 (or 416 past the end)."""

    def do_GET(self):  # noqa: N802 - the http.server API
        state = self.server.state
        state["requests"].append((self.path, self.headers.get("Range")))
        body = state["files"].get(self.path)
        if body is None:
            self.send_error(404, "File not found")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not state["ignore_range"]:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        # `cut_after`: drop the connection after that many bytes (an interrupted download).
        self.wfile.write(payload[: state["cut_after"]])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(published, tmp_path, monkeypatch):
    """A local mirror of the model archives; its `state` records every request."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = {
        "files": {ARCHIVE: published[1]},
        "requests": [],
        "ignore_range": False,
        "cut_after": None,
    }
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("ROBERTA_MODEL_BASE_URL", f"http://127.0.0.1:{httpd.server_port}/models/")
    monkeypatch.setenv("ROBERTA_CACHE", str(tmp_path / "cache"))
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _assert_is_original(loaded: Checkpoint, published) -> None:
    original = published[0]
    assert loaded.model.cfg == original.model.cfg
    assert sorted(loaded.model.heads) == ["extra", "mnli"]
    assert max_diff(run_packed(loaded.model, SEQS), run_packed(original.model, SEQS)) <= 1e-6


def test_download_extract_load_and_cache(server, published, tmp_path):
    cache = tmp_path / "cache"
    loaded = checkpoints.load_checkpoint("roberta.base")
    _assert_is_original(loaded, published)
    assert server["requests"] == [(ARCHIVE, None)]
    assert loaded.source == f"fairseq:{cache / 'roberta.base' / 'model.pt'}"
    # Extracted from its top folder; no archive, partial file or temporary folder left behind.
    assert sorted(p.name for p in cache.iterdir()) == ["roberta.base"]
    assert sorted(p.name for p in (cache / "roberta.base").iterdir()) == [
        "NOTE",
        "dict.txt",
        "model.pt",
    ]
    # The second time comes from the cache: the server sees no request.
    again = checkpoints.load_checkpoint("roberta.base")
    _assert_is_original(again, published)
    assert download.fetch("roberta.base") == cache / "roberta.base"
    assert len(server["requests"]) == 1


@pytest.mark.parametrize("have", [1 / 3, 1.0], ids=["partial", "complete"])
def test_resume_partial_download(server, published, tmp_path, have):
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = published[1]
    size = int(len(archive) * have)
    (cache / "roberta.base.tar.gz.part").write_bytes(archive[:size])
    _assert_is_original(checkpoints.load_checkpoint("roberta.base"), published)
    # One request that asked only for the missing bytes (a complete file is answered with 416).
    assert server["requests"] == [(ARCHIVE, f"bytes={size}-")]
    assert sorted(p.name for p in cache.iterdir()) == ["roberta.base"]


def test_server_ignoring_range_restarts(server, published, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = b"stale bytes of some other file"
    (cache / "roberta.base.tar.gz.part").write_bytes(stale)
    server["ignore_range"] = True
    _assert_is_original(checkpoints.load_checkpoint("roberta.base"), published)
    assert server["requests"] == [(ARCHIVE, f"bytes={len(stale)}-")]


def test_interrupted_download_resumes(server, published, tmp_path):
    cache = tmp_path / "cache"
    archive = published[1]
    server["cut_after"] = len(archive) * 3 // 4
    with pytest.raises(OSError):
        download.fetch("roberta.base")
    assert not (cache / "roberta.base").exists()
    assert not (cache / "roberta.base.tar.gz").exists()
    part = cache / "roberta.base.tar.gz.part"
    have = part.stat().st_size if part.exists() else 0
    assert have <= server["cut_after"]
    server["cut_after"] = None
    _assert_is_original(checkpoints.load_checkpoint("roberta.base"), published)
    assert server["requests"][-1] == (ARCHIVE, f"bytes={have}-" if have else None)


def test_missing_archive_404(server, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    server["files"].clear()
    with pytest.raises(OSError, match="404"):
        checkpoints.load_checkpoint("roberta.base")
    assert server["requests"] == [(ARCHIVE, None)]
    assert not (cache / "roberta.base").exists()
    assert not cache.exists() or not any(p.name.startswith("roberta.base") for p in cache.iterdir())


def test_archive_without_model_pt(server, tmp_path):
    cache = tmp_path / "cache"
    server["files"][ARCHIVE] = _tar_gz({"roberta.base/NOTE": b"nothing else here\n"})
    with pytest.raises(OSError, match="no model.pt"):
        download.fetch("roberta.base")
    assert not (cache / "roberta.base").exists()
    assert [p.name for p in cache.iterdir()] in ([], ["roberta.base.tar.gz"])


def test_bad_archive_is_downloaded_again(server, published, tmp_path):
    server["files"][ARCHIVE] = _tar_gz({"roberta.base/NOTE": b"nothing else here\n"})
    with pytest.raises(OSError, match="no model.pt"):
        download.fetch("roberta.base")
    server["files"][ARCHIVE] = published[1]  # the mirror is fixed
    _assert_is_original(checkpoints.load_checkpoint("roberta.base"), published)
    assert len(server["requests"]) == 2


def test_unknown_name_is_rejected(server):
    with pytest.raises(ValueError, match="unknown model 'roberta.huge'"):
        download.fetch("roberta.huge")
    with pytest.raises(CheckpointError, match="neither a named model"):
        checkpoints.load_checkpoint("roberta.huge")
    assert server["requests"] == []


def test_archive_url_override(monkeypatch):
    monkeypatch.delenv("ROBERTA_MODEL_BASE_URL", raising=False)
    assert download.archive_url("roberta.large.mnli") == (
        "https://dl.fbaipublicfiles.com/fairseq/models/roberta.large.mnli.tar.gz"
    )
    monkeypatch.setenv("ROBERTA_MODEL_BASE_URL", "http://mirror.example/x/")
    assert download.archive_url("roberta.base") == "http://mirror.example/x/roberta.base.tar.gz"
