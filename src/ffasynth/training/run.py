"""Run folders: what a training run writes besides checkpoints, and how a later stage, `export` or
inference rebuilds the model from one.

RUN/
  config.yaml   the resolved config;  run.json  kind, data, versions, where frozen weights came from
  model/        unet/config.json, vae/ (the frozen VAE, whole), image_encoder/ (the frozen CLIP
                encoder and its processor, whole): a run folder is self-contained, so export and
                stage 2 work on another machine or after the original weights moved
  checkpoints/  see training/checkpoint.py;  samples/  logs/  metrics.jsonl
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffusers import UNet2DConditionModel

from ffasynth import configtree, run_folder
from ffasynth.config import Config, load_config, save_config
from ffasynth.data.dataset import PairDataset
from ffasynth.data.pair_check import load_pairs
from ffasynth.data.transforms import PairedTransform
from ffasynth.errors import FFASynthError
from ffasynth.models import loading
from ffasynth.models.components import (
    Components,
    add_phase_embedding,
    make_student,
    set_attention,
    training_scheduler,
)
from ffasynth.models.conditioning import SourceConditioner
from ffasynth.models.decoder import Decoder
from ffasynth.models.lora import add_lora, merge_lora
from ffasynth.models.preview_decoder import PreviewDecoder
from ffasynth.provenance import versions
from ffasynth.training import checkpoint as ckpt


def load_training_data(data_dir: str | Path, config: Config, say: Callable[[str], None] | None = None):
    """The training pairs of DATA (its train/ split when there is one) as random paired crops. Every
    image is decoded once first: a broken, tiny or wrong-kind file is left out with a warning to
    `say`, rather than stopping the run when its turn comes."""

    def warn(problem) -> None:
        if say is not None:
            say(f"warning: {'' if problem.kept else 'left out '}{problem.path}: {problem.message}")

    root = run_folder.split_dir(data_dir, "train")
    pairs = load_pairs(
        root, config.data.layout, config.data.phase, config.data.max_pixels, decode=True, on_problem=warn
    )
    return PairDataset(
        pairs,
        PairedTransform.from_config(config.data),
        seed=config.seed,
        cache=config.data.cache_images,
        max_pixels=config.data.max_pixels,
        cache_dir=config.data.cache_dir,
    )


def prepare_run(
    out: str | Path, config: Config, kind: str, data_dir: str | Path, resume: bool, write: bool = True
) -> Path:
    """Check that OUT may be (re)used and write its config.yaml and run.json; write=False (every
    process but the first of a multi-process run) checks only."""
    run_dir = Path(out)
    if run_dir.exists() and run_folder.complete_checkpoints(run_dir) and not resume:
        raise FFASynthError(f"{run_dir} already holds a run with checkpoints: pass --resume, or choose another --out")
    saved = run_folder.info(run_dir) if (run_dir / "run.json").is_file() else {}
    if resume and run_folder.complete_checkpoints(run_dir):  # before any write
        if saved.get("kind") not in (None, kind):
            raise FFASynthError(
                f"--resume: {run_dir} holds a {saved['kind']} run, not a {kind} run; choose another --out"
            )
        before, now = saved.get("data"), Path(data_dir).resolve()
        if before and Path(before).is_dir() and Path(before).resolve() != now:  # a moved folder may be given anew
            raise FFASynthError(
                f"--resume: {run_dir} was trained on {before}, not {now}; give that data, or choose another --out"
            )
    if resume and run_folder.complete_checkpoints(run_dir) and (run_dir / "config.yaml").is_file():
        check_resumable(run_dir, config, kind)
    if not write:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    libraries = versions("diffusers", "transformers", "accelerate")
    run_folder.update_info(run_dir, kind=kind, data=str(Path(data_dir).resolve()), versions=libraries)
    return run_dir


# Settings that decide which tensors a run trains (and so what its checkpoints hold), or what its weights mean:
# a resumed run must keep them, or its weights, EMA and optimiser state no longer fit the model it builds (or an
# epsilon-trained U-Net would go on as, and be exported as, a v-prediction one).
TRAINED_SET = {
    "stage1": (
        "stage1.prediction_type",
        "stage1.num_train_timesteps",
        "stage1.freeze",
        "stage1.lora.rank",
        "stage1.lora.target_modules",
        "model.use_clip",
        "model.use_concat",
        "model.num_phases",
        "model.clip_tokens",
    ),
    "stage2": ("stage2.disc_layers", "stage2.disc_channels"),
    "distill": (
        "distill.lora.rank",
        "distill.lora.target_modules",
        "distill.preview_decoder",
        "distill.preview_channels",
    ),
}


def _trained_value(config: Config, key: str):
    """The value of a TRAINED_SET key as it shapes the run: freeze names in any order, LoRA's target modules
    only when it has adapters."""
    value = configtree.plain_lookup(config, key)
    if key.endswith(".freeze"):
        return sorted(value)
    if key.endswith(".lora.target_modules") and not configtree.plain_lookup(config, key.rsplit(".", 1)[0] + ".rank"):
        return None
    return value


def check_resumable(run_dir: Path, config: Config, kind: str) -> None:
    """Refuse, naming the option, a --resume whose config changes what the run trains (RUN/config.yaml
    against `config`). A config.yaml that does not load is left to the checkpoint's own checks."""
    try:
        saved = load_config(run_dir / "config.yaml")
    except (FFASynthError, OSError, ValueError):
        return
    for key in TRAINED_SET.get(kind, ()):
        before, now = (_trained_value(c, key) for c in (saved, config))
        if before != now:
            raise FFASynthError(
                f"--resume: {run_dir} was trained with {key}={before}, this config has {now}; "
                f"resume with {key}={before}, or start a new --out"
            )


