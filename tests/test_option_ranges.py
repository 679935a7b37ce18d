"""Options outside their range are refused, not quietly adjusted (issue 22, item 3): tile sizes that
are not a multiple of the model's downsampling (or smaller than it), overlaps of half a tile or more,
negative or oversized seeds, nan/inf for any float, step counts below 1, and config values in the
same spirit. Each refusal is one line naming the option (or config key) with the value asked and what
is allowed, exit code 2, nothing written. A value rounded on purpose (a tile overlap to whole latent
pixels) is said in one line, and the rounding is what the tiler does.

The CLI cases are marked `corpus` and count in the bad-input tally (conftest.py)."""

from __future__ import annotations

import inspect
import math
import typing
from pathlib import Path

import pytest
import torch

from ffasynth.cli import app
from ffasynth.config import load_config
from ffasynth.errors import ConfigError, FFASynthError
from ffasynth.tiling import check_tile_settings
from tests.corpus import HEIGHT, WIDTH, cli, complete_png, exit_problem, line_problem, write_photo
from tests.helpers import micro_pipeline, seeded

corpus = pytest.mark.corpus
# the micro pipeline: VAE ×2 and U-Net ×2 downsampling, so tiles are multiples of 4 and overlaps of 2


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline") / "pipeline"
    micro_pipeline("data.crop_size=32").save_pretrained(folder)
    return folder


def refused(run, asked: str, words: str) -> str | None:
    """None when the run stopped (exit 2) with one line naming `asked` (option and value) and `words`."""
    return line_problem(run.output, asked, words) or exit_problem(run, 2)


# ---- translate: (its options, what the line names, what it says)
TRANSLATE = [
    (["--seed", "-1"], "--seed -1", "allowed 0 to 4294967295"),
    (["--seed", str(2**32)], "--seed 4294967296", "allowed 0 to 4294967295"),
    (["--guidance", "nan"], "--guidance nan", "not a finite number; allowed 1 or more"),
    (["--guidance", "inf"], "--guidance inf", "not a finite number"),
    (["--guidance", "0.5"], "--guidance 0.5", "allowed 1 or more"),
    (["--steps", "0"], "--steps 0", "allowed 1 or more"),
    (["--samples", "0"], "--samples 0", "allowed 1 or more"),
    (["--uncertainty-max", "nan"], "--uncertainty-max nan", "not a finite number"),
    (["--uncertainty-max", "0"], "--uncertainty-max 0", "allowed more than 0"),
    (["--tile-size", "30"], "--tile-size 30", "a multiple of 4, the model's downsampling (e.g. 28 or 32)"),
    (["--tile-size", "2"], "--tile-size 2", "a multiple of 4"),
    (["--tile-size", "-8"], "--tile-size -8", "allowed 0 or more"),
    (["--tile-size", "16", "--tile-overlap", "16"], "--tile-overlap 16", "allowed 0 to 8 (half the tile)"),
    (["--tile-size", "16", "--tile-overlap", "9"], "--tile-overlap 9", "allowed 0 to 8"),
    (["--tile-overlap", "-1"], "--tile-overlap -1", "allowed 0 or more"),
    (["--decode-tile-size", "33"], "--decode-tile-size 33", "a multiple of 2, the vae's downsampling"),
]


@corpus
@pytest.mark.parametrize("args, asked, words", TRANSLATE, ids=[case[1] for case in TRANSLATE])
def test_translate_option_out_of_range(args, asked, words, pipeline_dir, tmp_path):
    out = tmp_path / "out"
    run = cli("translate", pipeline_dir, write_photo(tmp_path / "a.png"), "--out", out, "--quiet", *args)
    problem = refused(run, asked, words)
    assert not problem, problem
    assert not out.exists()


@corpus
def test_translate_says_when_it_rounds_the_overlap(pipeline_dir, tmp_path):
    out = tmp_path / "out"
    photo = write_photo(tmp_path / "a.png")
    run = cli(
        "translate", pipeline_dir, photo, "--out", out, "--steps", "1", "--tile-size", "16", "--tile-overlap", "5"
    )
    problem = line_problem(run.output, "--tile-overlap 5", "rounded down to 4") or exit_problem(run, 0)
    problem = problem or complete_png(out / "a_ffa.png", (WIDTH, HEIGHT))
    assert not problem, problem


