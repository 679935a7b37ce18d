"""A damaged newest checkpoint (issue 22): `--resume` verifies checkpoints newest first (manifest,
sizes, sha256 hashes, safetensors headers), falls back to the newest sound one with a warning naming
what it skipped and why, sets the damaged one aside (renamed step-N.damaged, its bytes untouched),
and the resumed run still repeats the uninterrupted one exactly. All damaged: one line, exit 2.
Checkpoints from before manifests resume when their sizes and headers are sound."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ffasynth.config import TrainConfig
from ffasynth.errors import FFASynthError
from ffasynth.integrity import MANIFEST, DamagedFileError, safetensors_header, sha256
from ffasynth.training import checkpoint as ckpt
from ffasynth.training.loop import Task, train
from tests.corpus import cli, exit_problem, line_problem
from tests.helpers import MICRO_STAGE1, BlankDataset


class _Linear(Task):
    """One linear layer with an EMA: weights, EMA, AdamW moments and state, as every stage saves them."""

    name = "linear"
    ema_names = ("layer",)

    def __init__(self):
        torch.manual_seed(0)
        self.trainable = {"layer": nn.Linear(3, 2)}

    def to(self, device, weight_dtype):
        self.trainable["layer"].to(device)

    def loss(self, batch, step, generator, optimizer):
        target = torch.tensor([1.0, -2.0])
        return ((self.trainable["layer"](torch.ones(1, 3)) - target) ** 2).mean(), {}

    def samples(self, batch, generator):
        return [batch["target"]]


def _config(steps: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, lr=0.05, lr_warmup_steps=1, save_every=2, sample_every=100, log_every=1)


def _train(run_dir, steps: int, resume: bool = False):
    return train(_Linear(), BlankDataset(), _config(steps), run_dir, resume=resume, progress=False)


def _weights(folder):
    return load_file(str(folder / "layer.safetensors"))


def _fingerprint(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _cut_short(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # a tensor's last byte: same size, header intact
    path.write_bytes(bytes(data))


# (case, file in the newest checkpoint, damage, words of the reason)
DAMAGE = [
    ("truncated-weights", "layer.safetensors", _cut_short, "cut short"),
    ("corrupted-byte-in-ema", "layer.ema.safetensors", _flip_last_byte, "sha256"),
    ("missing-optimizer-json", "optimizer-main.json", lambda p: p.unlink(), "optimizer-main.json is missing"),
    ("state-json-rewritten", "state.json", lambda p: p.write_text('{"step": 4}'), "state.json is"),
    ("manifest-garbled", MANIFEST, lambda p: p.write_text("{"), "manifest.json is unreadable"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run, and a run stopped at step 4 (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("linear")
    _train(root / "whole", 6)
    _train(root / "stopped", 4)
    return root


@pytest.mark.corpus
@pytest.mark.parametrize(("file", "damage", "reason"), [pytest.param(*d[1:], id=d[0]) for d in DAMAGE])
def test_a_damaged_newest_checkpoint_is_skipped_kept_and_the_run_resumes_exactly(
    reference, tmp_path, capsys, file, damage, reason
):
    run = tmp_path / "run"
    shutil.copytree(reference / "stopped", run)
    newest = run / "checkpoints" / "step-000004"
    damage(newest / file)
    damaged = _fingerprint(newest)
    result = _train(run, 6, resume=True)
    said = capsys.readouterr().out
    problem = line_problem(said, "step-000004", reason) or line_problem(said, "step-000004.damaged", "resuming from")
    assert not problem, problem
    assert "resuming" in said and "from step-000002" in said, said
    assert _fingerprint(run / "checkpoints" / "step-000004.damaged") == damaged, "the damaged checkpoint changed"
    whole = _weights(reference / "whole" / "checkpoints" / "step-000006")
    assert result.step == 6 and all(torch.equal(whole[k], v) for k, v in _weights(result.checkpoint).items())
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


@pytest.mark.corpus
def test_every_checkpoint_damaged_is_one_error_naming_each_and_nothing_is_moved(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference / "stopped", run)
    _cut_short(run / "checkpoints" / "step-000004" / "layer.safetensors")
    _flip_last_byte(run / "checkpoints" / "step-000002" / "layer.ema.safetensors")
    before = {p.name: _fingerprint(p) for p in (run / "checkpoints").iterdir()}
    with pytest.raises(FFASynthError) as error:
        _train(run, 6, resume=True)
    message = str(error.value)
    assert "\n" not in message and "step-000004: layer.safetensors" in message and "cut short" in message
    assert "step-000002: layer.ema.safetensors differs from its sha256" in message, message
    assert {p.name: _fingerprint(p) for p in (run / "checkpoints").iterdir()} == before


def _without_manifests(run):
    for manifest in (run / "checkpoints").glob(f"*/{MANIFEST}"):
        manifest.unlink()


@pytest.mark.corpus
def test_a_checkpoint_from_before_manifests_resumes_with_a_warning(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference / "stopped", run)
    _without_manifests(run)
    result = _train(run, 6, resume=True)
    said = capsys.readouterr().out
    problem = line_problem(said, "step-000004", "not hash-verified")
    assert not problem, problem
    assert "from step-000004" in said and not list((run / "checkpoints").glob("*.damaged"))
    whole = _weights(reference / "whole" / "checkpoints" / "step-000006")
    assert all(torch.equal(whole[k], v) for k, v in _weights(result.checkpoint).items())
    assert (result.checkpoint / MANIFEST).is_file()  # new checkpoints get one


@pytest.mark.corpus
def test_a_cut_short_checkpoint_from_before_manifests_is_still_skipped(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference / "stopped", run)
    _without_manifests(run)
    _cut_short(run / "checkpoints" / "step-000004" / "optimizer-main.safetensors")
    _train(run, 6, resume=True)
    problem = line_problem(capsys.readouterr().out, "step-000004", "optimizer-main.safetensors: cut short")
    assert not problem, problem


def test_every_file_of_a_checkpoint_is_in_its_manifest(reference):
    folder = reference / "stopped" / "checkpoints" / "step-000004"
    listed = json.loads((folder / MANIFEST).read_text())["files"]
    on_disk = {p.name for p in folder.iterdir()} - {MANIFEST}
    assert (
        set(listed)
        == on_disk
        == {
            "layer.safetensors",
            "layer.ema.safetensors",
            "optimizer-main.safetensors",
            "optimizer-main.json",
            "state.json",
        }
    )
    for name, entry in listed.items():
        assert entry == {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)}, name


def test_rotation_never_counts_or_deletes_a_damaged_checkpoint(tmp_path):
    layer = nn.Linear(3, 2)
    ema = ckpt.ExponentialMovingAverage(layer, 0.9)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()

    def save(step):
        return ckpt.save_checkpoint(tmp_path, step, {"layer": layer}, {"layer": ema}, {"main": optimizer}, {}, keep=2)

    def names():
        return [p.name for p in ckpt.checkpoint_folders(tmp_path)]

    save(1)
    _cut_short(save(2) / "layer.safetensors")  # damaged after it was written (a disk, a bad copy)
    save(3)  # counting step 2 as one of the two kept would have pruned step 1
    assert names() == ["step-000001", "step-000002", "step-000003"]
    save(4)
    _cut_short(save(5) / "layer.ema.safetensors")
    save(6)
    # the two newest sound ones (4, 6) are kept, the sound 1 and 3 pruned, the damaged 2 and 5 never touched
    assert names() == ["step-000002", "step-000004", "step-000005", "step-000006"]


# ---- safetensors headers, read without loading


def _safetensors(path, **tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _with_header(path, header: dict, data: bytes):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


HEADERS = [
    ("cut-short", lambda p: p.write_bytes(p.read_bytes()[:-3]), "cut short"),
    ("padded", lambda p: p.write_bytes(p.read_bytes() + b"\0"), "longer than its header says"),
    ("zero-bytes", lambda p: p.write_bytes(b""), "not a safetensors file"),
    ("text", lambda p: p.write_text("weights to follow\n"), "not a safetensors file"),
    ("pickle", lambda p: p.write_bytes(b"\x80\x04\x95" + bytes(64)), "not a safetensors file"),
    ("header-not-json", lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"), "not json"),
    ("shape-disagrees-with-bytes",
     lambda p: _with_header(p, {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, bytes(20)),
     "tensor 'w'"),
    ("overlapping-tensors",
     lambda p: _with_header(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
     "overlaps"),
    ("unknown-dtype",
     lambda p: _with_header(p, {"w": {"dtype": "F48", "shape": [1], "data_offsets": [0, 6]}}, bytes(6)),
     "tensor 'w'"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "words"), [pytest.param(*h[1:], id=h[0]) for h in HEADERS])
def test_a_damaged_safetensors_header_is_refused_in_one_phrase(tmp_path, damage, words):
    path = _safetensors(tmp_path / "w.safetensors", w=torch.arange(6.0).reshape(2, 3), b=torch.zeros(4, 1))
    damage(path)
    with pytest.raises(DamagedFileError) as error:
        safetensors_header(path)
    assert words in str(error.value).lower() and "\n" not in str(error.value)


def test_a_sound_header_gives_names_dtypes_and_shapes(tmp_path):
    path = _safetensors(tmp_path / "w.safetensors", w=torch.zeros(2, 3), steps=torch.zeros(5, dtype=torch.int64))
    assert safetensors_header(path) == {"w": ("F32", (2, 3)), "steps": ("I64", (5,))}


# ---- through the CLI: `ffasynth train stage1 --resume`


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    from ffasynth.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("stage1")
    pairs = write_phantom_dataset(root / "pairs", n=3, size=40, seed=2)
    options = [*MICRO_STAGE1, "stage1.save_every=1", "stage1.sample_every=1000", "stage1.sample_steps=1"]
    run = cli("train", "stage1", "--data", pairs, "--out", root / "run", "--preset", "tiny", "--max-steps", 2,
              "--quiet", *options)  # fmt: skip
    assert run.exit_code == 0, run.output
    return pairs, root / "run"


def _resume_cli(pairs, run, steps):
    return cli("train", "stage1", "--data", pairs, "--out", run, "--resume", "--max-steps", steps, "--quiet")


@pytest.mark.corpus
def test_cli_resume_past_a_cut_short_newest_checkpoint(stage1_run, tmp_path):
    pairs, original = stage1_run
    run = shutil.copytree(original, tmp_path / "run")
    _cut_short(run / "checkpoints" / "step-000002" / "unet.safetensors")
    said = _resume_cli(pairs, run, 3)
    problem = (
        line_problem(said.output, "step-000002", "unet.safetensors is")
        or line_problem(said.output, "step-000002.damaged", "resuming from step-000001")
        or exit_problem(said, 0)
    )
    assert not problem, problem
    # steps 2 and 3 trained again and kept (two), step 1 pruned, the damaged copy set aside
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000002.damaged",
        "step-000003",
    ]


@pytest.mark.corpus
def test_cli_resume_with_every_checkpoint_damaged(stage1_run, tmp_path):
    pairs, original = stage1_run
    run = shutil.copytree(original, tmp_path / "run")
    (run / "checkpoints" / "step-000002" / "unet.ema.safetensors").unlink()
    _flip_last_byte(run / "checkpoints" / "step-000001" / "optimizer-main.safetensors")
    said = _resume_cli(pairs, run, 3)
    problem = line_problem(said.output, "step-000002: unet.ema.safetensors is missing", "step-000001: optimizer")
    assert not problem, problem
    assert said.exit_code == 2, said.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_a_damaged_checkpoint_is_never_loaded_for_export(stage1_run, tmp_path):
    """Only a resume checked a checkpoint against its manifest: export (and stage 2, distill, the reports)
    loaded a checkpoint with a flipped byte, NaN weights and all. Now one line names the file."""
    _, original = stage1_run
    run = shutil.copytree(original, tmp_path / "run")
    _flip_last_byte(run / "checkpoints" / "step-000002" / "unet.ema.safetensors")
    said = cli("export", run, tmp_path / "pipeline")
    problem = line_problem(said.output, "step-000002: unet.ema.safetensors differs from its sha256", "damaged")
    assert not problem and said.exit_code != 0, (problem, said.output)
    assert not (tmp_path / "pipeline").exists()
