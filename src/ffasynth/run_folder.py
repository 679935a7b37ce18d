"""What every run folder (`ffasynth train ...`, `ffasynth baseline train`) shares, in one place:
its record run.json, which data split a stage reads, and its newest complete checkpoint.

RUN/run.json            kind, data, versions, and what later stages add (sources, stage1_run, ...)
RUN/training_photos.sha256  the sha256 of each photo the run trained on (an exported pipeline carries them)
RUN/checkpoints/step-N/ complete once its state.json is written (training/checkpoint.py verifies it
                        further, against the manifest.json written last, before a run resumes)

Standard library only, so any layer may use it without importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

try:
    import fcntl  # POSIX; elsewhere (Windows) a run folder is not locked
except ImportError:  # pragma: no cover
    fcntl = None

from ffasynth.errors import FFASynthError
from ffasynth.files import atomic_write_text
from ffasynth.integrity import file_sha256

STEP_DIR = re.compile(r"^step-(\d+)$")
PHOTOS_FILE = "training_photos.sha256"  # the sha256 of every photo a run trained on, one per line
LINEAGE_KEYS = ("stage1_run", "teacher_run")  # run.json keys naming the runs a run was built on
# A data folder may hold train/ and a held-out split under one of these names; the first found wins.
SPLIT_NAMES = {"train": ("train",), "test": ("test", "val", "valid")}


def info(run_dir: str | Path) -> dict:
    """The contents of RUN/run.json."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FFASynthError(f"{run_dir} is not an ffasynth run folder (no run.json)")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FFASynthError(f"{path} is damaged ({type(error).__name__}); restore it from a copy") from None


def update_info(run_dir: str | Path, **fields) -> dict:
    """Set `fields` in RUN/run.json, keeping every other key, and return the new contents. The file is
    replaced atomically (a reader never sees half of it); a folder without one gets a new one."""
    path = Path(run_dir) / "run.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(fields)
    atomic_write_text(path, json.dumps(record, indent=1))
    return record


def split_dir(data_dir: str | Path, split: str) -> Path:
    """The folder of DATA that holds `split`:
    train → DATA/train, or DATA itself when it has no train/ (a folder of pairs is all training data);
    test  → DATA/test, DATA/val or DATA/valid, or, when it has none of them, the train folder above
            (no held-out pairs: the caller evaluates on the training pairs and its record says which).
    The returned folder's name tells which was found."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, not {split!r}")
    data_dir = Path(data_dir)
    for name in SPLIT_NAMES[split]:
        if (data_dir / name).is_dir():
            return data_dir / name
    return data_dir if split == "train" else split_dir(data_dir, "train")


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """Every RUN/checkpoints/step-N folder, complete or not, oldest first (temporary and set-aside
    folders, `.step-N.*.tmp` and `step-N.damaged`, are not in the sequence)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders with their state.json written, oldest first; temporary folders are skipped."""
    return [p for p in checkpoint_folders(run_dir) if (p / "state.json").is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run that has to have one (to load, export or translate)."""
    found = complete_checkpoints(run_dir)
    if not found:
        raise FFASynthError(f"{run_dir} has no complete checkpoint yet (checkpoints/step-*/state.json)")
    return found[-1]


@contextlib.contextmanager
def training_lock(run_dir: str | Path, held: bool = True):
    """One training process at a time in RUN (an exclusive lock on the folder itself, released when the run
    ends or its process dies): a second `train --resume` on a run still training would prune its checkpoints
    and remove the one being written. held=False (every process but the first of a multi-process run): no lock."""
    if not held or fcntl is None:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FFASynthError(
                f"{run_dir} is being trained by another process; wait for it to end, or choose another --out"
            ) from None
        yield
    finally:
        os.close(handle)  # closing the folder's handle releases its lock


def record_photos(run_dir: str | Path, photos) -> Path:
    """RUN/training_photos.sha256: the sha256 of each training photo's bytes, sorted, one per line. An exported
    pipeline carries them so that `clinical` can tell the eyes it was trained on (a copied or renamed file
    too) from held-out ones, without the training data at hand."""
    return write_photos(run_dir, {file_sha256(path) for path in photos})


def write_photos(folder: str | Path, digests: set[str]) -> Path:
    """FOLDER/training_photos.sha256 listing `digests` (a run's, or an exported pipeline's), sorted."""
    return atomic_write_text(Path(folder) / PHOTOS_FILE, "".join(f"{digest}\n" for digest in sorted(digests)))


def trained_photos(folder: str | Path) -> set[str] | None:
    """The digests FOLDER/training_photos.sha256 lists (a run or an exported pipeline); None without the file."""
    path = Path(folder) / PHOTOS_FILE
    if not path.is_file():
        return None
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def lineage_photos(run_dir: str | Path) -> set[str] | None:
    """The photos RUN and the runs it was built on (its stage-1 run, a distillation's teacher) trained on;
    None when none of them recorded any (runs from before the record)."""
    found: set[str] | None = None
    pending, seen = [Path(run_dir)], set()
    while pending:
        run = pending.pop()
        if run.resolve() in seen or not (run / "run.json").is_file():
            continue
        seen.add(run.resolve())
        photos = trained_photos(run)
        if photos is not None:
            found = (found or set()) | photos
        record = info(run)
        pending += [Path(record[key]) for key in LINEAGE_KEYS if record.get(key)]
    return found
