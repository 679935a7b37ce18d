"""Stage 2: fine-tune only the VAE decoder so the latents stage 1 produces decode into sharp,
faithful angiograms. Encoder, U-Net and CLIP stay frozen (bit-identical after the run).

Latents to decode (`stage2.latents`), each paired with the real FFA crop x it should decode to:
  "encoder"  z = s·E(x), the real FFA's own latent;
  "unet"     the frozen U-Net's one-step estimate ẑ0 = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t from the noised target
             latent, t < `unet_max_timestep`, conditioned on the photo;
  "mix"      per item, "encoder" or "unet" with probability ½ each;
  "sampler"  what `translate` decodes: the frozen U-Net sampling from noise, conditioned on the photo
             crop, `sampler_steps` DPM-Solver++ (2nd order) steps with the run's image guidance.
  "split"    L1 and LPIPS on "encoder" latents, which line up with x pixel for pixel; the discriminator
             and the decoder's adversarial term on "sampler" latents (taming's recipe, with the sampler's
             latents as the fakes): the detail a sample draws afresh is not pulled to the mean by L1.
Only "sampler" (the default) shows the decoder the latents inference produces; "unet"'s estimates
from t < 500 start from the target's own latent, so they stay close to it. Measured on the shared UWF
pairs (tiny preset, 128² crops, one stage-1 run, 200 stage-2 steps per mode, six test angiograms,
benchmarks/bench_stage2_latents.py): "sampler" gave the best end-to-end PSNR, SSIM and MS-SSIM of
the four modes on every test image (and beat "mix" on every image again with a second seed: +0.95 and
+0.99 dB, MS-SSIM +0.10 and +0.13); it beat the untuned decoder in PSNR and MS-SSIM (SSIM within
0.015), while "encoder", "unet" and "mix" scored below the untuned decoder in all three. Its decoder
outputs less contrast (std 0.014-0.023 vs the real FFA's 0.092, "mix" 0.04): where samples do not
match the target pixel for pixel, the L1 term pulls towards their mean; LPIPS and the PatchGAN (sd15
defaults) push back. Its cost: `sampler_steps` guided U-Net passes a batch, once a step (≈4.4× the
step time of "encoder" at the tiny preset on 2 CPU cores).

decoder loss = |x̂ − x|₁ (or ²) + λ_p·LPIPS(x̂, x) + w·λ_adv·(−D(x̂)),
  w = ‖∇_last rec‖ / (‖∇_last adv‖ + 1e-4)  (LDM's adaptive weight, last = the decoder's conv_out)
discriminator loss (hinge) = relu(1 − D(x)) + relu(1 + D(x̂)), from `disc_start` on.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ffasynth import run_folder
from ffasynth.config import Stage2Config
from ffasynth.errors import ConfigError
from ffasynth.models.architecture import downsampling_factor
from ffasynth.models.components import sampling_scheduler
from ffasynth.models.conditioning import encode_latents, from_vae_output, guided_prediction
from ffasynth.models.decoder import Decoder
from ffasynth.models.discriminator import NLayerDiscriminator, adaptive_weight, hinge_d_loss
from ffasynth.training.loop import Task
from ffasynth.training.run import LoadedRun
from ffasynth.training.stage1 import clip_input, phase_labels

FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # stage2.frozen_dtype


def batch_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The items `rows` of a collated batch: tensors and lists of one entry per item, indexed."""
    size = len(batch["target"])
    picked = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() and value.shape[0] == size:
            value = value[rows]
        elif isinstance(value, (list, tuple)) and len(value) == size:
            value = [value[i] for i in rows.tolist()]
        picked[key] = value
    return picked


