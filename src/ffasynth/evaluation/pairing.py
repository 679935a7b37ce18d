"""Match generated images to real ones (and to their source photos) for evaluation.

Each image gets a key: its path below the folder without the suffix, with a trailing `_ffa`
removed (`ffasynth translate` writes `<name>_ffa.png`), so `7.1.bmp` and `7.1_ffa.png` share the
key `7.1`. Modes:
- `name`: equal keys (else equal file names without folders when that is unambiguous); in the
  uwf layout a generated `N` (named after the source photo `N.bmp`) pairs with every real `N.k`.
- `manifest`: a CSV with the columns `real,fake` (paths relative to the CSV): `pairs.csv` in the
  generated folder, or a CSV given in place of the mode.
- `auto`: `manifest` when the generated folder holds a `pairs.csv` with those columns, else `name`.

A real folder in the uwf layout (`N.bmp` photo, `N.1.bmp`/`N.2.bmp` angiograms) contributes only
its angiograms as real images, and its photos as the sources. Nothing here raises for a missing
partner: it is listed in `Pairing.missing_fake` / `Pairing.unmatched_fake`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from ffasynth.data.io import is_image_file
from ffasynth.data.pairs import _UWF_SOURCE, _UWF_TARGET, UWF_PHASES
from ffasynth.errors import PairError

PAIRING_MODES = ("auto", "name", "manifest")
IGNORED_SUFFIXES = ("_uncertainty",)  # side outputs of translate, not angiograms
_FFA_SUFFIX = re.compile(r"_ffa$", re.IGNORECASE)


@dataclass(frozen=True)
class MatchedPair:
    key: str
    real: Path
    fake: Path
    source: Path | None = None


@dataclass
class Pairing:
    mode: str
    pairs: list[MatchedPair] = field(default_factory=list)
    missing_fake: list[str] = field(default_factory=list)  # real images with no generated partner
    unmatched_fake: list[str] = field(default_factory=list)  # generated images with no real partner
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.pairs)} pairs ({self.mode}); {len(self.missing_fake)} real without generated, "
            f"{len(self.unmatched_fake)} generated without real"
        )

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "n_pairs": len(self.pairs),
            "pairs": [
                {"key": p.key, "real": str(p.real), "fake": str(p.fake), "source": str(p.source) if p.source else None}
                for p in self.pairs
            ],
            "missing_fake": self.missing_fake,
            "unmatched_fake": self.unmatched_fake,
            "notes": self.notes,
        }


def image_key(path: Path, root: Path) -> str:
    """`root/sub/7.1_ffa.png` → `sub/7.1`."""
    rel = path.relative_to(root)
    stem = rel.name[: -len(rel.suffix)] if rel.suffix else rel.name
    stem = _FFA_SUFFIX.sub("", stem)
    return (rel.parent / stem).as_posix() if rel.parent != Path(".") else stem


def image_files(root: Path) -> list[Path]:
    """Image files below `root`, sorted; hidden ones and translate's side outputs left out."""
    if not root.is_dir():
        raise PairError(f"{root}: no such folder of images")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return [p for p in files if not p.stem.endswith(IGNORED_SUFFIXES)]


def _uwf_id(key: str) -> str | None:
    """`sub/7.1` → `sub/7` when the name is a uwf target N.k."""
    name = Path(key).name
    match = _UWF_TARGET.match(name + ".png")
    return (Path(key).parent / match["id"]).as_posix().removeprefix("./") if match else None


def phase_of(key: str) -> str | None:
    """The phase of a uwf target's key, as data.pairs names it: `sub/7.1` → early; None elsewhere."""
    match = _UWF_TARGET.match(Path(key).name + ".png")
    return UWF_PHASES.get(match["phase"], f"phase{match['phase']}") if match else None


