"""Validate the pairs `ffasynth.data.pairs` finds: every file readable, large enough, source and target of one
size, a colour photo and a grey angiogram, and no image twice (one eye counted as two, or a test eye among
the training eyes). `check_pairs` never stops at the first bad file: it returns the valid pairs and every
problem; `load_pairs` gives the usable pairs for training and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ffasynth.data.io import MIN_SIDE, image_size, read_image, twelve_bit_data
from ffasynth.data.pairs import Pair, PairReport, Problem, discover_pairs
from ffasynth.errors import ImageReadError, PairError
from ffasynth.integrity import file_sha256


def check_pairs(
    root: str | Path, layout: str = "auto", decode: bool = True, max_pixels: int | None = None
) -> PairReport:
    """Discover pairs and validate every file: readable (fully decoded when `decode`), at least
    MIN_SIDE pixels a side, source and target of the same size, and (when decoded) a colour source
    and a grey target. Invalid pairs are dropped and each cause reported once. When decoded, two things
    are reported that leave the pair in (`flag_suspects`, Problem.kept): one image under two names, and
    16-bit data that uses only 12 bits."""
    layout, candidates, problems = discover_pairs(root, layout)
    report = PairReport(Path(root), layout, problems=list(problems))
    info: dict[Path, tuple[tuple[int, int], int] | None] = {}

    def inspect(path: Path):
        if path not in info:
            try:
                if decode:
                    image = read_image(path, max_pixels=max_pixels)
                    info[path] = ((image.shape[2], image.shape[1]), image.shape[0])
                else:
                    info[path] = (image_size(path, max_pixels), 0)
                report.sizes[str(path)] = info[path][0]
            except ImageReadError as error:
                info[path] = None
                report.problems.append(Problem("unreadable", str(path), error.cause))
        return info[path]

    reported: set[tuple[str, Path]] = set()

    def flag(kind: str, path: Path, message: str, kept: bool = False) -> None:
        if (kind, path) not in reported:
            reported.add((kind, path))
            report.problems.append(Problem(kind, str(path), message, kept))

    for pair in candidates:
        source, target = inspect(pair.source), inspect(pair.target)
        if source is None or target is None:
            continue
        small = [(path, size) for path, (size, _) in ((pair.source, source), (pair.target, target))]
        small = [(path, size) for path, size in small if min(size) < MIN_SIDE]
        for path, size in small:
            flag("too-small", path, f"too small: {size[0]}x{size[1]} pixels (at least {MIN_SIDE} on each side)")
        if small:
            continue
        if source[0] != target[0]:
            flag(
                "size-mismatch",
                pair.target,
                f"target is {target[0][0]}x{target[0][1]} but source {pair.source.name} is "
                f"{source[0][0]}x{source[0][1]} (register or resize the pair)",
            )
            continue
        if decode and target[1] == 3:
            flag("colour-target", pair.target, "target is a colour image; an FFA should be grey")
            continue
        if decode and source[1] == 1:
            flag("grey-source", pair.source, "source is a grey image; a colour photograph was expected")
            continue
        report.pairs.append(pair)
    if decode:
        flag_suspects(report, flag)
    return report


def flag_suspects(report: PairReport, flag: Callable[..., None]) -> None:
    """Problems that may be data as meant, so their pairs stay: a file whose bytes another file of the folder
    repeats (one eye counted as two eyes; across train/ and test/, a test eye trained on), and a 16-bit image
    whose values stay within 0..4095 (12-bit data: read as near black). (Orientation tags that differ between
    a photo and its angiogram are not among them: a camera's tag on one of them is the usual case, and each
    image read as displayed is what lines up.)"""
    first_of: dict[str, Path] = {}
    for path in sorted({p for pair in report.pairs for p in (pair.source, pair.target)}):
        digest = file_sha256(path)  # once a process: training's record of its photos reuses it
        if first_of.setdefault(digest, path) != path:
            flag("duplicate", path, kept=True, message=f"the same bytes as {first_of[digest]}: one image under two "
                 "names (one eye counted twice; across train/ and test/ a test eye is trained on)")  # fmt: skip
        if twelve_bit_data(path):
            flag("low-bit", path, kept=True, message="16-bit data that stays within 0..4095 (12-bit?): it "
                 "reads almost black; rescale it to the full 16-bit range")  # fmt: skip


def load_pairs(
    root: str | Path,
    layout: str = "auto",
    phase: str = "both",
    max_pixels: int | None = None,
    decode: bool = False,
    on_problem: Callable[[Problem], None] | None = None,
) -> list[Pair]:
    """Valid pairs for training/evaluation, filtered by phase ('early', 'late' or 'both'); each
    problem is passed to `on_problem`. Raises PairError (naming the folder and the first problem)
    when none is usable. decode=True reads every image in full (catches truncated files)."""
    report = check_pairs(root, layout, decode=decode, max_pixels=max_pixels)
    for problem in report.problems if on_problem else ():
        on_problem(problem)
    pairs = [p for p in report.pairs if phase == "both" or p.phase in (None, phase)]
    if not pairs:
        first = f"; first problem: {report.problems[0].path}: {report.problems[0].message}" if report.problems else ""
        raise PairError(f"{root}: no usable {'' if phase == 'both' else phase + '-phase '}pairs{first}")
    return pairs
