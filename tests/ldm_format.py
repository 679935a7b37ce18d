"""Write diffusers U-Net/VAE weights in the original single-file Stable Diffusion (CompVis LDM)
key layout, so the single-file loader can be tested on a checkpoint in the exact real format.
Test-only: the inverse of the key mapping diffusers applies when it reads such a file."""

from __future__ import annotations

import re

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_to_ldm(state: dict, layers_per_block: int, levels: int) -> dict:
    per_down = per_up = layers_per_block + 1
    out = {}
    for key, value in state.items():
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = 1 + i * per_down + j
            inner = f"0.{_rename(rest, RESNET)}" if kind == "resnets" else f"1.{rest}"
            new = f"input_blocks.{block}.{inner}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per_down}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_rename(m[2], RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = i * per_up + j
            inner = f"0.{_rename(rest, RESNET)}" if kind == "resnets" else f"1.{rest}"
            new = f"output_blocks.{block}.{inner}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            i = int(m[1])
            has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
            new = f"output_blocks.{i * per_up + per_up - 1}.{2 if has_attention else 1}.conv.{m[2]}"
        else:
            new = {
                "time_embedding.linear_1": "time_embed.0",
                "time_embedding.linear_2": "time_embed.2",
                "conv_in": "input_blocks.0.0",
                "conv_norm_out": "out.0",
                "conv_out": "out.2",
            }[key.rsplit(".", 1)[0]]
            new = f"{new}.{key.rsplit('.', 1)[1]}"
        out[f"model.diffusion_model.{new}"] = value
    return out


def vae_to_ldm(state: dict, levels: int) -> dict:
    out = {}
    for key, value in state.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            level = int(m[3]) if m[2] == "down" else levels - 1 - int(m[3])
            new = f"{m[1]}.{m[2]}.{level}.block.{m[4]}.{_rename(m[5], VAE_RESNET)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename(m[3], VAE_RESNET)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            new = f"{m[1]}.mid.attn_1.{_rename(m[2], VAE_ATTENTION)}"
            if value.ndim == 2:  # LDM stores the attention projections as 1x1 convolutions
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        out[f"first_stage_model.{new}"] = value
    return out
