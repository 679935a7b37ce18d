"""Which software wrote a file: the versions recorded in run.json, the evaluation and clinical
metrics.json, and the model card, so a figure can be traced to the libraries that made it."""

from __future__ import annotations

import platform
from importlib import metadata

import torch

ALWAYS = ("ffasynth", "torch", "numpy")


def versions(*packages: str) -> dict[str, str]:
    """python, platform, then ffasynth, torch, numpy and each of `packages` (distribution names, e.g.
    "scikit-learn") as installed, "not installed" when absent. torch's version is its build's
    (`2.14.1+cu126`), which says which CUDA it runs on."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in dict.fromkeys(ALWAYS + packages):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["torch"] = torch.__version__
    return found
