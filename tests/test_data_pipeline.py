"""Feeding the training step (issue 23): images decoded and their field of view computed once, kept
in memory-mapped files every loader worker shares; crops identical to the whole-image path; the same
batches with any number of workers; the stage-2 reconstruction report on a few images, tiled, in the
first process only."""

from __future__ import annotations

import gc
import json
import os
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import ffasynth.data.dataset as dataset_module
import ffasynth.evaluation.decoder_report as report_module
from ffasynth.config import load_config
from ffasynth.data.dataset import PairDataset, StreamBatchSampler, loader_workers, training_loader
from ffasynth.data.io import read_image
from ffasynth.data.pairs import Pair
from ffasynth.data.phantom import make_eye, write_phantom_dataset
from ffasynth.data.transforms import PairedTransform, crop_padded, pad_to
from ffasynth.errors import ConfigError
from tests.helpers import train_micro_stage1, two_level_vae


def _levels(array: np.ndarray, peak: int, dtype) -> np.ndarray:
    return (np.clip(array, 0.0, 1.0) * peak + 0.5).astype(dtype)


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory) -> list[Pair]:
    """Three kinds of file on disk: an 8-bit RGB photo with a 16-bit angiogram (90 x 120, smaller than
    some crops: padded), an RGBA photo (alpha composited) with an 8-bit one, and a grey 8-bit pair."""
    root = tmp_path_factory.mktemp("small")
    eye = make_eye(96, seed=3, style="uwf")
    photo = _levels(eye.photo, 255, np.uint8)
    Image.fromarray(photo).resize((120, 90)).save(root / "a.png")
    Image.fromarray(_levels(eye.ffa_early, 65535, np.uint16)).resize((120, 90)).save(root / "a.1.png")
    alpha = (np.arange(96 * 96).reshape(96, 96, 1) % 256).astype(np.uint8)
    Image.fromarray(np.concatenate([photo, alpha], -1), "RGBA").save(root / "b.png")
    Image.fromarray(_levels(eye.ffa_late, 255, np.uint8)).save(root / "b.1.png")
    Image.fromarray(photo[..., 1]).save(root / "c.png")
    Image.fromarray(_levels(eye.ffa_late, 255, np.uint8)).save(root / "c.1.png")
    return [Pair(id=n, source=root / f"{n}.png", target=root / f"{n}.1.png", phase="early") for n in "abc"]


def _whole_image_crop(pair: Pair, transform: PairedTransform, generator: torch.Generator) -> dict:
    """What every crop cost before: the whole image in float (from its 16-bit codes), the FOV mask,
    window counts and CLIP view computed by the transform from it."""

    def whole(path, channels):
        codes = (read_image(path, channels=channels) * 65535.0).round().to(torch.int32).to(torch.uint16)
        return codes.to(torch.float32) / 65535.0

    return transform(whole(pair.source, 3), whole(pair.target, 1), generator)


@pytest.mark.parametrize("crop, vflip", [(32, True), (64, False), (100, True), (128, True)])
def test_cached_crops_equal_the_whole_image_crops_pixel_for_pixel(small_pairs, crop, vflip):
    transform = PairedTransform(crop_size=crop, vflip=vflip, min_fov_fraction=0.5)
    dataset = PairDataset(small_pairs, transform, seed=7)
    uncached = PairDataset(small_pairs, transform, seed=7, cache=False)
    for epoch in range(3):
        for index, pair in enumerate(small_pairs):
            item = dataset[(index, epoch)]
            expected = _whole_image_crop(pair, transform, dataset.generator(index, epoch))
            again = uncached[(index, epoch)]
            for key in ("source", "target", "mask", "whole_source"):
                assert item[key].dtype == torch.float32 and torch.equal(item[key], expected[key]), (key, pair.id)
                assert torch.equal(again[key], expected[key]), (key, pair.id)


