"""The pix2pix baseline (Isola et al. 2017): a U-Net generator with skip connections, the 70×70
PatchGAN on (source, target) pairs, and the objective cGAN + λ·L1 (λ = 100).

The generator is pix2pix's `UnetGenerator` written as an explicit encoder/decoder instead of
nested blocks; the layers, widths, biases, dropout placement and initialisation are the same. As
in the reference code (its in-place LeakyReLU), each skip carries the activated encoder feature.
`generate_image` runs a whole image through the package's one padding rule and tiler
(`ffasynth.tiling`), the same as the diffusion pipeline's. Unlike the paper, the generator and the
discriminator may also read the FFA phase (`with_phase`), as ffasynth's U-Net does, so neither method has to
draw one angiogram for both phases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ffasynth.errors import FFASynthError
from ffasynth.models.discriminator import (
    hinge_d_loss,
    hinge_g_loss,
    init_weights,
    norm_layer,
    vanilla_d_loss,
    vanilla_g_loss,
)
from ffasynth.tiling import pad_to_multiple, tiled_map

GAN_LOSSES = ("vanilla", "hinge")


class UnetGenerator(nn.Module):
    """source (N, in_ch, H, W) in [-1, 1] → (N, out_ch, H, W) in [-1, 1]; H and W multiples of
    2**num_downs. Widths ngf·(1, 2, 4, 8, 8, ...); the paper's 256² model is num_downs=8, ngf=64,
    with dropout 0.5 in the num_downs − 5 innermost-but-one decoder blocks (its only noise)."""

    def __init__(
        self,
        in_ch: int = 3,
        out_ch: int = 1,
        num_downs: int = 8,
        ngf: int = 64,
        norm: str = "batch",
        use_dropout: bool = True,
    ):
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"num_downs={num_downs}: pix2pix's U-Net has at least 5 levels")
        self.in_ch, self.out_ch, self.num_downs = in_ch, out_ch, num_downs
        use_bias = norm != "batch"
        widths = [ngf * min(2**level, 8) for level in range(num_downs)]  # channels after each down-convolution
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        innermost = num_downs - 1
        for level in range(num_downs):
            outer = in_ch if level == 0 else widths[level - 1]
            down: list[nn.Module] = [nn.Conv2d(outer, widths[level], 4, stride=2, padding=1, bias=use_bias)]
            if 0 < level < innermost:
                down.append(norm_layer(norm, widths[level]))
            self.encoder.append(nn.Sequential(*down))
            # Every decoder block but the innermost sees [skip, deeper output]: twice the width.
            inner = widths[level] if level == innermost else 2 * widths[level]
            if level == 0:
                up = [nn.ReLU(True), nn.ConvTranspose2d(inner, out_ch, 4, stride=2, padding=1), nn.Tanh()]
            else:
                up = [
                    nn.ReLU(True),
                    nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1, bias=use_bias),
                    norm_layer(norm, outer),
                ]
                if use_dropout and 4 <= level < innermost:
                    up.append(nn.Dropout(0.5))
            self.decoder.append(nn.Sequential(*up))
        self.apply(init_weights)

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this."""
        return 2**self.num_downs

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        if source.shape[-1] % self.multiple or source.shape[-2] % self.multiple:
            raise ValueError(f"input {tuple(source.shape[-2:])} is not a multiple of {self.multiple}")
        skips = []
        h = self.encoder[0](source)
        for down in self.encoder[1:]:
            h = F.leaky_relu(h, 0.2)
            skips.append(h)
            h = down(h)
        h = self.decoder[-1](h)
        for up in reversed(self.decoder[:-1]):
            h = up(torch.cat([skips.pop(), h], dim=1))
        return h


def with_phase(source: torch.Tensor, phase, num_phases: int) -> torch.Tensor:
    """(N, C, H, W) photo ⊕ one constant map per FFA phase, +1 on the item's phase and −1 on the others (the
    photo's range), so one generator draws each phase; the photo alone for num_phases = 0 (the paper's)."""
    if not num_phases:
        return source
    index = torch.as_tensor(phase, device=source.device).long().reshape(-1).clamp(0, num_phases - 1)
    maps = 2.0 * F.one_hot(index, num_phases).to(source.dtype) - 1.0
    return torch.cat([source, maps[:, :, None, None].expand(-1, -1, *source.shape[-2:])], dim=1)


