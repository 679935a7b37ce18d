"""The pix2pix baseline: a U-Net whose skips and bottleneck both carry signal, whole-image inference
(padding, tiles that blend without seams) and an objective that learns on phantom pairs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ffasynth.baselines.pix2pix import (
    UnetGenerator,
    discriminator_loss,
    generate_image,
    generator_loss,
    with_phase,
)
from ffasynth.errors import FFASynthError
from ffasynth.models.discriminator import NLayerDiscriminator
from ffasynth.tiling import pad_to_multiple, plan_tiles


def tiny_generator(seed: int = 0, **kwargs) -> UnetGenerator:
    torch.manual_seed(seed)
    settings = {"in_ch": 3, "out_ch": 1, "num_downs": 5, "ngf": 8, "norm": "batch"} | kwargs
    return UnetGenerator(**settings).double().eval()


def test_paper_sizes_match_the_reference_parameter_counts():
    # pytorch-CycleGAN-and-pix2pix prints 54.414 M for unet_256 and 2.769 M for the basic D (6 input channels).
    with torch.device("meta"):
        generator = UnetGenerator(3, 3, num_downs=8, ngf=64, norm="batch")
        discriminator = NLayerDiscriminator(6, 64, 3, norm="batch")
    assert round(sum(p.numel() for p in generator.parameters()) / 1e6, 3) == 54.414
    assert round(sum(p.numel() for p in discriminator.parameters()) / 1e6, 3) == 2.769
    dropouts = [m for m in generator.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 8 - 5 and all(d.p == 0.5 for d in dropouts)


def test_every_skip_connection_carries_signal():
    # Train-mode batch norm rescales every level to unit variance, so deep and shallow paths compare fairly.
    generator = tiny_generator(use_dropout=False).train()
    source = torch.randn(4, 3, 32, 32, dtype=torch.double)
    with torch.no_grad():
        reference = generator(source)
        for block in generator.decoder[:-1]:  # all but the innermost take [skip, deeper] channels
            up = block[1]
            saved = up.weight.clone()
            up.weight[: up.in_channels // 2] = 0  # cut this skip's contribution
            changed = (generator(source) - reference).abs().max().item()
            up.weight.copy_(saved)
            assert changed > 1e-2, f"skip into {up} does nothing"


def test_a_one_pixel_change_reaches_the_whole_output_through_the_bottleneck():
    generator = tiny_generator()
    with torch.no_grad():
        for block in generator.decoder[:-1]:
            up = block[1]
            up.weight[: up.in_channels // 2] = 0  # only the innermost path is left
        source = torch.randn(1, 3, 32, 32, dtype=torch.double)
        moved = source.clone()
        moved[0, :, 3, 3] += 1.0
        change = (generator(moved) - generator(source)).abs()[0, 0]
    # The 1×1 bottleneck mixes the whole image: the far corner moves too.
    assert change[3, 3] > 0 and change[-1, -1] > 0
    assert (change > 0).float().mean() > 0.9


def test_output_is_bounded_and_input_sides_are_checked():
    generator = tiny_generator()
    with torch.no_grad():
        out = generator(100 * torch.randn(2, 3, 64, 32, dtype=torch.double))
    assert out.shape == (2, 1, 64, 32)
    assert out.abs().max() <= 1 and out.abs().max() > 0.9  # tanh, and saturating on huge inputs
    with pytest.raises(ValueError, match="multiple of 32"):
        generator(torch.zeros(1, 3, 40, 32, dtype=torch.double))
    with pytest.raises(ValueError, match="at least 5"):
        UnetGenerator(num_downs=4)


@pytest.mark.parametrize("shape", [(3, 45, 37), (2, 3, 33, 70), (3, 5, 7)])
def test_translate_keeps_odd_sizes(shape):
    generator = tiny_generator().float()
    out = generate_image(generator, torch.rand(shape) * 2 - 1, tile=64, overlap=16)
    assert out.shape == (*shape[:-3], 1, *shape[-2:])
    assert out.abs().max() <= 1 and torch.isfinite(out).all()


def test_translate_restores_the_training_mode_and_checks_its_options():
    generator = tiny_generator().float().train()
    generate_image(generator, torch.zeros(3, 32, 32), tile=32)
    assert generator.training
    with pytest.raises(FFASynthError, match="multiple of 32"):
        generate_image(generator, torch.zeros(3, 32, 32), tile=48)
    with pytest.raises(FFASynthError, match="overlap"):
        generate_image(generator, torch.zeros(3, 64, 64), tile=32, overlap=32)


@pytest.mark.parametrize("size", [(64, 64), (45, 37)])
def test_an_image_that_fits_one_tile_is_the_plain_generator_output(size):
    # padded by the pipeline's rule (bottom/right, reflect), then cropped back from the top-left
    generator = tiny_generator()
    source = torch.rand(3, *size, dtype=torch.double) * 2 - 1
    with torch.no_grad():
        direct = generator(pad_to_multiple(source[None], 32))[0, :, : size[0], : size[1]]
    assert torch.allclose(generate_image(generator, source, tile=64).double(), direct, atol=1e-6)
    assert torch.allclose(generate_image(generator, source, tile=128).double(), direct, atol=1e-6)


class LocalGenerator(nn.Module):
    """Three 3×3 convolutions with zero padding: each output pixel sees ±3 input pixels, so a tile's
    outer 3 pixels are spoiled by the padding (as a U-Net's are) while everything inside is exact."""

    num_downs = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Conv2d(8, 1, 3, padding=1), nn.Tanh())

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("overlap", [12, 16, 24])
def test_tiles_blend_without_seams(overlap):
    # overlap ≥ 12 → guard band overlap//4 ≥ 3 = the receptive radius: each pixel comes only from tiles
    # where it is valid, so tiled = whole everywhere. A weight > 0 up to the tile edge fails here.
    generator = LocalGenerator()
    source = torch.rand(3, 101, 75) * 2 - 1
    whole = generate_image(generator, source, tile=512)
    tiled = generate_image(generator, source, tile=32, overlap=overlap)
    assert len(plan_tiles(104, 80, 32, overlap, 8)) > 6  # really tiled (101 × 75 pads to 104 × 80)
    assert torch.allclose(tiled, whole, atol=1e-5), (tiled - whole).abs().max()


