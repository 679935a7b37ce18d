"""The options every training verb shares (cli/options.py): one command line, one order of precedence."""

import dataclasses
from pathlib import Path

import typer
from typer.testing import CliRunner

from ffasynth.cli.options import TrainOptions, settings_from, train_options
from ffasynth.config import load_config, save_config


def test_flags_set_the_verbs_section_and_key_value_overrides_win(tmp_path):
    options = TrainOptions(
        data=tmp_path, out=tmp_path / "run", preset="tiny", max_steps=7, batch_size=3, resolution=48, seed=5,
        overrides=["vae.max_steps=9"],
    )  # fmt: skip
    config = options.config("vae")
    assert (config.vae.max_steps, config.vae.batch_size, config.data.crop_size, config.seed) == (9, 3, 48, 5)
    assert config.stage1.max_steps == load_config(preset="tiny").stage1.max_steps  # another section: untouched
    assert options.config("stage1", **{"model.vae": "/vae", "model.pretrained": None}).model.vae == "/vae"


def test_config_comes_from_config_file_else_resumed_run_else_start(tmp_path):
    start, given, run = tmp_path / "start.yaml", tmp_path / "given.yaml", tmp_path / "run"
    for path, seed in ((start, 1), (given, 2), (run / "config.yaml", 3)):
        path.parent.mkdir(exist_ok=True)
        save_config(load_config(preset="tiny", overrides=[f"seed={seed}"]), path)
    seed = lambda **kw: TrainOptions(data=tmp_path, out=run, **kw).config("stage2", start=start).seed  # noqa: E731
    assert seed(config_file=given, resume=True) == 2
    assert seed(resume=True) == 3
    assert seed() == 1  # a new run starts from `start` (stage 2: the stage-1 run's config)
    assert TrainOptions(data=tmp_path, out=tmp_path / "new", resume=True).config("vae").seed == 0  # defaults


def test_a_verb_gets_its_own_options_and_the_shared_ones_on_one_command_line(tmp_path):
    app, seen = typer.Typer(), {}

    @app.command()
    @train_options(without=("preset",))
    def verb(options: TrainOptions, level: int = typer.Option(1, "--level")) -> None:
        """A verb."""
        seen.update(options=options, level=level)

    args = ["--data", str(tmp_path), "--out", "run", "--level", "4", "--max-steps", "3", "--resume", "seed=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["level"] == 4
    assert seen["options"] == TrainOptions(tmp_path, Path("run"), resume=True, max_steps=3, overrides=["seed=1"])
    refused = CliRunner().invoke(app, ["--data", str(tmp_path), "--out", "run", "--preset", "tiny"])
    assert refused.exit_code == 2 and "No such option: --preset" in refused.output  # left out of this verb
    assert CliRunner().invoke(app, ["--level", "2"]).exit_code != 0  # --data and --out are required


def test_settings_from_takes_the_options_named_like_fields_and_the_given_ones_first():
    @dataclasses.dataclass
    class Settings:
        steps: int = 1
        seed: int = 0
        device: str = "cpu"

    made = settings_from(Settings, {"steps": 5, "device": "auto", "out": "elsewhere"}, device="cuda")
    assert made == Settings(steps=5, seed=0, device="cuda")


def test_device_names_are_checked_before_any_work(tmp_path, monkeypatch):
    """--device: auto, cpu, cuda, cuda:N; a wrong word or an absent GPU is one line naming the option, in
    evaluate as in translate (evaluate used to accept any word and fail later, inside torch)."""
    import pytest
    import torch

    from ffasynth.errors import FFASynthError
    from ffasynth.translate import resolve_device
    from tests.helpers import invoke

    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("foo", "cuda:x", "cuda:", "cpu:0", "CUDA", "cuda:²", "cuda:٠"):
        with pytest.raises(FFASynthError, match=r"--device must be auto, cpu, cuda or cuda:N"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the word is checked before the machine
    for name in ("cuda:²", "cuda:٠"):
        with pytest.raises(FFASynthError, match=r"--device must be auto, cpu, cuda or cuda:N"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(FFASynthError, match=f"--device {name}: no CUDA GPU"):
            resolve_device(name)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(FFASynthError, match="--device cuda:2: this machine has 2 CUDA GPU"):
        resolve_device("cuda:2")
    (tmp_path / "real").mkdir()
    (tmp_path / "fake").mkdir()
    result = invoke("evaluate", "--real", tmp_path / "real", "--fake", f"m={tmp_path / 'fake'}",
                    "--out", tmp_path / "report", "--device", "foo")  # fmt: skip
    assert result.exit_code != 0 and "--device must be auto, cpu, cuda or cuda:N, not 'foo'" in (
        str(result.exception) + result.output
    )
    assert not (tmp_path / "report").exists()


def test_paths_and_numbers_on_the_command_line_are_read_as_typed(tmp_path):
    """Flags went through YAML as text: `--vae "/data/runs #2/vae"` became '/data/runs' (a comment) and
    `/data/a: b/vae` a mapping; key=value read `010` as octal 8 and `1:30` as sexagesimal 90."""
    from ffasynth.config import load_config
    from ffasynth.errors import ConfigError

    for path in ("/data/runs #2/vae", "/data/a: b/vae", "/data/[x]/vae", "/data/it's/vae"):
        options = TrainOptions(data=tmp_path, out=tmp_path / "run", preset="tiny")
        assert options.config("stage1", **{"model.vae": path}).model.vae == path
    assert load_config(preset="tiny", overrides=["model.vae=/data/runs #2/vae"]).model.vae == "/data/runs #2/vae"
    assert load_config(preset="tiny", overrides=["stage1.max_steps=010"]).stage1.max_steps == 10
    import pytest

    with pytest.raises(ConfigError, match="stage1.max_steps"):
        load_config(preset="tiny", overrides=["stage1.max_steps=1:30"])
