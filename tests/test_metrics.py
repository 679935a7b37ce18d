"""Weights location/loading and the metrics, with random-valued backbones in the real file formats."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ffasynth.data.io import save_image
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.data.registration import field_of_view
from ffasynth.errors import FFASynthError, WeightsNotFoundError
from ffasynth.evaluation.metrics import (
    PAIRED_METRICS,
    EvalSettings,
    _distribution_images,
    distribution_scores,
    evaluate,
    inception_features,
    load_pair,
    paired_scores,
    read_grey,
    resize_to,
    sample_patches,
)
from ffasynth.evaluation.pairing import real_images
from ffasynth.weights import (
    KNOWN_WEIGHTS,
    WEIGHTS_ENV,
    build_inception,
    build_lpips,
    locate,
    resolve_weights_dir,
    trust_file,
)
from tests.fake_weights import write_inception, write_torchvision


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    write_inception(folder)
    write_torchvision(folder, "alexnet")
    return folder


@pytest.fixture(scope="session")
def ffa_dir(tmp_path_factory):
    """Three phantom eyes, 6 real FFA; at 200 px their field of view spans the 176 px MS-SSIM needs."""
    return write_phantom_dataset(tmp_path_factory.mktemp("ffa"), n=3, size=200, seed=1)


@pytest.fixture(scope="session")
def lpips_alex(weights_dir):
    return build_lpips("alex", weights_dir)


@pytest.fixture(scope="session")
def inception(weights_dir):
    return build_inception(weights_dir)


@pytest.fixture(scope="session")
def real_ffa(ffa_dir):
    return [read_grey(path)[0] for path in real_images(ffa_dir)[0].values()]


def blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel[:, None] * kernel[None, :] / kernel.sum() ** 2
    return F.conv2d(F.pad(image[None], (radius,) * 4, mode="reflect"), kernel[None, None])[0]


def noise(image: torch.Tensor, sigma: float) -> torch.Tensor:
    return (image + sigma * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)


def test_weights_folder_argument_env_then_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert resolve_weights_dir() == tmp_path / "hub" / "checkpoints"
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "env"))
    assert resolve_weights_dir() == tmp_path / "env"
    assert resolve_weights_dir(tmp_path / "arg") == tmp_path / "arg"


def test_missing_weights_say_which_file_goes_where(tmp_path):
    with pytest.raises(WeightsNotFoundError) as caught:
        locate("alexnet", tmp_path)
    message = str(caught.value)
    spec = KNOWN_WEIGHTS["alexnet"]
    assert "\n" not in message and spec.filename in message and str(tmp_path) in message and spec.url in message


def test_weights_in_the_wrong_format_are_named(tmp_path):
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / KNOWN_WEIGHTS["alexnet"].filename)
    trust_file(tmp_path / KNOWN_WEIGHTS["alexnet"].filename)  # past the hash check, to the format check
    with pytest.raises(FFASynthError, match="do not match"):
        build_lpips("alex", tmp_path)
    (tmp_path / KNOWN_WEIGHTS["inception"].filename).write_bytes(b"not a checkpoint")
    with pytest.raises(FFASynthError, match="is not the pinned"):  # refused before torch reads it
        build_inception(tmp_path)
    trust_file(tmp_path / KNOWN_WEIGHTS["inception"].filename)
    with pytest.raises(FFASynthError, match="not a readable tensor-only state dict"):
        build_inception(tmp_path)


def test_lpips_is_differentiable_zero_on_identity_and_frozen(lpips_alex):
    lpips = lpips_alex
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 1, 64, 64, generator=generator) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 1, 64, 64, generator=generator) * 2 - 1
    distance = lpips(x, y)
    assert distance.shape == (2,) and (distance > 0).all()
    distance.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())
    assert torch.equal(lpips(y, y), torch.zeros(2))
    assert torch.allclose(lpips(x, y), lpips(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)))  # grey → 3 channels
    torch.nn.Sequential(lpips).train()
    assert not lpips.training and not lpips.model.training  # dropout never switches on
    inside = torch.zeros(2, 1, 64, 64)
    inside[..., :32] = 1
    changed_outside = x.detach().clone()
    changed_outside[..., 48:] = -1
    assert lpips(changed_outside, x.detach(), inside).abs().max() < lpips(changed_outside, x.detach()).min()


@pytest.mark.slow
def test_lpips_vgg_loads_the_torchvision_file(tmp_path):
    write_torchvision(tmp_path, "vgg16")
    lpips = build_lpips("vgg", tmp_path)
    x = torch.rand(1, 3, 48, 48, requires_grad=True)
    lpips(x * 2 - 1, torch.zeros(1, 3, 48, 48)).sum().backward()
    assert x.grad.abs().sum() > 0 and lpips(x, x).item() == 0.0


def test_inception_gives_2048_features(inception):
    features = inception(torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8))[0]
    assert features.shape == (2, 2048) and features.std() > 0


def test_paired_metrics_identical_and_masked():
    image = torch.rand(1, 180, 190, generator=torch.Generator().manual_seed(0))
    scores = paired_scores(image, image.clone())
    assert scores["psnr"] == math.inf and scores["ssim"] == pytest.approx(1.0) and scores["ms_ssim"] == pytest.approx(1)
    mask = torch.zeros(1, 180, 190)
    mask[:, :, :100] = 1
    altered = image.clone()
    altered[:, :, 120:] = 0.0  # a difference outside the field of view only
    masked = paired_scores(image, altered, mask, ("psnr", "ssim"))
    assert masked["psnr"] == math.inf and masked["ssim"] > 0.97
    assert paired_scores(image, altered, None, ("psnr",))["psnr"] < 15
    small = paired_scores(image[:, :64, :64], image[:, :64, :64], metrics=("ms_ssim",))
    assert math.isnan(small["ms_ssim"])  # under 176 px: reported as not computed, never a crash


def test_ssim_is_scikit_images_gaussian_ssim():
    """The SSIM of Wang et al. 2004 as scikit-image computes it (11-px Gaussian window, σ 1.5, population
    covariance), on the region both leave after the window's border."""
    from skimage.metrics import structural_similarity

    generator = torch.Generator().manual_seed(3)
    real = torch.rand(1, 64, 80, generator=generator)
    fake = (real + 0.2 * torch.randn(1, 64, 80, generator=generator)).clamp(0, 1)
    expected = structural_similarity(
        real[0].double().numpy(),
        fake[0].double().numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
    )
    assert paired_scores(real, fake, metrics=("ssim",))["ssim"] == pytest.approx(expected, abs=2e-3)


