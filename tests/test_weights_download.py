"""`ffasynth weights download / check` and the loaders' hash check, against a local HTTP server.

Small payloads stand in for the real files: the test patches their SHA-256 and size into the pinned
table, so a real download is never needed and a wrong byte is caught exactly as it would be.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import threading
from dataclasses import replace

import pytest
import torch

from ffasynth import integrity, weights
from ffasynth.errors import FFASynthError, WeightsNotFoundError
from ffasynth.evaluation.metrics import EvalSettings, load_backbones
from ffasynth.weights import KNOWN_WEIGHTS, TRUSTED_LIST, load_state_dict, locate, trust_file, verify
from ffasynth.weights_download import DownloadError, OfflineError, download
from tests.helpers import invoke


def tensor_file(seed: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({"features.0.weight": torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))}, buffer)
    return buffer.getvalue()


PAYLOAD = tensor_file(0)
NAME = "alexnet"
FILENAME = KNOWN_WEIGHTS[NAME].filename


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `routes[path] = (body, announced Content-Length)`; an unknown path is a 404."""

    routes: dict[str, tuple[bytes, int]] = {}
    requests: list[str] = []

    def do_GET(self):
        self.requests.append(self.path)
        if self.path not in self.routes:
            self.send_error(404, "Not Found")
            return
        body, announced = self.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        self.wfile.write(body)  # fewer bytes than announced: the server hangs up early
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.routes, Handler.requests = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/files"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def pinned(monkeypatch):
    """The alexnet entry pinned to PAYLOAD's full digest and size."""
    spec = replace(KNOWN_WEIGHTS[NAME], sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD))
    monkeypatch.setitem(KNOWN_WEIGHTS, NAME, spec)
    return spec


def serve(body: bytes, announced: int | None = None) -> None:
    Handler.routes[f"/files/{FILENAME}"] = (body, len(body) if announced is None else announced)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_verified_file_lands_where_evaluate_and_stage2_look(server, pinned, tmp_path):
    serve(PAYLOAD)
    fetched = download(NAME, tmp_path / "weights", base_url=server)
    assert fetched.state == "downloaded" and fetched.path == locate(NAME, tmp_path / "weights")
    assert leftovers(tmp_path / "weights") == [FILENAME]  # no temporary file beside it
    assert torch.equal(
        load_state_dict(NAME, tmp_path / "weights")["features.0.weight"],
        torch.load(io.BytesIO(PAYLOAD), weights_only=True)["features.0.weight"],
    )
    again = download(NAME, tmp_path / "weights", base_url=server)
    assert again.state == "present" and Handler.requests == [f"/files/{FILENAME}"]  # fetched once


def test_the_weights_env_folder_is_the_default_target(server, pinned, tmp_path, monkeypatch):
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path / "env"))
    serve(PAYLOAD)
    result = invoke("weights", "download", "alex", "--mirror", server)
    assert result.exit_code == 0, result.output
    assert "downloaded, SHA-256 verified" in result.output and locate(NAME) == tmp_path / "env" / FILENAME


CORRUPTED = PAYLOAD[:100] + bytes([PAYLOAD[100] ^ 1]) + PAYLOAD[101:]


