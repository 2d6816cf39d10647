"""Download of the named fairseq archives (roberta.base, roberta.large, roberta.large.mnli).

Archives land in a cache (`ROBERTA_CACHE`, default `~/.cache/roberta`). A download is written to
`<name>.tar.gz.part`, resumed with an HTTP Range request when a partial file exists, renamed into
place only when complete, and extracted into a temporary folder that is renamed into place: an
interrupted run never leaves a half-written model where a later run would take it for a whole one.
`ROBERTA_MODEL_BASE_URL` points the download at a mirror (or a local server in air-gapped sites).
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import requests
from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/fairseq/models"
NAMED_MODELS = ("roberta.base", "roberta.large", "roberta.large.mnli")
CHUNK = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("ROBERTA_CACHE") or Path.home() / ".cache" / "roberta")


def archive_url(name: str) -> str:
    base = os.environ.get("ROBERTA_MODEL_BASE_URL") or DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{name}.tar.gz"


def _download(url: str, target: Path, timeout: float) -> None:
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        if resp.status_code == 416:  # the partial file is already complete
            part.rename(target)
            return
        resp.raise_for_status()
        if have and resp.status_code != 206:
            log.info("server ignored the range request; downloading %s from the start", url)
            have = 0
        total = int(resp.headers.get("Content-Length", 0)) + have or None
        with (
            open(part, "ab" if have else "wb") as f,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=target.name) as bar,
        ):
            for chunk in resp.iter_content(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise OSError(f"download of {url} ended early ({part.stat().st_size} of {total} bytes)")
    part.rename(target)


def _extract(archive: Path, final: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        # The official archives hold one top-level folder (roberta.base/model.pt, dict.txt, NOTE).
        entries = list(tmp.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        if not (root / "model.pt").is_file():
            raise OSError(f"{archive} holds no model.pt")
        root.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(name: str, timeout: float = 60.0) -> Path:
    """Return the folder of a named model, downloading and extracting it on first use."""
    if name not in NAMED_MODELS:
        raise ValueError(f"unknown model {name!r}; named models are {', '.join(NAMED_MODELS)}")
    root = cache_dir()
    final = root / name
    if (final / "model.pt").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"{name}.tar.gz"
    if not archive.exists():
        url = archive_url(name)
        log.info("downloading %s from %s into %s", name, url, root)
        _download(url, archive, timeout)
    try:
        _extract(archive, final)
    except (OSError, tarfile.TarError) as exc:
        archive.unlink(missing_ok=True)  # a bad archive is downloaded again next time
        if isinstance(exc, OSError):
            raise
        raise OSError(f"{archive} is not a valid tar.gz archive: {exc}") from exc
    archive.unlink()
    return final
