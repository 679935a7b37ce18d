"""LoRA on the stage-1 U-Net (stage1.lora, models/lora.py): what trains (the adapters, conv_in, the phase
embedding; their count from the rank arithmetic), in which dtype, that a run resumes and exports, and that
the merged export computes what the adapter model computes (a wrong alpha/rank scale would show)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from ffasynth.config import load_config
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.errors import ConfigError
from ffasynth.export import export_run
from ffasynth.models.components import build_components
from ffasynth.models.lora import ADAPTER_FOLDER, add_lora, has_lora
from ffasynth.pipeline import FFASynthesisPipeline
from ffasynth.training.run import load_stage1_run
from ffasynth.training.stage1 import build_stage1, trainable_parameters
from ffasynth.training.stages import train_stage1
from tests.helpers import invoke, micro_config, train_micro_stage1
from tests.sd15_format import write_openai_clip_folder, write_sd15_folder

REPO = Path(__file__).resolve().parents[1]

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _unet_inputs(unet, batch: int = 2, size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    tokens = torch.randn(batch, 1, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([10, 700][:batch]), tokens, torch.tensor([0, 1][:batch])


def _output(unet, inputs) -> torch.Tensor:
    latents, t, tokens, labels = inputs
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=tokens, class_labels=labels).sample


def test_trainable_parameters_are_the_adapters_conv_in_and_the_phase_embedding():
    rank = 3
    plain = build_components(micro_config(), random_weights=True).unet
    targeted = [m for n, m in plain.named_modules() if isinstance(m, nn.Linear) and any(n.endswith(t) for t in TARGETS)]
    task = build_stage1(micro_config(f"stage1.lora.rank={rank}"))
    projection = task.trainable.get("projection", nn.Identity())
    # A (rank×in) + B (out×rank) per targeted layer; conv_in and the phase embedding whole
    adapters = sum(rank * (m.in_features + m.out_features) for m in targeted)
    whole = plain.conv_in.weight.numel() + plain.conv_in.bias.numel() + plain.class_embedding.weight.numel()
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in plain.modules())
    assert blocks and len(targeted) == 4 * 2 * blocks  # 4 projections × (self + cross attention) per block
    assert trainable_parameters(task) == adapters + whole + sum(p.numel() for p in projection.parameters())
    assert trainable_parameters(task) < 0.2 * sum(p.numel() for p in plain.parameters())


def test_adapters_start_as_the_base_model_and_only_they_and_conv_in_get_gradients():
    config = micro_config("stage1.lora.rank=2", "stage1.lora.alpha=4")
    torch.manual_seed(0)
    unet = build_components(config, random_weights=True).unet
    inputs = _unet_inputs(unet)
    before = _output(unet, inputs)
    add_lora(unet, config.stage1.lora)
    assert torch.equal(_output(unet, inputs), before)  # B = 0: W + (alpha/rank)·B·A = W

    latents, t, tokens, labels = inputs
    unet(latents, t, encoder_hidden_states=tokens, class_labels=labels).sample.square().mean().backward()
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == with_grad
    assert {"conv_in.weight", "conv_in.bias", "class_embedding.weight"} <= with_grad
    assert all(".lora_" in n for n in with_grad - {"conv_in.weight", "conv_in.bias", "class_embedding.weight"})
    assert any(n.endswith("to_q.lora_B.default.weight") for n in with_grad)


def test_under_mixed_precision_the_frozen_base_weights_are_bf16_and_what_learns_float32():
    task = build_stage1(micro_config("stage1.lora.rank=2"))
    task.to(torch.device("cpu"), torch.bfloat16)
    dtypes = {n: p.dtype for n, p in task.components.unet.named_parameters()}
    learning = {n for n, p in task.components.unet.named_parameters() if p.requires_grad}
    assert {dtypes[n] for n in learning} == {torch.float32}
    assert {dtypes[n] for n in dtypes if n not in learning} == {torch.bfloat16}
    assert dtypes["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight"] == torch.bfloat16


def test_full_fine_tuning_keeps_the_unet_float32_and_wholly_trainable():
    task = build_stage1(micro_config())
    task.to(torch.device("cpu"), torch.bfloat16)
    unet = task.components.unet
    assert not has_lora(unet)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in unet.parameters())


def test_target_modules_that_match_no_layer_are_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"stage1\.lora\.target_modules \(to_nothing\) match no layer"):
        build_stage1(micro_config("stage1.lora.rank=2", "stage1.lora.target_modules=[to_nothing]"))
    with pytest.raises(ConfigError, match=r"stage1\.lora\.rank"):
        load_config(preset="tiny", overrides=["stage1.lora.rank=-1"])


# A micro LoRA run: rank 2, alpha 6 (scale 3, so a merge that forgot alpha/rank would show), a learning
# rate that moves the adapters well away from zero in a few steps
LORA_RUN = ["stage1.lora.rank=2", "stage1.lora.alpha=6", "stage1.lr=2e-2"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Six LoRA steps straight, and three then three more resumed; the pairs they trained on."""
    root = tmp_path_factory.mktemp("lora")
    pairs = write_phantom_dataset(root / "pairs", n=3, size=48, seed=1)
    train_micro_stage1(pairs, root / "straight", 6, extra=LORA_RUN)
    train_micro_stage1(pairs, root / "resumed", 3, extra=LORA_RUN)
    train_micro_stage1(pairs, root / "resumed", 6, resume=True, extra=LORA_RUN)
    return root


