"""Clinical validation: does adding synthetic FFA help a disease classifier?

Cross-validated (stratified, grouped so that one group's images never sit on both sides of a split:
an eye of paired data; for class folders each image is its own group unless `groups.csv` says which
images show one eye or patient) training of a timm classifier on:
- `source-only`: the photographs;
- `real-only`: the real angiograms (the upper reference);
- `source+real`: photographs with their real angiograms;
- `source+synthetic` (alias `synthetic`): photographs with synthetic angiograms (a folder of generated images).
Two inputs are fused by stacking channels (`stack`: one backbone, 3+1 input channels) or by two
backbones whose pooled features are concatenated (`two-branch`). Modes compared with each other run on
the same eyes and the same folds (`paired_eyes`); `clinical_stats` says how sure a difference is.
"""

from __future__ import annotations

import copy
import csv
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ffasynth.data.io import IMAGE_SUFFIXES, is_image_file, read_image
from ffasynth.data.pair_check import check_pairs
from ffasynth.data.pairs import detect_layout
from ffasynth.errors import FFASynthError, ImageReadError, PairError
from ffasynth.evaluation.classifier import build_classifier
from ffasynth.evaluation.clinical_stats import classification_metrics, corrected_interval, make_folds

MODES: dict[str, tuple[str, ...]] = {
    "source-only": ("source",),
    "real-only": ("real",),
    "source+real": ("source", "real"),
    "source+synthetic": ("source", "synthetic"),
}
ALIASES = {"synthetic": "source+synthetic"}  # the experiment the paper asks about
CHANNELS = {"source": 3, "real": 1, "synthetic": 1}
GROUPS_FILE = "groups.csv"  # id,group: images of one eye (or patient) that must stay in one fold


@dataclass
class LabelledEye:
    """One labelled example; `group` keeps images of the same eye in the same fold."""

    id: str
    group: str
    label: str
    images: dict[str, Path] = field(default_factory=dict)


def load_labelled(root: str | Path) -> list[LabelledEye]:
    """Labelled examples from a pair folder with labels (uwf + labels.csv, isfahan, manifest with a
    label column: photo = source, angiogram = real) or from class folders of angiograms
    (`root/<label>/*.jpg`, e.g. ffa-labelled/02.disease_diagnosis)."""
    root = Path(root)
    if not root.is_dir():
        raise PairError(f"{root}: no such folder")
    try:
        detect_layout(root)
        paired = True
    except PairError:
        paired = False
    if paired:
        report = check_pairs(root, decode=False)
        eyes: dict[str, LabelledEye] = {}
        for pair in report.pairs:
            if pair.label is None:
                continue
            if pair.id not in eyes:  # one example per eye: the early phase when there are two
                eyes[pair.id] = LabelledEye(pair.id, pair.id, pair.label, {"source": pair.source, "real": pair.target})
        if not eyes:
            raise PairError(
                f"{root}: pairs found but none has a label (labels.csv id,label or a manifest label column)"
            )
        return _grouped(root, list(eyes.values()))
    classes = sorted(p for p in root.iterdir() if p.is_dir() and any(is_image_file(f) for f in p.iterdir()))
    if len(classes) < 2:
        raise PairError(f"{root}: neither labelled pairs nor at least two class folders of images")
    examples = [
        LabelledEye(f"{c.name}/{f.stem}", f"{c.name}/{f.stem}", c.name, {"real": f})
        for c in classes
        for f in sorted(c.iterdir())
        if is_image_file(f)
    ]
    return _grouped(root, examples)