@pytest.mark.parametrize("height, width", [(9, 12), (5, 12), (9, 4), (3, 2)])
def test_a_window_of_the_padded_image_reads_only_the_window(height, width):
    image = torch.arange(2 * height * width, dtype=torch.int32).view(2, height, width) + 1
    size = 6
    padded = pad_to(image, size, size)
    for top in range(padded.shape[-2] - size + 1):
        for left in range(padded.shape[-1] - size + 1):
            expected = padded[..., top : top + size, left : left + size]
            assert torch.equal(crop_padded(image, top, left, size), expected)
            assert torch.equal(crop_padded(image.numpy(), top, left, size), expected)


class _Counter:
    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def test_each_image_is_decoded_and_its_field_of_view_computed_once(small_pairs, tmp_path, monkeypatch):
    counters = {}
    for name in ("read_image", "fov_mask", "window_counts", "whole_view"):
        counters[name] = _Counter(getattr(dataset_module, name))
        monkeypatch.setattr(dataset_module, name, counters[name])
    transform = PairedTransform(crop_size=48)
    repeated = small_pairs + small_pairs[:1]  # one pair twice: the same files, the same entries
    dataset = PairDataset(repeated, transform, seed=1, cache_dir=tmp_path / "cache")
    items = [dataset[(index, epoch)] for epoch in range(4) for index in range(len(repeated))]
    assert len({item["source"].sum().item() for item in items}) > len(small_pairs)  # crops differ
    calls = {name: counter.calls for name, counter in counters.items()}
    assert calls == {"read_image": 6, "fov_mask": 3, "window_counts": 3, "whole_view": 3}

    # a second dataset (another process, a later run) naming the folder computes nothing again
    other = PairDataset(small_pairs, transform, seed=1, cache_dir=tmp_path / "cache")
    assert torch.equal(other[(2, 3)]["source"], dataset[(2, 3)]["source"])
    assert {name: counter.calls for name, counter in counters.items()} == calls

    # an image replaced on disk is read anew, not served from its old entry
    target = small_pairs[2].target
    before = other[(2, 3)]["target"]
    Image.fromarray(255 - np.asarray(Image.open(target))).save(target)
    os.utime(target, ns=(1, 1))  # a different modification time even on a coarse clock
    after = PairDataset(small_pairs, transform, seed=1, cache_dir=tmp_path / "cache")[(2, 3)]["target"]
    assert counters["read_image"].calls == calls["read_image"] + 1
    assert torch.allclose(after, -before)


def test_the_cache_holds_each_image_once_however_many_workers_read_it(small_pairs):
    transform = PairedTransform(crop_size=40)
    batches = {}
    for workers in (0, 2):
        dataset = PairDataset(small_pairs, transform, seed=5)
        folder = dataset.store.folder
        sampler = StreamBatchSampler(len(dataset), 2, seed=5, rank=1, world=2)
        stream = iter(training_loader(dataset, sampler, workers, pin_memory=False, seed=0))
        batches[workers] = [next(stream) for _ in range(6)]  # 4 epochs of 3 pairs for this rank
        del stream
        gc.collect()
        images = sorted(path.name.split("-")[0] for path in folder.glob("*.npy"))
        # every image, mask, count table and view made once, in whichever process came first
        assert images == ["counts"] * 3 + ["fov"] * 3 + ["image"] * 6 + ["view"] * 3
        assert folder.is_dir()  # the workers' exit leaves the folder to the dataset that made it
        del dataset
        gc.collect()
        assert not folder.exists()  # gone with the dataset
    for zero, two in zip(batches[0], batches[2], strict=True):
        assert zero["index"].tolist() == two["index"].tolist()
        for key in ("source", "target", "mask", "whole_source"):
            assert torch.equal(zero[key], two[key])


