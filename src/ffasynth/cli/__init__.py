"""The `ffasynth` command line: thin verbs over the library. Each sub-module adds one group.

Errors the user can act on (FFASynthError) print as one line and exit 2; set FFASYNTH_DEBUG=1 for
the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

from ffasynth import __version__
from ffasynth.cli import base as base_cli
from ffasynth.cli import baseline as baseline_cli
from ffasynth.cli import clinical as clinical_cli
from ffasynth.cli import data as data_cli
from ffasynth.cli import evaluate as evaluate_cli
from ffasynth.cli import export as export_cli
from ffasynth.cli import quickstart as quickstart_cli
from ffasynth.cli import train as train_cli
from ffasynth.cli import translate as translate_cli
from ffasynth.cli import weights as weights_cli
from ffasynth.errors import FFASynthError

app = typer.Typer(
    name="ffasynth",
    help="Synthesise fluorescein angiograms (FFA) from retinal photographs with latent diffusion (StableFFA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_cli.app, name="data")
app.add_typer(train_cli.app, name="train")
app.command("evaluate")(evaluate_cli.evaluate_command)
app.command("export")(export_cli.export)
app.command("translate")(translate_cli.translate)
app.command("quickstart")(quickstart_cli.quickstart)
app.command("serve")(quickstart_cli.serve)
app.command("clinical")(clinical_cli.clinical)
app.add_typer(baseline_cli.app, name="baseline")
app.add_typer(weights_cli.app, name="weights")
app.add_typer(base_cli.app, name="base")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ffasynth {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """ffasynth: photograph → synthetic fluorescein angiogram."""


def _quiet_libraries() -> None:
    """Our own progress bars and messages only; the libraries' per-shard bars and notices are noise here."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("diffusers", "transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")  # deprecated-argument notices
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # imported before the variable was set (huggingface_hub comes with the CLI): their switches, not their reading
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()  # transformers imported later follows it
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()  # "Loading weights" bars


def main() -> None:
    if not os.environ.get("FFASYNTH_DEBUG"):
        _quiet_libraries()
    try:
        app()
    except FFASynthError as error:
        if os.environ.get("FFASYNTH_DEBUG"):
            raise
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(2)
