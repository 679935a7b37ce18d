"""Stage 1: train the denoising U-Net on target-FFA latents, conditioned on the source photo.

VAE and CLIP are frozen; the U-Net (and the CLIP token projection, if any) learn. One step:
  z0 = s·E(target);  ε' = ε + s_off·n, n ~ N(0, 1) of shape (B, C, 1, 1)   (offset noise)
  z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε';  loss = ‖U([z_t ⊕ s·E(source)], t, CLIP(view)) − y‖²,
  y = ε' (epsilon) or √ᾱ_t ε' − √(1−ᾱ_t) z0 (v), optionally min-SNR-γ weighted.
CLIP's view (`model.clip_view`) is what the pipeline gives it: the crop itself ("tile"; the pipeline
encodes each denoising tile) or the whole photo ("whole"; the item's "whole_source").
Every `stage1.cond_gain_every` steps the loop logs the conditioning gain (`training.conditioning_gain`):
the same loss on a fixed batch with shuffled photos minus with the true ones.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from ffasynth.config import Stage1Config
from ffasynth.data.alignment import eye_of
from ffasynth.errors import ConfigError, FFASynthError
from ffasynth.models.architecture import downsampling_factor
from ffasynth.models.components import Components, build_components
from ffasynth.models.conditioning import (
    SourceConditioner,
    decode_latents,
    drop_condition,
    encode_latents,
    guided_prediction,
)
from ffasynth.models.lora import add_lora, has_lora
from ffasynth.training.conditioning_gain import (
    conditioning_losses,
    gain_figures,
    probe_timesteps,
    shuffle_order,
)
from ffasynth.training.loop import Task

PROBE_SEED = 0  # the conditioning-gain probe's own noise stream (never the training generator)


def offset_noise(latents: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """ε + s·n with n ~ N(0, 1) per (sample, channel): shifts each channel's mean, so the model can
    learn the target's overall brightness (dark FFA backgrounds) that plain ε cannot move."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if strength > 0:
        shift = torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + strength * shift
    return noise


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t)."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas / (1.0 - alphas)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v."""
    ratio = snr(scheduler, timesteps)
    clipped = torch.minimum(ratio, torch.full_like(ratio, gamma))
    return clipped / (ratio + 1.0) if prediction_type == "v_prediction" else clipped / ratio


def phase_labels(batch: dict, num_phases: int, device) -> torch.Tensor | None:
    if not num_phases:
        return None
    return torch.as_tensor(batch["phase"], device=device).long().clamp(0, num_phases - 1)


def clip_input(batch: dict, clip_view: str) -> torch.Tensor:
    """What CLIP encodes for a training batch: the crop ("tile") or the whole photo's view ("whole")."""
    if clip_view == "tile":
        return batch["source"]
    if "whole_source" not in batch:
        raise FFASynthError("model.clip_view=whole needs items with the whole photo's view (PairedTransform)")
    return batch["whole_source"]


def photo_condition(conditioner: SourceConditioner, vae, batch: dict, clip_view: str, projection=None):
    """A batch's (cond_tokens, source_latents) as stage 1 trains on them: CLIP's view (`clip_input`) and the
    source latent from the frozen encoders without grad, then the projection (the one training holds, else
    the conditioner's own) with grad where grad is on."""
    source = batch["source"]
    with torch.no_grad():
        features = conditioner.clip_features(clip_input(batch, clip_view)) if conditioner.use_clip else None
        source_latents = conditioner.source_latents(vae, source)
    if features is None:
        tokens = source.new_zeros(source.shape[0], 1, conditioner.cross_attention_dim)
    else:
        tokens = conditioner.project(features, projection)
    return tokens, source_latents


