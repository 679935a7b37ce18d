"""Does the stage-1 U-Net use its conditioning photo? The conditioning gain (issue 20).

The training loss cannot tell: a U-Net that learns the FFA's texture and ignores the photo lowers
it too. So on a fixed probe batch, at fixed timesteps t, with the same noise for every variant, the
stage-1 loss is measured with the true photos and with the photos moved one place along the batch
(a derangement: no crop keeps its own photo), both paths at once or one path at a time:
  cond_gain        = L(shuffled) − L(true)          > 0: the photo is used; ≈ 0: it is ignored
  cond_gain_concat = L(source latent shuffled) − L(true)   (CLIP tokens kept)
  cond_gain_clip   = L(CLIP tokens shuffled) − L(true)     (source latent kept)
  cond_gain_null   = L(null condition) − L(true)    (zeros, what conditioning dropout trains)
each the mean over PROBE_FRACTIONS of the schedule. `Stage1Task.conditioning_losses` supplies the
loss; this module knows the variants, the order and the figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Fractions of num_train_timesteps (t = 400, 700, 950 of 1000), as benchmarks/probe_conditioning.py: at
# high noise z_t says little about the target, so there the photo matters most (issue 20's probe
# found the gain largest at t = 950); t = 400 shows whether it still matters once z_t is readable.
PROBE_FRACTIONS = (0.4, 0.7, 0.95)
# a gain below this fraction of the true-photo loss: the photo is not being used
GAIN_WARNING_FRACTION = 0.01


def probe_timesteps(num_train_timesteps: int) -> list[int]:
    return [min(num_train_timesteps - 1, round(f * num_train_timesteps)) for f in PROBE_FRACTIONS]


def shuffle_order(eyes: Sequence[str]) -> torch.Tensor:
    """A derangement of the batch: item i gets item (i + k) mod n's photo, k ≥ 1 the smallest shift
    that gives every item another eye's photo (1 when none does: then another crop of the same eye)."""
    count = len(eyes)
    if count < 2:
        raise ValueError("shuffling photos needs at least two items")
    shift = next((k for k in range(1, count) if all(eyes[i] != eyes[(i + k) % count] for i in range(count))), 1)
    return (torch.arange(count) + shift) % count


def condition_variants(
    tokens: torch.Tensor, source_latents: torch.Tensor | None, order: torch.Tensor, use_clip: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """name → (cond_tokens, source_latents) for the true, shuffled and null conditions, and one path
    shuffled at a time where that path is on (concat: source_latents is not None; CLIP: use_clip)."""
    order = order.to(tokens.device)
    concat = source_latents is not None
    shuffled_tokens = tokens[order] if use_clip else tokens
    shuffled_latents = source_latents[order] if concat else None
    variants = {
        "true": (tokens, source_latents),
        "shuffled": (shuffled_tokens, shuffled_latents),
        "null": (torch.zeros_like(tokens), torch.zeros_like(source_latents) if concat else None),
    }
    if concat:
        variants["concat_shuffled"] = (tokens, shuffled_latents)
    if use_clip:
        variants["clip_shuffled"] = (shuffled_tokens, source_latents)
    return variants


def conditioning_losses(
    loss_at: Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor],
    tokens: torch.Tensor,
    source_latents: torch.Tensor | None,
    order: torch.Tensor,
    timesteps: Sequence[int],
    use_clip: bool,
) -> dict[int, dict[str, float]]:
    """{t: {variant: loss, "gain", "gain_null", "gain_concat", "gain_clip"}}; loss_at(tokens,
    source_latents, t) is the batch's mean loss at t under that condition, the same noise each call."""
    variants = condition_variants(tokens, source_latents, order, use_clip)
    result = {}
    for t in timesteps:
        losses = {name: float(loss_at(tok, lat, t)) for name, (tok, lat) in variants.items()}
        losses["gain"] = losses["shuffled"] - losses["true"]
        losses["gain_null"] = losses["null"] - losses["true"]
        for path in ("concat", "clip"):
            if f"{path}_shuffled" in losses:
                losses[f"gain_{path}"] = losses[f"{path}_shuffled"] - losses["true"]
        result[t] = losses
    return result


def gain_figures(per_timestep: dict[int, dict[str, float]]) -> dict[str, float]:
    """The logged figures: each gain and the true-photo loss, averaged over the probe timesteps."""
    rows = list(per_timestep.values())
    keys = {"true": "cond_loss_true", "gain": "cond_gain", "gain_concat": "cond_gain_concat"}
    keys.update(gain_clip="cond_gain_clip", gain_null="cond_gain_null")
    return {logged: sum(r[key] for r in rows) / len(rows) for key, logged in keys.items() if key in rows[0]}


def gain_line(logged: Sequence[dict]) -> str | None:
    """One line on the last logged conditioning gain (None when none was logged), with a plain warning
    when it is below GAIN_WARNING_FRACTION of the true-photo loss."""
    last = next((line for line in reversed(logged) if "cond_gain" in line), None)
    if last is None:
        return None
    gain, loss = last["cond_gain"], last["cond_loss_true"]
    paths = ", ".join(
        f"{name} {last[key]:+.4f}"
        for name, key in (("concat", "cond_gain_concat"), ("CLIP", "cond_gain_clip"), ("null", "cond_gain_null"))
        if key in last
    )
    text = (
        f"conditioning gain at step {last['step']}: {gain:+.4f} = shuffled − true photo loss "
        f"({100 * gain / loss:+.1f}% of {loss:.4f}; {paths})"
    )
    if gain < GAIN_WARNING_FRACTION * loss:
        text += (
            "; warning: the U-Net is not using the photo (its loss is the same with other eyes' photos): "
            "train for more steps, and check that photo and FFA are aligned (`ffasynth data register`)"
        )
    return text
