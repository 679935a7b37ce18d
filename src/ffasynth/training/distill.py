"""`ffasynth train distill`: fewer U-Net passes per angiogram, learnt from a trained model.

The teacher is a frozen stage-1 U-Net (from a stage-1 or stage-2 run) with its image classifier-free
guidance, two passes a step. The student is the same U-Net with the guidance scale w as an input
(`add_guidance_embedding`, zero-initialised, so it starts as the teacher's unguided self): a whole copy
(distill.lora.rank 0) or LoRA adapters over the teacher's own layers (SD1.5's size; the teacher pass
then runs with the adapters off). One step, for every row its own w ~ U[w_min, w_max]:

  z0 = s·E(target);  z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε'   (ε' offset noise, as the teacher trained)
  teacher:  y = U_∅ + w (U_c − U_∅)  at (z_t, t)  → ẑ0, ε̂ (the prediction type's algebra)
  "guidance" (Meng et al. 2023):  t ~ U{0..T−1};  loss = ‖U_θ(z_t, t, w) − y‖²
  "lcm" (Luo et al. 2023):  t = n·k − 1 on the solver grid (k = T / solver_steps), s = max(t − k, 0);
      DDIM to s:  z_s = √ᾱ_s ẑ0 + √(1−ᾱ_s) ε̂
      f(z, t) = c_skip(t) z + c_out(t) x0(U_θ(z, t, w))   (LCMScheduler's boundary condition)
      loss = pseudo-Huber(f_θ(z_t, t) − sg[f_θ(z_s, s)])   (the target is the student itself, no grad)
The tiny preview decoder (optional, its own optimizer) learns the VAE decoder on the same latents.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers import LCMScheduler

from ffasynth.config import DistillConfig
from ffasynth.models.architecture import downsampling_factor
from ffasynth.models.components import make_student, sampling_scheduler
from ffasynth.models.conditioning import decode_latents, encode_latents, guided_prediction
from ffasynth.models.preview_decoder import PreviewDecoder, distill_loss
from ffasynth.training.loop import Task
from ffasynth.training.run import LoadedRun
from ffasynth.training.stage1 import offset_noise, phase_labels, photo_condition

SIGMA_DATA = 0.5  # LCM's boundary-condition constants, as diffusers' LCMScheduler has them
TIMESTEP_SCALING = 10.0


def boundary_scalings(timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at integer timesteps: c_skip = σ²/((10t)² + σ²), c_out = 10t/√((10t)² + σ²), σ = 0.5;
    f = x at t = 0."""
    scaled = timesteps.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def split_prediction(output: torch.Tensor, latents: torch.Tensor, alphas: torch.Tensor, prediction_type: str):
    """(ẑ0, ε̂) from a model output at noise level ᾱ (B, 1, 1, 1): ε: ẑ0 = (z − √(1−ᾱ) ε̂)/√ᾱ;
    v: ẑ0 = √ᾱ z − √(1−ᾱ) v, ε̂ = √ᾱ v + √(1−ᾱ) z."""
    root, rest = alphas.sqrt(), (1.0 - alphas).sqrt()
    if prediction_type == "v_prediction":
        return root * latents - rest * output, root * output + rest * latents
    return (latents - rest * output) / root, output


def sampler_for(training_scheduler, config: DistillConfig):
    """How a student samples: LCMScheduler on the solver grid (lcm), or the usual DPM-Solver++ (guidance)."""
    if config.method == "lcm":
        return LCMScheduler.from_config(
            training_scheduler.config, original_inference_steps=config.solver_steps, timestep_scaling=TIMESTEP_SCALING
        )
    return sampling_scheduler(training_scheduler)