class Stage1Task(Task):
    name = "stage1"

    def __init__(
        self,
        components: Components,
        conditioner: SourceConditioner,
        config: Stage1Config,
        num_phases: int,
        clip_view: str = "tile",
    ):
        self.components = components
        self.conditioner = conditioner
        self.config = config
        self.num_phases = num_phases
        self.clip_view = clip_view
        self.trainable = {"unet": components.unet}
        if conditioner.projection is not None:
            self.trainable["projection"] = conditioner.projection
        self.ema_names = tuple(self.trainable)
        every = config.cond_gain_every
        self.diagnostics_every = config.sample_every if every is None else every
        self.diagnostic_items = config.cond_gain_items
        self.components.unet.train()
        self.lowered_dtype: torch.dtype | None = None  # set by to(): a LoRA U-Net's frozen weights in it
        self.frozen = 0  # U-Net values kept as loaded (stage1.freeze; set by build_stage1)

    def to(self, device, weight_dtype) -> None:
        frozen = [self.components.vae] + ([self.conditioner.image_encoder] if self.conditioner.use_clip else [])
        for module in frozen:  # frozen parts in the mixed-precision dtype: half the memory, no gradients needed
            module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
        unet = self.components.unet
        if has_lora(unet) and weight_dtype != torch.float32:
            # with LoRA the U-Net's own weights are frozen too: in the mixed-precision dtype; what learns stays float32
            unet.to(device, dtype=weight_dtype)
            for parameter in unet.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
            self.lowered_dtype = weight_dtype
        else:
            unet.to(device)
        if self.conditioner.projection is not None:
            self.conditioner.projection.to(device)

    def _mixed_weights(self, device) -> contextlib.AbstractContextManager:
        """Autocast for what runs outside the loop's (samples, diagnostics) when the U-Net holds weights of
        two dtypes (LoRA under mixed precision); a no-op otherwise, so full fine-tuning samples in float32."""
        if self.lowered_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.lowered_dtype)

    def enable_gradient_checkpointing(self) -> None:
        self.components.unet.enable_gradient_checkpointing()

    def _condition(self, batch: dict, keep: torch.Tensor | None):
        """(cond_tokens, source_latents), dropped where `keep` is False; the projection learns."""
        vae, projection = self.components.vae, self.trainable.get("projection")
        tokens, source_latents = photo_condition(self.conditioner, vae, batch, self.clip_view, projection)
        return drop_condition(tokens, source_latents, keep) if keep is not None else (tokens, source_latents)

    def _denoising_loss(self, unet, latents, noise, timesteps, tokens, source_latents, labels) -> torch.Tensor:
        """Per-sample ‖U([z_t ⊕ c_lat], t, c_tok) − y‖², min-SNR-γ weighted when stage1.snr_gamma is set."""
        scheduler = self.components.scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if self.config.prediction_type == "v_prediction":
            wanted = scheduler.get_velocity(latents, noise, timesteps)
        else:
            wanted = noise
        prediction = guided_prediction(unet, noisy, timesteps, tokens, source_latents, labels, guidance=1.0)
        per_sample = F.mse_loss(prediction, wanted.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.config.snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(
                scheduler, timesteps, self.config.snr_gamma, self.config.prediction_type
            )
        return per_sample

    def loss(self, batch: dict, step: int, generator: torch.Generator, optimizer: str):
        scheduler, vae, unet = self.components.scheduler, self.components.vae, self.trainable["unet"]
        target = batch["target"]
        batch_size = target.shape[0]
        with torch.no_grad():
            latents = encode_latents(vae, target, generator, sample=True).float()
        keep = torch.rand(batch_size, generator=generator, device=target.device) >= self.config.conditioning_dropout
        tokens, source_latents = self._condition(batch, keep)
        noise = offset_noise(latents, self.config.offset_noise_strength, generator)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=target.device
        )
        labels = phase_labels(batch, self.num_phases, target.device)
        per_sample = self._denoising_loss(unet, latents, noise, timesteps, tokens, source_latents, labels)
        return per_sample.mean(), {}

    @torch.no_grad()
    def conditioning_losses(self, probe: dict, timesteps=None) -> dict[int, dict[str, float]]:
        """The loss on `probe` at each timestep (default: conditioning_gain.probe_timesteps) with the true,
        shuffled and null conditions, and the gains (`conditioning_gain.conditioning_losses`). No dropout;
        the target latent is the posterior mode and the noise comes from its own seeded generator, so
        the numbers repeat and the training generator is untouched. The U-Net is the one `trainable`
        holds (the loop swaps in the live, unwrapped weights), in eval mode for the call."""
        unet, vae, target = self.trainable["unet"], self.components.vae, probe["target"]
        latents = encode_latents(vae, target).float()
        generator = torch.Generator(device=target.device).manual_seed(PROBE_SEED)
        noise = offset_noise(latents, self.config.offset_noise_strength, generator)
        tokens, source_latents = self._condition(probe, None)
        labels = phase_labels(probe, self.num_phases, target.device)
        order = shuffle_order([eye_of(str(i)) for i in probe["id"]])
        steps = timesteps or probe_timesteps(self.components.scheduler.config.num_train_timesteps)

        def loss_at(tok, lat, t: int) -> torch.Tensor:
            at = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
            return self._denoising_loss(unet, latents, noise, at, tok, lat, labels).mean()

        was_training = unet.training
        unet.eval()
        try:
            with self._mixed_weights(target.device):
                return conditioning_losses(loss_at, tokens, source_latents, order, steps, self.conditioner.use_clip)
        finally:
            unet.train(was_training)

    def diagnostics(self, probe: dict, step: int) -> dict[str, float]:
        """The conditioning gain (cond_gain, cond_gain_concat, cond_gain_clip, cond_gain_null, cond_loss_true)."""
        return gain_figures(self.conditioning_losses(probe))

    @torch.no_grad()
    def samples(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """source | real FFA | generated (DDIM from noise, `sample_steps` steps, `image_guidance_scale`)."""
        unet = self.components.unet
        was_training = unet.training
        unet.eval()
        sampler = DDIMScheduler.from_config(self.components.scheduler.config)
        sampler.set_timesteps(self.config.sample_steps, device=batch["source"].device)
        tokens, source_latents = self._condition(batch, None)
        vae = self.components.vae
        factor = downsampling_factor(vae.config)
        shape = (batch["source"].shape[0], vae.config.latent_channels) + tuple(
            s // factor for s in batch["source"].shape[-2:]
        )
        latents = torch.randn(shape, generator=generator, device=batch["source"].device)
        labels = phase_labels(batch, self.num_phases, latents.device)
        for t in sampler.timesteps:  # guided as the pipeline samples
            with self._mixed_weights(latents.device):
                prediction = guided_prediction(
                    unet, latents, t, tokens, source_latents, labels, self.config.image_guidance_scale
                )
            latents = sampler.step(prediction, t, latents).prev_sample
        unet.train(was_training)
        return [batch["source"], batch["target"], decode_latents(vae, latents).float()]

    def finish(self, run_dir: Path) -> None:
        pass


def trainable_parameters(task: Stage1Task) -> int:
    return sum(p.numel() for m in task.trainable.values() for p in m.parameters() if p.requires_grad)


def freeze_unet(unet: torch.nn.Module, prefixes: tuple[str, ...], latent_channels: int) -> int:
    """Keep the U-Net parameters under `prefixes` (dotted module names: "down_blocks", "down_blocks.0") as
    loaded: `requires_grad` off, so no optimizer, EMA or gradient touches them. Returns how many values are
    frozen. A prefix that names no parameter, or one that would freeze a part added at zero (conv_in's
    source-latent channels, the phase embedding) so that it never learns, is a ConfigError naming stage1.freeze."""
    # parts ffasynth adds to a loaded U-Net start at zero (conv_in's photo channels, the phase embedding):
    # frozen so, the photo's latent or the phase would never get in
    conv_in = unet.conv_in.weight
    added = {"conv_in's source-latent input channels": (conv_in, conv_in[:, latent_channels:])}
    if getattr(unet, "class_embedding", None) is not None:
        added["the phase embedding (class_embedding)"] = (unet.class_embedding.weight,) * 2
    frozen = 0
    for prefix in prefixes:
        prefix = prefix.strip(".")
        matched = [p for name, p in unet.named_parameters() if name == prefix or name.startswith(prefix + ".")]
        if not matched:
            tops = ", ".join(dict.fromkeys(name.split(".")[0] for name, _ in unet.named_parameters()))
            raise ConfigError(f"stage1.freeze: {prefix!r} names no U-Net parameter (its modules: {tops})")
        for what, (parameter, part) in added.items():
            if any(p is parameter for p in matched) and part.numel() and not part.abs().any():
                raise ConfigError(
                    f"stage1.freeze: {what} are newly added zeros in the loaded U-Net; frozen, they would "
                    f"never learn (leave {prefix} out of stage1.freeze)"
                )
        for parameter in matched:
            if parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen += parameter.numel()
    return frozen


def build_stage1(config) -> Stage1Task:
    """Components (seeded random init where nothing is loaded), the conditioner and the task. With loaded
    U-Net weights (a base, model.pretrained) `stage1.freeze`'s modules stay as loaded (task.frozen counts
    them); on a random U-Net there is nothing to keep and it is ignored."""
    torch.manual_seed(config.seed)
    components = build_components(config)
    add_lora(components.unet, config.stage1.lora)  # rank 0: full fine-tuning, the U-Net unchanged
    frozen = 0
    if config.stage1.freeze and components.sources.get("unet"):
        frozen = freeze_unet(components.unet, config.stage1.freeze, config.model.latent_channels)
    conditioner = SourceConditioner.from_components(components, config.model)
    task = Stage1Task(components, conditioner, config.stage1, config.model.num_phases, config.model.clip_view)
    task.frozen = frozen
    return task
