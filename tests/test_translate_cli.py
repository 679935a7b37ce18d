"""`ffasynth export` (run → pipeline folder + model card) and `ffasynth translate` (files and
folders → same-size FFA PNGs, uncertainty maps, bad files skipped)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from ffasynth.cli import app
from ffasynth.data.io import read_image, save_image
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.errors import FFASynthError
from ffasynth.translate import collect_inputs, output_stems, read_photo, uncertainty_rgb
from tests.corpus import HEIGHT, WIDTH, write_ffa, write_photo
from tests.helpers import STAGE2, train_micro_stage1

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    pairs = write_phantom_dataset(root / "pairs", n=4, size=48, seed=5)
    train_micro_stage1(pairs, root / "run", 3, extra=["data.fov_threshold=0.05"])  # not the default: export keeps it
    return root / "run"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "pipe"
    result = runner.invoke(app, ["export", str(trained), str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_export_writes_a_pipeline_folder_with_a_model_card(trained, exported, tmp_path):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "FFASynthesisPipeline" and index["num_phases"] == 2 and index["tile_size"] == 32
    assert index["fov_threshold"] == 0.05  # the run's data.fov_threshold: outside_field="black" masks its field
    assert json.loads((exported / "scheduler" / "scheduler_config.json").read_text())["algorithm_type"] == "dpmsolver++"
    unet = load_file(str(exported / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(trained / "checkpoints" / "step-000003" / "unet.ema.safetensors"))
    assert all(torch.equal(unet[k], v) for k, v in ema.items())
    card = (exported / "README.md").read_text()
    for fact in ("step 3 of 3", "EMA weights", str((trained.parent / "pairs").resolve()), "8 training pairs", "loss"):
        assert fact in card, fact
    # the card says how to load it and that this tiny run's U-Net started from random values
    assert "library_name: ffasynth" in card and "DiffusionPipeline.from_pretrained" in card
    assert "randomly initialised, not pretrained: unet" in card
    raw = tmp_path / "raw"
    assert runner.invoke(app, ["export", str(trained), str(raw), "--no-ema"]).exit_code == 0
    raw_unet = load_file(str(raw / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(raw_unet["conv_in.weight"], unet["conv_in.weight"])
    assert "raw (non-EMA)" in (raw / "README.md").read_text()
    assert runner.invoke(app, ["export", str(trained), str(raw)]).exit_code == 0  # an earlier export is replaced


def test_a_stage2_run_exports_its_stage1_model_with_the_tuned_decoder(trained, exported, tmp_path):
    info = json.loads((trained / "run.json").read_text())
    stage2 = tmp_path / "s2"
    result = runner.invoke(
        app,
        ["train", "stage2", "--from", str(trained), "--data", info["data"], "--out", str(stage2), "--max-steps", "2"]
        + ["--quiet", *STAGE2],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "pipe2"
    assert runner.invoke(app, ["export", str(stage2), str(out)]).exit_code == 0
    tuned = load_file(str(stage2 / "checkpoints" / "step-000002" / "decoder.ema.safetensors"))  # export takes the EMA
    vae = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(vae["decoder.conv_out.weight"], tuned["decoder.conv_out.weight"])
    stage1_vae = load_file(str(exported / "vae" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(vae["decoder.conv_out.weight"], stage1_vae["decoder.conv_out.weight"])
    assert torch.equal(vae["encoder.conv_in.weight"], stage1_vae["encoder.conv_in.weight"])
    unet = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(
        unet["conv_in.weight"],
        load_file(str(exported / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"],
    )
    card = (out / "README.md").read_text()
    assert "stage-2 run" in card and "decoder reconstruction PSNR" in card and "step 3 of 3" in card


def test_export_refuses_other_runs_and_foreign_folders(trained, tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "run.json").write_text(json.dumps({"kind": "vae"}))
    result = runner.invoke(app, ["export", str(tmp_path / "vae"), str(tmp_path / "out")])
    assert result.exit_code != 0 and "'vae' run" in str(result.exception)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(trained), str(tmp_path / "notes")])
    assert "not an ffasynth pipeline folder" in str(result.exception)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_translate_writes_same_size_grey_images_and_skips_bad_files(exported, tmp_path):
    photos = tmp_path / "photos"
    rng = np.random.default_rng(0)
    save_image((rng.random((37, 45, 3)) * 255).astype(np.uint8), photos / "a.png")
    Image.fromarray((rng.random((50, 33, 3)) * 255).astype(np.uint8)).save(photos / "b.jpg")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (photos / "notes.txt").write_text("not an image, not collected from a folder")
    single = tmp_path / "c.bmp"
    Image.fromarray((rng.random((20, 28)) * 255).astype(np.uint8)).save(single)
    out = tmp_path / "out"
    args = ["translate", str(exported), str(photos), str(single), "--out", str(out), "--steps", "2", "--quiet"]
    result = runner.invoke(app, [*args, "--samples", "2", "--phase", "late", "--tile-size", "16"])
    assert result.exit_code == 1, result.output
    assert "broken.png" in result.output and "1 failed" in result.output
    assert "skipped" in result.stderr and "\x1b[" not in result.output  # on stderr; no colour codes into a pipe
    assert sorted(p.name for p in out.iterdir()) == [
        "a_ffa.png",
        "a_uncertainty.png",
        "b_ffa.png",
        "b_uncertainty.png",
        "c_ffa.png",
        "c_uncertainty.png",
    ]
    for name, size in (("a", (45, 37)), ("b", (33, 50)), ("c", (28, 20))):
        with Image.open(out / f"{name}_ffa.png") as ffa, Image.open(out / f"{name}_uncertainty.png") as std:
            assert (ffa.mode, ffa.size, std.mode, std.size) == ("L", size, "RGB", size)
    first = read_image(out / "a_ffa.png")
    again = tmp_path / "again"
    result = runner.invoke(
        app, ["translate", str(exported), str(photos / "a.png"), "--out", str(again), "--steps", "2"]
    )
    assert result.exit_code == 0, result.output
    assert not torch.equal(first, read_image(again / "a_ffa.png"))  # 1 sample, early phase, no tiling
    for flag, word in (("--outside-field", "grey"), ("--decoder", "sharp"), ("--phase", "venous")):
        bad = runner.invoke(app, ["translate", "/no/such/pipeline", str(single), "--out", str(out), flag, word])
        # refused by name before the (here missing) pipeline is looked for
        assert isinstance(bad.exception, FFASynthError) and str(bad.exception).startswith(f"{flag} '{word}'")
    black = tmp_path / "black.png"  # a photo with a black rim: --outside-field black zeroes the output there
    rim = (rng.random((30, 30, 3)) * 200 + 55).astype(np.uint8)
    rim[:, :10] = 0
    save_image(rim, black)
    for mode in ("black", "model"):
        command = ["translate", str(exported), str(black), "--out", str(tmp_path / mode), "--steps", "2"]
        result = runner.invoke(app, [*command, "--outside-field", mode, "--quiet"])
        assert result.exit_code == 0, result.output
    ffa = {mode: read_image(tmp_path / mode / "black_ffa.png")[0] for mode in ("black", "model")}
    assert (ffa["black"][:, :6] == 0).all() and ffa["model"][:, :6].mean() > 0.02
    assert torch.equal(ffa["black"][:, 14:], ffa["model"][:, 14:])


def test_inputs_are_collected_named_and_coloured(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for folder in ("x", "y"):
        save_image(np.zeros((4, 4), np.uint8), tmp_path / folder / "7.png")
    save_image(np.zeros((4, 4), np.uint8), tmp_path / "x" / "7_ffa.png")  # an earlier output
    files, problems = collect_inputs([tmp_path / "x", tmp_path / "y", tmp_path / "missing.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["x/7.png", "y/7.png"]
    assert problems == [(tmp_path / "missing.png", "no such file or folder")]
    assert sorted(output_stems(files).values()) == ["x_7", "y_7"]
    colour = uncertainty_rgb(np.array([[0.0, 0.1, 0.2, 0.9]], np.float32), vmax=0.2)
    assert colour.shape == (1, 4, 3) and colour.dtype == np.uint8
    assert colour[0, 0].sum() < colour[0, 1].sum() < colour[0, 2].sum() and (colour[0, 2] == colour[0, 3]).all()


def test_half_precision_keeps_the_vae_in_float32_and_bfloat16_translates(exported):
    from ffasynth.translate import load_pipeline

    half = load_pipeline(exported, "cpu", "float16")
    assert (half.unet.dtype, half.vae.dtype) == (torch.float16, torch.float32)
    bf16 = load_pipeline(exported, "cpu", "bfloat16")
    assert (bf16.unet.dtype, bf16.vae.dtype) == (torch.bfloat16, torch.bfloat16)
    photo = torch.rand(3, 40, 36, generator=torch.Generator().manual_seed(0))
    full = load_pipeline(exported, "cpu", "float32")
    outputs = [
        p(photo, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        for p in (full, bf16)
    ]
    assert outputs[1].shape == (40, 36, 1) and np.isfinite(outputs[1]).all()
    assert np.abs(outputs[0] - outputs[1]).mean() < 0.05  # bf16 rounding, not a different image


def test_grey_photo_is_translated_with_a_warning_not_silently(tmp_path):
    grey = write_ffa(tmp_path / "angiogram.png")
    image, warning = read_photo(grey)
    assert image.shape == (3, HEIGHT, WIDTH) and torch.equal(image[0], image[2]) and "grey" in warning
    colour = write_photo(tmp_path / "photo.png")
    image, warning = read_photo(colour)
    assert warning is None and not np.allclose(image[0].numpy(), image[2].numpy())


def test_an_output_that_is_not_finite_is_reported_not_written(tmp_path):
    """A guidance of 1e308 overflows the guidance sum: the image is skipped with one line, no PNG of NaN."""
    from tests.helpers import micro_pipeline

    micro_pipeline("data.crop_size=32").save_pretrained(tmp_path / "pipe")
    photo = write_photo(tmp_path / "a.png")
    result = runner.invoke(app, ["translate", str(tmp_path / "pipe"), str(photo), "--out", str(tmp_path / "o"),
                                 "--guidance", "1e308", "--quiet"])  # fmt: skip
    assert result.exit_code == 1 and "the output is not finite" in result.output
    assert "translated 0 image(s)" in result.output and not list((tmp_path / "o").glob("*.png"))
