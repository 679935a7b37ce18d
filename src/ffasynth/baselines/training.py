"""Training and whole-image inference for the pix2pix baseline on ffasynth's own data pipeline,
loop (accelerate, checkpoints, resume, logs, sample grids) and output naming, so a comparison with
the diffusion model differs only in the method."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ffasynth import run_folder
from ffasynth.baselines.pix2pix import (
    UnetGenerator,
    discriminator_loss,
    generate_image,
    generator_loss,
    with_phase,
)
from ffasynth.config import Config, Pix2PixConfig, load_config
from ffasynth.configtree import read_yaml
from ffasynth.data.dataset import requested_phase
from ffasynth.data.io import read_image, save_image
from ffasynth.data.transforms import denormalise, normalise
from ffasynth.errors import ConfigError, FFASynthError, OutputError
from ffasynth.models.discriminator import NLayerDiscriminator
from ffasynth.training import checkpoint as ckpt
from ffasynth.training.loop import Task, TrainResult, train
from ffasynth.training.run import load_training_data, prepare_run
from ffasynth.translate import output_file, output_names


def build_generator(config: Pix2PixConfig) -> UnetGenerator:
    return UnetGenerator(3 + config.num_phases, 1, config.num_downs, config.ngf, config.norm, config.use_dropout)


class Pix2PixTask(Task):
    name = "pix2pix"

    def __init__(self, config: Pix2PixConfig):
        self.config = config
        self.generator = build_generator(config)
        # conditional discriminator: it sees the photo (and the phase maps) and the angiogram together
        channels = 3 + config.num_phases + 1
        self.discriminator = NLayerDiscriminator(channels, config.disc_channels, config.disc_layers, config.norm)
        self.trainable = {"generator": self.generator, "discriminator": self.discriminator}
        self._fake: tuple[int, torch.Tensor] | None = None

    def optimizer_groups(self) -> dict[str, list[str]]:
        return {"generator": ["generator"], "discriminator": ["discriminator"]}

    def to(self, device, weight_dtype) -> None:
        self.generator.to(device)
        self.discriminator.to(device)

    def generate(self, source: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The generator's output in training: its dropout draws from torch's global generator, seeded here from
        the step's own generator, so a resumed run repeats the uninterrupted one mask for mask."""
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[source.device] if source.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self.trainable["generator"](source)

    def condition(self, batch: dict) -> torch.Tensor:
        """What both networks are conditioned on: the photo, with the phase maps when the run has them."""
        return with_phase(batch["source"], batch["phase"], self.config.num_phases)

    def loss(self, batch: dict, step: int, generator: torch.Generator, optimizer: str):
        source, target = self.condition(batch), batch["target"]
        if optimizer == "generator":
            fake = self.generate(source, generator)
            self._fake = (id(batch), fake.detach())
            return generator_loss(
                self.trainable["discriminator"], source, fake, target, self.config.l1_weight, self.config.gan_loss
            )
        if self._fake is not None and self._fake[0] == id(batch):
            fake = self._fake[1]  # the generator's output for this batch, before its update (as pix2pix does)
        else:
            with torch.no_grad():
                fake = self.generate(source, generator)
        return discriminator_loss(self.trainable["discriminator"], source, fake, target, self.config.gan_loss)

    @torch.no_grad()
    def samples(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """photo | real FFA | pix2pix output."""
        return [
            batch["source"],
            batch["target"],
            generate_image(self.generator, self.condition(batch), self.config.tile, self.config.tile_overlap),
        ]


def train_pix2pix(
    config: Config, data: Path, out: Path, resume: bool = False, progress: bool = True, say: Callable = print
) -> TrainResult:
    settings = config.pix2pix
    multiple = 2**settings.num_downs
    if config.data.crop_size % multiple:
        raise ConfigError(
            f"data.crop_size={config.data.crop_size} must be a multiple of 2**pix2pix.num_downs={multiple}"
        )
    if settings.tile_overlap and settings.tile - settings.tile_overlap < multiple:  # checked here, not on load:
        raise ConfigError(  # an earlier run's generator still translates (its tiles then abut, unblended)
            f"pix2pix.tile_overlap={settings.tile_overlap} must leave tile − overlap >= 2**num_downs ({multiple}), "
            f"or be 0: tiles start on multiples of {multiple}"
        )
    dataset = load_training_data(data, config)
    run_dir = prepare_run(out, config, "pix2pix", data, resume)
    torch.manual_seed(config.seed)
    task = Pix2PixTask(config.pix2pix)
    parameters = sum(p.numel() for p in task.generator.parameters()) / 1e6
    say(f"{len(dataset)} training pairs; pix2pix generator {parameters:.2f} M parameters; run {run_dir}")
    result = train(task, dataset, config.pix2pix, run_dir, config.seed, resume, progress)
    if result.losses:
        say(f"done: {result.step} steps; L1 {result.losses[0]['l1']:.4f} → {result.losses[-1]['l1']:.4f}")
    return result


def load_generator(run_dir: str | Path) -> tuple[UnetGenerator, Pix2PixConfig]:
    run_dir = Path(run_dir)
    if run_folder.info(run_dir).get("kind") != "pix2pix":
        raise FFASynthError(f"{run_dir} is not a pix2pix run (made by `ffasynth baseline train`)")
    # a run from before the phase input has no pix2pix.num_phases in its config: it read the photo alone
    before_phases = "num_phases" not in (read_yaml(run_dir / "config.yaml").get("pix2pix") or {})
    config = load_config(run_dir / "config.yaml", overrides=["pix2pix.num_phases=0"] if before_phases else []).pix2pix
    folder = run_folder.latest_checkpoint(run_dir)
    generator = build_generator(config)
    ckpt.load_weights(folder, "generator", generator, ema=False)
    return generator.eval(), config


def generate_folder(
    run_dir: Path, files: list[Path], out_dir: Path, say: Callable = print, phase: str | None = None
) -> list[tuple[Path, str]]:
    """`<name>_ffa.png` per photo, like `ffasynth translate` (of `phase`, early by default, when the run
    reads the phase); returns the (file, reason) that failed."""
    generator, config = load_generator(run_dir)
    index = requested_phase(phase, config.num_phases, "pix2pix run") or 0  # 0: unused without phase maps
    stems, notes = output_names(files)
    failed = []
    for note in notes:
        say(f"note: {note}")
    for path in files:
        try:
            source = with_phase(normalise(read_image(path, channels=3))[None], [index], config.num_phases)
            fake = generate_image(generator, source, config.tile, config.tile_overlap)
            save_image(denormalise(fake.reshape(1, *fake.shape[-2:])), out_dir / output_file(stems[path]))
            say(f"{path.name} → {output_file(stems[path])}")
        except OutputError:  # disk full, no permission: every later image would fail alike
            raise
        except FFASynthError as error:
            failed.append((path, str(error)))
            say(f"error: {error}")
    return failed
