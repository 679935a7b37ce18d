"""A pipeline folder is untrusted input (issue 22): model_index.json is checked against the
pipeline's components, library and class names and settings before anything is imported; symlinks
out of the folder, pickle weights, code, weights nobody reads and configs whose shapes disagree with
their weights are refused, each in one line naming the key or file, through `ffasynth translate`
(exit 2, nothing written). An SD1.5 base folder (model.pretrained) keeps loading as downloaded: the
components its index lists that we never load are accepted and never imported."""

from __future__ import annotations

import inspect
import json
import math
import os
import pickle
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

from ffasynth.config import load_config
from ffasynth.errors import WeightsNotFoundError
from ffasynth.models import loading
from ffasynth.models.folders import COMPONENTS, SETTINGS, check_base_folder, check_pipeline_folder
from ffasynth.pipeline import FFASynthesisPipeline, TokenProjection
from tests.corpus import cli, exit_problem, line_problem, write_photo
from tests.helpers import MICRO, micro_pipeline
from tests.sd15_format import SD15_MODEL_INDEX, write_sd15_folder

WEIGHTS = "diffusion_pytorch_model.safetensors"
FP16 = "diffusion_pytorch_model.fp16.safetensors"  # a variant diffusers reads only when asked for
PLANTED = "ffasynth_planted_module"  # a module that leaves a marker file when imported


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "pipeline"
    micro_pipeline("data.crop_size=32").save_pretrained(folder)
    return folder


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """The marker file PLANTED's import would write (the module is on sys.path for this test)."""
    marker = tmp_path / "imported"
    code = tmp_path / "modules" / f"{PLANTED}.py"
    code.parent.mkdir()
    code.write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(code.parent))
    yield marker
    sys.modules.pop(PLANTED, None)


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle(path, marker=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"weight": _Exploit(marker or path.with_suffix(".ran"))}))


def _index(folder, **changes):
    path = folder / "model_index.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def _config(folder, component, **changes):
    path = folder / component / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **{k: v(config[k]) if callable(v) else v for k, v in changes.items()}}))


def _link_outside(folder, relative):
    """Move FOLDER/relative out of the folder and leave a symlink to it in its place."""
    inside = folder / relative
    outside = folder.parent / "elsewhere" / relative.replace("/", "-")
    outside.parent.mkdir(exist_ok=True)
    shutil.move(inside, outside)
    inside.symlink_to(outside)


def _relink(path, target):
    path.unlink()
    path.symlink_to(target)


def _extra_component(folder):
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(folder / "text_encoder" / "model.safetensors"))


def _custom_pipeline_code(folder):
    _index(folder, _class_name=["pipeline", "Evil"])  # diffusers' form for "run pipeline.py from the folder"
    (folder / "pipeline.py").write_text("import os\n")