def save_model_folder(run_dir: Path, components: Components) -> None:
    """The architecture and the frozen parts, so the run can be rebuilt without the original sources."""
    model_dir = Path(run_dir) / "model"
    components.unet.save_config(model_dir / "unet")
    components.vae.save_pretrained(model_dir / "vae", safe_serialization=True)
    if components.image_encoder is not None:
        components.image_encoder.save_pretrained(model_dir / "image_encoder", safe_serialization=True)
        components.image_processor.save_pretrained(model_dir / "image_encoder")
    run_folder.update_info(run_dir, sources=components.sources)


@dataclass
class LoadedRun:
    config: Config
    components: Components
    conditioner: SourceConditioner
    checkpoint: Path
    ema: bool
    preview_decoder: PreviewDecoder | None = None  # a distill run's tiny decoder, when it trained one
    distilled: bool = False  # a distill run's student: guidance as an input (and, method lcm, few steps)


def load_stage1_run(
    run_dir: str | Path, ema: bool = True, checkpoint: str | Path | None = None, merge: bool = True
) -> LoadedRun:
    """Rebuild the stage-1 model of a run from its newest complete checkpoint (or the one given). A run
    trained with LoRA (stage1.lora.rank > 0) has its adapters merged into plain weights unless merge=False."""
    run_dir = Path(run_dir)
    info = run_folder.info(run_dir)
    if info.get("kind") != "stage1":
        raise FFASynthError(f"{run_dir} is a '{info.get('kind')}' run, not a stage-1 run")
    config = load_config(run_dir / "config.yaml")
    model_dir = run_dir / "model"
    if not (model_dir / "unet" / "config.json").is_file():  # else diffusers takes the path for a hub id
        raise FFASynthError(f"{run_dir} has no model/unet/config.json: the run folder is incomplete")
    folder = Path(checkpoint) if checkpoint else run_folder.latest_checkpoint(run_dir)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir / "unet"))
    add_phase_embedding(unet, config.model.num_phases)
    add_lora(unet, config.stage1.lora)  # the checkpoint holds the adapters under peft's names
    used_ema = ckpt.load_weights(folder, "unet", unet, ema=ema)
    if merge:
        merge_lora(unet)
    set_attention(unet, config.model.attention)
    vae = loading.load_vae(str(model_dir / "vae"))
    encoder = processor = None
    if config.model.use_clip:
        # runs written before the encoder was kept in the run folder name where it came from
        saved = model_dir / "image_encoder"
        source = str(saved) if saved.is_dir() else info.get("sources", {}).get("image_encoder") or str(saved)
        encoder, processor = loading.load_image_encoder(source)
    conditioner = SourceConditioner(
        encoder,
        processor,
        unet.config.cross_attention_dim,
        use_clip=config.model.use_clip,
        use_concat=config.model.use_concat,
        clip_tokens=config.model.clip_tokens,
    )
    if conditioner.projection is not None:
        ckpt.load_weights(folder, "projection", conditioner.projection, ema=ema)
    for module in (unet, vae, conditioner):
        module.requires_grad_(False).eval()
    scheduler = training_scheduler(config.stage1.num_train_timesteps, config.stage1.prediction_type)
    components = Components(vae, unet, encoder, processor, scheduler, info.get("sources", {}))
    return LoadedRun(config, components, conditioner, folder, used_ema)


