"""A training run → a self-contained FFASynthesisPipeline folder (diffusers format, safetensors) with
a README.md model card.

Which runs can be exported is the table `RUN_LOADERS` (run.json "kind" → how to rebuild its model
and what the card should add). A stage-1 run gives U-Net, VAE and CLIP; a stage-2 run gives its
stage-1 model with the fine-tuned decoder swapped in (`training.run.load_model_run`). Another kind
is one more loader returning an `ExportedModel`; `export_run`, the card and the CLI need no change.

A U-Net trained with LoRA (stage1.lora.rank > 0) is exported with its adapters merged into its weights
(a plain pipeline folder), or, with lora="separate", unmerged: unet/ holds the base weights (with the
trained conv_in and phase embedding) and unet_lora/ the adapters, which `FFASynthesisPipeline.from_pretrained`
puts back on the U-Net.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ffasynth import run_folder
from ffasynth.config import to_dict
from ffasynth.data.pair_check import load_pairs
from ffasynth.errors import FFASynthError
from ffasynth.files import atomic_folder
from ffasynth.models.components import sampling_scheduler
from ffasynth.models.lora import ADAPTER_FOLDER, has_lora, split_lora
from ffasynth.pipeline import FFASynthesisPipeline, TokenProjection
from ffasynth.training.distill import sampler_for
from ffasynth.training.progress import metrics_line
from ffasynth.training.run import LoadedRun, load_model_run, load_stage1_run


@dataclass
class ExportedModel:
    """What a run contributes to a pipeline: the rebuilt model (its `run.checkpoint` is the stage-1
    checkpoint) and what the card adds about later stages."""

    run: LoadedRun
    kind: str
    notes: list[str] = field(default_factory=list)  # card lines under "Training"
    metrics: list[str] = field(default_factory=list)  # card lines under "Metrics"

    @property
    def stage1_dir(self) -> Path:
        return Path(self.run.checkpoint).parent.parent


def _earlier_export(folder: Path) -> bool:
    """Whether `folder` holds an ffasynth export (which export_run may replace), not another diffusers model."""
    try:
        return json.loads((folder / "model_index.json").read_text()).get("_class_name") == FFASynthesisPipeline.__name__
    except (OSError, ValueError, AttributeError):
        return False


def _step(checkpoint: Path) -> int:
    return int(json.loads((Path(checkpoint) / "state.json").read_text())["step"])


def _load_stage1(run_dir: Path, ema: bool, merge: bool) -> ExportedModel:
    return ExportedModel(load_stage1_run(run_dir, ema=ema, merge=merge), "stage1")


def _load_stage2(run_dir: Path, ema: bool, merge: bool) -> ExportedModel:
    loaded = load_model_run(run_dir, ema=ema, merge=merge)
    folder = run_folder.latest_checkpoint(run_dir)
    info = run_folder.info(run_dir)
    notes = [f"- decoder fine-tuned by stage-2 run `{run_dir}`, checkpoint `{folder.name}` = step {_step(folder)}"]
    psnr = info.get("decoder_psnr")
    metrics = []
    if psnr:
        metrics.append(
            f"- decoder reconstruction PSNR on {psnr['images']} {psnr['split']} FFA images: "
            f"{psnr['before_db']:.2f} dB (original decoder) → {psnr['after_db']:.2f} dB (fine-tuned)"
            + (f"; L1 {psnr['before_l1']:.4f} → {psnr['after_l1']:.4f}" if "before_l1" in psnr else "")
        )
    return ExportedModel(loaded, "stage2", notes, metrics)


def _load_distill(run_dir: Path, ema: bool, merge: bool) -> ExportedModel:
    if not merge:
        raise FFASynthError(f"export --lora separate: {run_dir} is a distill run, whose student is exported merged")
    loaded = load_model_run(run_dir, ema=ema)
    folder = run_folder.latest_checkpoint(run_dir)
    distill = loaded.config.distill
    info = run_folder.info(run_dir)
    kind = "latent consistency (LCM)" if distill.method == "lcm" else "guidance"
    notes = [
        f"- U-Net: the {kind} distillation of `{info.get('teacher_run')}` by run `{run_dir}`, checkpoint "
        f"`{folder.name}` = step {_step(folder)}; guidance scale is an input (one pass a step), learnt for "
        f"{distill.guidance_min:g}-{distill.guidance_max:g}; default {loaded.config.stage1.image_guidance_scale:g}"
        + (f", {distill.default_steps} steps (LCMScheduler)" if distill.method == "lcm" else ""),
    ]
    if distill.lora.rank:
        notes.append(f"- student trained as rank-{distill.lora.rank} LoRA adapters, merged into the U-Net here")
    losses = [row["loss/unet"] for row in _training_metrics(run_dir) if "loss/unet" in row]
    metrics = [f"- distillation loss (logged means): {losses[0]:.4f} → {losses[-1]:.4f}"] if losses else []
    if loaded.preview_decoder is not None:
        notes.append('- preview_decoder/: a tiny decoder distilled from the VAE decoder (`decoder="preview"`)')
    return ExportedModel(loaded, "distill", notes, metrics)


# (run folder, EMA weights, merge LoRA adapters) → the model
RUN_LOADERS: dict[str, Callable[[Path, bool, bool], ExportedModel]] = {
    "stage1": _load_stage1,
    "stage2": _load_stage2,
    "distill": _load_distill,
}


def load_run(run_dir: str | Path, ema: bool = True, merge_lora: bool = True) -> ExportedModel:
    run_dir = Path(run_dir)
    kind = run_folder.info(run_dir).get("kind")
    loader = RUN_LOADERS.get(kind)
    if loader is None:
        raise FFASynthError(f"{run_dir} is a '{kind}' run; export takes a {' or '.join(RUN_LOADERS)} run")
    return loader(run_dir, ema, merge_lora)


def is_lcm_student(loaded: LoadedRun) -> bool:
    """A distill run's student trained by latent consistency (LCMScheduler, its few default steps)."""
    return loaded.distilled and loaded.config.distill.method == "lcm"