def test_ms_ssim_and_lpips_ignore_a_difference_outside_the_field_inside_its_bounding_box(lpips_alex):
    """MS-SSIM is computed on the field's bounding box with the outside blacked out in both images, and LPIPS
    averages its distance map over the field: the corners of a round field's box are outside it."""
    yy, xx = torch.meshgrid(torch.arange(200), torch.arange(200), indexing="ij")
    mask = (((yy - 100) ** 2 + (xx - 100) ** 2) < 95**2).float()[None]
    real = torch.rand(1, 200, 200, generator=torch.Generator().manual_seed(0))
    fake = torch.where(mask.bool(), real, 1.0 - real)  # differs only in the box's corners
    masked = paired_scores(real, fake, mask, ("ms_ssim", "lpips"), lpips=lpips_alex)
    assert masked["ms_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert masked["lpips"] < 0.5 * paired_scores(real, fake, None, ("lpips",), lpips=lpips_alex)["lpips"]
    assert paired_scores(real, fake, None, ("ms_ssim",))["ms_ssim"] < 0.99


@pytest.mark.parametrize(("degrade", "levels"), [(blur, (0.7, 1.5, 3.0)), (noise, (0.03, 0.08, 0.2))])
def test_paired_metrics_worsen_monotonically(real_ffa, lpips_alex, degrade, levels):
    means = []
    for level in levels:
        rows = [paired_scores(real, degrade(real, level), lpips=lpips_alex) for real in real_ffa]
        means.append({k: sum(r[k] for r in rows) / len(rows) for k in rows[0]})
    for better, worse in zip(means, means[1:], strict=False):
        assert worse["psnr"] < better["psnr"] and worse["ssim"] < better["ssim"]
        assert worse["ms_ssim"] < better["ms_ssim"] and worse["lpips"] > better["lpips"]


@pytest.mark.slow
def test_distribution_metrics_worsen_monotonically(real_ffa, inception):
    real_features = inception_features(real_ffa, inception)
    same, _ = distribution_scores(real_features, inception_features([r.clone() for r in real_ffa], inception))
    scores = [same]
    for sigma in (1.5, 4.0):
        fake_features = inception_features([blur(r, sigma) for r in real_ffa], inception)
        scores.append(distribution_scores(real_features, fake_features)[0])
    fids, kids = [s["fid"] for s in scores], [s["kid"] for s in scores]
    assert abs(fids[0]) < 1e-3 * fids[1] and abs(kids[0]) < 0.1 * kids[1]
    assert fids == sorted(fids) and kids == sorted(kids)


def test_patches_are_reproducible_and_inside_the_field(ffa_dir):
    image = torch.zeros(1, 120, 200)
    image[:, 30:90, 40:160] = 0.8  # 30% of the frame is inside the field
    first = sample_patches(image, 8, 48, "7.1", seed=3)
    assert len(first) == 8 and all(p.shape == (1, 48, 48) for p in first)
    assert all(float((p > 0).float().mean()) >= 0.4 for p in first)  # >= half inside the (7-px blurred) mask
    assert all(torch.equal(a, b) for a, b in zip(first, sample_patches(image, 8, 48, "7.1", seed=3), strict=True))
    reals = real_images(ffa_dir)[0]
    settings = EvalSettings(patches=3, patch_size=64)
    images, unreadable = _distribution_images(list(reals.values()), list(reals), settings)
    assert len(images) == 3 * len(reals) and not unreadable  # the count each FID/KID rests on


@pytest.fixture(scope="module")
def identical_evaluation(ffa_dir, weights_dir, tmp_path_factory):
    """Generated = copies of the real FFA, written as <key>_ffa.png (translate's naming)."""
    fake = tmp_path_factory.mktemp("same")
    for key, path in real_images(ffa_dir)[0].items():
        shutil.copyfile(path, fake / f"{key}_ffa.png")
    return evaluate(ffa_dir, {"same": fake}, EvalSettings(weights_dir=str(weights_dir)))


@pytest.mark.slow
def test_identical_sets_score_perfectly(identical_evaluation):
    method = identical_evaluation.methods[0]
    assert len(method.per_image) == 6 and not identical_evaluation.skipped
    assert method.summary["psnr"]["mean"] == math.inf
    assert method.summary["ssim"]["mean"] == pytest.approx(1.0)
    assert method.summary["ms_ssim"]["mean"] == pytest.approx(1.0)
    assert method.summary["lpips"]["mean"] == 0.0
    assert abs(method.distribution["fid"]) < 1e-3 and abs(method.distribution["kid"]) < 1e-3
    assert method.n_features == {"real": 6, "fake": 6}
    assert any("fewer than the 2048 feature dimensions" in w for w in method.warnings)


def test_missing_weights_skip_only_their_metrics(ffa_dir, tmp_path):
    fake = tmp_path / "blurred"
    fake.mkdir()
    for key, path in real_images(ffa_dir)[0].items():
        save_image(blur(read_grey(path)[0], 1.0), fake / f"{key}.jpg")
    evaluation = evaluate(ffa_dir, {"blur": fake}, EvalSettings(weights_dir=str(tmp_path / "empty")))
    assert set(evaluation.skipped) == {"lpips", "fid", "kid"}
    assert all("\n" not in reason and ".pth" in reason for reason in evaluation.skipped.values())
    method = evaluation.methods[0]
    assert set(method.summary) & set(PAIRED_METRICS) == {"psnr", "ssim", "ms_ssim"}
    assert method.summary["psnr"]["mean"] < 40 and "vessel_dice" in method.summary  # no network needed
    assert not method.distribution


def test_load_pair_flags_a_resize_only_when_the_generated_image_differs_from_its_real_partner(tmp_path):
    """`resolution` scales both images alike; only a generated image of another size than its real
    partner is resized to it (and flagged)."""
    rng = np.random.default_rng(0)
    for name, size in (("real.png", (60, 80)), ("same.png", (60, 80)), ("half.png", (30, 40))):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(tmp_path / name)
    for resolution in (None, 48):
        real, fake, resized, _ = load_pair(tmp_path / "real.png", tmp_path / "same.png", resolution)
        assert not resized and fake.shape == real.shape == ((1, 60, 80) if resolution is None else (1, 48, 64))
        real, fake, resized, _ = load_pair(tmp_path / "real.png", tmp_path / "half.png", resolution)
        assert resized and fake.shape == real.shape


@pytest.mark.slow
def test_fid_patches_see_a_smaller_generated_image_at_its_real_partners_size(ffa_dir, weights_dir, tmp_path):
    """Copies of the real FFA saved at half size: each generated patch covered twice the field of a real one
    (FID/KID compared magnifications, not quality). Now each is first resized to its real partner, as the
    paired metrics do: FID as if the copies had been written at full size."""
    half = tmp_path / "half"
    half.mkdir()
    for key, path in real_images(ffa_dir)[0].items():
        image = read_grey(path)[0]
        save_image(F.interpolate(image[None], scale_factor=0.5, mode="area")[0], half / f"{key}_ffa.png")
    settings = EvalSettings(weights_dir=str(weights_dir), metrics=("fid",), patches=2, patch_size=64)
    scored = evaluate(ffa_dir, {"half": half}, settings).methods[0]
    restored = tmp_path / "restored"  # the half-size copies brought to full size by hand, as evaluate should
    restored.mkdir()
    for path in half.iterdir():
        save_image(resize_to(read_grey(path)[0], (200, 200)), restored / path.name)
    expected = evaluate(ffa_dir, {"restored": restored}, settings).methods[0].distribution["fid"]
    assert scored.distribution["fid"] == pytest.approx(expected, rel=0.01), (scored.distribution, expected)
    images, _ = _distribution_images(
        [half / "1.1_ffa.png"], ["1.1"], settings, {half / "1.1_ffa.png": ffa_dir / "1.1.png"}
    )
    assert all(image.shape == (1, 64, 64) for image in images)
    whole = EvalSettings(weights_dir=str(weights_dir), metrics=("fid",))
    unpaired = _distribution_images([half / "1.1_ffa.png"], ["1.1"], whole)[0][0]
    paired = _distribution_images([half / "1.1_ffa.png"], ["1.1"], whole, {half / "1.1_ffa.png": ffa_dir / "1.1.png"})
    assert unpaired.shape == (1, 100, 100) and paired[0][0].shape == (1, 200, 200)
    # with --resolution: resampled once, straight to the evaluation size, as the paired metrics see it
    scaled = EvalSettings(weights_dir=str(weights_dir), metrics=("fid",), resolution=150)
    seen = _distribution_images([half / "1.1_ffa.png"], ["1.1"], scaled, {half / "1.1_ffa.png": ffa_dir / "1.1.png"})
    assert torch.equal(seen[0][0], load_pair(ffa_dir / "1.1.png", half / "1.1_ffa.png", 150)[1])


def test_dark_pathology_inside_the_eye_counts_in_the_paired_metrics(tmp_path):
    """A near-black non-perfusion area inside the field (4/255) was outside the mask of a per-pixel threshold:
    a generated image that drew it grey lost nothing. The field now has its holes filled."""
    yy, xx = np.mgrid[:200, :200]
    field = (yy - 100) ** 2 + (xx - 100) ** 2 < 90**2
    real = np.where(field, 0.5, 0.0)
    real[(yy - 100) ** 2 + (xx - 120) ** 2 < 30**2] = 4 / 255  # dark area well inside the field
    fake = np.where(field, 0.5, 0.0)  # the same eye, the dark area drawn as its surroundings
    (tmp_path / "real").mkdir()
    (tmp_path / "fake").mkdir()
    save_image(torch.from_numpy(real).float()[None], tmp_path / "real" / "1.png")
    save_image(torch.from_numpy(fake).float()[None], tmp_path / "fake" / "1_ffa.png")
    settings = EvalSettings(weights_dir=str(tmp_path / "none"), metrics=("psnr", "ssim"))
    method = evaluate(tmp_path / "real", {"m": tmp_path / "fake"}, settings).methods[0]
    # the dark area is 30²/90² ≈ 11% of the field, wrong by ~0.5: MSE ≈ 0.11 · 0.24 → PSNR ≈ 15.7 dB; over the
    # field only (over the whole frame, where the rest is right, it would be ≈ 17.7 dB)
    levels = [np.round(image * 255) / 255 for image in (real, fake)]  # as saved, 8 bits
    squared = (levels[0] - levels[1]) ** 2
    scored = field_of_view(levels[0].astype(np.float32), settings.fov_threshold)  # the filled field evaluate uses
    assert -10 * np.log10(squared.mean()) > -10 * np.log10(squared[scored].mean()) + 1.5  # the two differ
    assert method.summary["psnr"]["mean"] == pytest.approx(-10 * np.log10(squared[scored].mean()), abs=0.02)


def test_fid_finds_a_generated_images_partner_however_its_path_is_written(ffa_dir, tmp_path):
    """The partners were looked up by the path as written: a manifest's absolute or "../" path for a generated
    image the folder lists under another spelling found none, and Inception saw it at its own (half) size."""
    half = tmp_path / "gen"
    half.mkdir()
    save_image(torch.zeros(1, 100, 100), half / "1.1_ffa.png")
    (tmp_path / "elsewhere").mkdir()
    spelled = tmp_path / "elsewhere" / ".." / "gen" / "1.1_ffa.png"  # the same file
    whole = EvalSettings(metrics=("fid",))
    seen = _distribution_images([half / "1.1_ffa.png"], ["1.1"], whole, {spelled: ffa_dir / "1.1.png"})[0]
    assert seen[0].shape == (1, 200, 200)


def test_evaluate_names_generated_images_of_another_aspect_ratio_and_12_bit_real_images(tmp_path):
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir()
    fake.mkdir()
    rng = np.random.default_rng(0)
    for key in ("1", "2", "3"):
        Image.fromarray(rng.integers(0, 256, (60, 80), dtype=np.uint8)).save(real / f"{key}.png")
    Image.fromarray((rng.integers(0, 4096, (60, 80))).astype(np.uint16)).save(real / "3.png")  # 12-bit in 16
    Image.fromarray(rng.integers(0, 256, (60, 80), dtype=np.uint8)).save(fake / "1_ffa.png")
    Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8)).save(fake / "2_ffa.png")  # half: same aspect
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(fake / "3_ffa.png")  # squashed to 80x60
    result = evaluate(real, {"m": fake}, EvalSettings(metrics=("psnr",))).methods[0]
    said = "\n".join(result.warnings)
    assert "2 generated images differ in size" in said
    assert "1 images have another aspect ratio than their real partner and were distorted to its (3_ffa.png)" in said
    assert "1 images are 16-bit files within 0..4095 (12-bit data?), scored as near black (3.png)" in said
