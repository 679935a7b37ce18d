"""The recipe of the tiny preset's base model (`ffasynth base build`), from nothing: the paper's
premise is a model pretrained on large data that fine-tunes on a few hundred pairs; on a CPU there
is no SD1.5, so we pretrain the tiny architecture on everything we may use.

1. Data. An unlimited stream of procedural pairs drawn on the fly (data/phantom_stream.py: 70%
   UWF-like eyes of 512-853 px, pseudo-colour, wide elliptical field, eyelids and lashes; 30%
   standard-field eyes with varied illumination and disc position; early and late phase; every
   lesion kind, mixed), plus the real images we may use: the shared UWF
   training eyes (registered photo → FFA first: as shipped they are tens of pixels apart at crop
   scale) and the shared labelled FFA images (angiograms only: the `non_ffa` frames are left out).
   The shared UWF test eyes are never read, so every figure on them stays a held-out figure.
2. VAE (stage 0) on photos and angiograms of all of it.
3. U-Net (stage 1) on the pairs: procedural and the registered real training eyes.
4. Decoder (stage 2) on the same pairs.
5. One file (models/base.py): U-Net and CLIP in float16, VAE in float32; the header holds this
   recipe, the data counts, steps, minutes and the float16 check.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ffasynth.config import Config, load_config, save_config, to_dict
from ffasynth.data.alignment import aligned_pairs, eye_of, register_folder
from ffasynth.data.dataset import Mixture, PairDataset
from ffasynth.data.io import is_image_file
from ffasynth.data.pairs import Pair
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.data.phantom_stream import BASE_SIZES, BASE_STYLES, PhantomStream
from ffasynth.data.transforms import PairedTransform
from ffasynth.errors import FFASynthError
from ffasynth.files import atomic_write_text
from ffasynth.models import base
from ffasynth.provenance import versions
from ffasynth.training.run import load_model_run
from ffasynth.training.stages import train_stage1, train_stage2, train_vae

# The VAE bounds everything after it (a generated latent decodes no better than a real one): at 0.25 of
# 40 min its reconstruction of 256-px phantom angiograms reached only SSIM 0.37 (see the README)
SHARES = {"vae": 0.35, "stage1": 0.55, "stage2": 0.10}
# The procedural stream per scale: eye sides drawn per eye and style (phantom_stream.BASE_SIZES), eyes and crops
# per epoch; the written report set (stage 2's before/after figures) is a few UWF eyes. `mini` is for the test
# that runs the recipe.
STREAM = {
    "full": {
        "size": BASE_SIZES,
        "eyes_per_epoch": 32,
        "crops_per_eye": 16,
        "report_eyes": 6,
        "report_size": 512,
    },
    "mini": {"size": (64, 96), "eyes_per_epoch": 2, "crops_per_eye": 4, "report_eyes": 2, "report_size": 96},
}
CONFIG = {"mini": ["data.crop_size=64"]}  # a scale's own settings (its eyes are smaller than the preset's crop)
REAL_REPEAT = 4  # the aligned real training pairs are few (6 of 8): each counts 4 times per epoch
FFA_FOLDERS = ("01.phase_identification/arterial_phase", "01.phase_identification/venous_phase", "02.disease_diagnosis")


def default_shared() -> Path:
    return Path(os.environ.get("FFASYNTH_SHARED_DATA", "../shared/data"))


def real_ffa_pairs(shared: Path) -> list[Pair]:
    """The shared labelled angiograms as (FFA, FFA) pairs: the VAE learns angiograms from both sides."""
    root = shared / "ffa-labelled"
    files = sorted(
        {path for folder in FFA_FOLDERS for path in (root / folder).rglob("*") if is_image_file(path)}
        | {path for path in (root / "03.area_segmentation" / "labeled_data").glob("*.jpg")}
    )
    return [Pair(f"ffa-{i}", path, path) for i, path in enumerate(files)]


def collect_data(out: Path, shared: Path | None, scale: str, seed: int, say: Callable) -> dict:
    """The real pairs we may use (registered into OUT/data) and a small written UWF phantom set whose
    test/ split is stage 2's report set; returns the pair lists per source and what was used."""
    plan = STREAM[scale]
    data = out / "data"
    report = data / "phantoms-report"
    if not (report / "test").is_dir():
        write_phantom_dataset(
            report, n=plan["report_eyes"], size=plan["report_size"], seed=seed + 1, test_fraction=0.5, style="uwf"
        )
    sets: dict[str, list[Pair]] = {}
    used = {"shared_data": None, "uwf_train_eyes": [], "ffa_images": 0}
    if shared is not None and (shared / "uwf-slo-ffa" / "train").is_dir():
        registered = data / "uwf-train-registered"
        if not registered.is_dir():
            say(f"registering the shared UWF training eyes into {registered}")
            register_folder(shared / "uwf-slo-ffa" / "train", registered)
        sets["uwf-train"] = aligned_pairs(registered)
        used["uwf_train_eyes"] = sorted({eye_of(pair.id) for pair in sets["uwf-train"]})
    if shared is not None and (shared / "ffa-labelled").is_dir():
        sets["ffa"] = real_ffa_pairs(shared)
        used["ffa_images"] = len(sets["ffa"])
    if shared is not None:
        used["shared_data"] = str(shared)
    say("real data: " + (", ".join(f"{name} {len(pairs)}" for name, pairs in sets.items()) or "none"))
    return {"sets": sets, "used": used, "report": report}