def _grouped(root: Path, eyes: list[LabelledEye]) -> list[LabelledEye]:
    """The examples with the groups ROOT/groups.csv gives (columns id,group; an id it does not name stays
    its own group); unchanged without the file. An id the data lacks, or a missing column, is refused."""
    path = root / GROUPS_FILE
    if not path.is_file():
        return eyes
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"id", "group"} <= set(rows[0]):
        raise PairError(f"{path}: needs the columns id,group (one row per image of an eye or patient)")
    by_id = {eye.id: eye for eye in eyes}
    unknown = [row["id"] for row in rows if row["id"] not in by_id]
    if unknown:
        shown = ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise PairError(f"{path}: {len(unknown)} ids are not examples of {root} ({shown}); ids look like {eyes[0].id}")
    for row in rows:
        by_id[row["id"]].group = f"group:{row['group']}"
    return eyes


def attach_synthetic(eyes: list[LabelledEye], folder: str | Path) -> list[str]:
    """Attach each eye's generated angiogram from `folder` (`<name>.png` or `<name>_ffa.png`), matched by,
    in turn: the eye's id as a path (`train/7`); the name `ffasynth translate` (and `clinical --pipeline`)
    gives the eye's photo among all the eyes' photos (isfahan `normal/1-1.jpg` → `1-1_ffa.png`); the id's
    last part (`7`) when exactly one eye and one file have it. Returns the ids left without an image, an
    ambiguous one with why (e.g. isfahan's `normal/1` and `abnormal/1` both end in `1`): those eyes are
    dropped by the caller, never given another eye's image."""
    from ffasynth.translate import output_stems  # file naming only (no pipeline import)

    folder = Path(folder)
    if not folder.is_dir():
        raise PairError(f"{folder}: no such folder of synthetic images")
    by_path: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.endswith("_uncertainty.png"):
            stem = re.sub(r"_ffa$", "", path.stem)
            by_path[path.relative_to(folder).with_name(stem).as_posix()] = path
            by_stem.setdefault(stem, []).append(path)
    photo_names = output_stems([eye.images["source"] for eye in eyes if "source" in eye.images])
    last_parts: dict[str, int] = {}
    for eye in eyes:
        last_parts[Path(eye.id).name] = last_parts.get(Path(eye.id).name, 0) + 1
    missing = []
    for eye in eyes:
        name = Path(eye.id).name
        match = by_path.get(eye.id)
        if match is None and "source" in eye.images:
            match = by_path.get(photo_names[eye.images["source"]])
        if match is None and last_parts[name] == 1 and len(by_stem.get(name, [])) == 1:
            match = by_stem[name][0]
        if match is not None:
            eye.images["synthetic"] = match
        elif last_parts[name] > 1 and by_stem.get(name):
            missing.append(f"{eye.id} ({last_parts[name]} eyes' ids end in {name}: name the file {eye.id}.png)")
        elif len(by_stem.get(name, [])) > 1:
            missing.append(f"{eye.id} ({len(by_stem[name])} files are named {name}: put it at {eye.id}.png)")
        else:
            missing.append(eye.id)
    return missing


def _load_inputs(eyes: list[LabelledEye], inputs: tuple[str, ...], size: int) -> torch.Tensor:
    """(N, C, size, size) in [-1, 1]: each input resized (antialiased) and channel-concatenated."""
    batch = []
    for eye in eyes:
        parts = []
        for name in inputs:
            image = read_image(eye.images[name], channels=CHANNELS[name])
            image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            parts.append(image[0] * 2 - 1)
        batch.append(torch.cat(parts))
    return torch.stack(batch)


@dataclass
class ClinicalSettings:
    mode: str = "real-only"
    fusion: str = "stack"
    folds: int = 5
    backbone: str = "resnet10t"
    image_size: int = 128
    epochs: int = 15
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    weights: str | None = None
    repeats: int = 1  # cross-validations with other splits (seed + r); each fold of each counts in the summary


