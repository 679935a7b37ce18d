"""LoRA on the denoising U-Net (`stage1.lora`), through peft as diffusers drives it: each targeted layer
W becomes W + (alpha/rank)·B·A with A (rank×in), B (out×rank) zero at the start, so the adapted U-Net
starts as the base one. Only A and B learn, and the parts SD1.5 does not have: conv_in's source-latent
channels (the whole conv_in, 8×320×3×3 + 320 values) and the phase embedding.

A checkpoint keeps the whole U-Net with its adapters (peft's names, `…to_q.base_layer.weight`,
`…to_q.lora_A.default.weight`); `merge_lora` folds them into plain weights for a pipeline folder.
"""

from __future__ import annotations

from pathlib import Path

import peft
from diffusers import UNet2DConditionModel
from torch import nn

from ffasynth.config import LoRAConfig
from ffasynth.errors import ConfigError

ADAPTER_FOLDER = "unet_lora"  # beside unet/ in a pipeline folder exported with the adapters kept apart
WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA file


def fully_trainable(unet: UNet2DConditionModel) -> list[nn.Module]:
    """What trains whole beside the adapters: conv_in (it reads the source latent) and the phase embedding."""
    return [unet.conv_in] + ([unet.class_embedding] if getattr(unet, "class_embedding", None) is not None else [])


def has_lora(unet: nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def add_lora(unet: UNet2DConditionModel, lora: LoRAConfig) -> None:
    """Wrap `lora.target_modules` with rank-`lora.rank` adapters and freeze every other weight but
    `fully_trainable`'s; rank 0 leaves the U-Net as it is (full fine-tuning)."""
    if not lora.rank:
        return
    settings = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )
    try:
        unet.add_adapter(settings)
    except ValueError as error:  # peft: no layer matches a target name
        names = ", ".join(lora.target_modules)
        raise ConfigError(
            f"stage1.lora.target_modules ({names}) match no layer of the U-Net ({str(error).splitlines()[0]})"
        ) from None
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    for module in fully_trainable(unet):
        module.requires_grad_(True)


def merge_lora(unet: UNet2DConditionModel) -> None:
    """Fold each adapter into its layer's weight (W ← W + (alpha/rank)·B·A) and drop the adapter layers:
    a plain UNet2DConditionModel again, what any diffusers pipeline loads."""
    if has_lora(unet):
        unet.fuse_lora()
        unet.unload_lora()


def split_lora(unet: UNet2DConditionModel, folder: Path) -> None:
    """Write the adapters to FOLDER (diffusers' pytorch_lora_weights.safetensors, its peft settings in the
    header) and remove them from `unet` unmerged: the base weights (with the trained conv_in and phase
    embedding) stay in the U-Net, the learned difference in FOLDER (`load_lora` puts it back)."""
    unet.save_lora_adapter(str(folder), weight_name=WEIGHTS)
    unet.unload_lora()


def load_lora(unet: UNet2DConditionModel, folder: Path) -> None:
    """The adapters `split_lora` wrote, back on `unet` (unmerged: scale them with `unet.set_adapters`)."""
    unet.load_lora_adapter(str(folder), prefix=None, weight_name=WEIGHTS, use_safetensors=True)


def add_student_adapters(unet: UNet2DConditionModel, lora: LoRAConfig) -> None:
    """The distillation student as adapters (`distill.lora`, rank > 0) over a U-Net that already has its
    guidance-scale input (`components.add_guidance_embedding`): only the adapters and that input learn;
    every weight of the stage-1 model, conv_in and the phase embedding included, stays frozen (it is the
    teacher, run with the adapters disabled)."""
    add_lora(unet, lora)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(".lora_" in name or "time_embedding.cond_proj" in name)
