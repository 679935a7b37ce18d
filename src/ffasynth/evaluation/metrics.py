"""Image-quality metrics of generated angiograms against real ones.

Paired (per matched image, then mean ± std): PSNR, SSIM, MS-SSIM (torchmetrics) and LPIPS
(`ffasynth.weights.build_lpips`). Distribution (set against set): FID and KID with its std over
subsets (torch-fidelity's formulas on its FID Inception-v3 features).

Conventions, stated in every report:
- Intensity: images read by `read_image` as [0, 1] (8-bit / 255, 16-bit / 65535), data range 1.
- Channels: FFA is grey. Paired metrics compare one channel (a colour generated image is
  converted to luma); LPIPS and Inception see that channel repeated to 3.
- Resolution: the real image's own size, or with `resolution` its shorter side scaled to that
  (aspect kept); a generated image of another size is resized to its real partner (bilinear,
  antialiased), for FID/KID too (so their patches cover the same field in both sets). Inception
  then resizes every image or patch to 299x299 itself.
- Field of view: with `fov_mask`, paired metrics count only pixels inside the real image's
  field of view (`data.registration.field_of_view`: above the threshold, the largest region with its
  holes filled, so dark non-perfusion inside the eye counts): PSNR on those pixels, SSIM and LPIPS
  maps averaged there; MS-SSIM has no map, so it is computed on the mask's bounding box with pixels
  outside the mask set to black in both images (the shared border is structure both share: an
  unrelated texture scores ~0.24 there against ~0.06 on a square inside the field).
- Patches: with `patches` > 0, FID/KID use that many random `patch_size` crops per image (inside
  the field of view, positions a function of seed and image name) instead of whole images.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ffasynth.data.io import MIN_SIDE, image_size, read_image, twelve_bit_data
from ffasynth.data.registration import field_of_view
from ffasynth.data.transforms import choose_crop, fov_mask, pad_to
from ffasynth.errors import FFASynthError, ImageReadError
from ffasynth.evaluation import agreement
from ffasynth.evaluation.agreement import AGREEMENT_METRICS, AgreementScorer, summarise
from ffasynth.evaluation.pairing import Pairing, generated_images, match, real_images
from ffasynth.weights import LPIPS_BACKBONES, build_inception, build_lpips

METRICS = (*AGREEMENT_METRICS, "psnr", "ssim", "ms_ssim", "lpips", "fid", "kid")
PAIRED_METRICS = ("psnr", "ssim", "ms_ssim", "lpips")
DISTRIBUTION_METRICS = ("fid", "kid")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "ms_ssim": True, "lpips": False, "fid": False, "kid": False}
HIGHER_IS_BETTER |= agreement.HIGHER_IS_BETTER
INCEPTION_DIMS = 2048
MS_SSIM_MIN_SIDE = 176  # torchmetrics' 5 scales with an 11-px window need a side > 10 * 2**4


@dataclass
class EvalSettings:
    metrics: tuple[str, ...] = METRICS
    resolution: int | None = None  # shorter side in pixels; None = the real image's own size
    fov_mask: bool = True
    fov_threshold: float = 0.04
    patches: int = 0  # random crops per image for FID/KID; 0 = whole images
    patch_size: int = 512
    lpips_net: str = "alex"
    weights_dir: str | None = None
    kid_subsets: int = 100
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 16

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise FFASynthError(
                f"unknown metric {unknown[0] if unknown else '(none)'}; choose from {', '.join(METRICS)}"
            )
        if self.resolution is not None and self.resolution < 16:
            raise FFASynthError(f"--resolution {self.resolution}: use at least 16 pixels")
        if self.patches < 0 or self.patch_size < 16:
            raise FFASynthError("--patches must be >= 0 and --patch-size >= 16")
        if self.lpips_net not in LPIPS_BACKBONES:
            raise FFASynthError(f"unknown LPIPS network {self.lpips_net!r}; choose {' or '.join(LPIPS_BACKBONES)}")

    def to_json(self) -> dict:
        return asdict(self) | {"metrics": list(self.metrics)}


@dataclass
class Backbones:
    """Networks loaded once for all methods; `skipped` maps a metric to the one-line reason."""

    lpips: torch.nn.Module | None = None
    inception: torch.nn.Module | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def load_backbones(settings: EvalSettings) -> Backbones:
    """Load what the chosen metrics need; a missing weights file skips only its metrics."""
    backbones = Backbones()
    if "lpips" in settings.metrics:
        try:
            backbones.lpips = build_lpips(settings.lpips_net, settings.weights_dir).to(settings.device)
        except FFASynthError as error:
            backbones.skipped["lpips"] = str(error)
    wanted = [m for m in DISTRIBUTION_METRICS if m in settings.metrics]
    if wanted:
        try:
            backbones.inception = build_inception(settings.weights_dir).to(settings.device)
        except FFASynthError as error:
            backbones.skipped.update(dict.fromkeys(wanted, str(error)))
    return backbones


def shorter_side_size(size: tuple[int, int], side: int | None) -> tuple[int, int]:
    """(H, W) with the shorter side scaled to `side` (aspect kept); unchanged for None."""
    if side is None or min(size) == side:
        return tuple(size)
    scale = side / min(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def resize_shorter(image: torch.Tensor, side: int | None) -> torch.Tensor:
    """(C, H, W) with the shorter side scaled to `side` (aspect kept); unchanged for None."""
    return resize_to(image, shorter_side_size(tuple(image.shape[-2:]), side))


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    resized = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].clamp(0.0, 1.0)


def read_grey(path: Path) -> tuple[torch.Tensor, bool]:
    """(1, H, W) in [0, 1] and whether the file was colour (then converted to luma); images under
    MIN_SIDE pixels a side are refused (no metric window fits them)."""
    image = read_image(path, min_side=MIN_SIDE)
    if image.shape[0] == 1:
        return image, False
    return read_image(path, channels=1), True


def load_pair(
    real_path: Path, fake_path: Path, resolution: int | None
) -> tuple[torch.Tensor, torch.Tensor, bool, list[Path]]:
    """Real and generated (1, H, W) at the evaluation size, whether the generated one was resized ("squashed"
    when its aspect ratio differed by over 1%: the resize then distorts it), and which of the two files were
    colour (compared as luma)."""
    real, real_colour = read_grey(real_path)
    fake, fake_colour = read_grey(fake_path)
    resized = tuple(fake.shape[-2:]) != tuple(real.shape[-2:])  # before `resolution`: it resizes both alike
    (real_h, real_w), (fake_h, fake_w) = real.shape[-2:], fake.shape[-2:]
    if resized and abs(fake_w / fake_h - real_w / real_h) > 0.01 * real_w / real_h:
        resized = "squashed"
    real = resize_shorter(real, resolution)
    colour = [path for path, flag in ((real_path, real_colour), (fake_path, fake_colour)) if flag]
    return real, resize_to(fake, tuple(real.shape[-2:])), resized, colour


def paired_scores(
    real: torch.Tensor,
    fake: torch.Tensor,
    mask: torch.Tensor | None = None,
    metrics: tuple[str, ...] = PAIRED_METRICS,
    lpips: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Scores of one (1, H, W) pair in [0, 1]; `mask` (1, H, W) {0, 1} restricts them to the field
    of view. MS-SSIM is NaN when the image (or the mask's bounding box) is under 176 px."""
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    inside = mask.bool() if mask is not None else torch.ones_like(real, dtype=torch.bool)
    scores: dict[str, float] = {}
    if "psnr" in metrics:
        scores["psnr"] = float(peak_signal_noise_ratio(fake[inside], real[inside], data_range=1.0))
    if "ssim" in metrics:
        score, ssim_map = structural_similarity_index_measure(
            fake[None], real[None], data_range=1.0, return_full_image=True
        )
        scores["ssim"] = float(ssim_map[0][inside].mean()) if mask is not None else float(score)
    if "ms_ssim" in metrics:
        rows, cols = inside[0].any(dim=1).nonzero().flatten(), inside[0].any(dim=0).nonzero().flatten()
        box = (
            (slice(None), slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
            if len(rows)
            else ...
        )
        real_box, fake_box = (real * inside)[box], (fake * inside)[box]
        if len(rows) and min(real_box.shape[-2:]) >= MS_SSIM_MIN_SIDE:
            scores["ms_ssim"] = float(
                multiscale_structural_similarity_index_measure(fake_box[None], real_box[None], data_range=1.0)
            )
        else:
            scores["ms_ssim"] = math.nan
    if "lpips" in metrics and lpips is not None:
        device = next(lpips.parameters()).device
        with torch.no_grad():
            distance = lpips(
                (fake[None] * 2 - 1).to(device),
                (real[None] * 2 - 1).to(device),
                mask[None].to(device) if mask is not None else None,
            )
        scores["lpips"] = float(distance[0])
    return scores


def sample_patches(
    image: torch.Tensor, count: int, size: int, key: str, seed: int, fov_threshold: float = 0.04
) -> list[torch.Tensor]:
    """`count` crops of size x size, each with at least half its pixels inside the image's field of
    view; positions depend only on (seed, key), so identical images give identical crops."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    image = pad_to(image, size, size)
    mask = fov_mask(image, fov_threshold)
    crops = []
    for _ in range(count):
        top, left = choose_crop(mask, size, generator, min_fraction=0.5)
        crops.append(image[:, top : top + size, left : left + size])
    return crops


def inception_features(images: list[torch.Tensor], inception: torch.nn.Module, batch_size: int = 16) -> torch.Tensor:
    """(N, 2048) pool features of (1 or 3, H, W) images in [0, 1], in input order (grey repeated to
    3 and quantised to uint8, as torch-fidelity expects; batches group images of one size)."""
    device = next(inception.parameters()).device
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(index)
    features = torch.zeros(len(images), INCEPTION_DIMS, dtype=torch.float64)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = torch.stack([images[i].expand(3, -1, -1) for i in chunk])
            batch = (batch * 255).round().to(torch.uint8).to(device)
            with torch.no_grad():
                features[chunk] = inception(batch)[0].double().cpu()
    return features


def distribution_scores(
    real_features: torch.Tensor, fake_features: torch.Tensor, metrics=DISTRIBUTION_METRICS, subsets=100, seed=0
) -> tuple[dict[str, float], list[str]]:
    """FID and KID (mean, std over `subsets` random subsets of min(1000, n_real, n_fake)) from
    Inception features, by torch-fidelity's own functions; plus warnings about small samples."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    n_real, n_fake = len(real_features), len(fake_features)
    scores, warnings = {}, []
    if min(n_real, n_fake) < 2:
        return scores, [f"FID/KID need at least 2 images on each side (have {n_real} real, {n_fake} generated)"]
    if "fid" in metrics:
        scores["fid"] = fid_statistics_to_metric(
            fid_features_to_statistics(real_features), fid_features_to_statistics(fake_features), verbose=False
        )["frechet_inception_distance"]
        if min(n_real, n_fake) < real_features.shape[1]:
            warnings.append(
                f"FID rests on {n_real} real and {n_fake} generated features, fewer than the {real_features.shape[1]} "
                "feature dimensions: the covariances are rank-deficient, so compare FIDs only at equal counts"
            )
    if "kid" in metrics:
        kid = kid_features_to_metric(
            real_features,
            fake_features,
            kid_subsets=subsets,
            kid_subset_size=min(1000, n_real, n_fake),
            rng_seed=seed,
            verbose=False,
        )
        scores["kid"] = kid["kernel_inception_distance_mean"]
        scores["kid_std"] = kid["kernel_inception_distance_std"]
        if n_real == n_fake == min(1000, n_real):
            warnings.append(f"KID subsets hold all {n_real} samples of each side: its std over subsets is 0 by design")
        elif min(n_real, n_fake) < 1000:
            warnings.append(f"KID subsets of {min(n_real, n_fake)} samples (usually 1000): expect a large std")
    return scores, warnings


@dataclass
class MethodResult:
    name: str
    fake_dir: Path
    pairing: Pairing
    per_image: list[dict] = field(default_factory=list)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)  # metric → mean, std, n
    distribution: dict[str, float] = field(default_factory=dict)  # fid, kid, kid_std
    n_features: dict[str, int] = field(default_factory=dict)  # real, fake
    warnings: list[str] = field(default_factory=list)
    agreement: dict = field(default_factory=dict)  # retrieval, lesions, by_phase: AgreementScorer.results