def default_steps(loaded: LoadedRun) -> int:
    """The exported pipeline's steps when a call gives none: an LCM student's few, else stage1.inference_steps
    (20; the tiny preset 4)."""
    return loaded.config.distill.default_steps if is_lcm_student(loaded) else loaded.config.stage1.inference_steps


def build_pipeline(loaded: LoadedRun) -> FFASynthesisPipeline:
    """The run's components as a pipeline with DPM-Solver++ (2nd order) on the training noise schedule, or,
    for an LCM student, diffusers' LCMScheduler on its solver grid and its few default steps."""
    model = loaded.config.model
    components = loaded.components
    distill = loaded.config.distill
    distilled = loaded.distilled  # a distill run's student: guidance as an input
    scheduler = sampler_for(components.scheduler, distill) if distilled else sampling_scheduler(components.scheduler)
    projection = loaded.conditioner.projection
    return FFASynthesisPipeline(
        vae=components.vae,
        unet=components.unet,
        scheduler=scheduler,
        image_encoder=components.image_encoder if model.use_clip else None,
        image_processor=components.image_processor if model.use_clip else None,
        projection=None if projection is None else TokenProjection.from_linear(projection),
        use_clip=model.use_clip,
        use_concat=model.use_concat,
        clip_tokens=model.clip_tokens,
        clip_view=model.clip_view,
        num_phases=model.num_phases,
        prediction_type=loaded.config.stage1.prediction_type,
        tile_size=loaded.config.data.crop_size,
        image_guidance_scale=loaded.config.stage1.image_guidance_scale,
        preview_decoder=loaded.preview_decoder,
        num_inference_steps=default_steps(loaded),
        guidance_input=distilled,
        fov_threshold=loaded.config.data.fov_threshold,
    )


