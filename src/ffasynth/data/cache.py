"""Arrays computed once per image and kept on disk as .npy files, opened memory-mapped read-only.

`PairDataset` keeps here what a crop needs: the decoded image (8-bit levels or 16-bit codes), the
source's field-of-view mask, the FOV pixel counts of the crop windows and the whole photo's CLIP
view. Every DataLoader worker (and, with a shared folder, every process of a run) maps the same
files, so the operating system's page cache holds one copy of each image however many read it,
and a worker reads and converts to float only its crop's pixels.

An entry is written with files.atomic_write (a temporary name of its own, unique even for two processes
of one PID in two containers sharing the folder; synced, then renamed): two workers that compute the same entry at once
both write a complete file and the second rename wins (same content). An entry that cannot be read (cut
short, empty: what a crash can leave) is computed again and replaced.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ffasynth.errors import FFASynthError
from ffasynth.files import atomic_write


def file_key(path: str | os.PathLike, *details) -> str:
    """A name for what is computed from the file at `path` with `details`: its resolved path, size, modification
    time, inode and change time go in, so an entry of an edited or replaced file is never reused (`cp -p` and
    `rsync -t` keep the modification time, and a BMP of the same size keeps the size; the change time moves)."""
    path = Path(path).resolve()
    stat = path.stat()
    text = repr((str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns, *details))
    return hashlib.sha1(text.encode()).hexdigest()[:24]


def _remove_folder(folder: Path, owner: int) -> None:
    # forked DataLoader workers inherit this finaliser: only the process that made the folder removes it
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


class ArrayStore:
    """Named arrays in `folder` (None: a new temporary folder, removed when the store is collected or
    the process exits; its place follows $TMPDIR). `computed` counts the arrays this process made."""

    def __init__(self, folder: str | os.PathLike | None = None):
        if folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="ffasynth-cache-"))
            self._cleanup = weakref.finalize(self, _remove_folder, self.folder, os.getpid())
        else:
            self.folder = Path(folder)
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:  # a file of that name, a file above it, no permission
                raise FFASynthError(f"data.cache_dir {folder}: cannot be a cache folder ({error.strerror})") from None
            self._cleanup = None
        self.computed = 0
        self._open: dict[str, np.ndarray] = {}

    def get(self, name: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        """The array called `name`, memory-mapped read-only; `make()` computes it when no file has it yet."""
        array = self._open.get(name)
        if array is not None:
            return array
        path = self.folder / f"{name}.npy"
        array = self._load(path)
        if array is None:
            self._write(path, np.ascontiguousarray(make()))
            self.computed += 1
            array = np.load(path, mmap_mode="r")
        self._open[name] = array
        return array

    @staticmethod
    def _load(path: Path) -> np.ndarray | None:
        """The entry memory-mapped, or None when there is none or it cannot be read (then it is made again)."""
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, EOFError, OSError):  # none yet; or cut short, empty, not an .npy: a crash's leftover
            return None

    @staticmethod
    def _write(path: Path, value: np.ndarray) -> None:
        def save(tmp: Path) -> None:
            with open(tmp, "wb") as out:  # a handle: np.save given a name would add ".npy" to the temporary's
                np.save(out, value)

        atomic_write(path, save, "the image cache (data.cache_dir)")

    def __getstate__(self) -> dict:
        # a spawned worker gets the folder, not the mapped arrays (pickling would copy them) nor the finaliser
        return {"folder": self.folder, "_cleanup": None, "computed": 0, "_open": {}}