@dataclass
class Evaluation:
    real_dir: Path
    source_dir: Path | None
    settings: EvalSettings
    methods: list[MethodResult]
    skipped: dict[str, str]  # metric → why it was not computed
    warnings: list[str]


def _distribution_images(
    paths: list[Path], keys: list[str], settings: EvalSettings, partners: dict[Path, Path] | None = None
) -> tuple[list, list[str]]:
    """The images (or patches) Inception sees; a generated image with a real partner (`partners`) first
    at that partner's size, as the paired metrics compare it."""
    images, unreadable = [], []
    # by resolved path: a manifest's absolute or "../" path is the same file as the folder's listing of it
    partners = {Path(fake).resolve(): real for fake, real in (partners or {}).items()}
    for path, key in zip(paths, keys, strict=True):
        try:
            image = read_grey(path)[0]
            size = tuple(image.shape[-2:])
            if (partner := partners.get(Path(path).resolve())) is not None:
                width, height = image_size(partner)
                size = (height, width)
            image = resize_to(image, shorter_side_size(size, settings.resolution))  # one resampling, as load_pair
        except ImageReadError as error:
            unreadable.append(str(error))
            continue
        if settings.patches > 0:
            images.extend(
                sample_patches(image, settings.patches, settings.patch_size, key, settings.seed, settings.fov_threshold)
            )
        else:
            images.append(image)
    return images, unreadable


