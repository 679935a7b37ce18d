"""LoRA on the stage-1 U-Net (stage1.lora, models/lora.py): what trains (the adapters, conv_in, the phase
embedding; their count from the rank arithmetic), in which dtype, that a run resumes and exports, and that
the merged export computes what the adapter model computes (a wrong alpha/rank scale would show)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ffasynth.config import load_config
from ffasynth.errors import ConfigError
from ffasynth.models.components import build_components
from ffasynth.models.lora import add_lora, has_lora
from ffasynth.training.stage1 import build_stage1, trainable_parameters
from tests.helpers import micro_config

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
