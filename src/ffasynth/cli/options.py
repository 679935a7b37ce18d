"""What several verbs share: the training options (`ffasynth train ...`, `ffasynth baseline train`),
written once and added to a verb by `@train_options()` (which also checks --out before any work);
`in_range` and `one_of`, the option callbacks that refuse a number outside its range or an unknown
word in one line; settings built from a verb's options; `say`."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer

from ffasynth.config import SEED_MAX, Config, load_config
from ffasynth.errors import FFASynthError, OutputError
from ffasynth.files import check_output_folder
from ffasynth.run_folder import split_dir
from ffasynth.translate import library_bars_off


@dataclass
class TrainOptions:
    """What every training verb is given, besides its own options."""

    data: Path
    out: Path
    config_file: Path | None = None
    preset: str | None = None
    resume: bool = False
    max_steps: int | None = None
    batch_size: int | None = None
    resolution: int | None = None
    save_every: int | None = None
    seed: int | None = None
    quiet: bool = False
    overrides: list[str] | None = None

    @property
    def progress(self) -> bool:
        return not self.quiet

    def config(self, section: str, start: Path | None = None, **fields: object) -> Config:
        """Defaults ← preset ← --config (or, with --resume, the run's saved config; else `start`)
        ← the flags (train.* meaning `section`.*) and `fields` ← key=value."""
        saved = self.out / "config.yaml"
        base = self.config_file or (saved if self.resume and saved.is_file() else start)
        flags = {
            f"{section}.max_steps": self.max_steps,
            f"{section}.batch_size": self.batch_size,
            "data.crop_size": self.resolution,
            f"{section}.save_every": self.save_every,
            "seed": self.seed,
            **fields,
        }
        # text (paths) quoted, so no character of it is read as YAML (`#`, `: `)
        extra = [
            f"{key}={json.dumps(str(value)) if isinstance(value, (str, os.PathLike)) else value}"
            for key, value in flags.items()
            if value is not None
        ]
        return load_config(base, self.preset, extra + list(self.overrides or []))


def allowed_range(low: float | None = None, high: float | None = None, above: bool = False) -> str:
    """[low, high] (or (low, high] with `above`) in words: "1 or more", "0 to 1", "more than 0"."""

    def number(value: float) -> str:
        return str(int(value)) if float(value).is_integer() else repr(float(value))

    if low is not None and high is not None:
        return f"{'more than ' if above else ''}{number(low)} to {number(high)}"
    if low is not None:
        return f"more than {number(low)}" if above else f"{number(low)} or more"
    return f"{number(high)} or less" if high is not None else "any finite number"


def in_range(low: float | None = None, high: float | None = None, above: bool = False) -> Callable:
    """A typer option callback refusing, in one line naming the option with the value asked and what is
    allowed, a number outside [low, high] ((low, high] with `above`) or a float that is not finite
    (nan, inf). Used in place of typer's min/max, whose message does not say what was asked."""

    def check(param: typer.CallbackParam, value):
        for asked in value if isinstance(value, list | tuple) else [value]:
            if asked is None or isinstance(asked, bool):
                continue
            finite = not isinstance(asked, float) or math.isfinite(asked)
            inside = finite and (low is None or asked > low or (asked == low and not above))
            inside = inside and (high is None or asked <= high)
            if not inside:
                why = "" if finite else "not a finite number; "
                raise FFASynthError(f"{param.opts[0]} {asked}: {why}allowed {allowed_range(low, high, above)}")
        return value

    return check


def _check_config_kept(given: Path | None, out: Path) -> None:
    """A new run writes its resolved config to OUT/config.yaml: refuse a hand-written --config there (a run's
    own, on --resume, is that resolved config already)."""
    written = out / "config.yaml"
    if given is not None and Path(given).resolve() == written.resolve() and not (out / "run.json").is_file():
        raise OutputError(f"--config {given} would be replaced by the run's resolved config.yaml; move it out of --out")


def one_of(*allowed: str) -> Callable:
    """A typer option callback refusing, in one line naming the option, a word not in `allowed`, before
    any work (a pipeline loads in seconds to minutes; what it alone can refuse, it refuses after)."""

    def check(param: typer.CallbackParam, value):
        if value is not None and value not in allowed:
            raise FFASynthError(f"{param.opts[0]} {value!r}: allowed {', '.join(map(repr, allowed))}")
        return value

    return check


# Seeds feed torch and numpy generators; both take 0 to 2**32 - 1 (numpy refuses a negative seed).
SEED = in_range(0, SEED_MAX)
at_least_1 = in_range(1)


# name → (type, typer option), in the order --help lists them
TRAIN_OPTIONS = {
    "data": (
        Path,
        typer.Option(..., "--data", help="Folder of registered pairs (its train/ subfolder is used when present)."),
    ),
    "out": (Path, typer.Option(..., "--out", help="Run folder to write (config, checkpoints, samples, logs).")),
    "config_file": (Path | None, typer.Option(None, "--config", help="YAML config file (see `configs/`).")),
    "preset": (str | None, typer.Option(None, "--preset", help="tiny (CPU, seconds) or sd15 (the paper's scale).")),
    "resume": (
        bool,
        typer.Option(False, "--resume", help="Continue from the run's newest complete checkpoint and config."),
    ),
    "max_steps": (int | None, typer.Option(None, "--max-steps", callback=at_least_1, help="Optimizer steps in total.")),
    "batch_size": (
        int | None,
        typer.Option(None, "--batch-size", callback=at_least_1, help="Crops per step (per process)."),
    ),
    "resolution": (
        int | None,
        typer.Option(
            None,
            "--resolution",
            callback=at_least_1,
            help="Crop size in pixels (data.crop_size), a multiple of the model's downsampling.",
        ),
    ),
    "save_every": (
        int | None,
        typer.Option(None, "--save-every", callback=at_least_1, help="Checkpoint every N steps."),
    ),
    "seed": (int | None, typer.Option(None, "--seed", callback=SEED, help="Seed for crops, noise and initialisation.")),
    "quiet": (bool, typer.Option(False, "--quiet", help="No progress bar.")),
    "overrides": (
        list[str] | None,
        typer.Argument(None, help="Any config field as key=value, e.g. stage1.lr=1e-4 model.use_clip=false."),
    ),
}


def train_options(without: tuple[str, ...] = ()) -> Callable:
    """Give a verb `def verb(options: TrainOptions, <its own options>)` the command line of its own
    options followed by TRAIN_OPTIONS (less `without`): typer reads the signature written here, and the
    verb is called with the shared values gathered into `options`."""
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
        for name, (kind, option) in TRAIN_OPTIONS.items()
        if name not in without
    ]

    def decorate(verb: Callable) -> Callable:
        own = list(inspect.signature(verb, eval_str=True).parameters.values())[1:]  # after `options`

        @functools.wraps(verb)
        def command(**values):
            options = TrainOptions(**{p.name: values.pop(p.name) for p in shared})
            data = options.data
            check_output_folder(options.out, [data, split_dir(data, "train"), split_dir(data, "test")])
            _check_config_kept(options.config_file, Path(options.out))
            if options.quiet:  # the libraries' own bars too
                library_bars_off()
            return verb(options, **values)

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared
        command.__signature__ = inspect.Signature(parameters, return_annotation=None)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return decorate


def say(message: str) -> None:
    """Progress lines to stdout; warnings in yellow to stderr."""
    warning = message.startswith("warning")
    typer.secho(message, err=warning, fg=typer.colors.YELLOW if warning else None)


def settings_from(settings_class: type, options: dict, **fields: object):
    """A settings dataclass from a verb's options named like its fields (`options = dict(locals())` as
    the verb's first line: typer passes each option as the parameter of its name), `fields` given or
    converted by the verb taking precedence."""
    names = {field.name for field in dataclasses.fields(settings_class)}
    return settings_class(**{**{k: v for k, v in options.items() if k in names}, **fields})