def _features(paths, keys, settings: EvalSettings, inception, partners=None) -> tuple[torch.Tensor, list[str]]:
    images, unreadable = _distribution_images(paths, keys, settings, partners)
    return inception_features(images, inception, settings.batch_size), unreadable


def evaluate_method(
    name: str,
    fake_dir: Path,
    pairing: Pairing,
    settings: EvalSettings,
    backbones: Backbones,
    real_features: torch.Tensor | None,
    progress: Callable[[str], None] | None = None,
    real_maps: dict | None = None,
) -> MethodResult:
    """Scores of one folder of generated images; `real_maps` (shared by the methods of one evaluation)
    keeps the real images' vessel and region maps."""
    result = MethodResult(name, Path(fake_dir), pairing)
    paired = tuple(m for m in PAIRED_METRICS if m in settings.metrics and m not in backbones.skipped)
    chosen = tuple(m for m in AGREEMENT_METRICS if m in settings.metrics)
    scorer = AgreementScorer(chosen, settings.fov_threshold, {} if real_maps is None else real_maps)
    resized = empty_fov = 0
    colour: list[str] = []
    squashed: list[str] = []
    low_bit: list[str] = []
    for pair in pairing.pairs if paired or chosen else []:
        try:
            real, fake, was_resized, colour_files = load_pair(pair.real, pair.fake, settings.resolution)
        except ImageReadError as error:
            result.warnings.append(f"skipped pair {pair.key}: {error}")
            continue
        resized += bool(was_resized)
        squashed += [pair.fake.name] if was_resized == "squashed" else []
        low_bit += [path.name for path in (pair.real, pair.fake) if twelve_bit_data(path)]
        colour += [path.name for path in colour_files]
        mask = None
        if settings.fov_mask:  # the field with its holes filled: dark non-perfusion inside the eye is scored
            grey = real[0].numpy()  # the agreement metrics' field of this real image when they run (computed once)
            fov = scorer.real_maps(pair.real, grey).fov if chosen else field_of_view(grey, settings.fov_threshold)
            mask = torch.from_numpy(fov)[None].float()
        if mask is not None and not mask.any():  # an all-black real image: score the whole frame
            mask, empty_fov = None, empty_fov + 1
        row = {
            "key": pair.key,
            "real": str(pair.real),
            "fake": str(pair.fake),
            "size": f"{real.shape[2]}x{real.shape[1]}",
        }
        row["fov_fraction"] = float(mask.mean()) if mask is not None else 1.0
        if paired:  # (its torchmetrics import alone takes seconds)
            row.update(paired_scores(real, fake, mask, paired, backbones.lpips))
        if chosen:
            row.update(scorer.score(pair.key, pair.real, real[0].numpy(), fake[0].numpy()))
        result.per_image.append(row)
        if progress:
            progress(f"{name}: {pair.key}")
    if resized:
        result.warnings.append(f"{resized} generated images differ in size from their real partner and were resized")
    if empty_fov:
        result.warnings.append(f"{empty_fov} real images have no field of view above the threshold; scored unmasked")
    for names, what, then in (
        (squashed, "have another aspect ratio than their real partner and were distorted to its", ""),
        (low_bit, "are 16-bit files within 0..4095 (12-bit data?), scored as near black", ""),
        (colour, "are colour", "; an FFA should be grey; compared as luma"),
    ):  # the files named, the first ten
        if names:
            listed = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            result.warnings.append(f"{len(names)} images {what} ({listed}){then}")
    if any(math.isnan(row.get("ms_ssim", 0.0)) for row in result.per_image):
        result.warnings.append(f"MS-SSIM skipped for images (or FOV boxes) under {MS_SSIM_MIN_SIDE} px")
    columns = [c for metric in ("vessels", "regions") if metric in chosen for c in agreement.PER_IMAGE[metric]]
    result.summary = summarise(result.per_image, (*columns, *paired))
    result.agreement = scorer.results(result.per_image) if chosen else {}
    if backbones.inception is not None and real_features is not None:
        fakes = generated_images(fake_dir)[0]
        partners = {pair.fake: pair.real for pair in pairing.pairs}
        fake_features, unreadable = _features(
            list(fakes.values()), list(fakes), settings, backbones.inception, partners
        )
        result.warnings.extend(f"left out of FID/KID: {cause}" for cause in unreadable)
        result.n_features = {"real": len(real_features), "fake": len(fake_features)}
        wanted = tuple(m for m in DISTRIBUTION_METRICS if m in settings.metrics)
        scores, warnings = distribution_scores(
            real_features, fake_features, wanted, settings.kid_subsets, settings.seed
        )
        result.distribution, result.warnings = scores, result.warnings + warnings
    return result