@pytest.mark.parametrize(
    "body, announced, reason",
    [
        (CORRUPTED, None, r"SHA-256 [0-9a-f]{16}… is not the pinned .*corrupted on the way"),
        (PAYLOAD[: len(PAYLOAD) // 2], len(PAYLOAD), rf"cut short, {len(PAYLOAD) // 2} of {len(PAYLOAD)} bytes"),
        (PAYLOAD + b"more", None, rf"announces {len(PAYLOAD) + 4} bytes, {FILENAME} has {len(PAYLOAD)}"),
        (None, None, "HTTP 404"),
    ],
    ids=["corrupted", "truncated", "wrong-length", "404"],
)
def test_a_bad_transfer_leaves_nothing_and_says_why(server, pinned, tmp_path, body, announced, reason):
    if body is not None:
        serve(body, announced)
    with pytest.raises(DownloadError, match=reason) as caught:
        download(NAME, tmp_path, base_url=server)
    assert "\n" not in str(caught.value) and "nothing written" in str(caught.value)
    assert leftovers(tmp_path) == []
    with pytest.raises(WeightsNotFoundError):
        locate(NAME, tmp_path)


def test_the_cli_reports_a_failed_file_in_one_line_and_fetches_the_others(server, pinned, tmp_path, monkeypatch):
    inception = tensor_file(1)
    monkeypatch.setitem(
        KNOWN_WEIGHTS,
        "inception",
        replace(KNOWN_WEIGHTS["inception"], sha256=hashlib.sha256(inception).hexdigest(), size=None),
    )
    Handler.routes[f"/files/{KNOWN_WEIGHTS['inception'].filename}"] = (inception, len(inception))
    serve(CORRUPTED)
    result = invoke("weights", "download", "all", "--dir", tmp_path, "--mirror", server)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "HTTP 404" in errors[0] and "is not the pinned" in errors[1]  # vgg16, alexnet
    assert leftovers(tmp_path) == [KNOWN_WEIGHTS["inception"].filename]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_without_a_connection_one_line_says_where_to_put_the_files_by_hand(tmp_path):
    mirror = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(OfflineError, match=f"no connection to 127.0.0.1:.*by hand: {FILENAME} from") as caught:
        download(NAME, tmp_path, base_url=mirror, timeout=5)
    assert leftovers(tmp_path) == [] and "\n" not in str(caught.value)
    result = invoke("weights", "download", "all", "--dir", tmp_path, "--mirror", mirror, "--timeout", 5)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no connection to 127.0.0.1")
    assert f"put these files in {tmp_path} by hand" in lines[0]
    for spec in KNOWN_WEIGHTS.values():
        assert f"{spec.filename} from {spec.url}" in lines[0]  # the upstream address, not the mirror


def test_a_damaged_file_is_refused_in_one_line_and_replaced_by_a_download(server, pinned, tmp_path):
    (tmp_path / FILENAME).write_bytes(CORRUPTED)
    with pytest.raises(FFASynthError, match="is not the pinned") as caught:
        load_state_dict(NAME, tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / FILENAME) in message
    assert f"ffasynth weights download alexnet --dir {tmp_path}" in message
    serve(PAYLOAD)
    assert download(NAME, tmp_path, base_url=server).state == "downloaded"
    assert verify(NAME, tmp_path / FILENAME) == "upstream" and leftovers(tmp_path) == [FILENAME]


def test_weights_check_names_a_damaged_file_and_what_each_enables(pinned, tmp_path):
    (tmp_path / FILENAME).write_bytes(PAYLOAD)
    (tmp_path / KNOWN_WEIGHTS["vgg16"].filename).write_bytes(b"half a download")
    result = invoke("weights", "check", "--dir", tmp_path)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == f"weights folder: {tmp_path}"
    assert any(line.startswith(f"ok       {FILENAME}: SHA-256 matches") and "evaluate: LPIPS" in line for line in lines)
    damaged = [line for line in lines if line.startswith("DAMAGED")]
    assert len(damaged) == 1 and KNOWN_WEIGHTS["vgg16"].filename in damaged[0] and "is not used" in damaged[0]
    missing = [line for line in lines if line.startswith("missing")]
    assert len(missing) == 1 and "FID, KID" in missing[0] and "ffasynth weights download inception" in missing[0]


def test_a_trusted_file_of_your_own_loads_until_it_changes(tmp_path):
    path = tmp_path / FILENAME
    path.write_bytes(tensor_file(2))
    with pytest.raises(FFASynthError, match="is not the pinned"):
        verify(NAME, path)
    digest = trust_file(path)
    assert (tmp_path / TRUSTED_LIST).read_text() == f"{digest}  {FILENAME}\n"
    assert verify(NAME, path) == "trusted" and "features.0.weight" in load_state_dict(NAME, tmp_path)
    assert "trusted  " + FILENAME in invoke("weights", "check", "--dir", tmp_path).output
    path.write_bytes(tensor_file(3))
    with pytest.raises(FFASynthError, match="is not the pinned"):
        verify(NAME, path)


def test_a_file_is_hashed_once_per_process_until_it_changes(pinned, tmp_path, monkeypatch):
    calls = []
    hash_file = integrity.sha256
    monkeypatch.setattr(integrity, "sha256", lambda path: calls.append(path) or hash_file(path))
    path = tmp_path / FILENAME
    path.write_bytes(PAYLOAD)
    for _ in range(3):
        assert verify(NAME, path) == "upstream"
    assert len(calls) == 1
    path.write_bytes(CORRUPTED)  # same size; a new modification time
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(FFASynthError, match="is not the pinned"):
        verify(NAME, path)
    assert len(calls) == 2


def test_a_file_rewritten_in_place_with_its_old_mtime_is_hashed_again_and_loads_what_was_checked(
    pinned, tmp_path, monkeypatch
):
    """The digest cache keyed on size and mtime accepted a file rewritten in place with its mtime set back; and
    the file was hashed, then opened again by name to load: a file replaced in between was loaded unchecked."""
    path = tmp_path / FILENAME
    path.write_bytes(PAYLOAD)
    assert verify(NAME, path) == "upstream"
    stat = path.stat()
    path.write_bytes(CORRUPTED)  # same size, and the modification time put back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(FFASynthError, match="is not the pinned"):
        verify(NAME, path)
    trusted = tmp_path / "trusted"  # a tensor file of one's own, replaced between its check and its load
    trusted.mkdir()
    good = trusted / FILENAME
    good.write_bytes(tensor_file(2))
    trust_file(good)
    real_read = type(good).read_bytes

    def read_then_replace(self):
        data = real_read(self)
        self.write_bytes(tensor_file(3))  # another file lands at the path right after it is read
        return data

    monkeypatch.setattr(type(good), "read_bytes", read_then_replace)
    loaded = load_state_dict(NAME, trusted)  # the bytes checked are the bytes loaded
    assert torch.equal(
        loaded["features.0.weight"], torch.load(io.BytesIO(tensor_file(2)), weights_only=True)["features.0.weight"]
    )


def test_an_unreadable_weights_file_is_one_line_in_weights_check(pinned, tmp_path, monkeypatch):
    (tmp_path / FILENAME).write_bytes(PAYLOAD)

    def denied(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(integrity, "sha256", denied)
    monkeypatch.setattr(integrity, "_DIGESTS", {})
    result = invoke("weights", "check", "--dir", tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"DAMAGED  {tmp_path / FILENAME}: cannot be read (Permission denied)" in result.output


def test_evaluate_and_stage2_name_the_download_command_when_weights_are_missing(tmp_path):
    backbones = load_backbones(EvalSettings(metrics=("lpips", "fid"), weights_dir=str(tmp_path)))
    assert f"ffasynth weights download alexnet --dir {tmp_path}" in backbones.skipped["lpips"]
    assert f"ffasynth weights download inception --dir {tmp_path}" in backbones.skipped["fid"]
    with pytest.raises(WeightsNotFoundError, match=f"ffasynth weights download vgg --dir {tmp_path}"):
        weights.build_lpips("vgg", tmp_path)  # what stage 2 calls for its LPIPS loss


def test_a_local_folder_is_a_mirror_and_a_non_url_is_refused_in_one_line(pinned, tmp_path):
    """Offline, the files copied from another machine into a folder: --mirror FOLDER fetches (and checks) them."""
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / FILENAME).write_bytes(PAYLOAD)
    fetched = download(NAME, tmp_path / "weights", base_url=str(tmp_path / "copied"))
    assert fetched.state == "downloaded" and fetched.path.read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="no such folder"):
        download(NAME, tmp_path / "other", base_url=str(tmp_path / "absent"))
    assert leftovers(tmp_path / "other") == []
    # a file the mirror folder lacks (or a non-UTF-8 folder name): said so, not "no connection to  (...)"
    odd = tmp_path / os.fsdecode(b"copied-\xff")
    odd.mkdir()
    for mirror in (tmp_path / "copied-but-empty", odd):
        mirror.mkdir(exist_ok=True)
        with pytest.raises(DownloadError, match=f"{FILENAME} is not in the mirror folder"):
            download(NAME, tmp_path / "other", base_url=str(mirror))
    (odd / FILENAME).write_bytes(PAYLOAD)
    assert download(NAME, tmp_path / "odd-weights", base_url=str(odd)).path.read_bytes() == PAYLOAD