def predicted_x0(scheduler, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """ẑ0 from ε̂: (z_t − √(1−ᾱ)·ε̂)/√ᾱ; from v̂: √ᾱ·z_t − √(1−ᾱ)·v̂."""
    alphas = scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
    return (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()


class Stage2Task(Task):
    name = "stage2"

    def __init__(self, stage1: LoadedRun, config: Stage2Config, lpips: nn.Module | None):
        self.stage1 = stage1
        self.config = config
        self.lpips = lpips
        vae = stage1.components.vae
        vae.requires_grad_(False)
        stage1.components.unet.eval().requires_grad_(False)  # frozen: a sampler, never trained here
        self.original_vae = copy.deepcopy(vae).cpu()  # untouched, for the before/after comparison
        self.decoder = Decoder(vae)
        self.decoder.requires_grad_(True).train()
        self.discriminator = NLayerDiscriminator(
            in_channels=1, base_channels=config.disc_channels, n_layers=config.disc_layers
        )
        self.trainable = {"decoder": self.decoder, "discriminator": self.discriminator}
        self.ema_names = ("decoder",)
        self.pool: list[dict] = []  # the last `latent_reuse` sampled batches with their latents
        self.draws = 0  # batches prepared so far (micro-batches count one each)
        if config.lpips_weight > 0 and lpips is None:
            raise ValueError("lpips_weight > 0 needs an LPIPS module")
        train_steps = stage1.components.scheduler.config.num_train_timesteps
        if config.sampler_steps >= train_steps:  # the sampler's most (pipeline.max_steps)
            raise ConfigError(
                f"stage2.sampler_steps={config.sampler_steps}: allowed up to {train_steps - 1}, one fewer than the "
                f"{train_steps} training timesteps"
            )

    def optimizer_groups(self) -> dict[str, list[str]]:
        return {"decoder": ["decoder"], "discriminator": ["discriminator"]}

    def learning_rates(self, base_lr: float) -> dict[str, float]:
        return {"decoder": base_lr, "discriminator": base_lr * self.config.disc_lr_factor}

    def to(self, device, weight_dtype) -> None:
        """The VAE in float32 (its decoder trains); the frozen U-Net and CLIP in `stage2.frozen_dtype`."""
        frozen_dtype = FROZEN_DTYPES.get(self.config.frozen_dtype, weight_dtype)  # "same": the training dtype
        components = self.stage1.components
        components.vae.to(device)
        components.unet.to(device, dtype=frozen_dtype)
        if self.stage1.conditioner.use_clip:
            self.stage1.conditioner.to(device, dtype=frozen_dtype)
        self.discriminator.to(device)
        if self.lpips is not None:
            self.lpips.to(device)

    def enable_gradient_checkpointing(self) -> None:
        self.stage1.components.vae.enable_gradient_checkpointing()

    @torch.no_grad()
    def latents(self, batch: dict, generator: torch.Generator, mode: str | None = None) -> torch.Tensor:
        """The latents the decoder learns from, per `mode` (default `stage2.latents`; see the module docstring)."""
        mode = mode or self.config.latents
        if mode in ("sampler", "split"):  # split: these are the adversarial term's; see prepare
            return self.sampled_latents(batch, generator)
        components = self.stage1.components
        latents = encode_latents(components.vae, batch["target"]).float()
        use_unet = torch.rand(latents.shape[0], generator=generator, device=latents.device)
        use_unet = use_unet < {"encoder": 0.0, "unet": 1.0, "mix": 0.5}[mode]
        if use_unet.any():
            scheduler = components.scheduler
            noise = torch.randn(latents.shape, generator=generator, device=latents.device)
            high = min(self.config.unet_max_timestep, scheduler.config.num_train_timesteps)
            timesteps = torch.randint(0, high, (latents.shape[0],), generator=generator, device=latents.device)
            # CLIP and the U-Net only on the items drawn for them (the draws are the whole batch's, as before)
            rows = use_unet.nonzero().squeeze(1)
            part, at = batch_rows(batch, rows), timesteps[rows]
            noisy = scheduler.add_noise(latents[rows], noise[rows], at)
            tokens, source_latents = self.condition(part)
            prediction = guided_prediction(
                components.unet, noisy, at, tokens, source_latents, self.labels(part), guidance=1.0
            )
            latents[rows] = predicted_x0(scheduler, noisy, prediction, at)
        return latents

    @torch.no_grad()
    def sampled_latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """ẑ0 as the pipeline's denoising loop makes it for one tile: noise from `generator`, then
        `sampler_steps` steps of `sampling_scheduler`, each ε̂ (or v̂) guided by the run's image guidance."""
        components = self.stage1.components
        source = batch["source"]
        tokens, source_latents = self.condition(batch)
        labels = self.labels(batch)
        sampler = sampling_scheduler(components.scheduler)
        sampler.set_timesteps(self.config.sampler_steps, device=source.device)
        factor = downsampling_factor(components.vae.config)
        height, width = (size // factor for size in source.shape[-2:])
        shape = (source.shape[0], components.unet.config.out_channels, height, width)
        latents = torch.randn(shape, generator=generator, device=source.device) * sampler.init_noise_sigma
        guidance = self.stage1.config.stage1.image_guidance_scale
        for t in sampler.timesteps:
            model_input = sampler.scale_model_input(latents, t)
            prediction = guided_prediction(components.unet, model_input, t, tokens, source_latents, labels, guidance)
            latents = sampler.step(prediction, t, latents, generator=generator).prev_sample
        return latents

    def condition(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond_tokens, source_latents) as stage 1 saw them: CLIP of `model.clip_view`, the crop's latent."""
        components, conditioner = self.stage1.components, self.stage1.conditioner
        view = clip_input(batch, self.stage1.config.model.clip_view)
        return conditioner.tokens(view), conditioner.source_latents(components.vae, batch["source"])

    def labels(self, batch: dict) -> torch.Tensor | None:
        return phase_labels(batch, self.stage1.config.model.num_phases, batch["source"].device)

    def reconstruction_terms(self, decoded: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        grey = from_vae_output(decoded.float())
        error = grey - target.float()
        terms = {"rec": error.abs().mean() if self.config.rec_loss == "l1" else error.pow(2).mean()}
        if self.config.lpips_weight > 0:
            # LPIPS sees [-1, 1]; a straight-through clamp keeps its gradient on pixels pushed past it (a plain
            # clamp gave them none: only L1 and the discriminator pulled them back)
            inside = grey + (grey.clamp(-1, 1) - grey).detach()
            terms["lpips"] = self.lpips(inside, target.float()).mean()
        return terms

    def prepare(self, batch: dict, generator: torch.Generator) -> None:
        """Gives `batch` its latents ("stage2_latents"): sampled for its photos on draws 0, k, 2k, ...
        (k = `stage2.latent_reuse`); on the others a batch from the pool of the last k sampled ones (drawn
        with `generator`), whose photos, targets and latents replace the batch's own."""
        reuse = self.config.latent_reuse
        if self.draws % reuse:
            index = int(torch.randint(len(self.pool), (1,), generator=generator, device=generator.device))
            batch.clear()
            batch.update(self.pool[index])
        else:
            batch["stage2_latents"] = self.latents(batch, generator)
            if self.config.latents == "split":  # the reconstruction's latents: the real FFA's own
                batch["stage2_aligned"] = encode_latents(self.stage1.components.vae, batch["target"]).float()
            if reuse > 1:
                self.pool = [*self.pool, dict(batch)][-reuse:]
        self.draws += 1

    def adversarial(self, step: int) -> bool:
        """Whether the discriminator learns, and the decoder against it, at `step`."""
        return step >= self.config.disc_start and self.config.adv_weight > 0

    def updates(self, optimizer: str, step: int) -> bool:
        return optimizer != "discriminator" or self.adversarial(step)

    def loss(self, batch: dict, step: int, generator: torch.Generator, optimizer: str):
        # one set of latents per batch: the discriminator's pass judges the decodes of the latents the
        # decoder just learned from (and the sampler runs once a step, not once per optimizer)
        if "stage2_latents" not in batch:
            self.prepare(batch, generator)
        target, latents = batch["target"], batch["stage2_latents"]
        adversarial = self.adversarial(step)
        decoder, discriminator = self.trainable["decoder"], self.trainable["discriminator"]
        if optimizer == "discriminator":  # from disc_start on (`updates`)
            with torch.no_grad():
                fake = from_vae_output(decoder(latents).float())
            real_logits, fake_logits = discriminator(target.float()), discriminator(fake)
            loss = hinge_d_loss(real_logits, fake_logits)
            return loss, {"d_real": real_logits.mean().item(), "d_fake": fake_logits.mean().item()}
        aligned = batch.get("stage2_aligned", latents)  # "split": L1 and LPIPS on the real FFA's own latents
        decoded = decoder(aligned)
        terms = self.reconstruction_terms(decoded, target)
        reconstruction = terms["rec"] + self.config.lpips_weight * terms.get("lpips", 0.0)
        logs = {k: v.item() for k, v in terms.items()}
        if not adversarial:
            return reconstruction, logs
        fake = decoded if aligned is latents else decoder(latents)  # what the discriminator judges
        generator_loss = -discriminator(from_vae_output(fake.float())).mean()
        weight = adaptive_weight(reconstruction, generator_loss, self.decoder.last_layer) * self.config.adv_weight
        logs.update(g_loss=generator_loss.item(), adv_weight=float(weight))
        return reconstruction + weight * generator_loss, logs

    @torch.no_grad()
    def samples(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """real FFA | decoded encoder latent | decoded sampler latent (what translate shows)."""
        was_training = self.decoder.training
        self.decoder.eval()
        latents = [self.latents(batch, generator, mode) for mode in ("encoder", "sampler")]
        columns = [batch["target"]] + [from_vae_output(self.decoder(z)).clamp(-1, 1) for z in latents]
        self.decoder.train(was_training)
        return columns

    def finish(self, run_dir: Path) -> None:
        pass


def record_stage1(run_dir: Path, stage1: LoadedRun) -> None:
    """run.json names the stage-1 run, checkpoint and weights (EMA or raw) this decoder was tuned for."""
    checkpoint = Path(stage1.checkpoint)
    run_folder.update_info(
        run_dir,
        stage1_run=str(checkpoint.parent.parent.resolve()),
        stage1_checkpoint=str(checkpoint.resolve()),
        stage1_ema=stage1.ema,
    )
