"""`ffasynth quickstart`: the whole job on phantom data within a time budget (micro model)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from PIL import Image
from typer.testing import CliRunner

from ffasynth.cli import app
from tests.helpers import MICRO


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_writes_the_report(tmp_path):
    from ffasynth.data.phantom import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", n=8, size=64, seed=1, test_fraction=0.25)
    tiny = MICRO + [
        "data.crop_size=32",
        "vae.batch_size=2",
        "stage1.batch_size=2",
        "stage2.batch_size=2",
        "stage1.sample_steps=2",
        "stage2.disc_start=2",
    ]
    result = CliRunner().invoke(
        app,
        [
            "quickstart",
            "--out",
            str(tmp_path / "out"),
            "--data",
            str(data),
            "--minutes",
            "0.3",
            "--steps",
            "3",
            "--quiet",
            *tiny,
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for stage in ("vae", "stage1", "stage2"):
        assert list((out / "runs" / stage / "checkpoints").glob("step-*")), stage
    assert (out / "pipeline" / "model_index.json").is_file()
    translated = sorted((out / "translated").glob("*_ffa.png"))
    assert [p.name for p in translated] == ["7.1_ffa.png", "7.2_ffa.png", "8.1_ffa.png", "8.2_ffa.png"]
    assert all(Image.open(p).size == (64, 64) for p in translated)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert len(metrics["methods"]["ffasynth"]["per_image"]) == 4
    assert "of the phantoms' lesions the real angiograms show, the synthetic ones show" in result.output
    assert "report: " in result.output and "ffasynth train stage1 --config configs/sd15.yaml" in result.output


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("extra", "crop", "batch"), [([], 256, 2), (["data.crop_size=128"], 128, 2)])
def test_the_demo_trains_on_whole_eye_crops_unless_told_otherwise(tmp_path, monkeypatch, extra, crop, batch):
    """Without --data the demo's 256-px phantoms are cropped whole (batch 2); a given setting still wins."""
    import ffasynth.quickstart as module

    seen = {}

    def stop(config, *args, **kwargs):
        seen["config"] = config
        raise _Stop

    monkeypatch.setattr(module, "train_stage1", stop)
    monkeypatch.setattr(module, "train_vae", stop)
    with pytest.raises(_Stop):
        module.quickstart(tmp_path / "demo", 1.0, None, progress=False, say=lambda line: None, overrides=extra)
    assert (seen["config"].data.crop_size, seen["config"].stage1.batch_size) == (crop, batch)


@pytest.mark.parametrize("steps", [None, 3])
def test_held_out_photos_are_translated_with_the_pipelines_default_steps_unless_given(tmp_path, steps):
    """The demo reports what `translate` gives: no --steps → the pipeline decides (its exported default)."""
    import numpy as np

    from ffasynth.data.phantom import write_phantom_dataset
    from ffasynth.quickstart import sample_held_out

    data = write_phantom_dataset(tmp_path / "data", n=4, size=32, seed=0, test_fraction=0.5)
    asked = []

    class Pipeline:
        config = SimpleNamespace(num_phases=2)

        def __call__(self, photo, num_inference_steps, **kwargs):
            asked.append(num_inference_steps)
            return type("Out", (), {"images": [np.zeros((32, 32, 1), np.float32)]})()

    written = sample_held_out(Pipeline(), data / "test", tmp_path / "out", steps, 0, lambda line: None)
    assert len(written) == 4 and asked == [steps] * 4


@pytest.mark.parametrize(
    ("extra", "decoder", "stages", "stage1_share", "exported"),
    [
        ([], None, ["stage1"], 1.0, "stage1"),  # from the base: its decoder kept, every minute to the U-Net
        ([], True, ["stage1", "stage2"], 0.85, "stage2"),
        (["model.base=none"], None, ["vae", "stage1", "stage2"], 0.55, "stage2"),  # random init: all three
        (["model.base=none"], False, ["vae", "stage1"], 0.65, "stage1"),
    ],
)
def test_stage_2_runs_from_random_weights_and_not_from_the_base_unless_asked(
    tmp_path, monkeypatch, extra, decoder, stages, stage1_share, exported
):
    import ffasynth.quickstart as module

    ran, budget = [], 2.0 - module.OVERHEAD_MINUTES

    def stage(name):
        def record(config, *args, **kwargs):
            ran.append(name)
            if name == "stage1":
                assert config.stage1.max_minutes == pytest.approx(budget * stage1_share, abs=1e-3)

        return record

    def export(run_dir, out):
        assert run_dir.name == exported
        raise _Stop

    for name in ("vae", "stage1", "stage2"):
        monkeypatch.setattr(module, f"train_{name}", stage(name))
    monkeypatch.setattr(module, "export_run", export)
    said = []
    with pytest.raises(_Stop):
        module.quickstart(tmp_path / "q", 2.0, None, progress=False, say=said.append, overrides=extra, decoder=decoder)
    assert ran == stages
    assert any(line.startswith("stage 2 (decoder): off") for line in said) == ("stage2" not in stages)


@pytest.mark.parametrize(("flag", "decoder"), [([], None), (["--decoder"], True), (["--no-decoder"], False)])
def test_the_decoder_flag_reaches_the_job(tmp_path, monkeypatch, flag, decoder):
    import ffasynth.quickstart as module

    seen = []

    def run(out, minutes, data, seed, steps, progress, say, overrides, decoder):
        seen.append(decoder)
        raise _Stop

    monkeypatch.setattr(module, "quickstart", run)
    result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "q"), *flag])
    assert isinstance(result.exception, _Stop) and seen == [decoder]
