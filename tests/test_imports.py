"""The import graph of STYLE.md: each module imported in a fresh interpreter, sys.modules checked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"config", "loss", "models", "data", "runtime", "inference", "training", "test", "main",
           "export"}

# module -> project modules it must NOT pull in (directly or indirectly)
FORBIDDEN = {
    "config": PROJECT - {"config"},
    "loss": PROJECT - {"loss"},
    "models": PROJECT - {"models"},
    "data": PROJECT - {"data"},
    "inference": {"loss", "training", "test", "main", "config"},
    "training": {"test", "main"},
    "test": {"training", "main"},
    "export": PROJECT - {"export"},
}
# third-party packages a module must not pull in
FORBIDDEN_THIRD_PARTY = {
    "config": {"torch", "numpy"},
    "loss": {"segmentation_models_pytorch", "timm", "medpy", "nibabel", "scipy"},
    "data": {"segmentation_models_pytorch", "timm", "medpy"},
    "export": {"onnx", "onnxruntime", "onnxscript"},  # imported only when exporting / checking
}


def loaded_modules(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return {name.split(".")[0] for name in json.loads(out.stdout.splitlines()[-1])}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_import_graph(module):
    loaded = loaded_modules(module)
    bad = (FORBIDDEN[module] | FORBIDDEN_THIRD_PARTY.get(module, set())) & loaded
    assert not bad, f"importing {module} pulled in {sorted(bad)}"


def test_main_imports_without_side_effects():
    # importing main must not parse arguments, create run directories or start training
    out = subprocess.run([sys.executable, "-c", "import main, test, training"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == "", out.stderr