@pytest.mark.parametrize("damage", ["empty", "cut short", "not npy"])
def test_a_damaged_cache_entry_is_made_again_and_a_failed_write_leaves_nothing(tmp_path, damage, monkeypatch):
    """What a crash can leave in a shared data.cache_dir (an empty or cut-short .npy) failed every later run;
    it is now computed again. Temporary names are unique (two processes of one PID in two containers wrote
    one name and broke each other), and a failed write (a full disk) removes its temporary file."""
    import errno

    from ffasynth.data.cache import ArrayStore
    from ffasynth.errors import OutputError

    value = np.arange(1000, dtype=np.int16).reshape(10, 100)
    store = ArrayStore(tmp_path / "cache")
    store.get("img", lambda: value)
    entry = tmp_path / "cache" / "img.npy"
    data = entry.read_bytes()
    entry.write_bytes({"empty": b"", "cut short": data[: len(data) // 2], "not npy": b"x" * len(data)}[damage])
    again = ArrayStore(tmp_path / "cache")
    assert np.array_equal(again.get("img", lambda: value), value) and again.computed == 1
    umask = os.umask(0)
    os.umask(umask)
    assert entry.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by a shared cache's other users
    full = ArrayStore(tmp_path / "cache")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", no_space)
    with pytest.raises(OutputError, match=r"cannot write the image cache \(data.cache_dir\): the disk is full"):
        full.get("other", lambda: value)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["img.npy"]


def test_processes_draw_different_crops_and_workers_seed_from_the_loader():
    keys = [StreamBatchSampler(4, 2, seed=0, rank=rank, world=2).batch(0) for rank in (0, 1)]
    assert not set(keys[0]) & set(keys[1])  # (index, epoch) keys, hence crops, differ per rank

    class Seeds(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, key):
            return torch.tensor([torch.initial_seed() % 2**32, int(np.random.randint(2**31))])

    runs = []
    for seed in (0, 0, 1):
        loader = training_loader(Seeds(), [[0], [1], [2], [3]], 2, pin_memory=False, seed=seed)
        runs.append(torch.cat(list(loader)).tolist())
    assert runs[0] == runs[1] and runs[0] != runs[2]  # reproducible from the seed, different per seed
    assert len({row[1] for row in runs[0]}) > 1  # NumPy seeded per worker, not copied from the parent


def test_num_workers_auto_is_none_without_a_gpu_and_at_most_four_with_one():
    assert loader_workers("auto", cuda=False) == 0
    cores = len(os.sched_getaffinity(0))
    assert loader_workers("auto", cuda=True) == min(4, cores)
    assert loader_workers(3, cuda=False) == 3
    assert load_config(overrides=["stage1.num_workers=2"]).stage1.num_workers == 2
    assert load_config().stage2.num_workers == "auto"
    with pytest.raises(ConfigError, match="stage1.num_workers"):
        load_config(overrides=["stage1.num_workers=-1"])


@pytest.mark.slow
def test_a_run_with_two_loader_workers_trains_exactly_as_one_without(tmp_path):
    pairs = write_phantom_dataset(tmp_path / "pairs", n=3, size=48, seed=2)
    losses = {}
    for workers in (0, 2):
        result = train_micro_stage1(pairs, tmp_path / f"run{workers}", 3, extra=[f"stage1.num_workers={workers}"])
        losses[workers] = [row["loss/main"] for row in result.losses]
    assert len(losses[2]) == 3 and losses[2] == losses[0]


class _LosslessVAE(torch.nn.Module):
    """4 pixels per latent as a 3-level VAE, losslessly: each 4 x 4 block becomes 48 latent channels
    (pixel_unshuffle) and back (scaling 1), so D(E(x)) = x; it records the sizes it is given."""

    config = SimpleNamespace(block_out_channels=(8, 8, 8), scaling_factor=1.0)
    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # its device is where the report runs
        self.sizes = []

    def encode(self, image):
        self.sizes.append(tuple(image.shape[-2:]))
        latents = torch.nn.functional.pixel_unshuffle(image, 4)
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: latents))

    def decode(self, latents):
        return SimpleNamespace(sample=torch.nn.functional.pixel_shuffle(latents, 4))


def test_the_tiled_report_sees_tiles_no_larger_than_asked_and_measures_the_same():
    ramp = torch.linspace(-1, 1, 45 * 70).view(1, 45, 70)
    vae = _LosslessVAE()
    whole = report_module.decoder_errors(vae, None, [ramp])
    assert vae.sizes == [(48, 72)]  # padded to the multiple of 4, in one piece
    vae.sizes.clear()
    tiled = report_module.decoder_errors(vae, None, [ramp], tile=32)
    assert vae.sizes and max(max(size) for size in vae.sizes) <= 32 and len(vae.sizes) > 1
    assert tiled["l1"] < 1e-6 and tiled["db"] > 100 and whole["db"] == pytest.approx(120.0)


def test_the_report_reads_at_most_report_images_angiograms(tmp_path, monkeypatch):
    from ffasynth.models.decoder import Decoder

    data = write_phantom_dataset(tmp_path / "data", n=6, size=32, seed=1, test_fraction=0.5)
    reads = _Counter(report_module.read_image)
    monkeypatch.setattr(report_module, "read_image", reads)
    torch.manual_seed(0)
    vae = two_level_vae()
    run = tmp_path / "run"
    run.mkdir()
    config = load_config(overrides=["stage2.report_images=2", "data.phase=early"])
    report = report_module.reconstruction_report(
        run, data, config.data, vae, Decoder(vae), config.stage2.report_images, tile=16
    )
    assert report["images"] == 2 and report["split"] == "test" and reads.calls == 2  # 3 test eyes, 2 read
    assert report["before_db"] == pytest.approx(report["after_db"])  # no checkpoint: the same decoder
    assert json.loads((run / "run.json").read_text())["decoder_psnr"]["images"] == 2


@pytest.mark.slow
def test_only_the_first_process_writes_the_reconstruction_report(tmp_path, monkeypatch):
    import ffasynth.training.stages as stages

    pairs = write_phantom_dataset(tmp_path / "pairs", n=4, size=48, seed=5, test_fraction=0.5)
    train_micro_stage1(pairs, tmp_path / "s1", 1)
    calls = []

    def recorded(*args):
        calls.append(args)
        return report_module.reconstruction_report(*args)

    monkeypatch.setattr(stages, "reconstruction_report", recorded)
    overrides = ["stage2.max_steps=1", "stage2.report_images=1", "stage2.lpips_weight=0", "stage2.sampler_steps=2"]
    config = load_config(tmp_path / "s1" / "config.yaml", overrides=overrides)
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        result, report = stages.train_stage2(config, tmp_path / "s1", pairs, tmp_path / f"s2-{rank}", progress=False)
        assert result.step == 1
        assert (report == {}) == (rank == "1")
    assert len(calls) == 1 and calls[0][5] == 1  # once, by rank 0, with stage2.report_images
    assert report["images"] == 1 and Path(calls[0][0]).name == "s2-0"


def test_the_data_benchmark_times_the_before_path_it_claims(small_pairs, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_data

    transform = PairedTransform(crop_size=48)
    before = bench_data.WholeImageCrops(small_pairs, transform, seed=3)
    now = PairDataset(small_pairs, transform, seed=3)
    for key in [(index, epoch) for epoch in range(2) for index in range(len(small_pairs))]:
        for name in ("source", "target", "mask", "whole_source"):
            assert torch.equal(before[key][name], now[key][name])
    assert len(before.codes) == 6  # each file once, whole, in this process

    for number in (1, 2):  # the uwf layout the benchmark writes
        for suffix, image in (("", "a.png"), (".1", "a.1.png")):
            (tmp_path / f"{number}{suffix}.png").write_bytes((small_pairs[0].source.parent / image).read_bytes())
    args = SimpleNamespace(crop=32, workers=[0, 2], rounds=2, seconds=0.05)
    result = bench_data.measure(args, tmp_path)
    paths = result["paths"]
    assert list(paths) == ["whole-image (before)", "cached, 0 workers", "cached, 2 workers"]
    for row in paths.values():
        assert len(row["rounds"]) == 2 and row["items_per_s"] == statistics.median(row["rounds"])
        assert row["vs_before"] == pytest.approx(row["items_per_s"] / paths["whole-image (before)"]["items_per_s"])
    assert result["pairs"] == 2 and result["memory"]["cache_files_mib_shared"] > 0


def test_a_file_replaced_with_the_same_size_and_modification_time_gets_a_new_cache_name(tmp_path):
    import time

    from ffasynth.data.cache import file_key

    path = tmp_path / "1.bmp"
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(path)
    before, stat = file_key(path, 1), path.stat()
    time.sleep(0.01)
    replacement = tmp_path / "new.bmp"
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(replacement)  # a BMP's size follows its dimensions
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` / `rsync -t` keep it
    replacement.replace(path)
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert file_key(path, 1) != before