@pytest.mark.slow
def test_a_lora_run_checkpoints_its_adapters_and_resumes_bit_for_bit(lora_run):
    straight = lora_run / "straight" / "checkpoints" / "step-000006"
    resumed = lora_run / "resumed" / "checkpoints" / "step-000006"
    unet, ema = load_file(str(straight / "unet.safetensors")), load_file(str(straight / "unet.ema.safetensors"))
    adapters = [k for k in unet if ".lora_B." in k]
    assert adapters and all(unet[k].abs().max() > 0 for k in adapters)  # the adapters learned
    # the EMA follows only what trains: adapters, conv_in, the phase embedding
    assert set(ema) == {k for k in unet if ".lora_" in k} | {"conv_in.weight", "conv_in.bias", "class_embedding.weight"}
    for name in ("unet.safetensors", "unet.ema.safetensors"):
        other = load_file(str(resumed / name))
        assert all(torch.equal(value, other[key]) for key, value in load_file(str(straight / name)).items())


@pytest.mark.slow
def test_merged_and_separate_exports_compute_what_the_adapter_model_computes(lora_run):
    run = lora_run / "straight"
    adapted = load_stage1_run(run, merge=False).components.unet
    assert has_lora(adapted)
    merged_dir = export_run(run, lora_run / "merged")
    separate_dir = export_run(run, lora_run / "separate", lora="separate")

    # merged: a plain diffusers U-Net, no adapter left in its weights file
    merged = FFASynthesisPipeline.from_pretrained(merged_dir).unet
    assert not has_lora(merged)
    assert not any(
        "lora" in k or "base_layer" in k for k in load_file(str(next((merged_dir / "unet").glob("*.safetensors"))))
    )
    # separate: the adapters apart, put back by from_pretrained
    assert (separate_dir / ADAPTER_FOLDER).is_dir()
    separate = FFASynthesisPipeline.from_pretrained(separate_dir).unet
    assert has_lora(separate)

    inputs = _unet_inputs(adapted)
    reference = _output(adapted, inputs)
    adapted.disable_adapters()
    without = _output(adapted, inputs)  # the same U-Net with its adapters switched off
    gap = (reference - without).abs().max()
    assert gap > 1e-2  # what the adapters contribute is far above the tolerance below
    for unet in (merged, separate):
        assert (_output(unet, inputs) - reference).abs().max() < 1e-3 * gap
    assert "LoRA: rank 2, alpha 6.0" in (merged_dir / "README.md").read_text()


