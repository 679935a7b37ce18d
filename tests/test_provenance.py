"""The one record of which software wrote a file (run.json, metrics.json, the model card)."""

from importlib import metadata

import torch

from ffasynth.provenance import versions


def test_versions_names_python_the_core_libraries_and_those_asked_for():
    found = versions("scikit-learn", "a-package-that-is-not-installed", "torch")
    assert list(found)[:5] == ["python", "platform", "ffasynth", "torch", "numpy"]
    assert found["scikit-learn"] == metadata.version("scikit-learn")
    assert found["numpy"] == metadata.version("numpy")
    assert found["a-package-that-is-not-installed"] == "not installed"
    assert found["torch"] == torch.__version__  # the build's version (e.g. +cu126), asked twice, listed once
    assert len(found) == 7