@dataclass
class ClinicalResult:
    settings: ClinicalSettings
    classes: list[str]
    fold_metrics: list[dict[str, float]]
    y_true: np.ndarray
    probabilities: np.ndarray
    fold_of: np.ndarray
    ids: list[str]
    skipped: list[str]
    test_fraction: float = 0.25  # a fold's n_test / n_train (for the corrected intervals)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per metric: mean, sample std (ddof 1) and the 95% corrected resampled t-interval of the mean
        (`clinical_stats`) over the folds where it is defined (an AUC is not in a fold with one class), and
        how many folds that is; NaN only when no fold defines it (the std and interval need two)."""
        summary = {}
        for name in self.fold_metrics[0]:
            values = np.array([m[name] for m in self.fold_metrics], dtype=float)
            defined = values[np.isfinite(values)]
            interval = corrected_interval(defined, self.test_fraction)
            std = float(defined.std(ddof=1)) if defined.size > 1 else math.nan
            summary[name] = {"mean": interval["mean"], "std": std, "low": interval["low"], "high": interval["high"]}
            summary[name]["folds"] = int(defined.size)
        return summary

    def scores(self, name: str) -> list[float]:
        """One metric's value in every fold of every repeat, in order (NaN where undefined)."""
        return [float(m[name]) for m in self.fold_metrics]

    def confusion(self) -> np.ndarray:
        from sklearn.metrics import confusion_matrix

        return confusion_matrix(self.y_true, self.probabilities.argmax(1), labels=range(len(self.classes)))


