"""The pretrained base model (models/base.py): written once, loaded into every part no other weight
option names, refused with one line when it does not fit the config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ffasynth.errors import ConfigError, FFASynthError, WeightsNotFoundError
from ffasynth.models import base
from ffasynth.models.components import build_components
from tests.corpus import cli
from tests.helpers import invoke, micro_config


def _trained_like_base(tmp_path, *overrides):
    """Random micro components with every weight moved off its initial value, written as a base."""
    config = micro_config("model.base=none", *overrides)
    torch.manual_seed(1)
    components = build_components(config, random_weights=True)
    parts = {"unet": components.unet, "vae": components.vae, "image_encoder": components.image_encoder}
    with torch.no_grad():
        for module in parts.values():
            for parameter in module.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
    path = base.save(tmp_path / "base.safetensors", parts, config.model, scaling_factor=0.777, recipe={"steps": 1})
    return path, parts


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    other = b.state_dict()
    return max((value.float() - other[key].float()).abs().max().item() for key, value in a.state_dict().items())


def test_every_part_starts_from_the_base(tmp_path):
    path, saved = _trained_like_base(tmp_path)
    torch.manual_seed(2)  # a different random init underneath
    components = build_components(micro_config(f"model.base={path}"))
    assert _max_difference(components.vae, saved["vae"]) == 0.0  # the VAE is kept in float32
    # U-Net and CLIP in float16: relative rounding 2^-11 of weights of size ~0.1-1
    assert _max_difference(components.unet, saved["unet"]) < 2e-3
    assert _max_difference(components.image_encoder, saved["image_encoder"]) < 2e-3
    assert components.vae.config.scaling_factor == pytest.approx(0.777)
    assert components.sources == {"unet": f"base:{path}", "vae": f"base:{path}", "image_encoder": f"base:{path}"}
    assert components.unet.conv_in.weight.dtype == torch.float32


def test_none_is_random_initialisation(tmp_path):
    path, saved = _trained_like_base(tmp_path)
    components = build_components(micro_config("model.base=none"))
    assert _max_difference(components.unet, saved["unet"]) > 0.01
    assert components.sources["unet"] == ""


def test_a_named_vae_replaces_the_bases(tmp_path):
    path, saved = _trained_like_base(tmp_path)
    vae_dir = tmp_path / "vae"
    other = build_components(micro_config("model.base=none"), random_weights=True).vae
    other.save_pretrained(vae_dir)
    components = build_components(micro_config(f"model.base={path}", f"model.vae={vae_dir}"))
    assert _max_difference(components.vae, other) == 0.0
    assert components.sources["vae"] == str(vae_dir)
    assert _max_difference(components.unet, saved["unet"]) < 2e-3


def test_a_base_counts_as_weights_for_the_random_init_guard(tmp_path):
    path, _ = _trained_like_base(tmp_path)
    with pytest.raises(ConfigError, match="allow_random_init"):
        build_components(micro_config("model.base=none", "model.allow_random_init=false"))
    build_components(micro_config(f"model.base={path}", "model.allow_random_init=false"))


def test_another_architecture_is_refused_naming_the_key(tmp_path):
    path, _ = _trained_like_base(tmp_path)
    with pytest.raises(ConfigError) as caught:
        build_components(micro_config(f"model.base={path}", "model.unet_channels=[16,16]"))
    message = str(caught.value)
    assert "\n" not in message and "model.unet_channels=[16, 16] (base: [16, 32])" in message


def test_mis_shaped_tensors_are_refused(tmp_path):
    # a header that claims this architecture over weights of another one
    path, _ = _trained_like_base(tmp_path, "model.unet_channels=[16,16]")
    header = base.read_header(path)
    header["architecture"]["unet_channels"] = [16, 32]
    save_file(load_file(str(path)), str(path), metadata={"ffasynth_base": json.dumps(header)})
    with pytest.raises(ConfigError, match="its unet does not fit"):
        build_components(micro_config(f"model.base={path}"))


def test_missing_and_foreign_files_are_one_line(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="model.base=.*does not exist.*ffasynth base build"):
        build_components(micro_config(f"model.base={tmp_path / 'absent.safetensors'}"))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(WeightsNotFoundError, match="not an ffasynth base model"):
        build_components(micro_config(f"model.base={foreign}"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 20)
    with pytest.raises(WeightsNotFoundError, match="not a readable safetensors file"):
        build_components(micro_config(f"model.base={broken}"))


def test_base_info_and_build_answer_in_one_line(tmp_path):
    path, _ = _trained_like_base(tmp_path)
    shown = invoke("base", "info", path)
    assert shown.exit_code == 0 and "scaling_factor: 0.777" in shown.output
    assert "random initialisation" in invoke("base", "info", "none").output
    missing = cli("base", "info", tmp_path / "absent.safetensors")
    assert missing.exit_code == 2 and missing.output.count("\n") == 1 and "does not exist" in missing.output
    refused = cli("base", "build", "--out", tmp_path / "b", "--scale", "huge", "--shared", tmp_path)
    assert refused.exit_code == 2 and "--scale must be one of full, mini" in refused.output
    assert not (tmp_path / "b").exists()


def _phantom_pairs(tmp_path, n=4):
    from ffasynth.data.phantom import write_phantom_dataset
    from ffasynth.training.run import load_training_data

    write_phantom_dataset(tmp_path / "pairs", n=n, size=48, seed=4, test_fraction=0.0)
    return tmp_path / "pairs", load_training_data(tmp_path / "pairs", micro_config("data.crop_size=32"))


def test_rehearsal_mixes_the_share_of_procedural_crops_new_eyes_each_epoch(tmp_path):
    from ffasynth.data.phantom_stream import with_rehearsal

    _, pairs = _phantom_pairs(tmp_path, n=3)
    n = len(pairs)  # early and late of each eye
    assert with_rehearsal(pairs, 0.0, pairs.transform, seed=0) is pairs
    half = with_rehearsal(pairs, 0.5, pairs.transform, seed=0)
    assert len(half) == 2 * n  # as many procedural crops as pairs: one eye, n crops
    three_quarters = with_rehearsal(pairs, 0.75, pairs.transform, seed=0)
    assert len(three_quarters) - n == 24  # 18 wanted: 3 eyes (UWF-like or standard) of 8 crops
    ids = [half[(i, 0)]["id"] for i in range(len(half))]
    assert ids[:n] == [pair.id for pair in pairs.pairs]
    assert all(item.startswith(("uwf-", "standard-")) for item in ids[n:])
    assert half[(n, 0)]["source"].shape == half[(0, 0)]["source"].shape == (3, 32, 32)
    assert half[(n, 0)]["id"] != half[(n, 1)]["id"]  # the next epoch draws another eye


def test_stage1_from_a_base_rehearses_and_from_random_weights_does_not(tmp_path):
    from ffasynth.training.stages import train_stage1

    data, _ = _phantom_pairs(tmp_path)
    path, _ = _trained_like_base(tmp_path)
    said = []
    steps = ["data.crop_size=32", "stage1.batch_size=2", "stage1.max_steps=1", "stage1.rehearsal=0.5"]
    train_stage1(micro_config(f"model.base={path}", *steps), data, tmp_path / "s1", progress=False, say=said.append)
    assert "rehearsal: 8 of each epoch's 16 crops are the base's procedural pairs" in said
    assert "16 training pairs" in " ".join(said)
    said.clear()
    train_stage1(micro_config(*steps), data, tmp_path / "s1-random", progress=False, say=said.append)
    assert not any(line.startswith("rehearsal") for line in said) and "8 training pairs" in " ".join(said)


FREEZE = "stage1.freeze=[conv_in,down_blocks,mid_block]"


def test_stage1_freeze_keeps_the_named_modules_as_loaded_and_trains_the_rest(tmp_path):
    from ffasynth.training.loop import train
    from ffasynth.training.run import prepare_run
    from ffasynth.training.stage1 import build_stage1
    from ffasynth.training.stages import train_stage1

    data, dataset = _phantom_pairs(tmp_path)
    path, _ = _trained_like_base(tmp_path)
    steps = ["data.crop_size=32", "stage1.batch_size=2", "stage1.rehearsal=0", "stage1.lr=1e-2", "stage1.ema_decay=0.9"]
    config = micro_config(f"model.base={path}", FREEZE, "stage1.max_steps=3", "stage1.lr_warmup_steps=0", *steps)
    task = build_stage1(config)
    unet = task.components.unet
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    frozen = [n for n in before if n.startswith(("conv_in.", "down_blocks.", "mid_block."))]
    assert task.frozen == sum(before[n].numel() for n in frozen) > 0
    prepare_run(tmp_path / "run", config, "stage1", data, False)
    train(task, dataset, config.stage1, tmp_path / "run", config.seed, progress=False)
    after = dict(unet.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    moved = [n for n in before if n not in frozen and not torch.equal(after[n], before[n])]
    assert any(n.startswith("up_blocks.") for n in moved) and "conv_out.weight" in moved
    said = []
    train_stage1(config, data, tmp_path / "s1", progress=False, say=said.append)
    kept = f"stage1.freeze: {task.frozen / 1e6:.2f} M U-Net values kept as loaded"
    assert any(line.startswith(kept) for line in said)
    said.clear()
    random_init = micro_config(FREEZE, "stage1.max_steps=1", *steps)
    train_stage1(random_init, data, tmp_path / "s1-random", progress=False, say=said.append)
    assert any(line.startswith("stage1.freeze ignored: the U-Net starts from random weights") for line in said)


def test_resuming_with_another_freeze_is_refused_naming_the_option_and_keeps_the_run(tmp_path):
    from ffasynth.training.stages import train_stage1

    data, _ = _phantom_pairs(tmp_path)
    path, _ = _trained_like_base(tmp_path)
    steps = [f"model.base={path}", "data.crop_size=32", "stage1.batch_size=2", "stage1.rehearsal=0"]
    train_stage1(micro_config(*steps, FREEZE, "stage1.max_steps=1"), data, tmp_path / "s1", progress=False)
    saved = (tmp_path / "s1" / "config.yaml").read_text()
    other = micro_config(*steps, "stage1.freeze=[conv_in]", "stage1.max_steps=2")
    with pytest.raises(FFASynthError) as caught:
        train_stage1(other, data, tmp_path / "s1", resume=True, progress=False)
    message = str(caught.value)
    assert "\n" not in message and "stage1.freeze=['conv_in', 'down_blocks', 'mid_block']" in message
    assert "this config has ['conv_in']" in message and "start a new --out" in message
    assert (tmp_path / "s1" / "config.yaml").read_text() == saved  # nothing rewritten
    assert (tmp_path / "s1" / "checkpoints" / "step-000001").is_dir()
    reordered = "stage1.freeze=[mid_block,conv_in,down_blocks]"  # the same set of modules
    train_stage1(
        micro_config(*steps, reordered, "stage1.max_steps=2"), data, tmp_path / "s1", resume=True, progress=False
    )
    assert (tmp_path / "s1" / "checkpoints" / "step-000002").is_dir()  # the same settings resume
    (tmp_path / "early").mkdir()  # a run that stopped before its first checkpoint has nothing to keep
    (tmp_path / "early" / "config.yaml").write_text(saved)
    train_stage1(other, data, tmp_path / "early", resume=True, progress=False)
    assert (tmp_path / "early" / "checkpoints" / "step-000002").is_dir()
    # what the weights mean is kept too: an epsilon-trained U-Net does not go on (and export) as v-prediction
    for changed in ("stage1.prediction_type=epsilon", "stage1.num_train_timesteps=500"):
        with pytest.raises(FFASynthError, match=changed.split("=")[0]):
            train_stage1(micro_config(*steps, reordered, changed, "stage1.max_steps=3"), data, tmp_path / "s1",
                         resume=True, progress=False)  # fmt: skip


def test_stage1_freeze_is_ignored_on_random_weights_and_refuses_bad_names():
    from ffasynth.config import load_config
    from ffasynth.training.stage1 import build_stage1, freeze_unet

    task = build_stage1(micro_config(FREEZE))  # model.base=none: nothing loaded to keep
    assert task.frozen == 0 and all(p.requires_grad for p in task.components.unet.parameters())
    unet = task.components.unet
    with pytest.raises(ConfigError, match=r"stage1\.freeze: 'down_block' names no U-Net parameter \(its modules: conv"):
        freeze_unet(unet, ("down_block",), latent_channels=4)
    assert all(p.requires_grad for p in unet.parameters())
    assert freeze_unet(unet, ("down_blocks.0",), latent_channels=4) == sum(
        p.numel() for n, p in unet.named_parameters() if n.startswith("down_blocks.0.")
    )
    with torch.no_grad():
        unet.conv_in.weight[:, 4:] = 0  # a 4-channel U-Net widened for the source latent, as loaded from SD1.5
    with pytest.raises(ConfigError, match=r"stage1\.freeze: conv_in's source-latent input channels are newly"):
        freeze_unet(unet, ("conv_in",), latent_channels=4)
    with torch.no_grad():
        unet.class_embedding.weight.zero_()  # the phase embedding as added to a loaded U-Net
    with pytest.raises(ConfigError, match=r"the phase embedding \(class_embedding\) are newly added zeros"):
        freeze_unet(unet, ("class_embedding",), latent_channels=4)
    with pytest.raises(ConfigError, match=r"stage1\.freeze=.* may not hold an empty name"):
        load_config(preset="tiny", overrides=["stage1.freeze=[down_blocks,.]"])


@pytest.mark.parametrize(
    ("kind", "before", "after", "refused"),
    [
        ("distill", [], ["distill.preview_channels=16"], "distill.preview_channels=32"),
        ("distill", [], ["distill.preview_decoder=false"], "distill.preview_decoder=True"),
        ("stage1", [], ["stage1.lora.target_modules=[to_q]"], None),  # no adapters (rank 0): nothing changes
        (
            "stage1",
            ["stage1.lora.rank=4"],
            ["stage1.lora.rank=4", "stage1.lora.target_modules=[to_q]"],
            "stage1.lora.target_m",
        ),
        ("stage2", [], ["stage2.disc_layers=2"], "stage2.disc_layers=3"),
        ("vae", [], ["stage1.freeze=[conv_in]"], None),  # another stage's keys: not this run's
    ],
)
def test_resume_compares_only_what_the_run_trains(tmp_path, kind, before, after, refused):
    from ffasynth.config import save_config
    from ffasynth.training.run import prepare_run

    save_config(micro_config(*before), tmp_path / "config.yaml")
    (tmp_path / "checkpoints" / "step-000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000001" / "state.json").write_text("{}")
    if refused is None:
        prepare_run(tmp_path, micro_config(*after), kind, tmp_path, resume=True)
    else:
        with pytest.raises(FFASynthError, match=rf"^--resume: .* was trained with {refused}"):
            prepare_run(tmp_path, micro_config(*after), kind, tmp_path, resume=True)


@pytest.mark.slow
def test_base_build_at_mini_scale_runs_as_its_help_says_with_no_overrides(tmp_path):
    """`--scale mini` is offered as a smoke run: it must work as typed (its eyes are smaller than the tiny
    preset's 128-px crop, so the scale brings its own crop), ~15 s on 2 cores."""
    built = cli("base", "build", "--out", tmp_path / "b", "--scale", "mini", "--minutes", "0.05", "--quiet",
                "--shared", tmp_path / "no-shared-data")  # fmt: skip
    assert built.exit_code == 0, built.output[-800:]
    header = base.read_header(tmp_path / "b" / "base.safetensors")
    assert "--scale mini" in header["command"]