def _sizes(size) -> list | dict:
    """The stream's eye sizes as JSON: [low, high], or style → [low, high]."""
    if isinstance(size, dict):
        return {style: list(value) if isinstance(value, tuple) else value for style, value in size.items()}
    return list(size) if isinstance(size, tuple) else size


def training_data(config: Config, plan: dict, real: list[Pair], repeat: int = 1) -> Mixture:
    """The procedural stream (UWF-like and standard eyes, both phases, all lesion kinds) mixed with
    real pairs (each `repeat` times per epoch)."""
    transform = PairedTransform.from_config(config.data)
    stream = PhantomStream(
        size=plan["size"],
        crop=config.data.crop_size,
        styles=BASE_STYLES,
        seed=config.seed,
        eyes_per_epoch=plan["eyes_per_epoch"],
        crops_per_eye=plan["crops_per_eye"],
        transform=transform,
    )
    parts = [stream]
    if real:
        parts.append(PairDataset(real * repeat, transform, seed=config.seed, max_pixels=config.data.max_pixels))
    return Mixture(parts)


def half_precision_error(unet: torch.nn.Module) -> float:
    """Relative error of the U-Net's output with float16-rounded weights (computed in float32), on
    random inputs: what storing it in float16 costs."""
    generator = torch.Generator().manual_seed(0)
    channels = unet.config.in_channels
    sample = torch.randn(2, channels, 16, 16, generator=generator)
    tokens = torch.randn(2, 1, unet.config.cross_attention_dim, generator=generator)
    extra = {"class_labels": torch.tensor([0, 1])} if unet.class_embedding is not None else {}
    state = {key: value.clone() for key, value in unet.state_dict().items()}
    with torch.no_grad():
        full = unet(sample, torch.tensor([500, 100]), tokens, **extra).sample
        unet.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in state.items()})
        half = unet(sample, torch.tensor([500, 100]), tokens, **extra).sample
        unet.load_state_dict(state)
    return float((half - full).norm() / full.norm().clamp_min(1e-12))


