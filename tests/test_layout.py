"""Static checks of the source tree: test modules share builders only through tests/helpers.py and
the format writers, never by importing one another; the package never loads a pickle."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

import ffasynth

TESTS = Path(__file__).resolve().parent


def imported_test_modules(path: Path) -> set[str]:
    """The tests/test_*.py modules a file imports, at the top or inside functions (`tests.test_x`,
    `from tests import test_x`, `from .test_x import ...`, `from . import test_x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "tests" if node.level else (node.module or "")
            base = f"{base}.{node.module}" if node.level and node.module else base
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("tests.test_")}
    return found


def test_no_test_module_imports_another_test_module():
    crossing = {
        path.name: sorted(imported)
        for path in sorted(TESTS.glob("*.py"))
        if (imported := imported_test_modules(path) - {path.stem})
    }
    assert not crossing, f"move the shared builders to tests/helpers.py: {crossing}"


def test_the_import_check_sees_every_form_of_import(tmp_path):
    forms = [
        "from tests.test_models import MICRO",
        "import tests.test_pipeline",
        "from tests import test_stage2",
        "from .test_training import x",
        "from . import test_loop",
        "def f():\n    from tests.test_tiling import y",
        "from tests.helpers import MICRO\nfrom tests.corpus import cli",  # allowed: not a test module
    ]
    found = [imported_test_modules(_write(tmp_path / f"m{i}.py", text)) for i, text in enumerate(forms)]
    expected = ["test_models", "test_pipeline", "test_stage2", "test_training", "test_loop", "test_tiling"]
    assert found == [{name} for name in expected] + [set()]


def _write(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    return path


def test_no_pickle_is_loaded_anywhere_in_the_package():
    """Every torch.load passes weights_only=True; no pickle-family import, unsafe YAML or pickled numpy."""
    unsafe = []
    for path in sorted(Path(ffasynth.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "marshal") for n in names):
                    unsafe.append(f"{where} imports {names}")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = ast.unparse(node.func.value)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            call = f"{owner}.{node.func.attr}"
            if call == "torch.load" and keywords.get("weights_only") != "True":
                unsafe.append(f"{where} torch.load without weights_only=True")
            if call in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "torch.hub.load"):
                unsafe.append(f"{where} {call}")
            if call in ("np.load", "numpy.load") and keywords.get("allow_pickle", "False") != "False":
                unsafe.append(f"{where} np.load with allow_pickle")
    assert not unsafe, unsafe
    from ffasynth.configtree import _UniqueKeyLoader  # config files' loader: built on the safe one

    assert issubclass(_UniqueKeyLoader, yaml.SafeLoader)
