"""Find source/target pairs in the layouts the field uses, and report everything that is wrong.

Layouts (auto-detected, or chosen):
- `uwf`: `N.ext` is the source photo, `N.1.ext` the early-phase FFA, `N.2.ext` the late-phase FFA
  (any image suffix, any depth of sub-folders; the id is the path without suffix, e.g. `train/3`).
  An optional `labels.csv` (`id,label[,...]`) beside the images gives labels.
- `isfahan`: `N.jpg` and `N-N.jpg` in `normal/` and `abnormal/` folders (the folder is the label).
  The folders swap which file is the photo; we decide by content (the angiogram is the grey one)
  and fall back to the folder's convention when both look alike.
- `manifest`: a CSV `source,target[,phase][,label][,id]` (`pairs.csv` / `manifest.csv` in the
  folder, or the CSV itself), paths relative to the CSV.
- `named`: one pair per folder, the source and target named by role: `cfp.<ext>` and `ffa.<ext>`
  by default, or any two names given (`names=("photo", "angio")`); the id is the folder's path
  (the root folder's own name for a pair at the root).

Files under folders whose name starts with `.` or `_` (temporary folders, quality-control images)
are not data and are skipped.

`discover_pairs` finds the candidate pairs; `ffasynth.data.pair_check` validates their files
(`check_pairs`, `load_pairs`).
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ffasynth.config import LAYOUTS  # the one list of layouts (data.layout is checked against it)
from ffasynth.data.io import IMAGE_SUFFIXES, is_image_file, read_image
from ffasynth.errors import ImageReadError, PairError

NAMED_DEFAULT = ("cfp", "ffa")  # the `named` layout's source and target file stems
MANIFEST_NAMES = ("pairs.csv", "manifest.csv")
UWF_PHASES = {"1": "early", "2": "late"}
MANIFEST_PHASES = {"": None, "early": "early", "late": "late", **UWF_PHASES}  # a manifest's phase column, lower-cased
_SUFFIX = "|".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
_UWF_SOURCE = re.compile(rf"^(?P<id>[^.]+)\.(?:{_SUFFIX})$", re.IGNORECASE)
_UWF_TARGET = re.compile(rf"^(?P<id>[^.]+)\.(?P<phase>\d)\.(?:{_SUFFIX})$", re.IGNORECASE)
_ISF_PLAIN = re.compile(rf"^(?P<n>\d+)\.(?:{_SUFFIX})$", re.IGNORECASE)
_ISF_DASH = re.compile(rf"^(?P<n>\d+)-(?P<m>\d+)\.(?:{_SUFFIX})$", re.IGNORECASE)


@dataclass(frozen=True)
class Pair:
    """One registered source photo and one target angiogram of the same eye."""

    id: str
    source: Path
    target: Path
    phase: str | None = None
    label: str | None = None

    @property
    def name(self) -> str:
        return f"{self.id}@{self.phase}" if self.phase else self.id


@dataclass(frozen=True)
class Problem:
    kind: str  # unpaired-source/-target, unreadable, too-small, size-mismatch, colour-target, grey-source, ...
    path: str
    message: str
    kept: bool = False  # a warning: its pair stays in (duplicate, low-bit); else the file is left out


@dataclass
class PairReport:
    root: Path
    layout: str
    pairs: list[Pair] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def sources(self) -> list[Path]:
        return sorted({p.source for p in self.pairs})

    @property
    def ok(self) -> bool:
        return bool(self.pairs)

    def summary(self) -> str:
        return f"{len(self.pairs)} pairs ok, {len(self.problems)} problems ({len(self.sources)} sources)"

    def to_json(self) -> dict:
        return {
            "root": str(self.root),
            "layout": self.layout,
            "summary": self.summary(),
            "n_pairs": len(self.pairs),
            "n_sources": len(self.sources),
            "pairs": [
                {
                    **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(p).items()},
                    "size": self.sizes.get(str(p.source)),
                }
                for p in self.pairs
            ],
            "problems": [asdict(p) for p in self.problems],
        }


def _image_files(root: Path) -> list[Path]:
    def is_data(path: Path) -> bool:
        folders = path.relative_to(root).parts[:-1]
        return not path.name.startswith(".") and not any(part.startswith((".", "_")) for part in folders)

    def unreadable(error: OSError) -> None:  # rglob skipped such a folder, and its pairs, without a word
        raise PairError(f"{error.filename}: cannot list this folder ({error.strerror}); fix its permissions")

    found = [
        Path(folder) / name
        for folder, _, names in os.walk(root, onerror=unreadable, followlinks=True)
        for name in names
    ]
    return sorted(p for p in found if p.is_file() and is_image_file(p) and is_data(p))


def _find_manifest(root: Path) -> Path | None:
    if root.is_file() and root.suffix.lower() == ".csv":
        return root
    for name in MANIFEST_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def detect_layout(root: str | Path) -> str:
    root = Path(root)
    if not root.exists():
        raise PairError(f"{root}: no such folder")
    if _find_manifest(root):
        return "manifest"
    names = [p.name for p in _image_files(root)]
    if any(_UWF_TARGET.match(n) for n in names):
        return "uwf"
    if any(_ISF_DASH.match(n) for n in names):
        return "isfahan"
    if _named_folders(root, NAMED_DEFAULT):
        return "named"
    raise PairError(
        f"{root}: no known pair layout (uwf N.bmp/N.1.bmp, isfahan N.jpg/N-N.jpg, named cfp.jpg/ffa.jpg, "
        "or a pairs.csv manifest); choose one with --layout or write a manifest"
    )


def _csv_rows(path: Path, what: str) -> list[dict[str, str]]:
    """A CSV's rows as {column: value}, names and values stripped; a field past the header's (key None) left
    out, a missing one "". Read as a spreadsheet saves it (utf-8-sig: a byte-order mark is not a column)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise PairError(f"{path}: cannot read the {what} ({error})") from None
    return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in rows]


