"""The PatchGAN: each logit sees exactly its analytic window; GAN losses and the adaptive weight by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ffasynth.models.discriminator import (
    NLayerDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    norm_layer,
    receptive_field,
    vanilla_d_loss,
    vanilla_g_loss,
)


@pytest.mark.parametrize(("n_layers", "norm"), [(3, "batch"), (3, "none"), (2, "batch"), (1, "none")])
def test_one_logit_depends_on_exactly_a_square_window_of_the_analytic_size(n_layers, norm):
    field = receptive_field(n_layers)
    torch.manual_seed(0)
    # Eval-mode batch norm is per-pixel affine; train mode (or instance norm) would mix the whole image.
    disc = NLayerDiscriminator(2, 8, n_layers, norm=norm).double().eval()
    image = torch.randn(1, 2, 128, 128, dtype=torch.double, requires_grad=True)
    logits = disc(image)
    logits[0, 0, logits.shape[-2] // 2, logits.shape[-1] // 2].backward()
    reached = image.grad[0].abs().amax(0) > 0
    rows, cols = reached.any(1).nonzero().flatten(), reached.any(0).nonzero().flatten()
    top, left = int(rows.min()), int(cols.min())
    assert (rows.max() - top + 1, cols.max() - left + 1) == (field, field)
    assert reached[top : top + field, left : left + field].all()  # every pixel inside counts
    assert int(reached.sum()) == field * field  # and none outside


def test_pix2pix_sizes():
    assert [receptive_field(n) for n in (1, 2, 3, 4)] == [16, 34, 70, 142]
    # pix2pix's 70×70 PatchGAN gives a 30×30 grid of logits on a 256² pair.
    assert NLayerDiscriminator(4)(torch.zeros(1, 4, 256, 256)).shape == (1, 1, 30, 30)
    with pytest.raises(ValueError, match="unknown norm"):
        norm_layer("group", 8)


def test_gan_losses_by_hand():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -3.0])
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  BCE(x, 1) = softplus(−x), BCE(x, 0) = softplus(x)
    expected_d = 0.5 * ((softplus(0) + softplus(-2)) / 2 + (softplus(0) + softplus(-3)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected_d)
    assert vanilla_g_loss(fake).item() == pytest.approx((softplus(0) + softplus(3)) / 2)
    # hinge: ½·(mean(relu(1 − real)) + mean(relu(1 + fake))) = ½·(0.5 + 0.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_g_loss(fake).item() == pytest.approx(1.5)


def test_adaptive_weight_on_a_toy_layer():
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0]]))
    x = torch.tensor([[3.0, 4.0]])
    out = layer(x)  # −1
    rec = (out - 2.0).pow(2).sum()  # d/dW = 2·(out − 2)·x = −6·(3, 4): norm 30
    adv = -0.5 * out.sum()  # d/dW = −0.5·(3, 4): norm 2.5
    assert adaptive_weight(rec, adv, layer.weight).item() == pytest.approx(30 / (2.5 + 1e-4))
    # A discriminator with no gradient at the last layer: the ratio is capped at 1e4.
    assert adaptive_weight(rec, 0.0 * out.sum(), layer.weight).item() == pytest.approx(1e4)
    assert not adaptive_weight(rec, adv, layer.weight).requires_grad
