"""What the benchmark scripts share: the machine they ran on, peak memory, a random-weight pipeline
built from a preset, and a child process per measurement (so each peak RSS is its own).

Each script prints one JSON object on stdout; progress goes to stderr."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> dict:
    """Where the figures came from."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(result, seconds) of fn(), waiting for the GPU's queued work."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def rss_mib() -> float:
    """This process's resident memory now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def random_pipeline(preset: str, overrides: list[str] = (), seed: int = 0):
    """An FFASynthesisPipeline with random weights in the preset's shapes (sd15 = SD1.5's U-Net with
    the 8-channel conv_in, its VAE and CLIP ViT-L/14), DPM-Solver++ as exported runs have."""
    from ffasynth.config import load_config
    from ffasynth.export import build_pipeline
    from ffasynth.models.components import build_components
    from ffasynth.models.conditioning import SourceConditioner
    from ffasynth.training.run import LoadedRun

    config = load_config(preset=preset, overrides=list(overrides))
    torch.manual_seed(seed)
    components = build_components(config, random_weights=True)
    conditioner = SourceConditioner.from_components(components, config.model)
    for module in (components.unet, components.vae, conditioner):
        module.requires_grad_(False).eval()
    pipeline = build_pipeline(LoadedRun(config, components, conditioner, Path("."), False))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run_child(script: Path, args: list[str], timeout: float | None = None) -> dict:
    """Run `script --child ARGS` in a fresh interpreter and return the JSON object it prints last."""
    command = [sys.executable, str(script), "--child", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{script.name} {' '.join(args)} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def emit(result: dict, one_line: bool = False) -> None:
    """The script's JSON object on stdout (one line from a child, for run_child to read)."""
    print(json.dumps(result) if one_line else json.dumps(result, indent=2), flush=True)