def _training_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [logged for line in path.read_text().splitlines() if (logged := metrics_line(line)) is not None]


def _count_pairs(data_dir: str | None, config) -> str:
    if not data_dir:
        return "unknown"
    root = run_folder.split_dir(data_dir, "train")
    try:
        return str(len(load_pairs(root, layout=config.data.layout, phase=config.data.phase)))
    except FFASynthError:
        return "unknown (the data folder is not readable from here)"


def _lora_line(config, separate: bool) -> list[str]:
    lora = config.stage1.lora
    if not lora.rank:
        return []
    where = f"kept apart in `{ADAPTER_FOLDER}/` (from_pretrained loads them)" if separate else "merged into the U-Net"
    return [
        f"- LoRA: rank {lora.rank}, alpha {lora.alpha if lora.alpha is not None else lora.rank}, on "
        f"{', '.join(lora.target_modules)}; conv_in and the phase embedding fully trained; adapters {where}"
    ]


def model_card(exported: ExportedModel, separate_lora: bool = False) -> str:
    """README.md: what the model is, what it was trained on, how, with which results, and its limits."""
    loaded, config, run_dir = exported.run, exported.run.config, exported.stage1_dir
    info = run_folder.info(run_dir)
    model, stage1 = config.model, config.stage1
    metrics = _training_metrics(run_dir)
    loss_key = "loss/main"
    if metrics:
        first, last = metrics[0], metrics[-1]
        metric_lines = [
            f"- stage-1 training loss (ε/v MSE, logged means): {first.get(loss_key, float('nan')):.4f} at step "
            f"{first['step']} → {last.get(loss_key, float('nan')):.4f} at step {last['step']}",
            f"- throughput at the end: {last.get('images_per_s', float('nan')):.1f} crops/s",
        ]
    else:
        metric_lines = ["- none recorded (no metrics.jsonl in the run)"]
    metric_lines += exported.metrics
    sources = info.get("sources", {})
    starting = ", ".join(f"{k}: {v or 'random initialisation'}" for k, v in sources.items()) or "unknown"
    random_parts = [k for k, v in sources.items() if not v and (k != "image_encoder" or model.use_clip)]
    random_note = (
        [
            f"- **randomly initialised, not pretrained: {', '.join(random_parts)}** "
            "(asked for with `model.allow_random_init`; fine for the tiny CPU preset, not the paper's method)"
        ]
        if random_parts
        else []
    )
    phases = ", ".join(["early", "late"][: model.num_phases]) or "none (one FFA phase)"
    versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
    config_yaml = yaml.safe_dump(to_dict(config), sort_keys=False).rstrip()
    steps = default_steps(loaded)
    sampler = "LCMScheduler (latent consistency)" if is_lcm_student(loaded) else "DPM-Solver++ (2nd order)"
    return "\n".join(
        [
            "---",
            "library_name: ffasynth",
            "pipeline_tag: image-to-image",
            "tags: [ffasynth, fluorescein-angiography, latent-diffusion, medical-imaging]",
            "---",
            "# ffasynth FFA synthesis model",
            "",
            "Translates a retinal photograph into a synthetic fluorescein angiogram (FFA) with latent diffusion "
            "(StableFFA-style: the photo conditions a U-Net through CLIP image tokens and/or its VAE latent "
            "concatenated to the noisy latent). Exported by `ffasynth export`.",
            "",
            "## Training",
            f"- stage-1 run: `{run_dir}`, checkpoint `{loaded.checkpoint.name}` = step {_step(loaded.checkpoint)} "
            f"of {stage1.max_steps}, {'EMA' if loaded.ema else 'raw (non-EMA)'} weights",
            *exported.notes,
            f"- data: `{info.get('data', 'unknown')}` ({_count_pairs(info.get('data'), config)} training pairs; "
            f"target phase(s): {config.data.phase}), random {config.data.crop_size}px crops",
            f"- preset {config.preset}; batch {stage1.batch_size} × {stage1.gradient_accumulation}, lr {stage1.lr}, "
            f"offset noise {stage1.offset_noise_strength}, conditioning dropout {stage1.conditioning_dropout}, "
            f"min-SNR γ {stage1.snr_gamma}, {stage1.prediction_type} prediction",
            *_lora_line(config, separate_lora),
            f"- starting weights: {starting}",
            *random_note,
            f"- software: {versions or 'unknown'}",
            "",
            "## Conditioning",
            f"- CLIP tokens: {model.clip_tokens if model.use_clip else 'off'}; source latent concatenated: "
            f"{model.use_concat}; FFA phases: {phases}",
            f"- default tile: {config.data.crop_size}px (the training crop); scheduler {sampler}, "
            f"{steps} steps by default",
            "",
            "## Metrics",
            *metric_lines,
            "",
            "## Use",
            "A diffusers-format folder whose pipeline class is ffasynth's (`pip install ffasynth`, "
            "or `pip install -e .` in its repository):",
            "```python",
            "from ffasynth.pipeline import FFASynthesisPipeline",
            "pipe = FFASynthesisPipeline.from_pretrained('THIS_FOLDER')",
            f"out = pipe('photo.png', num_inference_steps={steps}, num_samples=4)  # out.images, out.uncertainty",
            "```",
            "or `ffasynth translate THIS_FOLDER photo.png --out results/ --samples 4`. "
            "`diffusers.DiffusionPipeline.from_pretrained('THIS_FOLDER')` works once `import ffasynth.pipeline` "
            "has registered the class with diffusers; without that import diffusers answers "
            '"module diffusers has no attribute FFASynthesisPipeline", which means: install and import ffasynth.',
            "",
            "## Limitations",
            "Research use only; not a medical device. The images are synthetic: they can show or hide lesions "
            "that the real angiogram would not. Small training sets (e.g. the 4-eye UWF demo set) give a model "
            "that demonstrates the method, not one that generalises. Training data terms (see the data folder's "
            "README) restrict use to research and evaluation.",
            "",
            "## Full training configuration",
            "```yaml",
            config_yaml,
            "```",
            "",
        ]
    )