def build_base(
    out: str | Path,
    minutes: float = 60.0,
    shared: str | Path | None = None,
    seed: int = 0,
    scale: str = "full",
    overrides: list[str] | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> Path:
    """Run the recipe into OUT (resumable: finished stages are kept) and write OUT/base.safetensors and
    OUT/MODEL_CARD.md. `overrides` are config key=value (e.g. smaller models for tests)."""
    if scale not in STREAM:
        raise FFASynthError(f"--scale must be one of {', '.join(STREAM)}, not {scale!r}")
    if minutes <= 0:
        raise FFASynthError(f"--minutes must be > 0, not {minutes:g}")
    began = time.perf_counter()
    out = Path(out)
    shared = Path(shared) if shared is not None else None
    collected = collect_data(out, shared, scale, seed, say)
    sets, report, plan = collected["sets"], collected["report"], STREAM[scale]
    budget = {stage: minutes * share for stage, share in SHARES.items()}
    config = load_config(
        preset="tiny",
        overrides=[
            "model.base=none",
            "stage1.rehearsal=0",  # the recipe's pairs already are the stream (training_data)
            f"seed={seed}",
            *(f"{stage}.max_minutes={budget[stage]:.3f}" for stage in SHARES),
            *(f"{stage}.max_steps=1000000" for stage in SHARES),
            *CONFIG.get(scale, []),
            *(overrides or []),
        ],
    )
    runs = out / "runs"
    real_pairs, real_images = sets.get("uwf-train", []), sets.get("uwf-train", []) + sets.get("ffa", [])
    say(f"stage 0 (VAE): procedural stream + {len(real_images)} real images, about {budget['vae']:.1f} min")
    vae_data = training_data(config, plan, real_images)
    vae = train_vae(config, report, runs / "vae", True, progress, say, dataset=vae_data)
    config.model.vae = str((runs / "vae").resolve())
    pairs = training_data(config, plan, real_pairs, REAL_REPEAT)
    say(f"stage 1 (U-Net): procedural stream + {len(real_pairs)} real pairs, about {budget['stage1']:.1f} min")
    stage1 = train_stage1(config, report, runs / "stage1", True, progress, say, dataset=pairs)
    say(f"stage 2 (decoder), about {budget['stage2']:.1f} min")
    stage2 = train_stage2(config, runs / "stage1", report, runs / "stage2", True, progress, say, dataset=pairs)[0]
    save_config(config, out / "config.yaml")
    loaded = load_model_run(runs / "stage2")
    components = loaded.components
    info = {
        "recipe": __doc__.split("\n\n", 1)[1].strip(),
        "command": f"ffasynth base build --out OUT --minutes {minutes:g} --seed {seed} --scale {scale}",
        "data": {
            **collected["used"],
            "real_pairs": {name: len(pairs) for name, pairs in sets.items()},
            "stream": {**plan, "size": _sizes(plan["size"]), "styles": BASE_STYLES},
        },
        "steps": {"vae": vae.step, "stage1": stage1.step, "stage2": stage2.step},
        "minutes": round((time.perf_counter() - began) / 60, 1),
        "float16_relative_error_unet": half_precision_error(components.unet),
        "config": to_dict(config),
        "versions": versions("diffusers", "transformers"),
    }
    parts = {"unet": components.unet, "vae": components.vae}
    if components.image_encoder is not None:
        parts["image_encoder"] = components.image_encoder
    path = base.save(out / "base.safetensors", parts, config.model, components.vae.config.scaling_factor, **info)
    atomic_write_text(out / "MODEL_CARD.md", model_card(info, path))
    size = path.stat().st_size / 2**20
    say(f"base model: {path} ({size:.1f} MiB) after {info['minutes']} min; model card {out / 'MODEL_CARD.md'}")
    return path


def model_card(info: dict, path: Path) -> str:
    data = info["data"]
    lines = [
        "# ffasynth tiny base model",
        "",
        f"File: `{path.name}` ({path.stat().st_size / 2**20:.1f} MiB). Rebuild: `{info['command']}` "
        f"({info['minutes']} min on this machine).",
        "",
        "## Recipe",
        "",
        info["recipe"],
        "",
        "## Data",
        "",
        f"- procedural stream: {data['stream']}",
        *(f"- {name}: {count} real pairs" for name, count in data["real_pairs"].items()),
        f"- shared UWF training eyes used: {', '.join(data['uwf_train_eyes']) or 'none'}; test eyes: never read",
        f"- shared labelled FFA images: {data['ffa_images']}",
        "",
        "## Training",
        "",
        f"Steps: VAE {info['steps']['vae']}, U-Net {info['steps']['stage1']}, decoder {info['steps']['stage2']}. "
        f"Storing the U-Net in float16 changes its output by {info['float16_relative_error_unet']:.1e} (relative).",
        "",
        "Versions: " + json.dumps(info["versions"]),
        "",
    ]
    return "\n".join(lines)