def evaluate(
    real_dir: str | Path,
    fakes: dict[str, str | Path],
    settings: EvalSettings | None = None,
    pairing_mode: str = "auto",
    source_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Evaluate each named folder of generated images against the real folder."""
    settings = settings or EvalSettings()
    backbones = load_backbones(settings)
    pairings = {name: match(real_dir, fake_dir, pairing_mode, source_dir) for name, fake_dir in fakes.items()}
    real_features, warnings = None, []
    if backbones.inception is not None:
        reals = real_images(real_dir)[0]
        real_features, unreadable = _features(list(reals.values()), list(reals), settings, backbones.inception)
        warnings.extend(f"real image left out of FID/KID: {cause}" for cause in unreadable)
        if progress:
            progress(f"Inception features of {len(real_features)} real images/patches")
    real_maps: dict = {}
    methods = [
        evaluate_method(name, Path(fakes[name]), pairing, settings, backbones, real_features, progress, real_maps)
        for name, pairing in pairings.items()
    ]
    skipped = dict(backbones.skipped)
    for metric in settings.metrics:
        if metric in PAIRED_METRICS and metric not in skipped and not any(m.per_image for m in methods):
            skipped[metric] = "no real/generated pairs matched"
    skipped |= agreement.skipped(settings.metrics, methods)
    return Evaluation(Path(real_dir), Path(source_dir) if source_dir else None, settings, methods, skipped, warnings)