def _pair_logits(discriminator: nn.Module, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The conditional discriminator sees the source and an angiogram stacked on channels."""
    return discriminator(torch.cat([source, target], dim=1))


def generator_loss(
    discriminator: nn.Module,
    source: torch.Tensor,
    fake: torch.Tensor,
    target: torch.Tensor,
    l1_weight: float = 100.0,
    gan_loss: str = "vanilla",
) -> tuple[torch.Tensor, dict[str, float]]:
    """G's objective: GAN(D(source ⊕ fake)) + λ·‖target − fake‖₁ (the discriminator gets no update
    from it; step only the generator's optimiser)."""
    logits = _pair_logits(discriminator, source, fake)
    adversarial = vanilla_g_loss(logits) if _check(gan_loss) == "vanilla" else hinge_g_loss(logits)
    l1 = (fake - target).abs().mean()
    return adversarial + l1_weight * l1, {"g_gan": adversarial.item(), "l1": l1.item()}


def discriminator_loss(
    discriminator: nn.Module,
    source: torch.Tensor,
    fake: torch.Tensor,
    target: torch.Tensor,
    gan_loss: str = "vanilla",
) -> tuple[torch.Tensor, dict[str, float]]:
    """D's objective, halved as in pix2pix: ½·(GAN(D(source ⊕ target), real) + GAN(D(source ⊕ fake), fake));
    `fake` is detached, so no gradient reaches the generator."""
    real_logits = _pair_logits(discriminator, source, target)
    fake_logits = _pair_logits(discriminator, source, fake.detach())
    loss = vanilla_d_loss if _check(gan_loss) == "vanilla" else hinge_d_loss
    logs = {"d_real": real_logits.mean().item(), "d_fake": fake_logits.mean().item()}
    return loss(real_logits, fake_logits), logs


def _check(gan_loss: str) -> str:
    if gan_loss not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {gan_loss!r}; choose from {', '.join(GAN_LOSSES)}")
    return gan_loss


@torch.no_grad()
def generate_image(
    generator: nn.Module,
    source_tensor: torch.Tensor,
    tile: int = 512,
    overlap: int = 64,
    multiple: int | None = None,
) -> torch.Tensor:
    """Whole-image inference: (C, H, W) or (N, C, H, W) in [-1, 1] → the generator's output of the
    same height and width, float32 on the input's device. The generator runs in eval mode (running batch
    statistics, no dropout): deterministic and the same in every tile; the paper kept train mode.

    The same padding and tiler as the diffusion pipeline (`ffasynth.tiling`): padded on the bottom/right
    to a multiple of `multiple` (default 2**generator.num_downs); when larger than `tile`, run in
    tile×tile pieces starting on that multiple and overlapping by at least `overlap` pixels
    (0 ≤ overlap < tile), blended with weights that are 0 in a guard band at each shared edge, where
    the generator's zero padding spoils its output, and ramp up to 1 over `overlap`."""
    multiple = multiple or 2**generator.num_downs
    if tile % multiple:
        raise FFASynthError(f"tile {tile} must be a multiple of {multiple} (2**num_downs)")
    single = source_tensor.ndim == 3
    batch = source_tensor[None] if single else source_tensor
    height, width = batch.shape[-2:]
    parameter = next(generator.parameters(), None)
    device = parameter.device if parameter is not None else batch.device
    padded = batch.to(device=device, dtype=parameter.dtype if parameter is not None else torch.float32)
    padded = pad_to_multiple(padded, multiple)
    if max(padded.shape[-2:]) > tile and not 0 <= overlap < tile:
        raise FFASynthError(f"overlap {overlap} must be between 0 and the tile size {tile}")
    was_training = generator.training
    generator.eval()
    try:
        output = tiled_map(generator, [padded], tile, overlap, multiple=multiple, batch_size=1)
    finally:
        generator.train(was_training)
    output = output[..., :height, :width].float().to(source_tensor.device)
    return output[0] if single else output