# (case, how the folder is changed, the name the line must hold, the words it must say (lower case))
PIPELINE_CASES = [
    ("index-names-os-system", lambda f: _index(f, unet=["os", "system"]),
     "model_index.json", 'unet is ["os", "system"]'),
    ("index-wrong-class", lambda f: _index(f, vae=["diffusers", "UNet2DConditionModel"]), "model_index.json", "vae is"),
    ("index-unknown-component", lambda f: _index(f, text_encoder=["transformers", "CLIPTextModel"]),
     "model_index.json", "text_encoder: not a component"),
    ("index-custom-pipeline-class", _custom_pipeline_code, "model_index.json", "_class_name is"),
    ("index-required-component-null", lambda f: _index(f, unet=[None, None]),
     "model_index.json", "unet is [null, null]"),
    ("index-setting-of-wrong-type", lambda f: _index(f, tile_size="huge"), "model_index.json", 'tile_size is "huge"'),
    ("index-fov-threshold-above-1", lambda f: _index(f, fov_threshold=5.0), "model_index.json", "fov_threshold is 5.0"),
    ("index-fov-threshold-nan", lambda f: _index(f, fov_threshold=math.nan), "model_index.json", "fov_threshold is"),
    ("index-not-json", lambda f: (f / "model_index.json").write_text("{"), "model_index.json", "not a readable"),
    ("symlink-weights-outside", lambda f: _link_outside(f, f"unet/{WEIGHTS}"), f"unet/{WEIGHTS}", "outside"),
    ("symlink-folder-outside", lambda f: _link_outside(f, "image_processor"), "image_processor", "outside"),
    ("symlink-config-to-etc", lambda f: _relink(f / "vae/config.json", "/etc/hostname"), "vae/config.json", "outside"),
    ("pickle-bin-beside-weights", lambda f: _pickle(f / "unet/diffusion_pytorch_model.bin"),
     "diffusion_pytorch_model.bin", "pickle weights are never loaded"),
    ("pickle-pt-at-top", lambda f: _pickle(f / "ema.pt"), "ema.pt", "convert them to .safetensors"),
    ("pickle-ckpt-in-subfolder", lambda f: _pickle(f / "extras/sd15.ckpt"), "extras/sd15.ckpt", "pickle"),
    ("extra-safetensors-variant", lambda f: shutil.copy(f / f"vae/{WEIGHTS}", f / f"vae/{FP16}"),
     f"vae/{FP16}", "does not use"),
    ("extra-component-folder", _extra_component, "text_encoder/model.safetensors", "does not use"),
    ("code-file", lambda f: (f / "unet" / "modeling.py").write_text("import os\n"), "modeling.py", "never run"),
    ("config-shape-disagrees", lambda f: _config(f, "unet", cross_attention_dim=lambda n: 2 * n),
     f"unet/{WEIGHTS}", "implies"),
    ("config-more-layers-than-weights", lambda f: _config(f, "vae", layers_per_block=lambda n: n + 1),
     f"vae/{WEIGHTS}", "lacks"),
    ("config-of-another-model", lambda f: _config(f, "unet", _class_name="AutoencoderKL"),
     "unet/config.json", "describes a autoencoderkl"),
    ("config-encoder-narrower", lambda f: _config(f, "image_encoder", hidden_size=lambda n: n // 2),
     "image_encoder/model.safetensors", "implies"),
]  # fmt: skip


@pytest.mark.corpus
@pytest.mark.parametrize(("change", "name", "words"), [pytest.param(*c[1:], id=c[0]) for c in PIPELINE_CASES])
def test_translate_refuses_an_untrusted_pipeline_folder(pipeline_dir, tmp_path, change, name, words):
    folder = shutil.copytree(pipeline_dir, tmp_path / "pipeline", symlinks=True)
    change(folder)
    out = tmp_path / "out"
    run = cli("translate", folder, write_photo(tmp_path / "photo.png"), "--out", out, "--quiet")
    problem = line_problem(run.output, name, words) or exit_problem(run, 2)
    assert not problem, problem
    assert not out.exists(), f"{out} was written"
    assert not list(tmp_path.rglob("*.ran")), "a pickle was executed"


@pytest.mark.corpus
@pytest.mark.parametrize("component", ["unet", "scheduler", "image_processor"])
def test_a_library_named_by_the_index_is_never_imported(pipeline_dir, tmp_path, planted, component):
    folder = shutil.copytree(pipeline_dir, tmp_path / "pipeline")
    _index(folder, **{component: [PLANTED, "UNet2DConditionModel"]})
    with pytest.raises(WeightsNotFoundError, match=f"{component} is"):
        FFASynthesisPipeline.from_pretrained(folder)
    assert not planted.exists() and PLANTED not in sys.modules, "the index's library was imported"


def test_an_exported_pipeline_of_every_kind_passes_and_loads(tmp_path):
    for name, overrides in {"patches": ["model.clip_tokens=patches"], "no-clip": ["model.use_clip=false"]}.items():
        folder = tmp_path / name
        micro_pipeline("data.crop_size=32", *overrides).save_pretrained(folder)
        check_pipeline_folder(folder)
        FFASynthesisPipeline.from_pretrained(folder)
    _config(tmp_path / "patches", "projection", in_features=lambda n: n + 1)  # the projection's shapes matter too
    with pytest.raises(WeightsNotFoundError, match="projection/diffusion_pytorch_model.safetensors: linear.weight is"):
        check_pipeline_folder(tmp_path / "patches")


def test_the_checked_index_knows_every_argument_of_the_pipeline():
    arguments = set(inspect.signature(FFASynthesisPipeline.__init__).parameters) - {"self"}
    assert set(COMPONENTS) | set(SETTINGS) == arguments
    projection = TokenProjection(5, 3).state_dict()
    assert {k: tuple(v.shape) for k, v in projection.items()} == {"linear.weight": (3, 5), "linear.bias": (3,)}


def test_links_into_a_hugging_face_cache_are_followed(pipeline_dir, tmp_path):
    """`hf download` keeps each file once in models--X/blobs/ and links a snapshot to it."""
    repository = tmp_path / "hub" / "models--someone--ffa"
    snapshot = shutil.copytree(pipeline_dir, repository / "snapshots" / "0123abc")
    (repository / "blobs").mkdir()
    for number, path in enumerate(sorted(p for p in snapshot.rglob("*") if p.is_file())):
        blob = repository / "blobs" / f"{number:040x}"
        shutil.move(path, blob)
        path.symlink_to(os.path.relpath(blob, path.parent))
    check_pipeline_folder(snapshot)
    FFASynthesisPipeline.from_pretrained(snapshot)


# ---- SD1.5 base folders (model.pretrained)


def _whole_repository(folder, marker):
    """What a download of the whole stable-diffusion-v1-5 repository adds beside what we read."""
    pickles = ("text_encoder/pytorch_model.bin", "safety_checker/pytorch_model.bin", "unet/diffusion_pytorch_model.bin")
    for path in (*pickles, "v1-5-pruned.ckpt"):
        _pickle(folder / path, marker)
    shutil.copy(folder / "unet" / WEIGHTS, folder / "unet" / FP16)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")


def test_an_sd15_folder_as_downloaded_loads_and_what_we_never_load_stays_unread(tmp_path, planted):
    folder = write_sd15_folder(tmp_path / "sd15")
    assert set(SD15_MODEL_INDEX) >= {"text_encoder", "tokenizer", "safety_checker", "feature_extractor"}
    _whole_repository(folder, planted)
    _index(folder, safety_checker=[PLANTED, "StableDiffusionSafetyChecker"])  # never loaded, so never imported
    model = load_config(preset="tiny", overrides=MICRO).model
    unet, vae = loading.load_unet_and_vae(str(folder), model)
    assert unet.config.cross_attention_dim == 768 and vae.config.latent_channels == 4
    assert not planted.exists() and PLANTED not in sys.modules


# (case, how the SD1.5 folder is changed, words of the one-line refusal)
BASE_CASES = [
    ("index-unet-os-system", lambda f: _index(f, unet=["os", "system"]), 'unet is ["os", "system"]'),
    ("index-vae-wrong-class", lambda f: _index(f, vae=["diffusers", "VQModel"]), "vae is"),
    ("index-not-json", lambda f: (f / "model_index.json").write_text("[1, 2"), "not a readable pipeline index"),
    ("unet-weights-linked-outside", lambda f: _link_outside(f, f"unet/{WEIGHTS}"), "outside"),
    ("vae-folder-linked-outside", lambda f: _link_outside(f, "vae"), "outside"),
    ("unet-config-wider", lambda f: _config(f, "unet", block_out_channels=lambda c: [2 * n for n in c]), "implies"),
    ("vae-weights-cut-short", lambda f: (f / "vae" / WEIGHTS).write_bytes((f / "vae" / WEIGHTS).read_bytes()[:5000]),
     "corrupt (cut short"),
]  # fmt: skip


@pytest.mark.corpus
@pytest.mark.parametrize(("change", "words"), [pytest.param(*c[1:], id=c[0]) for c in BASE_CASES])
def test_an_untrusted_sd15_folder_is_refused_before_loading(tmp_path, change, words):
    folder = write_sd15_folder(tmp_path / "sd15")
    change(folder)
    with pytest.raises(WeightsNotFoundError) as error:
        check_base_folder(folder)
    assert words in str(error.value).lower() and "\n" not in str(error.value), str(error.value)
    assert str(folder) in str(error.value)


@pytest.mark.corpus
def test_train_refuses_an_sd15_folder_whose_index_names_another_library(tmp_path, phantom_dir):
    folder = write_sd15_folder(tmp_path / "sd15")
    _index(folder, unet=["os", "system"])
    run = cli("train", "stage1", "--data", phantom_dir, "--out", tmp_path / "run", "--preset", "tiny",
              f"model.pretrained={folder}", "model.base=none", "--quiet")  # fmt: skip
    problem = line_problem(run.output, "model_index.json", 'unet is ["os", "system"]') or exit_problem(run, 2)
    assert not problem, problem
