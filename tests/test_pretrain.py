"""The base model's recipe (pretrain.py) end to end at miniature scale, and what data it may read."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ffasynth.data.alignment import REPORT_NAME, aligned_pairs
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.models import base
from ffasynth.models.components import build_components
from ffasynth.pretrain import STREAM, build_base, collect_data, real_ffa_pairs, training_data
from ffasynth.training.run import load_model_run
from tests.helpers import MICRO, micro_config

# the recipe's stages at a few steps each, on the micro model
MINI = [
    *MICRO,
    "data.crop_size=32",
    "vae.batch_size=2",
    "vae.max_steps=3",
    "stage1.batch_size=2",
    "stage1.max_steps=3",
    "stage2.batch_size=2",
    "stage2.max_steps=2",
    "stage2.sampler_steps=2",
    "stage2.disc_channels=8",
]


def _fake_shared(root):
    """A shared-data folder in the real layout: UWF train eyes (phantoms), a test eye that must never be
    read (not even an image), labelled FFA folders including non_ffa frames that are not angiograms."""
    write_phantom_dataset(root / "uwf-slo-ffa", n=2, size=96, seed=5)
    (root / "uwf-slo-ffa" / "train").mkdir()
    for path in list((root / "uwf-slo-ffa").glob("*.png")) + [root / "uwf-slo-ffa" / "labels.csv"]:
        shutil.move(path, root / "uwf-slo-ffa" / "train" / path.name)
    # a folder that cannot be listed or read by anyone (root included): a symlink to itself
    (root / "uwf-slo-ffa" / "test").symlink_to("test")
    grey = np.full((64, 64, 3), 90, np.uint8)
    for folder in (
        "01.phase_identification/arterial_phase",
        "01.phase_identification/non_ffa",
        "02.disease_diagnosis/brvo",
    ):
        (root / "ffa-labelled" / folder).mkdir(parents=True)
        Image.fromarray(grey).save(root / "ffa-labelled" / folder / "a.jpg")
    return root


def test_the_recipe_reads_the_training_eyes_and_angiograms_only(tmp_path):
    shared = _fake_shared(tmp_path / "shared")
    pairs = real_ffa_pairs(shared)
    assert sorted(p.source.parent.name for p in pairs) == ["arterial_phase", "brvo"]  # no non_ffa frame
    assert all(p.source == p.target for p in pairs)
    collected = collect_data(tmp_path / "out", shared, "mini", 0, lambda line: None)
    used = collected["used"]
    assert used["uwf_train_eyes"] == ["1", "2"] and used["ffa_images"] == 2
    assert len(collected["sets"]["uwf-train"]) == 4  # 2 eyes × early/late, registered
    assert sorted(p.name for p in (collected["report"] / "test").glob("*.png")) == ["2.1.png", "2.2.png", "2.png"]


def test_the_training_data_mixes_the_stream_with_each_real_pair_repeated(tmp_path):
    shared = _fake_shared(tmp_path / "shared")
    collected = collect_data(tmp_path / "out", shared, "mini", 0, lambda line: None)
    config = micro_config("data.crop_size=32")
    real = collected["sets"]["uwf-train"]
    mixture = training_data(config, STREAM["mini"], real, repeat=3)
    stream_items = STREAM["mini"]["eyes_per_epoch"] * STREAM["mini"]["crops_per_eye"]
    assert len(mixture) == stream_items + 3 * len(real)
    first, last = mixture[(0, 0)], mixture[(len(mixture) - 1, 0)]
    assert first["id"].startswith(("uwf-", "standard-")) and last["id"] == real[-1].id
    assert first["source"].shape == last["source"].shape == (3, 32, 32) and last["index"] == len(mixture) - 1
    assert torch.equal(mixture[(5, 1)]["source"], mixture[(5, 1)]["source"])  # the same key, the same crop
    with pytest.raises(IndexError):
        mixture[(len(mixture), 0)]


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_and_its_file_starts_fine_tuning(tmp_path):
    out = tmp_path / "base"
    path = build_base(out, minutes=30, shared=None, scale="mini", overrides=MINI, progress=False, say=lambda x: None)
    header = base.read_header(path)
    assert header["steps"] == {"vae": 3, "stage1": 3, "stage2": 2}
    assert header["data"]["uwf_train_eyes"] == [] and header["data"]["real_pairs"] == {}
    assert header["data"]["stream"]["eyes_per_epoch"] == STREAM["mini"]["eyes_per_epoch"]
    assert 0 < header["float16_relative_error_unet"] < 1e-2
    assert (out / "MODEL_CARD.md").read_text().count("Steps: VAE 3, U-Net 3, decoder 2") == 1
    # what the file holds is the finished recipe: the stage-1 EMA U-Net and the stage-2 decoder
    trained = load_model_run(out / "runs" / "stage2").components
    fresh = build_components(micro_config("data.crop_size=32", f"model.base={path}"))
    decoder = trained.vae.decoder.state_dict()
    assert all(torch.equal(value, decoder[key]) for key, value in fresh.vae.decoder.state_dict().items())
    unet = trained.unet.state_dict()
    assert all(torch.allclose(v, unet[k], atol=1e-3) for k, v in fresh.unet.state_dict().items())
    assert fresh.vae.config.scaling_factor == pytest.approx(trained.vae.config.scaling_factor)


def test_only_aligned_pairs_of_a_registered_folder_are_trained_on(tmp_path):
    """registered / transferred pairs are kept; a pair left at the identity is kept only when it already
    matched there (identity correlation above the mirrored-eye bar by the margin), not when refused."""
    folder = tmp_path / "registered"
    write_phantom_dataset(folder, n=4, size=64, seed=2)  # pairs N.png + N.1.png / N.2.png
    header = "id,phase,status,identity_correlation,null_correlation,aligned_target\n"
    rows = [
        "1,early,registered,0.1,0.3,1.1.png",
        "1,late,transferred,,,1.2.png",
        "2,early,identity,0.50,0.20,2.1.png",  # already aligned: margin 0.30
        "2,late,identity,0.22,0.20,2.2.png",  # refused: margin 0.02 < 0.06
        "3,early,identity,,,3.1.png",  # refused without figures
        "3,late,flagged,0.9,0.1,3.2.png",
        "4,early,unreadable,,,4.1.png",
    ]  # 4.2.png: no row at all
    (folder / REPORT_NAME).write_text(header + "\n".join(rows) + "\n")
    kept = sorted(pair.target.name for pair in aligned_pairs(folder))
    assert kept == ["1.1.png", "1.2.png", "2.1.png"]


def test_aligned_pairs_of_a_registered_folder_with_sub_folders(tmp_path):
    """The report names each output by its path inside the folder (train/1.1.png), not its bare name."""
    folder = tmp_path / "registered"
    write_phantom_dataset(folder / "train", n=2, size=64, seed=2)
    header = "id,phase,status,identity_correlation,null_correlation,aligned_target\n"
    rows = ["train/1,early,registered,0.1,0.3,train/1.1.png", "train/2,early,identity,,,train/2.1.png"]
    (folder / REPORT_NAME).write_text(header + "\n".join(rows) + "\n")
    kept = [pair.target.relative_to(folder).as_posix() for pair in aligned_pairs(folder)]
    assert kept == ["train/1.1.png"]