def test_the_noted_rounding_is_what_the_tiler_does():
    """An overlap of 5 px runs exactly as 4 (two latent pixels), as the note says; 6 differs."""
    pipe = micro_pipeline("data.crop_size=32")
    photo = torch.rand(3, 40, 52, generator=seeded(1))

    def run(overlap):
        return pipe(photo, num_inference_steps=2, generator=seeded(0), output_type="pt", tile_size=16,
                    tile_overlap=overlap).images[0]  # fmt: skip

    assert torch.equal(run(5), run(4)) and not torch.equal(run(6), run(4))
    with pytest.raises(FFASynthError, match="tile_size 30: allowed 0"):
        pipe(photo, num_inference_steps=1, tile_size=30)
    with pytest.raises(FFASynthError, match="image_guidance_scale nan"):
        pipe(photo, num_inference_steps=1, image_guidance_scale=math.nan)


@pytest.mark.parametrize(
    "size, overlap, decode, refusal",
    [
        (0, None, None, None),  # the whole image
        (16, 8, 0, None),
        (32, 0, 512, None),
        (20, None, None, "tile_size 20"),  # 20 = 5 latent px: the U-Net cannot halve it
        (8, None, None, "tile_size 8"),  # smaller than the downsampling
        (16, 10, None, "tile_overlap 10"),
        (16, None, 6, "decode_tile_size 6"),
    ],
)
def test_tile_settings_table(size, overlap, decode, refusal):
    """VAE factor 4, U-Net factor 4 (the tiny preset): tiles are multiples of 16."""
    if refusal is None:
        assert check_tile_settings(size, overlap, decode, 4, 4) == []
    else:
        with pytest.raises(FFASynthError, match=refusal):
            check_tile_settings(size, overlap, decode, 4, 4)
    assert check_tile_settings(32, 6, None, 4, 4) == ["tile_overlap 6 is rounded down to 4, a whole number of "
                                                      "latent pixels (4 px each)"]  # fmt: skip


# ---- the other verbs: (command line, what the line names, what it says)
def _other_verbs(tmp: Path) -> list[tuple[list, str, str]]:
    out, data = tmp / "out", tmp / "data"
    return [
        (["evaluate", "--real", data, "--fake", data, "--out", out, "--fov-threshold", "nan"], "--fov-threshold nan",
         "not a finite number; allowed 0 to 1"),
        (["evaluate", "--real", data, "--fake", data, "--out", out, "--fov-threshold", "1.5"], "--fov-threshold 1.5",
         "allowed 0 to 1"),
        (["evaluate", "--real", data, "--fake", data, "--out", out, "--seed", "-1"], "--seed -1", "allowed 0 to"),
        (["evaluate", "--real", data, "--fake", data, "--out", out, "--patch-size", "8"], "--patch-size 8",
         "allowed 16 or more"),
        (["clinical", "--data", data, "--out", out, "--lr", "nan"], "--lr nan", "not a finite number"),
        (["clinical", "--data", data, "--out", out, "--lr", "0"], "--lr 0", "allowed more than 0"),
        (["clinical", "--data", data, "--out", out, "--steps", "0"], "--steps 0", "allowed 1 or more"),
        (["clinical", "--data", data, "--out", out, "--folds", "1"], "--folds 1", "allowed 2 or more"),
        (["clinical", "--data", data, "--out", out, "--seed", "-2"], "--seed -2", "allowed 0 to"),
        (["data", "phantom", out, "--seed", "-1"], "--seed -1", "allowed 0 to"),
        (["data", "phantom", out, "--test-fraction", "inf"], "--test-fraction inf", "not a finite number"),
        (["data", "phantom", out, "--size", "16"], "--size 16", "allowed 32 or more"),
        (["data", "phantom", out, "--n", "0"], "--n 0", "allowed 1 or more"),
        (["data", "register", data, "--out", out, "--min-margin", "nan"], "--min-margin nan", "not a finite number"),
        (["data", "register", data, "--out", out, "--min-margin", "-1"], "--min-margin -1.0", "allowed 0 to 1"),
        (["data", "check", data, "--max-pixels", "0"], "--max-pixels 0", "allowed 1 or more"),
        (["quickstart", "--out", out, "--minutes", "inf"], "--minutes inf", "not a finite number"),
        (["quickstart", "--out", out, "--minutes", "0.1"], "--minutes 0.1", "allowed 0.2 or more"),
        (["quickstart", "--out", out, "--steps", "0"], "--steps 0", "allowed 1 or more"),
        (["quickstart", "--out", out, "--seed", "-1"], "--seed -1", "allowed 0 to"),
        (["base", "build", "--out", out, "--minutes", "nan"], "--minutes nan", "not a finite number"),
        (["base", "build", "--out", out, "--seed", "-1"], "--seed -1", "allowed 0 to"),
        (["train", "stage1", "--data", data, "--out", out, "--max-steps", "0"], "--max-steps 0", "allowed 1 or more"),
        (["train", "stage1", "--data", data, "--out", out, "--seed", "-1"], "--seed -1", "allowed 0 to"),
        (["train", "vae", "--data", data, "--out", out, "--batch-size", "0"], "--batch-size 0", "allowed 1 or more"),
        (["baseline", "train", "--data", data, "--out", out, "--save-every", "0"], "--save-every 0",
         "allowed 1 or more"),
    ]  # fmt: skip


