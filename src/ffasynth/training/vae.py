"""Stage 0: train a VAE (encoder + decoder) on source and target crops, for presets with no
pretrained VAE (`tiny`, or training from scratch). SD1.5 users skip this and keep SD's VAE.

loss = |D(z) − x|₁ + λ_KL · KL(q(z|x) ‖ N(0, I)),  z ~ q(z|x),  x = photo or FFA (grey → 3 channels)

At the end the latent scaling factor is set to 1/std(z) over training crops (as LDM does for SD's
0.18215), and RUN/vae/ is written as a diffusers AutoencoderKL folder for `--vae RUN`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ffasynth.config import VAETrainConfig
from ffasynth.models.conditioning import to_vae_input
from ffasynth.training import checkpoint as ckpt
from ffasynth.training.loop import Task


class Autoencode(torch.nn.Module):
    """x → (D(z), posterior) with z sampled; one forward, so DDP sees every parameter's use."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator):
        posterior = self.vae.encode(images).latent_dist
        return self.vae.decode(posterior.sample(generator=generator)).sample, posterior


class VAETask(Task):
    name = "vae"

    def __init__(self, vae: AutoencoderKL, config: VAETrainConfig, dataset=None, scale_items: int = 32):
        self.vae = vae
        self.config = config
        self.dataset = dataset
        self.scale_items = scale_items
        vae.requires_grad_(True).train()
        self.trainable = {"vae": Autoencode(vae)}
        self.ema_names = ("vae",)
        self.device = torch.device("cpu")

    def to(self, device, weight_dtype) -> None:
        self.device = device
        self.vae.to(device)

    def enable_gradient_checkpointing(self) -> None:
        self.vae.enable_gradient_checkpointing()

    @staticmethod
    def _images(batch: dict) -> torch.Tensor:
        return torch.cat([to_vae_input(batch["source"]), to_vae_input(batch["target"])], dim=0)

    def loss(self, batch: dict, step: int, generator: torch.Generator, optimizer: str):
        images = self._images(batch)
        reconstruction, posterior = self.trainable["vae"](images, generator)
        l1 = (reconstruction.float() - images.float()).abs().mean()
        kl = posterior.kl().mean() / images[0].numel()  # per pixel, so λ_KL does not depend on crop size
        return l1 + self.config.kl_weight * kl, {"l1": l1.item(), "kl": kl.item()}

    @torch.no_grad()
    def samples(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """photo | its reconstruction | FFA | its reconstruction."""
        vae = self.vae
        was_training = vae.training
        vae.eval()
        columns = []
        for key in ("source", "target"):
            image = to_vae_input(batch[key])
            reconstruction = vae.decode(vae.encode(image).latent_dist.mode()).sample.clamp(-1, 1)
            columns += [
                batch[key],
                reconstruction if batch[key].shape[1] == 3 else reconstruction.mean(1, keepdim=True),
            ]
        vae.train(was_training)
        return columns

    @torch.no_grad()
    def latent_scale(self) -> float:
        """1 / std of latent samples over up to `scale_items` training crops (photos and FFAs)."""
        vae = self.vae.eval()
        latents = []
        count = min(self.scale_items, len(self.dataset))
        for start in range(0, count, 8):
            items = [self.dataset[(i % len(self.dataset), 0)] for i in range(start, min(count, start + 8))]
            batch = torch.utils.data.default_collate(items)
            images = self._images({k: batch[k].to(self.device) for k in ("source", "target")})
            latents.append(vae.encode(images).latent_dist.sample().float().cpu())
        return float(1.0 / torch.cat(latents).std().clamp_min(1e-6))

    def finish(self, run_dir: Path) -> None:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None and self.config.ema_decay > 0:
            ckpt.load_weights(latest, "vae", Autoencode(self.vae), ema=True)
        scale = self.latent_scale() if self.dataset is not None else self.vae.config.scaling_factor
        self.vae.register_to_config(scaling_factor=scale)
        self.vae.to("cpu").save_pretrained(Path(run_dir) / "vae", safe_serialization=True)