def _stage1_of(run_dir: Path, info: dict, key: str = "stage1") -> tuple[Path, Path | None]:
    """The stage-1 run (and checkpoint) a stage-2 run was tuned on (key "stage1"; "teacher": the run a
    distill run learnt from): where run.json says, or, when the runs were moved or copied together to
    another machine, the folder of that name beside this run."""
    recorded = info.get(f"{key}_run")
    if not recorded:
        raise FFASynthError(f"{run_dir}/run.json does not name its {key} run ({key}_run)")
    candidates = [Path(recorded), Path(run_dir).resolve().parent / Path(recorded).name]
    stage1_dir = next((c for c in candidates if (c / "run.json").is_file()), None)
    if stage1_dir is None:
        raise FFASynthError(
            f"{run_dir} is a {info.get('kind')} run whose {key} run {recorded} is gone; put it back there or "
            f"beside {run_dir}"
        )
    checkpoint = info.get(f"{key}_checkpoint")
    if checkpoint and not Path(checkpoint).is_dir():  # moved with its run: same step folder name
        checkpoint = stage1_dir / "checkpoints" / Path(checkpoint).name
    return stage1_dir, Path(checkpoint) if checkpoint else None


def load_model_run(
    run_dir: str | Path, ema: bool = True, merge: bool = True, checkpoint: str | Path | None = None
) -> LoadedRun:
    """A stage-1 run, or a stage-2 run (its stage-1 model with the fine-tuned decoder swapped in), or a
    distill run (its teacher's model with the student U-Net); merge: fold a LoRA U-Net's adapters into its
    weights (`load_stage1_run`); checkpoint: the run's own checkpoint folder (default: its newest). ema: the
    run's own weights; a stage-2 run's U-Net is the one its decoder was tuned on (run.json: stage1_ema)."""
    run_dir = Path(run_dir)
    info = run_folder.info(run_dir)
    if info.get("kind") == "distill":
        return load_distill_run(run_dir, info, ema)
    if info.get("kind") != "stage2":
        return load_stage1_run(run_dir, ema=ema, merge=merge, checkpoint=checkpoint)
    stage1_dir, stage1_checkpoint = _stage1_of(run_dir, info)
    folder = Path(checkpoint) if checkpoint else run_folder.latest_checkpoint(run_dir)
    unet_ema = info.get("stage1_ema", ema)  # runs from before it was recorded: as asked
    loaded = load_stage1_run(stage1_dir, ema=unet_ema, checkpoint=stage1_checkpoint, merge=merge)
    ckpt.load_weights(folder, "decoder", Decoder(loaded.components.vae), ema=ema)
    loaded.components.vae.requires_grad_(False).eval()
    loaded.components.sources["decoder"] = str(folder)
    return loaded


def load_distill_run(run_dir: Path, info: dict, ema: bool = True) -> LoadedRun:
    """A distill run: its teacher's model (a stage-1 or stage-2 run's, VAE and CLIP as they were) with the
    distilled student as its U-Net (LoRA adapters merged) and the preview decoder, if it trained one."""
    loaded = load_teacher(run_dir, info)
    config = load_config(run_dir / "config.yaml")
    folder = run_folder.latest_checkpoint(run_dir)
    unet = make_student(loaded.components.unet, config.distill)
    ckpt.load_weights(folder, "unet", unet, ema=ema)
    merge_lora(unet)
    set_attention(unet, config.model.attention)
    preview = None
    if config.distill.preview_decoder:
        preview = PreviewDecoder.for_vae(loaded.components.vae.config, config.distill.preview_channels)
        ckpt.load_weights(folder, "preview", preview, ema=ema)
    for module in (unet,) + (() if preview is None else (preview,)):
        module.requires_grad_(False).eval()
    loaded.components.unet = unet
    loaded.components.sources["distill"] = str(folder)
    return LoadedRun(config, loaded.components, loaded.conditioner, loaded.checkpoint, loaded.ema, preview, True)


def load_pinned_stage1(run_dir: Path, info: dict, ema: bool = True) -> LoadedRun:
    """The U-Net a stage-2 run's decoder was tuned on, as its run.json pins it: the stage-1 run (found beside the
    stage-2 run when both moved), its checkpoint, and EMA or raw weights (`ema` for runs that did not record it)."""
    stage1_dir, checkpoint = _stage1_of(run_dir, info)
    return load_stage1_run(stage1_dir, ema=info.get("stage1_ema", ema), checkpoint=checkpoint)


def load_teacher(run_dir: Path, info: dict) -> LoadedRun:
    """The teacher a distill run learnt from, as run.json pins it: its run (found beside the distill run when
    both moved), its checkpoint (a stage-1 run's, or a stage-2 run's decoder) and EMA or raw weights."""
    teacher_dir, checkpoint = _stage1_of(run_dir, info, "teacher")
    return load_model_run(teacher_dir, ema=info.get("teacher_ema", True), checkpoint=checkpoint)