class DistillTask(Task):
    name = "distill"

    def __init__(self, teacher: LoadedRun, config: DistillConfig):
        self.teacher = teacher
        self.config = config
        self.model = teacher.config.model
        self.prediction_type = teacher.config.stage1.prediction_type
        self.offset_noise = teacher.config.stage1.offset_noise_strength
        components = teacher.components
        components.unet.requires_grad_(False).eval()
        student = make_student(components.unet, config)
        student.train()
        self.trainable = {"unet": student}
        if config.preview_decoder:
            self.trainable["preview"] = PreviewDecoder.for_vae(components.vae.config, config.preview_channels)
        self.ema_names = tuple(self.trainable)
        self.shared = bool(config.lora.rank)  # the teacher is the student with its adapters off
        self.lowered_dtype: torch.dtype | None = None  # set by to(): a LoRA student's frozen weights in it

    def optimizer_groups(self) -> dict[str, list[str]]:
        return {name: [name] for name in self.trainable}

    def learning_rates(self, base_lr: float) -> dict[str, float]:
        return {"unet": base_lr, "preview": self.config.preview_lr}

    def to(self, device, weight_dtype) -> None:
        components, conditioner = self.teacher.components, self.teacher.conditioner
        frozen = [components.vae] + ([conditioner.image_encoder] if conditioner.use_clip else [])
        if not self.shared:
            frozen.append(components.unet)
        for module in frozen:  # frozen parts in the mixed-precision dtype; what learns stays float32
            module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
        # a LoRA student holds two dtypes: what runs outside the loop's autocast (samples) needs its own
        self.lowered_dtype = weight_dtype if self.shared and weight_dtype != torch.float32 else None
        if self.lowered_dtype is not None:
            components.unet.to(device, dtype=weight_dtype)
            for parameter in components.unet.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        for module in self.trainable.values():
            module.to(device)
        if conditioner.projection is not None:
            conditioner.projection.to(device)

    def enable_gradient_checkpointing(self) -> None:
        self.trainable["unet"].enable_gradient_checkpointing()

    @torch.no_grad()
    def _condition(self, batch: dict):
        """(cond_tokens, source_latents, phase labels) as the teacher was trained to read them."""
        vae = self.teacher.components.vae
        tokens, latents = photo_condition(self.teacher.conditioner, vae, batch, self.model.clip_view)
        return tokens, latents, phase_labels(batch, self.model.num_phases, batch["source"].device)

    @torch.no_grad()
    def _teacher(self, latents, t, condition, scales) -> torch.Tensor:
        unet = self.teacher.components.unet
        if self.shared:
            unet.disable_adapters()
        try:
            return guided_prediction(unet, latents, t, *condition, scales)
        finally:
            if self.shared:
                unet.enable_adapters()

    def _consistency(self, unet, latents, t, condition, scales) -> torch.Tensor:
        """f(z, t) = c_skip z + c_out ẑ0 from the student's one-pass guided prediction."""
        output = guided_prediction(unet, latents, t, *condition, scales, fold=True)
        alphas = self.teacher.components.scheduler.alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1)
        x0, _ = split_prediction(output, latents, alphas, self.prediction_type)
        c_skip, c_out = boundary_scalings(t)
        return c_skip * latents + c_out * x0

    def _latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The target's latents, drawn once a step for both optimizers."""
        if "distill_latents" not in batch:
            with torch.no_grad():
                vae = self.teacher.components.vae
                batch["distill_latents"] = encode_latents(vae, batch["target"], generator, sample=True).float()
        return batch["distill_latents"]

    def loss(self, batch: dict, step: int, generator: torch.Generator, optimizer: str):
        latents = self._latents(batch, generator)
        if optimizer == "preview":
            with torch.no_grad():
                decoded = decode_latents(self.teacher.components.vae, latents).float()
            return distill_loss(self.trainable["preview"], latents, decoded), {}
        config, scheduler, device = self.config, self.teacher.components.scheduler, latents.device
        batch_size, total = latents.shape[0], scheduler.config.num_train_timesteps
        condition = self._condition(batch)
        noise = offset_noise(latents, self.offset_noise, generator)
        scales = config.guidance_min + (config.guidance_max - config.guidance_min) * torch.rand(
            batch_size, generator=generator, device=device
        )
        student = self.trainable["unet"]
        if config.method == "guidance":
            t = torch.randint(0, total, (batch_size,), generator=generator, device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            wanted = self._teacher(noisy, t, condition, scales)
            return F.mse_loss(guided_prediction(student, noisy, t, *condition, scales, fold=True), wanted), {}
        k = total // config.solver_steps
        t = torch.randint(1, config.solver_steps + 1, (batch_size,), generator=generator, device=device) * k - 1
        s = (t - k).clamp(min=0)
        noisy = scheduler.add_noise(latents, noise, t)
        alphas = scheduler.alphas_cumprod.to(device)
        with torch.no_grad():  # one guided DDIM step of the teacher, then the student's own target there
            x0, eps = split_prediction(
                self._teacher(noisy, t, condition, scales), noisy, alphas[t].view(-1, 1, 1, 1), self.prediction_type
            )
            alpha_s = alphas[s].view(-1, 1, 1, 1)
            earlier = alpha_s.sqrt() * x0 + (1.0 - alpha_s).sqrt() * eps
            target = self._consistency(student, earlier, s, condition, scales)
        prediction = self._consistency(student, noisy, t, condition, scales)
        difference = prediction - target
        if config.huber_c > 0:
            loss = ((difference**2 + config.huber_c**2).sqrt() - config.huber_c).mean()
        else:
            loss = (difference**2).mean()
        return loss, {}

    @torch.no_grad()
    def samples(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """source | real FFA | student at distill.default_steps (guidance the teacher's) | its preview decode."""
        student = self.trainable["unet"]
        was_training = student.training
        student.eval()
        condition = self._condition(batch)
        vae = self.teacher.components.vae
        sampler = sampler_for(self.teacher.components.scheduler, self.config)
        steps = self.config.default_steps if self.config.method == "lcm" else self.teacher.config.stage1.sample_steps
        sampler.set_timesteps(steps, device=batch["source"].device)
        factor = downsampling_factor(vae.config)
        shape = (batch["source"].shape[0], vae.config.latent_channels) + tuple(
            s // factor for s in batch["source"].shape[-2:]
        )
        latents = torch.randn(shape, generator=generator, device=batch["source"].device)
        guidance = self.teacher.config.stage1.image_guidance_scale
        noise = {"generator": generator} if self.config.method == "lcm" else {}  # LCM re-noises between steps
        mixed = self.lowered_dtype is not None
        for t in sampler.timesteps:
            with torch.autocast(latents.device.type, dtype=self.lowered_dtype) if mixed else contextlib.nullcontext():
                prediction = guided_prediction(student, latents, t, *condition, guidance, fold=True)
            latents = sampler.step(prediction.float(), t, latents, **noise).prev_sample
        student.train(was_training)
        columns = [batch["source"], batch["target"], decode_latents(vae, latents).float()]
        if "preview" in self.trainable:
            columns.append(self.trainable["preview"](latents).float().clamp(-1.0, 1.0))
        return columns