def _read_labels(root: Path, problems: list[Problem]) -> dict[str, str]:
    """labels.csv's id → label; an id given two labels is reported and left unlabelled (not the last row's)."""
    path = root / "labels.csv"
    if not path.is_file():
        return {}
    rows = _csv_rows(path, "labels")
    if rows and not {"id", "label"} <= set(rows[0]):
        raise PairError(f"{path}: needs the columns id,label")
    given: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row["id"] and row["label"]:
            given[row["id"]].add(row["label"])
    for pair_id, labels in given.items():
        if len(labels) > 1:
            problems.append(Problem("label-conflict", str(path), f"id {pair_id!r} has the labels {sorted(labels)}; "
                                    "it is left unlabelled: keep one"))  # fmt: skip
    return {pair_id: labels.pop() for pair_id, labels in given.items() if len(labels) == 1}


def _unique(found: dict, problems: list[Problem], what: str) -> tuple[dict, set]:
    """(key → its one file, the keys claimed by several files): a key claimed by several (`3.bmp` and `3.png`)
    keeps none, each of its files reported."""
    unique, ambiguous = {}, set()
    for key, paths in found.items():
        if len(paths) == 1:
            unique[key] = paths[0]
            continue
        ambiguous.add(key)
        names = ", ".join(p.name for p in paths)
        problems.extend(Problem("ambiguous", str(p), f"several files are {what} ({names}); keep one") for p in paths)
    return unique, ambiguous