def test_the_seam_test_can_see_a_seam():
    # without overlap the tiles abut and their padding-spoiled edges show: the stand-in is not pointwise
    generator = LocalGenerator()
    source = torch.rand(3, 101, 75) * 2 - 1
    whole = generate_image(generator, source, tile=512)
    assert (generate_image(generator, source, tile=32, overlap=0) - whole).abs().max() > 1e-2


def test_objective_values_and_gradient_routes():
    torch.manual_seed(0)
    discriminator = NLayerDiscriminator(4, 8, 3, norm="none")
    nn.init.zeros_(discriminator.model[-1].weight)  # logits exactly 0: D is undecided
    nn.init.zeros_(discriminator.model[-1].bias)
    source, target = torch.rand(2, 3, 64, 64), torch.rand(2, 1, 64, 64)
    fake = torch.rand(2, 1, 64, 64, requires_grad=True)
    l1 = (fake - target).abs().mean().item()
    d_loss, logs = discriminator_loss(discriminator, source, fake, target)
    assert d_loss.item() == pytest.approx(math.log(2)) and logs["d_real"] == 0.0
    d_loss.backward()
    assert fake.grad is None  # D's step never reaches the generator
    g_loss, logs = generator_loss(discriminator, source, fake, target)
    assert g_loss.item() == pytest.approx(math.log(2) + 100 * l1, rel=1e-5)
    assert logs["l1"] == pytest.approx(l1)
    g_loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    hinge_d, _ = discriminator_loss(discriminator, source, fake, target, gan_loss="hinge")
    hinge_g, _ = generator_loss(discriminator, source, fake, target, l1_weight=0.0, gan_loss="hinge")
    assert hinge_d.item() == pytest.approx(1.0) and hinge_g.item() == 0.0
    with pytest.raises(ValueError, match="GAN loss"):
        generator_loss(discriminator, source, fake, target, gan_loss="wgan")


@pytest.mark.slow
def test_pix2pix_learns_phantom_angiograms(tmp_path):
    from ffasynth.data.dataset import PairDataset
    from ffasynth.data.pair_check import load_pairs
    from ffasynth.data.phantom import write_phantom_dataset

    root = write_phantom_dataset(tmp_path, n=10, size=64, seed=3, test_fraction=0.2)

    def stacked(split):
        dataset = PairDataset(load_pairs(root / split, phase="early"))
        items = [dataset[i] for i in range(len(dataset))]
        return torch.stack([i["source"] for i in items]), torch.stack([i["target"] for i in items])

    source, target = stacked("train")
    test_source, test_target = stacked("test")
    torch.manual_seed(0)
    generator = UnetGenerator(3, 1, num_downs=6, ngf=8)
    discriminator = NLayerDiscriminator(4, 8, 3)
    adam = {"lr": 2e-4, "betas": (0.5, 0.999)}  # the paper's optimiser
    opt_g = torch.optim.Adam(generator.parameters(), **adam)
    opt_d = torch.optim.Adam(discriminator.parameters(), **adam)

    def held_out_l1() -> float:
        return (generate_image(generator, test_source) - test_target).abs().mean().item()

    start = held_out_l1()
    draw = torch.Generator().manual_seed(0)
    for _ in range(200):
        index = torch.randperm(len(source), generator=draw)[:4]
        batch_source, batch_target = source[index], target[index]
        if torch.rand(1, generator=draw) < 0.5:
            batch_source, batch_target = batch_source.flip(-1), batch_target.flip(-1)
        fake = generator(batch_source)
        discriminator.requires_grad_(True)
        d_loss, _ = discriminator_loss(discriminator, batch_source, fake, batch_target)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        discriminator.requires_grad_(False)
        g_loss, logs = generator_loss(discriminator, batch_source, fake, batch_target)
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
    end = held_out_l1()
    print(f"pix2pix held-out L1 (early phase, 64², [-1, 1] scale): {start:.3f} → {end:.3f}")
    assert end < 0.4 * start, (start, end)


def test_the_phase_maps_say_each_items_phase_in_the_photos_range():
    photo = torch.rand(3, 3, 5, 7) * 2 - 1
    stacked = with_phase(photo, [0, 1, 5], num_phases=2)  # 5: clamped to the last phase, as the U-Net's label is
    assert stacked.shape == (3, 5, 5, 7) and torch.equal(stacked[:, :3], photo)
    assert stacked[0, 3].eq(1).all() and stacked[0, 4].eq(-1).all()
    assert stacked[1, 3].eq(-1).all() and stacked[1, 4].eq(1).all() and torch.equal(stacked[2, 3:], stacked[1, 3:])
    assert with_phase(photo, [0, 1, 1], num_phases=0) is photo  # the paper's pix2pix: the photo alone
    # the phase reaches the output of a generator that reads it, and tiles carry it (constant maps, reflect padding)
    generator = tiny_generator(in_ch=5)
    big = torch.rand(1, 3, 70, 90, dtype=torch.float64) * 2 - 1
    early, late = (generate_image(generator, with_phase(big, [i], 2), tile=64, overlap=16) for i in (0, 1))
    assert early.shape == (1, 1, 70, 90) and (early - late).abs().mean() > 1e-4