def _train_one(model: nn.Module, x, y, num_classes: int, settings: ClinicalSettings, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * max(1, -(-len(x) // settings.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, settings.lr, total_steps=steps, pct_start=0.2)
    # Balanced classes per epoch: weight the loss by inverse class frequency.
    counts = torch.bincount(y, minlength=num_classes).clamp(min=1).float()
    class_weight = counts.sum() / (len(counts) * counts)
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), settings.batch_size):
            index = order[start : start + settings.batch_size]
            if len(index) < 2:  # batch norm needs two samples
                continue
            batch = x[index]
            flips = torch.rand(2, generator=generator)
            if flips[0] < 0.5:
                batch = batch.flip(-1)
            if flips[1] < 0.5:
                batch = batch.flip(-2)
            loss = F.cross_entropy(model(batch), y[index], weight=class_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    recalibrate_batchnorm(model, x)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> None:
    """Re-estimate every batch-norm layer's running mean and variance with the final weights over
    `x` ("precise BN"). The exponential averages gathered during a few dozen fast-moving steps
    describe earlier networks; in eval mode they made every prediction collapse to one class."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    model.eval()  # dropout and the like stay off; only the norm layers gather statistics
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches below
        layer.train()
    ends = list(range(batch_size, len(x), batch_size)) + [len(x)]
    if len(ends) > 1 and ends[-1] - ends[-2] < 2:  # batch norm needs two values per channel
        ends.pop(-2)
    try:
        for start, end in zip([0, *ends[:-1]], ends, strict=True):
            model(x[start:end])
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        model.train(was_training)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    model.eval()
    outputs = [model(x[i : i + batch_size]).softmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(outputs).numpy()


def resolve_modes(mode: str, eyes: list[LabelledEye], folds: int) -> tuple[list[str], dict[str, str]]:
    """The modes to run for `--mode` (a mode, an alias, or `all`) and, for `all`, the modes the data
    does not allow with the reason: an input is missing, or too few examples per class for the folds."""
    if mode != "all":
        mode = ALIASES.get(mode, mode)
        if mode not in MODES:
            raise FFASynthError(f"unknown --mode {mode!r}; choose from {', '.join([*MODES, *ALIASES, 'all'])}")
        return [mode], {}
    chosen, skipped = [], {}
    for name, inputs in MODES.items():
        usable = [e for e in eyes if all(i in e.images for i in inputs)]
        counts = {label: len({e.group for e in usable if e.label == label}) for label in {e.label for e in usable}}
        if len(counts) < 2:
            skipped[name] = f"needs {' and '.join(inputs)} images for at least two classes"
        elif min(counts.values()) < folds:
            skipped[name] = (
                f"a class has {min(counts.values())} eyes (groups) with {' and '.join(inputs)}, "
                f"fewer than {folds} folds"
            )
        else:
            chosen.append(name)
    if not chosen:
        raise FFASynthError(f"no mode can run on this data: {'; '.join(f'{k}: {v}' for k, v in skipped.items())}")
    return chosen, skipped


def paired_eyes(eyes: list[LabelledEye], modes: list[str]) -> tuple[list[LabelledEye], list[str]]:
    """The eyes every mode in `modes` can use (each input they need present and readable), so that the modes
    run on the same eyes and, with one seed, the same folds: their scores compare fold by fold. Returns
    (those eyes, the others with why)."""
    needed = sorted({name for mode in modes for name in MODES[mode]})
    kept, left = [], []
    for eye in eyes:
        absent = [name for name in needed if name not in eye.images]
        if absent:
            left.append(f"{eye.id} (no {' or '.join(absent)} image)")
            continue
        try:
            _load_inputs([eye], tuple(needed), 16)  # decoded whole: an unreadable file is found here
        except ImageReadError as error:
            left.append(f"{eye.id} ({error})")
            continue
        kept.append(eye)
    return kept, left


def cross_validate(
    eyes: list[LabelledEye],
    settings: ClinicalSettings,
    progress: Callable[[int, int], None] | None = None,
) -> ClinicalResult:
    """The clinical experiment for one mode: a classifier trained and scored on each of settings.folds
    grouped folds (no group in both train and test), settings.repeats times with other splits; each eye's
    out-of-fold probabilities averaged over the repeats (its fold: the first repeat's)."""
    if settings.mode not in MODES:
        raise FFASynthError(f"unknown mode {settings.mode!r}; choose from {', '.join(MODES)}")
    inputs = MODES[settings.mode]
    usable, skipped = [], []
    for eye in eyes:
        (usable if all(name in eye.images for name in inputs) else skipped).append(eye)
    if not usable:
        raise FFASynthError(f"no labelled example has the inputs {', '.join(inputs)} that mode {settings.mode} needs")
    torch.manual_seed(settings.seed)
    loaded, unreadable = [], []
    for eye in usable:
        try:
            loaded.append((eye, _load_inputs([eye], inputs, settings.image_size)[0]))
        except ImageReadError as error:
            unreadable.append(f"{eye.id} ({error})")
    usable = [eye for eye, _ in loaded]
    x = torch.stack([t for _, t in loaded])
    classes = sorted({eye.label for eye in usable})
    if len(classes) < 2:
        raise FFASynthError(f"need at least two classes, found {classes}")
    y = torch.tensor([classes.index(eye.label) for eye in usable])
    probabilities = np.zeros((len(usable), len(classes)), np.float32)
    fold_of = np.zeros(len(usable), np.int64)
    fold_metrics, fractions = [], []
    channels = [CHANNELS[name] for name in inputs]
    base = build_classifier(settings.backbone, channels, len(classes), settings.fusion, settings.weights)
    total = settings.folds * settings.repeats
    for repeat in range(settings.repeats):
        splits = make_folds(y.numpy(), [eye.group for eye in usable], settings.folds, settings.seed + repeat)
        for fold, (train, test) in enumerate(splits):
            seed = settings.seed + repeat * settings.folds + fold  # repeat 0: the seeds of a single run
            torch.manual_seed(seed)
            model = copy.deepcopy(base)
            _train_one(model, x[train], y[train], len(classes), settings, seed)
            predicted = _predict(model, x[test], settings.batch_size)
            probabilities[test] += predicted / settings.repeats
            if repeat == 0:
                fold_of[test] = fold
            fold_metrics.append(classification_metrics(y[test].numpy(), predicted, len(classes)))
            fractions.append(len(test) / len(train))
            if progress is not None:
                progress(repeat * settings.folds + fold + 1, total)
    return ClinicalResult(
        settings,
        classes,
        fold_metrics,
        y.numpy(),
        probabilities,
        fold_of,
        [e.id for e in usable],
        [e.id for e in skipped] + unreadable,
        test_fraction=float(np.mean(fractions)),
    )