OTHER_IDS = [f"{' '.join(map(str, case[0][:2]))} {case[1]}" for case in _other_verbs(Path("."))]


@corpus
@pytest.mark.parametrize("index", range(len(OTHER_IDS)), ids=OTHER_IDS)
def test_other_verbs_option_out_of_range(index, tmp_path):
    args, asked, words = _other_verbs(tmp_path)[index]
    (tmp_path / "data").mkdir()
    run = cli(*args)
    problem = refused(run, asked, words)
    assert not problem, problem
    assert not (tmp_path / "out").exists()


# ---- config values: (override, what the line names, what it says)
CONFIG = [
    ("stage1.lr=.nan", "stage1.lr=nan", "must be a finite number"),
    ("stage1.lr=inf", "stage1.lr='inf'", "must be a finite number"),
    ("seed=-5", "seed=-5", "must be between 0 and 4294967295"),
    ("data.crop_size=40", "data.crop_size=40", "must be a multiple of 16"),
    ("stage1.sample_steps=0", "stage1.sample_steps=0", "must be in [1, num_train_timesteps - 1 = 999]"),
    ("stage1.inference_steps=1000", "stage1.inference_steps=1000", "must be in [1, num_train_timesteps - 1 = 999]"),
    ("stage2.unet_max_timestep=5000", "stage2.unet_max_timestep=5000", "must be at most 1000"),
    ("stage2.latent_reuse=0", "stage2.latent_reuse=0", "must be at least 1"),
    ("stage1.rehearsal=1", "stage1.rehearsal=1.0", "must be in [0, 1)"),
    ("stage1.max_minutes=0", "stage1.max_minutes=0.0", "must be positive or null"),
    ("stage1.adam_beta2=1", "stage1.adam_beta2=1.0", "must be in [0, 1)"),
    ("model.clip_image_size=65", "model.clip_image_size=65", "must be a multiple of clip_patch_size (8)"),
    ("pix2pix.tile=100", "pix2pix.tile=100", "must be a multiple of 2**num_downs (64)"),
    ("stage2.disc_lr_factor=0", "stage2.disc_lr_factor=0.0", "must be positive"),
    ("vae.kl_weight=-1", "vae.kl_weight=-1.0", "must be >= 0"),
]


@corpus
@pytest.mark.parametrize("override, asked, words", CONFIG, ids=[case[0] for case in CONFIG])
def test_config_value_out_of_range(override, asked, words, tmp_path):
    out = tmp_path / "run"
    run = cli("train", "stage1", "--data", tmp_path, "--out", out, "--preset", "tiny", override)
    problem = refused(run, f"config value {asked}", words)
    assert not problem, problem
    assert not out.exists()


@corpus
def test_config_file_with_a_non_finite_value(tmp_path):
    config = tmp_path / "nan.yaml"
    config.write_text("preset: tiny\nstage2:\n  adv_weight: .inf\n")
    run = cli("train", "vae", "--data", tmp_path, "--out", tmp_path / "run", "--config", config)
    problem = refused(run, "config value stage2.adv_weight=inf", "must be a finite number")
    assert not problem, problem


def test_config_ranges_accept_the_presets_and_their_edges():
    for preset in ("tiny", "sd15"):
        load_config(preset=preset)
    edges = ["seed=0", "seed=4294967295", "stage1.sample_steps=999", "stage1.max_minutes=0.5", "stage2.disc_start=0"]
    assert load_config(preset="tiny", overrides=edges).seed == 4294967295
    with pytest.raises(ConfigError, match="seed=4294967296"):
        load_config(preset="tiny", overrides=["seed=4294967296"])


# ---- every float option of every verb has a range (so nan and inf cannot slip through)


def _commands(typer_app, prefix=""):
    for info in typer_app.registered_commands:
        yield f"{prefix}{info.name or info.callback.__name__}", info.callback
    for group in typer_app.registered_groups:
        yield from _commands(group.typer_instance, f"{prefix}{group.name} ")


def test_every_float_option_is_range_checked():
    unchecked, seen = [], 0
    for name, callback in _commands(app):
        for parameter in inspect.signature(callback, eval_str=True).parameters.values():
            kinds = typing.get_args(parameter.annotation) or (parameter.annotation,)
            if float not in kinds:
                continue
            seen += 1
            option = parameter.default
            if option.callback is None and option.min is None and option.max is None:
                unchecked.append(f"{name} {parameter.name}")
    assert seen >= 8 and not unchecked, unchecked