@pytest.mark.slow
def test_the_exported_lora_model_translates_unlike_its_base(lora_run, tmp_path):
    photo = tmp_path / "photo.png"
    pixels = torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(0))
    Image.fromarray((pixels * 255).byte().numpy()).save(photo)
    folder = export_run(lora_run / "straight", tmp_path / "merged")
    result = invoke("translate", folder, photo, "--out", tmp_path / "out", "--steps", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out" / "photo_ffa.png").size == (56, 40)

    def translate(pipeline) -> np.ndarray:
        pipeline.set_progress_bar_config(disable=True)
        image = pipeline(str(photo), num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        return np.asarray(image, dtype=np.float32)  # grey levels 0-255

    merged = translate(FFASynthesisPipeline.from_pretrained(folder))
    apart = export_run(lora_run / "straight", tmp_path / "apart", lora="separate")
    adapters = FFASynthesisPipeline.from_pretrained(apart)
    assert np.abs(translate(adapters) - merged).max() <= 1.0  # the same model, rounding aside
    adapters.unet.disable_adapters()  # the model the adapters started from (with the trained conv_in)
    assert np.abs(translate(adapters) - merged).mean() > 1.0


def _cli(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, f"{' '.join(map(str, args[:3]))}: {result.output}\n{result.exception!r}"
    return result.output


@pytest.mark.slow
def test_configs_sd15_lora_trains_sd15_shaped_weights_exports_and_translates(tmp_path):
    """configs/sd15-lora.yaml through the CLI on folders in SD1.5's and CLIP ViT-L/14's layouts (reduced
    widths): bf16 with gradient checkpointing as configured, its feed-forward targets found, merged export."""
    sd15 = write_sd15_folder(tmp_path / "weights" / "sd15")
    clip = write_openai_clip_folder(tmp_path / "weights" / "clip")
    data = write_phantom_dataset(tmp_path / "data", n=3, size=80, seed=1)
    run = tmp_path / "s1"
    small = ["data.crop_size=64", "stage1.max_steps=2", "stage1.save_every=2", "stage1.sample_every=2"]
    small += ["stage1.sample_steps=2", "stage1.lr_warmup_steps=1", "stage1.gradient_accumulation=1"]
    where = [f"model.pretrained={sd15}", f"model.image_encoder={clip}"]
    config = REPO / "configs" / "sd15-lora.yaml"
    output = _cli("train", "stage1", "--config", config, "--data", data, "--out", run, *where, *small)

    settings = load_config(run / "config.yaml")
    assert settings.stage1.lora.rank == 32 and settings.stage1.mixed_precision == "bf16"
    weights = load_file(str(run / "checkpoints" / "step-000002" / "unet.safetensors"))
    for target in settings.stage1.lora.target_modules:  # every configured target found a layer
        assert any(k.endswith(f"{target}.lora_B.default.weight") for k in weights), target
    plain = UNet2DConditionModel.from_pretrained(sd15 / "unet")
    trainable = float(output.split(" M trainable parameters")[0].rsplit(" ", 1)[-1]) * 1e6
    assert trainable < 0.5 * sum(p.numel() for p in plain.parameters())

    _cli("export", run, tmp_path / "pipeline")
    pipe = FFASynthesisPipeline.from_pretrained(tmp_path / "pipeline")
    assert not has_lora(pipe.unet) and pipe.unet.config.in_channels == 8
    photo = tmp_path / "photo.png"
    Image.fromarray((torch.rand(72, 100, 3) * 255).byte().numpy()).save(photo)
    _cli("translate", tmp_path / "pipeline", photo, "--out", tmp_path / "out", "--steps", "2", "--quiet")
    assert Image.open(tmp_path / "out" / "photo_ffa.png").size == (100, 72)


@pytest.mark.slow
def test_lora_on_the_tiny_preset_leaves_its_shipped_base_weights_as_they_were(tmp_path):
    """The tiny preset starts from its shipped base model; with LoRA every base weight stays as shipped
    (peft's base_layer), the adapters and conv_in learn, and the merged export translates."""
    overrides = ["stage1.lora.rank=4", "data.crop_size=64", "stage1.batch_size=2", "stage1.max_steps=2"]
    overrides += ["stage1.save_every=2", "stage1.sample_every=100", "stage1.lr_warmup_steps=1"]
    config = load_config(preset="tiny", overrides=overrides)
    data = write_phantom_dataset(tmp_path / "data", n=3, size=80, seed=2)
    train_stage1(config, data, tmp_path / "s1", progress=False)

    base = build_components(load_config(preset="tiny")).unet.state_dict()
    trained = load_file(str(tmp_path / "s1" / "checkpoints" / "step-000002" / "unet.safetensors"))
    frozen = {k.replace(".base_layer", ""): v for k, v in trained.items() if ".lora_" not in k}
    learned = {"conv_in.weight", "conv_in.bias", "class_embedding.weight"}
    assert set(frozen) == set(base)
    assert all(torch.equal(frozen[k], base[k]) for k in set(base) - learned)
    assert not torch.equal(frozen["conv_in.weight"], base["conv_in.weight"])
    assert any(v.abs().max() > 0 for k, v in trained.items() if ".lora_B." in k)

    folder = export_run(tmp_path / "s1", tmp_path / "pipeline")
    pipe = FFASynthesisPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(torch.rand(3, 96, 80), num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (80, 96)