def _discover_uwf(root: Path) -> tuple[list[Pair], list[Problem]]:
    found_sources: dict[str, list[Path]] = defaultdict(list)
    found_targets: dict[tuple[str, str], list[Path]] = defaultdict(list)
    problems: list[Problem] = []
    for path in _image_files(root):
        rel = path.relative_to(root)
        parent = "" if rel.parent == Path(".") else f"{rel.parent.as_posix()}/"
        if (m := _UWF_TARGET.match(path.name)) and m["phase"] not in UWF_PHASES:  # not trained as early
            problems.append(Problem("unrecognised-name", str(path), f"phase digit {m['phase']}: only N.1 (early) "
                                    "and N.2 (late) are known; rename it"))  # fmt: skip
        elif m:
            found_targets[(parent + m["id"], UWF_PHASES[m["phase"]])].append(path)
        elif m := _UWF_SOURCE.match(path.name):
            found_sources[parent + m["id"]].append(path)
        else:
            problems.append(Problem("unrecognised-name", str(path), "name fits neither N.ext nor N.k.ext"))
    sources, unclear_sources = _unique(found_sources, problems, "the photo of one eye")
    unique_targets, unclear_targets = _unique(found_targets, problems, "one angiogram")
    targets: dict[str, dict[str, Path]] = defaultdict(dict)
    for (pair_id, phase), path in unique_targets.items():
        targets[pair_id][phase] = path
    ambiguous = unclear_sources | {pair_id for pair_id, _ in unclear_targets}  # reported: not again as unpaired
    labels = _read_labels(root, problems)
    pairs = []
    for pair_id in sorted(set(sources) | set(targets), key=_natural_key):
        if pair_id in ambiguous and (pair_id not in sources or pair_id not in targets):
            continue
        if pair_id not in targets:
            problems.append(Problem("unpaired-source", str(sources[pair_id]), f"no target {pair_id}.1/.2 found"))
            continue
        if pair_id not in sources:
            for path in targets[pair_id].values():
                problems.append(Problem("unpaired-target", str(path), f"no source image {pair_id}.<ext> found"))
            continue
        for phase, target in sorted(targets[pair_id].items()):
            pairs.append(Pair(pair_id, sources[pair_id], target, phase, labels.get(pair_id)))
    return pairs, problems


def _is_grey_file(path: Path) -> bool | None:
    try:
        return read_image(path).shape[0] == 1
    except ImageReadError:
        return None


def _discover_isfahan(root: Path) -> tuple[list[Pair], list[Problem]]:
    found_plain: dict[tuple[str, str], list[Path]] = defaultdict(list)
    found_dashed: dict[tuple[str, str], list[Path]] = defaultdict(list)
    problems: list[Problem] = []
    for path in _image_files(root):
        folder = path.parent.relative_to(root).as_posix()
        if m := _ISF_DASH.match(path.name):
            if m["n"] != m["m"]:
                problems.append(Problem("unrecognised-name", str(path), "expected N-N with the same N twice"))
                continue
            found_dashed[(folder, m["n"])].append(path)
        elif m := _ISF_PLAIN.match(path.name):
            found_plain[(folder, m["n"])].append(path)
        else:
            problems.append(Problem("unrecognised-name", str(path), "name fits neither N.jpg nor N-N.jpg"))
    plain, unclear_plain = _unique(found_plain, problems, "image N")
    dashed, unclear_dashed = _unique(found_dashed, problems, "image N-N")
    ambiguous = unclear_plain | unclear_dashed
    pairs = []
    for key in sorted(set(plain) | set(dashed) | ambiguous, key=lambda k: (k[0], int(k[1]))):
        folder, number = key
        if key in ambiguous:  # reported as ambiguous
            continue
        if key not in plain or key not in dashed:
            lone = plain.get(key) or dashed[key]
            problems.append(Problem("unpaired-source", str(lone), f"no partner for image {number} in {folder or '.'}"))
            continue
        label = Path(folder).name.lower() or None
        # Folder convention: in abnormal/ the plain file is the photo; in normal/ the dashed one.
        source, target = (plain[key], dashed[key]) if label != "normal" else (dashed[key], plain[key])
        grey_source, grey_target = _is_grey_file(source), _is_grey_file(target)
        if grey_source and grey_target is False:  # content wins: the angiogram is the grey image
            source, target = target, source
        pair_id = f"{folder}/{number}" if folder not in ("", ".") else number
        pairs.append(Pair(pair_id, source, target, None, label))
    return pairs, problems


