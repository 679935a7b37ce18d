"""The main job end to end on a fresh machine (what `make demo` runs): data → stage 0 (VAE) →
stage 1 (U-Net) → stage 2 (decoder) → export → translate the held-out photos → evaluate → report.
From the tiny preset's base model (the default) stage 0 is the base's VAE and stage 2 is off unless
asked for (`decoder=True`): the base's decoder is kept.

With no `data`, procedural phantom pairs are generated; the tiny preset trains within a wall-clock
budget split across the stages, so it finishes in about `minutes` on 2 CPU cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ffasynth import run_folder
from ffasynth.config import load_config, save_config
from ffasynth.data.io import read_image, save_image
from ffasynth.data.pair_check import load_pairs
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.errors import FFASynthError
from ffasynth.evaluation.lesions import recall_sentence
from ffasynth.evaluation.metrics import EvalSettings, evaluate
from ffasynth.evaluation.outputs import write_evaluation
from ffasynth.export import export_run
from ffasynth.models import base
from ffasynth.training.stages import train_stage1, train_stage2, train_vae
from ffasynth.translate import load_pipeline, output_file

# Share of the training budget per stage (VAE, U-Net, decoder); the rest of `minutes` is export,
# translation and evaluation.
SHARES = {"vae": 0.35, "stage1": 0.55, "stage2": 0.10}
NO_DECODER_SHARES = {"vae": 0.35, "stage1": 0.65}
BASE_SHARES = {"stage1": 0.85, "stage2": 0.15}
# From the base stage 2 is off by default: the U-Net has all the minutes and the base's decoder is kept.
# Stage 2 on a few real pairs for its share of a few minutes is L1 on sampler latents that match their
# angiograms only loosely (the tiny preset has no LPIPS offline and its discriminator starts at step 100),
# which pays the decoder to blur: on the shared UWF folds it lowered the outputs' vessel-band own-eye excess
# and cost 0.012-0.017 vessel Dice for +0.3 dB PSNR and +0.04-0.06 MS-SSIM, the grey own-eye excess no
# better (README "Where the vessels went", issue 20).
BASE_NO_DECODER_SHARES = {"stage1": 1.0}
OVERHEAD_MINUTES = 0.75
# On the demo's 256-px phantoms, crops of the whole eye (batch 2: the same pixels a step as 8 × 128²)
# beat 128² crops at equal minutes: SSIM 0.413 vs 0.381, PSNR 18.35 vs 17.95 dB, vessel Dice 0.481 vs
# 0.456 (benchmarks/quality_choices.py, 2026-12-04). Your own data's crop stays the preset's unless given.
# The demo's pairs are phantoms already: no procedural rehearsal mixed in.
DEMO_OVERRIDES = ["data.crop_size=256", "stage1.batch_size=2", "stage1.rehearsal=0"]


@dataclass
class QuickstartResult:
    out: Path
    report: Path
    pipeline: Path
    translated: list[Path]
    metrics: dict
    minutes: float


def sample_held_out(pipeline, test_dir: Path, out_dir: Path, steps: int | None, seed: int, say: Callable) -> list[Path]:
    """Each held-out photo → one synthetic angiogram per phase present, named like its real partner
    (`N.1_ffa.png` for `N.1.png`), so evaluation pairs them by name. steps None: the pipeline's default."""
    written = []
    pairs = load_pairs(test_dir)
    for index, pair in enumerate(pairs, 1):
        photo = read_image(pair.source, channels=3)
        phase = pair.phase if pipeline.config.num_phases else None
        output = pipeline(
            photo,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            phase=phase,
            output_type="np",
        )
        name = output_file(str(pair.target.relative_to(test_dir).with_suffix("")))
        written.append(save_image(output.images[0].transpose(2, 0, 1), out_dir / name))
        say(f"translated {index}/{len(pairs)}: {pair.source.name} ({pair.phase or 'single'} phase) → {name}")
    return written


