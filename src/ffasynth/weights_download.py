"""Fetch the metric backbones once, from their upstream addresses, verified against the SHA-256
pinned in `ffasynth.weights.KNOWN_WEIGHTS` (`ffasynth weights download`). Nothing else in
ffasynth downloads: evaluate and stage 2 only read the weights folder.

A file is streamed into a temporary file beside its final name and hashed on the way; it is renamed
into place only when its length (the server's Content-Length, and the pinned size where known) and
its digest are right. A 404, a cut-short or corrupted transfer, or no connection at all leaves no
file behind and raises one line saying why (no connection: which files to put where by hand).

Public API:
- `download(name, weights_dir=None, base_url=None, timeout=60.0, progress=None) -> Fetched`
- `source_url(name, base_url=None) -> str`; `by_hand(names, folder) -> str`
- `DownloadError`, `OfflineError`
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ffasynth.errors import FFASynthError
from ffasynth.files import atomic_write
from ffasynth.weights import KNOWN_WEIGHTS, matches_pin, origin, resolve_weights_dir

CHUNK = 1 << 20


class DownloadError(FFASynthError):
    """The transfer failed, or its bytes are not the pinned file; nothing was written."""


class OfflineError(DownloadError):
    """The server could not be reached at all (no internet, a firewall, a wrong mirror)."""

    def __init__(self, host: str, reason: str, names: list[str], folder: Path):
        self.host, self.reason = host, reason
        super().__init__(f"no connection to {host} ({reason}): {by_hand(names, folder)}")


@dataclass(frozen=True)
class Fetched:
    name: str
    path: Path
    sha256: str
    size: int
    state: str  # "downloaded", "present" (a verified upstream copy was there), "trusted" (yours, kept)


def source_url(name: str, base_url: str | None = None) -> str:
    """The upstream address, or `base_url/<file name>` for a mirror (a URL, a test server, or a local folder)."""
    spec = KNOWN_WEIGHTS[name]
    if base_url is not None and "://" not in base_url:  # a folder of the files, e.g. copied from another machine
        folder = Path(base_url).expanduser()
        if not folder.is_dir():
            raise DownloadError(f"--mirror {base_url}: no such folder (give a folder of the files or an http(s) URL)")
        base_url = folder.resolve().as_uri()
    return spec.url if base_url is None else f"{base_url.rstrip('/')}/{spec.filename}"


def by_hand(names: list[str], folder: Path) -> str:
    """Where to put the files without internet, in one line."""
    files = "; ".join(f"{KNOWN_WEIGHTS[n].filename} from {KNOWN_WEIGHTS[n].url}" for n in names)
    return f"without internet, put these files in {folder} by hand: {files}; then run `ffasynth weights check`"


class _LocalFile(io.FileIO):
    """A mirror folder's file, read as a download is (its size as the Content-Length)."""

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Length": str(os.fstat(self.fileno()).st_size)}


def _content_length(response) -> int | None:
    value = response.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None


def download(
    name: str,
    weights_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Fetched:
    """Fetch one known file into the weights folder unless a verified copy (or a file of your own
    listed as trusted) is already there; a damaged one is replaced only by a verified download.
    progress(bytes_received, bytes_expected_or_None) is called after every chunk."""
    spec = KNOWN_WEIGHTS[name]
    folder = resolve_weights_dir(weights_dir)
    target = folder / spec.filename
    if target.is_file():
        state, digest = origin(name, target)
        if state != "damaged":
            kept = "present" if state == "upstream" else "trusted"
            return Fetched(name, target, digest, target.stat().st_size, kept)
    url = source_url(name, base_url)
    try:
        if base_url is not None and "://" not in base_url:  # a mirror folder: read the file there, by its path
            local = Path(base_url).expanduser() / spec.filename
            if not local.is_file():
                raise DownloadError(f"{spec.filename} is not in the mirror folder {local.parent}; nothing written")
            try:
                url, response = str(local), _LocalFile(local)
            except OSError as error:
                raise DownloadError(f"{local}: cannot be read ({error.strerror or error}); nothing written") from None
        else:
            response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}; nothing written to {folder}") from None
    except ValueError as error:  # not a URL urllib can open
        raise DownloadError(f"{url}: {error}; give --mirror as http(s)://..., file://... or a folder") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        host = urllib.parse.urlsplit(url).netloc
        raise OfflineError(host, str(reason) or type(reason).__name__, [name], folder) from None
    with response:
        announced = _content_length(response)
        if spec.size is not None and announced is not None and announced != spec.size:
            raise DownloadError(
                f"{url}: the server announces {announced} bytes, {spec.filename} has {spec.size}; nothing written"
            )
        expected = announced if announced is not None else spec.size
        hasher = hashlib.sha256()
        received = 0

        def write(temporary: Path) -> None:
            nonlocal received
            with open(temporary, "wb") as out:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, http.client.HTTPException) as error:
                        raise DownloadError(
                            f"{url}: transfer broken after {received} bytes ({type(error).__name__}); nothing written"
                        ) from None
                    if not chunk:
                        break
                    hasher.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    if progress is not None:
                        progress(received, expected)
            if expected is not None and received != expected:
                raise DownloadError(f"{url}: transfer cut short, {received} of {expected} bytes; nothing written")
            digest = hasher.hexdigest()
            if not matches_pin(name, digest):
                raise DownloadError(
                    f"{url}: SHA-256 {digest[:16]}… is not the pinned {spec.sha256[:16]}…: corrupted on the way "
                    "or changed upstream; nothing written"
                )

        atomic_write(target, write)
    return Fetched(name, target, hasher.hexdigest(), received, "downloaded")