def _discover_manifest(manifest: Path) -> tuple[list[Pair], list[Problem]]:
    base = manifest.parent
    rows = _csv_rows(manifest, "manifest")
    if not rows or not {"source", "target"} <= set(rows[0]):
        raise PairError(f"{manifest}: a manifest needs a header with at least the columns source,target")
    pairs, problems = [], []
    source_of: dict[str, Path] = {}  # id → its photo: one photo per id (outputs are named by id)
    phases_of: dict[str, set[str | None]] = defaultdict(set)
    for line, row in enumerate(rows, start=2):
        if not row["source"] or not row["target"]:
            problems.append(Problem("manifest", f"{manifest}:{line}", "empty source or target"))
            continue
        source, target = base / row["source"], base / row["target"]
        missing = [p for p in (source, target) if not p.is_file()]
        for path in missing:
            problems.append(Problem("missing-file", str(path), f"listed in {manifest.name} line {line}, not found"))
        if missing:
            continue
        where = f"{manifest}:{line}"
        pair_id = _manifest_id(row, base)
        if pair_id is None:
            problems.append(Problem("manifest", where, f"id {row['id']!r}: outputs are named by id, so it must be a "
                                    "relative name without '..' (e.g. eye12)"))  # fmt: skip
            continue
        phase = row.get("phase", "").lower()
        if phase not in MANIFEST_PHASES:
            problems.append(Problem("manifest", where, f"phase {row['phase']!r}: allowed early, late, 1, 2 or empty"))
            continue
        phase = MANIFEST_PHASES[phase]
        if source_of.setdefault(pair_id, source) != source or phase in phases_of[pair_id]:
            clash = "another photo" if source_of[pair_id] != source else f"another {phase or 'phase-less'} angiogram"
            problems.append(
                Problem("ambiguous", where, f"id {pair_id!r} is already used with {clash}; ids must be unique")
            )
            continue
        phases_of[pair_id].add(phase)
        pairs.append(Pair(pair_id, source, target, phase, row.get("label") or None))
    return pairs, problems


def _manifest_id(row: dict, base: Path) -> str | None:
    """A manifest row's id, which names its outputs (`data register` writes OUT/<id>.png): the id column, or
    the photo's path inside the manifest's folder without its suffix (its name alone when it lies outside).
    None for an id column that would lead out of an output folder (absolute, or with '..')."""
    if row.get("id"):
        parts = Path(row["id"].replace("\\", "/"))
        return None if parts.is_absolute() or ".." in parts.parts else parts.as_posix()
    source = (base / row["source"]).resolve()
    inside = source.is_relative_to(base.resolve())
    return (source.relative_to(base.resolve()) if inside else Path(source.name)).with_suffix("").as_posix()


def _named_folders(root: Path, names: tuple[str, str]) -> dict[Path, dict[str, list[Path]]]:
    """Folder → {role stem: files} for every folder holding a file named by either role."""
    wanted = {name.lower() for name in names}
    found: dict[Path, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for path in _image_files(root):
        if path.stem.lower() in wanted:
            found[path.parent][path.stem.lower()].append(path)
    return found


def _discover_named(root: Path, names: tuple[str, str]) -> tuple[list[Pair], list[Problem]]:
    source_name, target_name = (name.lower() for name in names)
    if source_name == target_name:
        raise PairError(f"the source and target names must differ (both {source_name!r})")
    pairs, problems = [], []
    for folder, files in sorted(_named_folders(root, names).items()):
        pair_id = root.resolve().name if folder == root else folder.relative_to(root).as_posix()
        sources, targets = files.get(source_name, []), files.get(target_name, [])
        if len(sources) != 1 or len(targets) != 1:
            lone = (sources + targets)[0]
            kind = (
                "ambiguous"
                if len(sources) > 1 or len(targets) > 1
                else "unpaired-" + ("source" if sources else "target")
            )
            problems.append(
                Problem(kind, str(lone), f"needs exactly one {source_name}.<ext> and one {target_name}.<ext>")
            )
            continue
        pairs.append(Pair(pair_id, sources[0], targets[0]))
    return pairs, problems


def discover_pairs(
    root: str | Path, layout: str = "auto", names: tuple[str, str] | None = None
) -> tuple[str, list[Pair], list[Problem]]:
    """Pairs by file naming only (no pixels read, except isfahan's role check). `names` are the
    source and target stems of the `named` layout (default cfp, ffa)."""
    root = Path(root)
    if not root.exists():
        raise PairError(f"{root}: no such folder")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "uwf":
        return layout, *_discover_uwf(root)
    if layout == "isfahan":
        return layout, *_discover_isfahan(root)
    if layout == "manifest":
        manifest = _find_manifest(root)
        if manifest is None:
            raise PairError(f"{root}: no manifest ({' or '.join(MANIFEST_NAMES)}) found")
        return layout, *_discover_manifest(manifest)
    if layout == "named":
        return layout, *_discover_named(root, names or NAMED_DEFAULT)
    raise PairError(f"unknown layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}")


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
