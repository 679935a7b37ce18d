"""PatchGAN discriminator (pix2pix / taming-transformers) and the GAN losses and adaptive weight
that stage 2 and the pix2pix baseline share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "instance", "none")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """pix2pix's normalisations: batch norm, instance norm without affine parameters, or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose from {', '.join(NORMS)}")


class NLayerDiscriminator(nn.Module):
    """4×4 convolutions: n_layers of stride 2, then two of stride 1, LeakyReLU 0.2; one logit per
    patch. With n_layers=3 each logit sees a 70×70 input window (pix2pix's "70×70 PatchGAN")."""

    def __init__(self, in_channels: int = 1, base_channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        use_bias = norm != "batch"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        channels = base_channels
        for index in range(1, n_layers + 1):
            out = base_channels * min(2**index, 8)
            stride = 2 if index < n_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride=stride, padding=1, bias=use_bias), norm_layer(norm, out)]
            layers.append(nn.LeakyReLU(0.2, True))
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        self.n_layers = n_layers
        self.apply(init_weights)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


def init_weights(module: nn.Module) -> None:
    """pix2pix's initialisation (use with `module.apply`): N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def receptive_field(n_layers: int) -> int:
    """Input window seen by one logit: r ← r + (k − 1)·jump over the convolutions (k = 4)."""
    strides = [2] * n_layers + [1, 1]
    field, jump = 1, 1
    for stride in strides:
        field += 3 * jump
        jump *= stride
    return field


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """½·(E[relu(1 − D(real))] + E[relu(1 + D(fake))])."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def vanilla_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """½·(BCE(D(real), 1) + BCE(D(fake), 0)), pix2pix's original objective."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * (real + fake)


def vanilla_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """BCE(D(fake), 1): the non-saturating generator loss."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """−E[D(fake)]: the generator side of the hinge objective (taming / LDM)."""
    return -fake_logits.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """‖∇_last rec‖ / (‖∇_last g‖ + 1e-4), clamped to [0, 1e4] and detached (LDM / taming), so the
    adversarial gradient at the generator's last layer is as large as the reconstruction one."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach()
