"""`ffasynth baseline train/translate`: pix2pix on the shared loop and outputs `evaluate` compares."""

from __future__ import annotations

import json
import shutil

import torch
from PIL import Image

from ffasynth.training import checkpoint as ckpt
from tests.helpers import invoke

SMALL = [
    "data.crop_size=32",
    "pix2pix.batch_size=2",
    "pix2pix.ngf=8",
    "pix2pix.num_downs=5",
    "pix2pix.disc_channels=8",
    "pix2pix.tile=64",
    "pix2pix.tile_overlap=16",
    "pix2pix.log_every=1",
]


def test_pix2pix_trains_resumes_translates_and_is_evaluated_beside_another_method(tmp_path):
    from ffasynth.data.phantom import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", n=4, size=80, seed=2, test_fraction=0.25)
    run = tmp_path / "p2p"
    result = invoke(
        "baseline", "train", "--data", data, "--out", run, "--preset", "tiny", "--max-steps", 2, "--quiet", *SMALL
    )
    assert result.exit_code == 0, result.output
    result = invoke("baseline", "train", "--data", data, "--out", run, "--resume", "--max-steps", 3, "--quiet")
    assert result.exit_code == 0, result.output
    assert ckpt.latest_checkpoint(run).name == "step-000003"
    names = {p.name for p in ckpt.latest_checkpoint(run).iterdir()}
    assert {"generator.safetensors", "discriminator.safetensors", "optimizer-generator.safetensors"} <= names
    out = tmp_path / "pix2pix-out"
    result = invoke("baseline", "translate", run, data / "test", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["4_ffa.png"]  # the photo only, not its angiograms
    assert Image.open(out / "4_ffa.png").size == (80, 80)
    other = tmp_path / "other-out"
    shutil.copytree(out, other)
    report = tmp_path / "report"
    fakes = ["--fake", f"pix2pix={out}", "--fake", f"copy={other}"]
    result = invoke("evaluate", "--real", data / "test", *fakes, "--out", report, "--metrics", "psnr,ssim")
    assert result.exit_code == 0, result.output
    methods = json.loads((report / "metrics.json").read_text())["methods"]
    assert set(methods) == {"pix2pix", "copy"}
    assert methods["pix2pix"]["summary"]["psnr"]["mean"] == methods["copy"]["summary"]["psnr"]["mean"]
    bad = invoke("baseline", "translate", tmp_path / "data", data / "test", "--out", out)
    assert bad.exit_code != 0


def test_a_resumed_pix2pix_run_repeats_the_uninterrupted_one(tmp_path):
    """The U-Net's dropout drew from torch's global generator, reseeded from the seed at every start: a resumed
    run replayed step 0's masks and drifted from the uninterrupted run (1e-2 in the weights by step 4)."""
    from safetensors.torch import load_file

    from ffasynth.data.phantom import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", n=3, size=64, seed=2)
    dropout = [
        "data.crop_size=64",
        "pix2pix.num_downs=6",
        "pix2pix.tile=128",
        "pix2pix.tile_overlap=32",
    ]  # 6: one level
    common = [
        "baseline",
        "train",
        "--data",
        data,
        "--preset",
        "tiny",
        "--quiet",
        *SMALL,
        *dropout,
        "pix2pix.save_every=1",
    ]
    assert invoke(*common, "--out", tmp_path / "whole", "--max-steps", 4).exit_code == 0
    assert invoke(*common, "--out", tmp_path / "cut", "--max-steps", 2).exit_code == 0
    assert invoke(*common, "--out", tmp_path / "cut", "--max-steps", 4, "--resume").exit_code == 0
    whole, cut = (load_file(ckpt.latest_checkpoint(tmp_path / r) / "generator.safetensors") for r in ("whole", "cut"))
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step-000004"
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_a_tile_overlap_the_tiles_cannot_share_is_refused_at_training_only(tmp_path):
    """Tiles start on multiples of 2**num_downs: an overlap leaving less than that between starts cannot be
    blended as asked (it gave NaN pixels before the tiler learnt to blend what the tiles share); a new run
    refuses it in one line, while an earlier run's config with it still loads (its generator translates)."""
    from ffasynth.config import load_config
    from ffasynth.data.phantom import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", n=2, size=48, seed=2)
    result = invoke("baseline", "train", "--data", data, "--out", tmp_path / "run", "--preset", "tiny", "--quiet",
                    *SMALL, "pix2pix.tile_overlap=40")  # fmt: skip
    assert result.exit_code != 0 and "pix2pix.tile_overlap=40 must leave tile − overlap >= 2**num_downs (32)" in (
        str(result.exception) + result.output
    )
    assert not (tmp_path / "run").exists()
    assert load_config(preset="tiny", overrides=[*SMALL, "pix2pix.tile_overlap=40"]).pix2pix.tile_overlap == 40


def test_pix2pix_draws_the_phase_it_is_asked_for_and_an_older_phase_blind_run_still_translates(tmp_path):
    import yaml

    from ffasynth.baselines.training import Pix2PixTask, load_generator
    from ffasynth.config import load_config
    from ffasynth.data.io import read_image
    from ffasynth.data.phantom import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", n=4, size=64, seed=2, test_fraction=0.25)
    common = ["baseline", "train", "--data", data, "--preset", "tiny", "--max-steps", 2, "--quiet", *SMALL]
    assert invoke(*common, "--out", tmp_path / "phases").exit_code == 0
    generator, config = load_generator(tmp_path / "phases")
    assert config.num_phases == 2 and generator.encoder[0][0].in_channels == 5  # photo + early + late maps
    task = Pix2PixTask(load_config(preset="tiny", overrides=SMALL).pix2pix)
    assert task.discriminator.model[0].in_channels == 6  # photo, phase maps and the angiogram
    drawn = {}
    for phase in ("early", "late"):
        out = tmp_path / f"out-{phase}"
        result = invoke("baseline", "translate", tmp_path / "phases", data / "test", "--out", out, "--phase", phase)
        assert result.exit_code == 0, result.output
        drawn[phase] = read_image(out / "4_ffa.png", channels=1)
    assert not torch.equal(drawn["early"], drawn["late"])
    bad = invoke("baseline", "translate", tmp_path / "phases", data / "test", "--out", tmp_path / "x", "--phase", "mid")
    assert bad.exit_code != 0 and "--phase 'mid'" in bad.output + str(bad.exception)

    # a run made before the phase input: its config.yaml has no pix2pix.num_phases, its generator reads 3 channels
    assert invoke(*common, "--out", tmp_path / "blind", "pix2pix.num_phases=0").exit_code == 0
    saved = yaml.safe_load((tmp_path / "blind" / "config.yaml").read_text())
    del saved["pix2pix"]["num_phases"]
    (tmp_path / "blind" / "config.yaml").write_text(yaml.safe_dump(saved))
    out = tmp_path / "out-blind"
    assert invoke("baseline", "translate", tmp_path / "blind", data / "test", "--out", out).exit_code == 0
    late = tmp_path / "out-blind-late"
    refused = invoke("baseline", "translate", tmp_path / "blind", data / "test", "--out", late, "--phase", "late")
    assert refused.exit_code != 0 and "trained without a phase input" in refused.output + str(refused.exception)
    assert not late.exists()  # refused before anything was written
