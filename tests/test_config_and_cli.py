"""The config tree (presets, YAML, key=value overrides) and the data CLI verbs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ffasynth.cli import app
from ffasynth.config import load_config, save_config
from ffasynth.errors import ConfigError

runner = CliRunner()


def test_presets_yaml_roundtrip_and_overrides(tmp_path):
    config = load_config(preset="tiny", overrides=["data.crop_size=64", "data.hflip=false", "seed=7"])
    assert (config.data.crop_size, config.data.hflip, config.seed) == (64, False, 7)
    assert load_config(preset="sd15").data.crop_size == 768
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_choices_that_yaml_reads_as_booleans_keep_their_spelling(tmp_path):
    config = load_config(overrides=["stage1.mixed_precision=no", "vae.mixed_precision=bf16"])
    assert (config.stage1.mixed_precision, config.vae.mixed_precision) == ("no", "bf16")
    (tmp_path / "c.yaml").write_text("stage2:\n  mixed_precision: no\n")
    assert load_config(tmp_path / "c.yaml").stage2.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"stage1\.mixed_precision"):
        load_config(overrides=["stage1.mixed_precision=yes"])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.crop_sise=64", "data.crop_sise"),
        ("data.crop_size=big", "data.crop_size"),
        ("data.crop_size=4", "data.crop_size"),
        ("data.layout=zigzag", "data.layout"),
        ("data.hflip=3", "data.hflip"),
        ("preset=huge", "preset"),
        ("stage1.image_guidance_scale=0.5", "stage1.image_guidance_scale"),
        ("stage2.ema_decay=1", "stage2.ema_decay"),
        ("nokey", "nokey"),
    ],
)
def test_bad_config_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(overrides=[override])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_help_lists_verbs():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "data" in result.output
    result = runner.invoke(app, ["data", "--help"])
    assert "check" in result.output and "phantom" in result.output


def test_phantom_then_check_json(tmp_path):
    result = runner.invoke(app, ["data", "phantom", str(tmp_path / "ph"), "--n", "4", "--size", "48"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "check", str(tmp_path / "ph"), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "8 pairs ok, 0 problems" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_pairs"] == 8 and report["n_sources"] == 4 and report["problems"] == []


def test_check_exit_code_1_without_valid_pairs(tmp_path):
    (tmp_path / "1.png").write_bytes(b"")
    (tmp_path / "1.1.png").write_bytes(b"")
    result = runner.invoke(app, ["data", "check", str(tmp_path)])
    assert result.exit_code == 1
    assert "0 pairs ok, 2 problems" in result.output


def test_user_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    process = subprocess.run(
        [sys.executable, "-m", "ffasynth", "data", "check", str(tmp_path)], capture_output=True, text=True
    )
    assert process.returncode == 2
    assert process.stderr.strip().startswith("error:") and "no known pair layout" in process.stderr
    assert "Traceback" not in process.stderr and len(process.stderr.strip().splitlines()) == 1


def test_real_uwf_check_cli(shared_data):
    result = runner.invoke(app, ["data", "check", str(shared_data / "uwf-slo-ffa")])
    assert result.exit_code == 0
    assert "14 pairs ok, 0 problems (7 sources)" in result.output


def test_every_shipped_config_file_loads():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        config = load_config(path)
        assert config.preset in ("tiny", "sd15"), path


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize(
    ("name", "switched"),
    [
        ("ablation-no-clip.yaml", {"model.use_clip": False}),
        ("ablation-no-offset-noise.yaml", {"stage1.offset_noise_strength": 0.0}),
    ],
)
def test_each_ablation_is_sd15_yaml_but_for_its_one_switched_key(name, switched):
    from pathlib import Path

    from ffasynth.config import to_dict

    configs = Path(__file__).parent.parent / "configs"
    main, ablation = _flat(to_dict(load_config(configs / "sd15.yaml"))), _flat(to_dict(load_config(configs / name)))
    differing = {key: ablation[key] for key in main if main[key] != ablation[key]}
    assert differing == switched


def test_extends_chains_relative_to_the_file_and_refuses_a_cycle(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("preset: sd15\nstage1:\n  lr: 3.0e-5\n  max_steps: 7\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("extends: base/a.yaml\nstage1:\n  max_steps: 9\n")
    (tmp_path / "c.yaml").write_text("extends: b.yaml\nseed: 5\n")
    config = load_config(tmp_path / "c.yaml", overrides=["stage1.lr=1e-4"])
    assert (config.preset, config.stage1.max_steps, config.seed, config.stage1.lr) == ("sd15", 9, 5, 1e-4)
    assert config.data.crop_size == 768  # the base file's preset applies down the chain

    (tmp_path / "base" / "a.yaml").write_text("extends: ../c.yaml\n")
    with pytest.raises(ConfigError, match="in a cycle") as info:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(info.value) and "c.yaml" in str(info.value)
    (tmp_path / "d.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml .*extended by .*d\.yaml.* does not exist"):
        load_config(tmp_path / "d.yaml")


def test_preset_sd15_and_configs_sd15_yaml_train_alike_and_weights_need_a_preset():
    """`--preset sd15` with the weights given as options is the same recipe as configs/sd15.yaml (it was fp32,
    no checkpointing, no accumulation); naming SD1.5 weights with no preset at all used to train them with the
    tiny preset's CPU recipe (v-prediction, lr 5e-4, 128² crops) without a word: now refused."""
    from pathlib import Path

    from ffasynth.config import to_dict

    yaml_file = Path(__file__).parent.parent / "configs" / "sd15.yaml"
    from_file = load_config(yaml_file)
    weights = [f"model.pretrained={from_file.model.pretrained}", f"model.image_encoder={from_file.model.image_encoder}"]
    from_preset = load_config(preset="sd15", overrides=weights)
    assert _flat(to_dict(from_file)) == _flat(to_dict(from_preset))
    assert (from_preset.stage1.mixed_precision, from_preset.stage1.gradient_accumulation) == ("bf16", 4)
    assert from_preset.stage1.prediction_type == "epsilon" and from_preset.stage2.lpips_weight == 1.0
    with pytest.raises(ConfigError, match="model.pretrained names weights but no preset is given"):
        load_config(overrides=weights)
    assert load_config(preset="tiny", overrides=weights).preset == "tiny"  # said explicitly: as asked


def test_config_files_say_what_is_wrong_and_where(tmp_path):
    """A key given twice (a second `stage1:` section replaced the first whole, silently), a YAML error with
    its line (PyYAML's first line said neither what nor where), and unknown keys all at once, each with the
    key it resembles and the file named (a run's config.yaml written by an older ffasynth, say)."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("preset: tiny\nstage1:\n  lr: 1.0e-4\nseed: 3\nstage1:\n  lr: 2.0e-5\n")
    with pytest.raises(ConfigError, match=r"the key 'stage1' is given twice in one mapping at line 5, column 1"):
        load_config(twice)
    tab = tmp_path / "tab.yaml"
    tab.write_text("preset: tiny\nstage1:\n\tlr: 1\n")
    with pytest.raises(ConfigError, match=r"found character '\\t' that cannot start any token at line 3, column 1"):
        load_config(tab)
    old = tmp_path / "old.yaml"
    old.write_text("preset: tiny\nstage1:\n  guidance_scale: 3\n  use_ema: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(old)
    message = str(info.value)
    assert "unknown config keys stage1.guidance_scale (did you mean stage1.image_guidance_scale?)" in message
    assert "stage1.use_ema" in message and message.endswith(f"(with the config file {old})") and "\n" not in message
