"""Shared fixtures. Real images live outside the repo: ../shared/data or $FFASYNTH_SHARED_DATA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    return Path(os.environ.get("FFASYNTH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-image folder; the test is skipped, with the reason, when it is absent."""
    root = shared_data_root()
    if not (root / "uwf-slo-ffa").is_dir():
        pytest.skip(f"real data not found at {root} (set FFASYNTH_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small phantom set (uwf layout, 10 eyes of 64x64, labels.csv), built once per session."""
    from ffasynth.data.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("phantom"), n=10, size=64, seed=0)


def pytest_configure(config):
    config.addinivalue_line("markers", "corpus: one case of the bad-input corpus (tests/test_bad_inputs.py)")


def pytest_terminal_summary(terminalreporter):
    """How many bad-input corpus cases ran and how many were handled (passed), when any ran."""
    outcomes: dict[str, str] = {}
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if "corpus" in getattr(report, "keywords", {}) and outcomes.get(report.nodeid, "passed") == "passed":
                outcomes[report.nodeid] = outcome  # a failure in any phase counts once, as not handled
    if outcomes:
        handled = sum(outcome == "passed" for outcome in outcomes.values())
        terminalreporter.write_line(f"bad-input corpus: {len(outcomes)} cases tried, {handled} handled")
