"""The paper's path as a GPU user runs it, on CPU: `configs/sd15.yaml` pointed at folders in the real
SD1.5 and CLIP ViT-L/14 layouts (random values, reduced widths), stage 1 → stage 2 → export →
translate, all through the CLI. Then the runs are moved and the CLIP folder deleted, and export
still works: a run folder holds everything the pipeline needs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from ffasynth.cli import app
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.pipeline import FFASynthesisPipeline
from tests.fake_weights import write_torchvision
from tests.sd15_format import UNET_CHANNELS, write_openai_clip_folder, write_sd15_folder

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# What CPU tests shrink: the crop (64 px: 8² latents, 1² at the U-Net's bottom), the step counts.
# Everything else, bf16 and gradient checkpointing and accumulation included, is configs/sd15.yaml's.
SMALL = [
    "data.crop_size=64",
    "stage1.max_steps=2",
    "stage1.gradient_accumulation=2",
    "stage1.save_every=2",
    "stage1.sample_every=2",
    "stage1.sample_steps=2",
    "stage1.lr_warmup_steps=1",
    "stage1.log_every=1",
]
STAGE2 = [
    "stage2.max_steps=2",
    "stage2.gradient_accumulation=1",
    "stage2.save_every=2",
    "stage2.sample_every=2",
    "stage2.disc_start=1",
    "stage2.log_every=1",
    "stage2.lr_warmup_steps=1",
]
DISTILL = ["distill.max_steps=2", "distill.save_every=2", "distill.sample_every=2", "distill.batch_size=1",
           "distill.lr_warmup_steps=1", "distill.log_every=1", "distill.default_steps=4"]  # fmt: skip


def _invoke(args: list[str]):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{' '.join(map(str, args[:3]))}: {result.output}\n{result.exception!r}"
    return result


@pytest.mark.slow
def test_sd15_config_trains_both_stages_exports_and_translates(tmp_path):
    weights = tmp_path / "weights"
    sd15 = write_sd15_folder(weights / "stable-diffusion-v1-5")
    clip = write_openai_clip_folder(weights / "clip-vit-large-patch14")
    (weights / "lpips").mkdir()
    write_torchvision(weights / "lpips", "vgg16")  # stage 2's LPIPS-VGG backbone, torchvision's file
    data = write_phantom_dataset(tmp_path / "data", n=4, size=80, seed=1, test_fraction=0.25)
    runs = tmp_path / "runs"
    config = REPO / "configs" / "sd15.yaml"
    where = [f"model.pretrained={sd15}", f"model.image_encoder={clip}"]

    _invoke(["train", "stage1", "--config", config, "--data", data, "--out", runs / "s1", "--quiet", *where, *SMALL])
    resolved = json.loads(json.dumps(_yaml(runs / "s1" / "config.yaml")))
    assert resolved["stage1"]["mixed_precision"] == "bf16" and resolved["stage1"]["gradient_checkpointing"]
    info = json.loads((runs / "s1" / "run.json").read_text())
    assert info["sources"]["unet"] == str(sd15) and info["sources"]["image_encoder"] == str(clip)
    checkpoint = runs / "s1" / "checkpoints" / "step-000002"
    unet = load_file(str(checkpoint / "unet.safetensors"))
    assert unet["conv_in.weight"].shape[1] == 8  # SD1.5's 4 channels widened for the source latent
    assert not any("_orig_mod" in k or k.startswith("module.") for k in unet)
    assert len(list((runs / "s1" / "samples").glob("*.png"))) == 1

    _invoke(
        [
            "train", "stage2", "--from", runs / "s1", "--data", data, "--out", runs / "s2", "--quiet",
            f"stage2.weights_dir={weights / 'lpips'}", *STAGE2,
        ]
    )  # fmt: skip
    assert json.loads((runs / "s2" / "run.json").read_text())["decoder_psnr"]["images"] >= 1

    # LCM-LoRA-sized distillation of the stage-2 model, as configs/sd15.yaml sets it (rank 64, bf16, checkpointing)
    said = _invoke(["train", "distill", "--from", runs / "s2", "--data", data, "--out", runs / "lcm", *DISTILL]).output
    resolved = _yaml(runs / "lcm" / "config.yaml")["distill"]
    assert resolved["lora"]["rank"] == 64 and resolved["mixed_precision"] == "bf16"
    assert resolved["gradient_checkpointing"] and "(LoRA)" in said
    trainable = float(said.split(" M trainable student parameters")[0].rsplit(" ", 1)[-1]) * 1e6
    student = load_file(str(runs / "lcm" / "checkpoints" / "step-000002" / "unet.safetensors"))
    assert any(".lora_A." in k for k in student) and "time_embedding.cond_proj.weight" in student
    learnt = sum(v.numel() for k, v in student.items() if ".lora_" in k or "cond_proj" in k)
    assert abs(trainable - learnt) <= 0.005e6  # only the adapters and the guidance input learn (SD1.5: ~8%)

    # another machine: the runs moved, the original weights folders gone
    moved = tmp_path / "elsewhere"
    shutil.move(str(runs), str(moved))
    shutil.rmtree(weights)
    _invoke(["export", moved / "s2", tmp_path / "pipeline"])
    card = (tmp_path / "pipeline" / "README.md").read_text()
    assert "library_name: ffasynth" in card and "randomly initialised" not in card

    pipe = FFASynthesisPipeline.from_pretrained(tmp_path / "pipeline")
    assert tuple(pipe.unet.config.block_out_channels) == UNET_CHANNELS and pipe.unet.config.in_channels == 8
    assert pipe.image_encoder.config.projection_dim == pipe.unet.config.cross_attention_dim == 768
    photo = tmp_path / "photo.png"
    Image.fromarray((torch.rand(72, 100, 3) * 255).byte().numpy()).save(photo)
    _invoke(["translate", tmp_path / "pipeline", photo, "--out", tmp_path / "out", "--steps", "2", "--quiet"])
    result = Image.open(tmp_path / "out" / "photo_ffa.png")
    assert result.size == (100, 72) and result.mode == "L"

    _invoke(["export", moved / "lcm", tmp_path / "lcm-pipeline"])  # found its moved teacher beside it
    lcm = FFASynthesisPipeline.from_pretrained(tmp_path / "lcm-pipeline")
    assert type(lcm.scheduler).__name__ == "LCMScheduler" and lcm.config.num_inference_steps == 4
    assert lcm.unet.config.time_cond_proj_dim == 256 and lcm.preview_decoder is not None
    _invoke(["translate", tmp_path / "lcm-pipeline", photo, "--out", tmp_path / "lcm-out", "--quiet"])
    assert Image.open(tmp_path / "lcm-out" / "photo_ffa.png").size == (100, 72)


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())