def export_run(run_dir: str | Path, out_dir: str | Path, ema: bool = True, lora: str = "merge") -> Path:
    """Write OUT_DIR (replacing an earlier export there, atomically) and return it. lora: "merge" folds a
    LoRA run's adapters into the U-Net; "separate" writes them to OUT_DIR/unet_lora/ (see the module docstring)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if lora not in ("merge", "separate"):
        raise FFASynthError(f"export: lora must be 'merge' or 'separate', not {lora!r}")
    occupied = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if occupied and not _earlier_export(out_dir):
        raise FFASynthError(f"{out_dir} exists and is not an ffasynth pipeline folder; choose an empty or new OUT_DIR")
    exported = load_run(run_dir, ema, merge_lora=lora == "merge")
    unet = exported.run.components.unet
    separate = lora == "separate"
    if separate and not has_lora(unet):
        raise FFASynthError(f"export --lora separate: {run_dir} was trained without LoRA (stage1.lora.rank is 0)")
    pipeline = build_pipeline(exported.run)
    card = model_card(exported, separate_lora=separate)
    photos = run_folder.lineage_photos(run_dir)

    def fill(folder: Path) -> None:
        if separate:  # the adapters out first: the pipeline saves a plain U-Net
            split_lora(unet, folder / ADAPTER_FOLDER)
        pipeline.save_pretrained(folder, safe_serialization=True)
        (folder / "README.md").write_text(card)
        if photos is not None:  # the photos the model was trained on, by hash (run_folder.record_photos)
            run_folder.write_photos(folder, photos)

    return atomic_folder(out_dir, fill)
