"""`ffasynth serve`: the page's handler on bad input, and an end-to-end run in headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from diffusers import LCMScheduler
from PIL import Image

from ffasynth.app import ServeSettings, Translator
from ffasynth.errors import FFASynthError
from ffasynth.models.preview_decoder import PreviewDecoder
from tests.browser import Browser, find_chromium, free_port, wait_for_http
from tests.helpers import micro_pipeline

ARTIFACTS = Path(os.environ.get("FFASYNTH_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "pipeline"
    micro_pipeline().save_pretrained(folder)
    return folder


def test_handler_refuses_non_images_and_huge_images_in_one_line(tmp_path):
    translator = Translator(micro_pipeline(), tmp_path, ServeSettings(max_pixels=10_000))
    text = tmp_path / "notes.png"
    text.write_text("<html>not an image</html>")
    with pytest.raises(FFASynthError) as info:
        translator.answer(str(text), 2, 0, 1, "early")
    assert "notes.png" in str(info.value) and "\n" not in str(info.value)
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(big)
    with pytest.raises(FFASynthError, match="pixels"):
        translator.answer(str(big), 2, 0, 1, "early")
    with pytest.raises(FFASynthError, match="upload"):
        translator.answer(None, 2, 0, 1, "early")
    photo = tmp_path / "eye.png"
    Image.fromarray((np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)).save(photo)
    pair, grey, uncertainty, download = translator.answer(str(photo), 2, 0, 2, "late")
    assert grey.shape == (40, 52) and uncertainty.shape == (40, 52, 3)
    assert Path(download).parent == tmp_path and Image.open(download).size == (52, 40)


class Recording:
    """The pipeline, with each call's settings kept."""

    def __init__(self, pipeline):
        self.pipeline, self.calls = pipeline, []

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __call__(self, *args, **kwargs):
        self.calls.append({k: kwargs[k] for k in ("num_inference_steps", "num_samples", "decoder")})
        return self.pipeline(*args, **kwargs)


def test_the_page_shows_a_fast_preview_before_the_full_result(tmp_path):
    photo = tmp_path / "eye.png"
    Image.fromarray((np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)).save(photo)
    pipe = micro_pipeline()
    pipe.register_modules(preview_decoder=PreviewDecoder.for_vae(pipe.vae.config, 8))
    recording = Recording(pipe)
    translator = Translator(recording, tmp_path, ServeSettings())
    shown = list(translator.stream(str(photo), 6, 0, 3, "late"))
    assert [status.split(":")[0] for _, status in shown] == ["Preview", "Full result"]
    assert shown[0][1].startswith("Preview: 2 steps, preview decoder")
    assert recording.calls == [
        {"num_inference_steps": 2, "num_samples": 1, "decoder": "preview"},
        {"num_inference_steps": 6, "num_samples": 3, "decoder": "vae"},
    ]
    (_, preview_grey), preview_grey_again, no_uncertainty, no_download = shown[0][0]
    assert preview_grey.shape == (40, 52) and no_uncertainty is None
    assert no_download is None and Path(shown[1][0][3]).name.startswith("ffa-")  # only the full result downloads
    assert len(list(tmp_path.glob("ffa-*.png"))) == 1
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)  # a distilled model: one step
    recording.calls.clear()
    list(translator.stream(str(photo), 4, 0, 1, "late"))
    assert [c["num_inference_steps"] for c in recording.calls] == [1, 4]
    pipe.register_modules(preview_decoder=None)  # no preview decoder, and no fewer steps to show: no preview
    recording.calls.clear()
    assert len(list(translator.stream(str(photo), 1, 0, 1, "late"))) == 1 and len(recording.calls) == 1


