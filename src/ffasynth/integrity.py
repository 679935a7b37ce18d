"""Is a file what it claims to be, checked without loading it: a safetensors header (tensor names,
dtypes and shapes, and whether the file is exactly as long as the header says), and a manifest of
sha256 hashes and sizes written beside a folder's files.

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensor
bytes, which the offsets must tile exactly. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

from ffasynth.errors import FFASynthError
from ffasynth.files import atomic_write_text

MANIFEST = "manifest.json"
HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
               "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
               "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


class DamagedFileError(FFASynthError):
    """A file is cut short, corrupt or not of its format; the message is one phrase with the cause."""


def safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header, after checking that the
    header is well-formed and the tensor bytes fill the rest of the file exactly (a cut-short or
    padded file is refused). Reads the header only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            text = f.read(min(max(length, 0), HEADER_LIMIT))
            if length < 2 or length > HEADER_LIMIT or not text.startswith(b"{"):
                raise DamagedFileError(f"not a safetensors file ({size} bytes, header length {length})")
            if len(text) < length:
                raise DamagedFileError(f"cut short: {size} bytes, its header alone is {8 + length}")
            header = json.loads(text)
    except OSError as error:
        raise DamagedFileError(f"unreadable ({error.strerror or error})") from None
    except (UnicodeDecodeError, ValueError):
        raise DamagedFileError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise DamagedFileError("not a safetensors file (its header is not a JSON object)")
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid or dtype not in DTYPE_BYTES or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise DamagedFileError(f"corrupt safetensors header (tensor {name!r})")
        tensors[name] = (dtype, shape)
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise DamagedFileError("corrupt safetensors header (tensor data overlaps or leaves gaps)")
        position = end
    if 8 + length + position != size:
        state = "cut short" if 8 + length + position > size else "longer than its header says"
        raise DamagedFileError(f"{state}: {size} bytes, its header describes {8 + length + position}")
    return tensors


def sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, computed once a process while it stays the same file (inode, size, modification and
    change times: a file rewritten in place with its old size and mtime set back is hashed again). For files
    read more than once a run (weights, training photos); a checkpoint's manifest check hashes afresh (`sha256`)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256(path)
    return _DIGESTS[key]


def write_manifest(folder: str | Path) -> Path:
    """FOLDER/manifest.json: {"files": {name: {"size", "sha256"}}} of every file directly in FOLDER
    (hidden temporary files aside), written atomically; write it last, after every file it lists."""
    folder = Path(folder)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    return atomic_write_text(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def read_manifest(folder: str | Path) -> dict[str, dict] | None:
    """The manifest's {name: {"size", "sha256"}}, or None when FOLDER has none; a manifest that
    cannot be read is DamagedFileError."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if all(isinstance(e["size"], int) and isinstance(e["sha256"], str) for e in files.values()):
            return files
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    raise DamagedFileError(f"{MANIFEST} is unreadable or not a manifest")


def manifest_problem(folder: str | Path, files: dict[str, dict], hashes: bool = True) -> str | None:
    """Why FOLDER's files differ from the manifest `files` (missing, another size, another sha256
    when `hashes`), or None when they match."""
    folder = Path(folder)
    for name, expected in files.items():  # sizes first: a cut-short file is named before any hashing
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} is {size} bytes, the manifest says {expected['size']} (cut short or replaced)"
    for name, expected in files.items() if hashes else ():
        if sha256(folder / name) != expected["sha256"]:
            return f"{name} differs from its sha256 in the manifest (corrupted)"
    return None