def quickstart(
    out: str | Path = "demo-out",
    minutes: float = 5.0,
    data: str | Path | None = None,
    seed: int = 0,
    steps: int | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
    overrides: list[str] | None = None,
    decoder: bool | None = None,
) -> QuickstartResult:
    """decoder: train stage 2 (the VAE decoder on the U-Net's latents); None = on from random initialisation,
    off when fine-tuning the base (its decoder is kept; BASE_NO_DECODER_SHARES says why)."""
    began = time.perf_counter()
    out = Path(out)
    if minutes < 0.2:
        raise FFASynthError(f"--minutes {minutes:g} is too short to train three stages; give at least 0.2")
    if data is None:
        overrides = DEMO_OVERRIDES + list(overrides or [])  # the caller's settings still win
        data = out / "data"
        if not (data / "test").is_dir():
            say(f"writing 48 phantom photo/FFA eyes (256×256, 6 held out) to {data}")
            write_phantom_dataset(data, n=48, size=256, seed=seed, test_fraction=0.125)
    data = Path(data)
    budget = max(minutes - OVERHEAD_MINUTES, 0.5 * minutes)
    base_model = load_config(preset="tiny", overrides=list(overrides or [])).model.base
    # from a base model the VAE is the base's: its share goes to the U-Net (and the decoder, when trained)
    from_base = base.resolve(base_model) is not None
    decoder = not from_base if decoder is None else decoder
    shares = {
        (False, True): SHARES,
        (False, False): NO_DECODER_SHARES,
        (True, True): BASE_SHARES,
        (True, False): BASE_NO_DECODER_SHARES,
    }[from_base, decoder]
    config = load_config(
        preset="tiny",
        overrides=[f"seed={seed}", *(f"{stage}.max_minutes={budget * share:.3f}" for stage, share in shares.items())]
        + [f"{stage}.max_steps=100000" for stage in shares]
        + list(overrides or []),
    )
    runs = out / "runs"
    if not from_base:
        say(f"stage 0 (VAE), about {budget * shares['vae']:.1f} min")
        train_vae(config, data, runs / "vae", resume=True, progress=progress, say=say)
        config.model.vae = str((runs / "vae").resolve())
    say(f"stage 1 (U-Net), about {budget * shares['stage1']:.1f} min")
    train_stage1(config, data, runs / "stage1", resume=True, progress=progress, say=say)
    final = runs / "stage1"
    if decoder:
        say(f"stage 2 (decoder), about {budget * shares['stage2']:.1f} min")
        train_stage2(config, runs / "stage1", data, runs / "stage2", resume=True, progress=progress, say=say)
        final = runs / "stage2"
    else:
        say("stage 2 (decoder): off, the " + ("base's decoder is kept" if from_base else "VAE's decoder is kept"))
    save_config(config, out / "config.yaml")
    pipeline_dir = export_run(final, out / "pipeline")
    say(f"exported the pipeline to {pipeline_dir}")
    pipeline = load_pipeline(pipeline_dir, "cpu" if not torch.cuda.is_available() else "auto")
    pipeline.set_progress_bar_config(disable=not progress, leave=False, desc="steps")
    test_dir = run_folder.split_dir(data, "test")  # held-out pairs: test/, val/ or valid/
    translated = sample_held_out(pipeline, test_dir, out / "translated", steps, seed, say)
    settings = EvalSettings(seed=seed)
    evaluation = evaluate(test_dir, {"ffasynth": out / "translated"}, settings, source_dir=test_dir)
    written = write_evaluation(evaluation, out / "report")
    if counts := evaluation.methods[0].agreement.get("lesions", {}).get("kinds"):  # phantoms record their lesions
        say(f"of the phantoms' lesions the real angiograms show, the synthetic ones show {recall_sentence(counts)}")
    metrics = _headline(evaluation)
    elapsed = (time.perf_counter() - began) / 60
    return QuickstartResult(out, written["report.html"], pipeline_dir, translated, metrics, elapsed)


def _headline(evaluation) -> dict:
    """metric → mean over the held-out pairs, for the closing lines."""
    return {metric: values["mean"] for metric, values in evaluation.methods[0].summary.items()}