@pytest.mark.slow
@pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_page_translates_an_upload_in_headless_chromium(pipeline_dir, tmp_path):
    from ffasynth.data.phantom import make_eye

    photo = tmp_path / "phantom-photo.png"
    eye = make_eye(64, seed=3)
    Image.fromarray((eye.photo * 255).astype(np.uint8)[:, :56]).save(photo)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(
        [sys.executable, "-m", "ffasynth", "serve", str(pipeline_dir), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    browser = None
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", 120)
        browser = Browser(tmp_path / "chrome")
        browser.send("Page.enable")
        browser.send("Page.navigate", url=f"http://127.0.0.1:{port}/")
        browser.wait_for("!!document.querySelector('#photo input[type=file]')")
        assert "not for diagnosis" in browser.evaluate("document.querySelector('#banner').innerText")
        browser.set_files("#photo input[type=file]", [photo])
        browser.wait_for("!!document.querySelector('#photo img')")
        browser.evaluate(  # every status line the page shows, in order (not Gradio's timers)
            "window.statuses = []; new MutationObserver(() => { const t = document.querySelector('#status').innerText;"
            " if (/^(Preview|Full result)/.test(t) && window.statuses[window.statuses.length - 1] !== t)"
            " window.statuses.push(t) })"
            ".observe(document.querySelector('#status'), {subtree: true, childList: true, characterData: true})"
        )
        browser.evaluate("document.querySelector('#run').click()")
        try:
            size = browser.wait_for(
                "(() => { const img = document.querySelector('#result img');"
                " return img && img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight] : null })()",
                timeout=180,
            )
        except TimeoutError:
            browser.screenshot(ARTIFACTS / "serve-page-timeout.png")
            raise
        assert size == [56, 64]
        statuses = browser.wait_for(
            "window.statuses.some(t => t.startsWith('Full result')) ? window.statuses : null", timeout=180
        )
        # the preview, then the pipeline's default steps (the tiny preset's 4)
        assert statuses[0].startswith("Preview: 2 steps") and statuses[-1].startswith("Full result: 4 steps")
        shot = browser.screenshot(ARTIFACTS / "serve-page.png")
        assert shot.stat().st_size > 10_000
    finally:
        if browser is not None:
            browser.close()
        server.kill()
        output = server.communicate()[0].decode(errors="replace")
    assert "Traceback" not in output, output
    assert not shutil.which("nonexistent")


def test_a_port_in_use_or_out_of_range_is_refused_in_one_line(pipeline_dir, tmp_path, monkeypatch):
    import socket

    import ffasynth.app as app_module
    from ffasynth.app import start_page
    from ffasynth.translate import load_pipeline

    monkeypatch.setattr(app_module.tempfile, "tempdir", str(tmp_path))
    pipeline = load_pipeline(pipeline_dir, "cpu")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FFASynthError, match=f"cannot serve on 127.0.0.1:{port}"):
            start_page(pipeline, "127.0.0.1", port, ServeSettings())
    assert not list(tmp_path.glob("ffasynth-serve-*"))  # its temporary folder is gone
    from tests.helpers import invoke

    for option, value in (("--port", 0), ("--port", 70000), ("--max-upload-mb", -5), ("--max-pixels", 0)):
        result = invoke("serve", pipeline_dir, option, value)
        assert result.exit_code != 0 and f"{option} {value}: allowed" in str(result.exception), (option, result)


def test_serve_says_serving_only_once_the_page_answers(pipeline_dir, tmp_path, monkeypatch):
    """A bad folder or a taken port: one error line and no "serving …" line before it."""
    import socket

    import ffasynth.app as app_module
    from tests.helpers import invoke

    monkeypatch.setattr(app_module.tempfile, "tempdir", str(tmp_path))
    result = invoke("serve", tmp_path / "no-such-pipeline")
    assert result.exit_code != 0 and "serving" not in result.output, result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = invoke("serve", pipeline_dir, "--port", taken.getsockname()[1], "--device", "cpu")
    assert result.exit_code != 0 and "serving" not in result.output, result.output
    assert "cannot serve on 127.0.0.1" in str(result.exception) + result.output
    ready = []
    monkeypatch.setattr(
        app_module,
        "start_page",
        lambda *args: type("P", (), {"app": type("A", (), {"is_running": False})(), "close": lambda self: None})(),
    )
    app_module.serve(pipeline_dir, settings=ServeSettings(device="cpu"), on_ready=lambda: ready.append(1))
    assert ready == [1]


def test_the_page_reads_only_files_uploaded_to_it(tmp_path):
    """An API client can send any path in place of an upload: a file outside the page's upload folder is
    refused, without saying whether it exists (it used to be translated and sent back, the photo with it)."""
    uploads, elsewhere = tmp_path / "uploads", tmp_path / "private"
    rng = np.random.default_rng(0)
    for folder in (uploads / "3f2a", elsewhere):
        folder.mkdir(parents=True)
        Image.fromarray((rng.random((40, 52, 3)) * 255).astype(np.uint8)).save(folder / "eye.png")
    (uploads / "link.png").symlink_to(elsewhere / "eye.png")
    translator = Translator(micro_pipeline(), tmp_path, ServeSettings())
    translator.uploads = uploads
    refusal = "upload the photograph through the page: only uploaded files are read"
    climbing = uploads / "3f2a" / ".." / ".." / "private" / "eye.png"
    for path in (elsewhere / "eye.png", elsewhere / "missing.png", climbing, uploads / "link.png", "/etc/passwd"):
        with pytest.raises(FFASynthError) as info:
            translator.answer(str(path), 2, 0, 1, "early")
        assert str(info.value) == refusal, path
    assert translator.answer(str(uploads / "3f2a" / "eye.png"), 2, 0, 1, "early")[1].shape == (40, 52)


def test_an_unexpected_failure_is_one_line_and_clears_the_page(pipeline_dir, tmp_path, monkeypatch):
    """A failure after the preview (here a simulated GPU out of memory) leaves no preview on the page as if
    it were the result, and says one line (the traceback stays in the server log)."""
    import gradio as gr
    import torch

    from ffasynth.app import build_app, page_error
    from ffasynth.translate import load_pipeline

    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(more detail)")
    assert page_error(error) == (
        "the model failed on this image (OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB); "
        "try fewer samples or steps"
    )
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    pipe = load_pipeline(pipeline_dir, "cpu")
    app = build_app(pipe, tmp_path, ServeSettings())
    handle = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "handle")
    photo = tmp_path / "uploads" / "9c" / "eye.png"
    photo.parent.mkdir(parents=True)
    Image.fromarray((np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)).save(photo)
    calls, original = [], type(pipe).__call__

    def failing(*args, **kwargs):
        calls.append(kwargs["num_inference_steps"])
        if len(calls) > 1:
            raise error
        return original(pipe, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **k: failing(*a, **k))
    outside = tmp_path / "eye.png"  # the page's own upload folder is GRADIO_TEMP_DIR: this file is not in it
    outside.write_bytes(photo.read_bytes())
    for path in (outside, str(photo.parent) + "/\x00eye.png"):
        with pytest.raises(gr.Error, match="only uploaded files are read"):
            list(handle({"path": str(path)}, 6, 0, 1, "early"))
    assert calls == []
    shown = []
    with pytest.raises(gr.Error) as info:
        for outputs in handle({"path": str(photo)}, 6, 0, 1, "early"):
            shown.append(outputs)
    assert calls == [2, 6] and shown[0][-1].startswith("Preview") and shown[0][0] is not None
    assert shown[-1] == (None, None, None, None, f"Failed: {page_error(error)}")
    assert info.value.message == page_error(error)