def real_images(real_dir: str | Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(key → real angiogram, uwf id → source photo). In a uwf folder the photos `N.ext` are
    sources, not real angiograms; elsewhere every image is a real angiogram."""
    root = Path(real_dir)
    files = image_files(root)
    if not files:
        raise PairError(f"{root}: no images found")
    keyed = {image_key(p, root): p for p in files}
    if any(_UWF_TARGET.match(p.name) for p in files):
        sources = {k: p for k, p in keyed.items() if _UWF_SOURCE.match(p.name) and not _UWF_TARGET.match(p.name)}
        return {k: p for k, p in keyed.items() if k not in sources}, sources
    return keyed, {}


def source_images(source_dir: str | Path) -> dict[str, Path]:
    """key → source photo; in a uwf folder (photos beside their angiograms) only the photos."""
    root = Path(source_dir)
    files = image_files(root)
    if any(_UWF_TARGET.match(p.name) for p in files):
        files = [p for p in files if not _UWF_TARGET.match(p.name)]
    return {image_key(p, root): p for p in files}


def generated_images(fake_dir: str | Path) -> tuple[dict[str, Path], list[str]]:
    """(key → generated image, notes on files left out because another has the same key)."""
    root = Path(fake_dir)
    fakes: dict[str, Path] = {}
    duplicates = []
    for path in image_files(root):
        key = image_key(path, root)
        if key in fakes:
            duplicates.append(f"{path.name} has the same key {key!r} as {fakes[key].name}; left out")
        else:
            fakes[key] = path
    return fakes, duplicates


def _find_source(key: str, sources: dict[str, Path]) -> Path | None:
    if key in sources:
        return sources[key]
    uwf = _uwf_id(key)
    return sources.get(uwf) if uwf else None


def _read_manifest(path: Path) -> list[tuple[Path, Path]]:
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise PairError(f"{path}: cannot read the evaluation manifest ({error})") from None
    if not rows or not {"real", "fake"} <= {c.strip() for c in rows[0] if c}:
        raise PairError(f"{path}: an evaluation manifest needs a header with the columns real,fake")
    return [(path.parent / row["real"].strip(), path.parent / row["fake"].strip()) for row in rows]


def _manifest_of(fake_dir: Path, mode: str) -> Path | None:
    if mode not in PAIRING_MODES:
        path = Path(mode)
        if path.suffix.lower() != ".csv" or not path.is_file():
            raise PairError(f"--pairs {mode}: choose {', '.join(PAIRING_MODES)} or give an existing .csv manifest")
        return path
    candidate = fake_dir / "pairs.csv"
    if mode == "manifest" and not candidate.is_file():
        raise PairError(f"{candidate}: no manifest (columns real,fake) for --pairs manifest")
    if mode == "auto" and candidate.is_file():
        with candidate.open(newline="") as f:
            header = next(csv.reader(f), [])
        return candidate if {"real", "fake"} <= {c.strip() for c in header} else None
    return candidate if mode == "manifest" else None


def match(
    real_dir: str | Path, fake_dir: str | Path, mode: str = "auto", source_dir: str | Path | None = None
) -> Pairing:
    """Pair generated images with real ones; see the module docstring for the rules."""
    real_dir, fake_dir = Path(real_dir), Path(fake_dir)
    reals, sources = real_images(real_dir)
    if source_dir is not None:
        sources = source_images(source_dir)
    fakes, duplicates = generated_images(fake_dir)
    manifest = _manifest_of(fake_dir, mode)
    pairing = Pairing("manifest" if manifest else "name", notes=duplicates)
    if manifest is not None:
        real_by_path = {p.resolve(): k for k, p in reals.items()}
        used_fakes: set[Path] = set()
        for real, fake in _read_manifest(manifest):
            key = real_by_path.get(real.resolve()) or image_key(real, real.parent)
            if not real.is_file() or not fake.is_file():
                pairing.notes.append(f"{manifest.name}: {real if not real.is_file() else fake} not found; skipped")
                continue
            pairing.pairs.append(MatchedPair(key, real, fake, _find_source(key, sources)))
            used_fakes.add(fake.resolve())
        paired = {p.key for p in pairing.pairs}
        pairing.missing_fake = [k for k in reals if k not in paired]
        pairing.unmatched_fake = [k for k, p in fakes.items() if p.resolve() not in used_fakes]
        return pairing

    by_name: dict[str, list[str]] = {}
    for key in fakes:
        by_name.setdefault(Path(key).name, []).append(key)
    used: set[str] = set()
    for key, real in reals.items():
        candidates = [key] if key in fakes else by_name.get(Path(key).name, [])
        uwf = _uwf_id(key)
        if not candidates and uwf and uwf in fakes:
            candidates = [uwf]
            pairing.notes.append(f"{fakes[uwf].name} (named after the photo {uwf}) compared with the real {key}")
        if len(candidates) != 1:
            pairing.missing_fake.append(key)
            continue
        used.add(candidates[0])
        pairing.pairs.append(MatchedPair(key, real, fakes[candidates[0]], _find_source(key, sources)))
    pairing.unmatched_fake = [k for k in fakes if k not in used]
    return pairing
