"""Tests for export.py: ONNX files that ONNX Runtime runs with the same logits as PyTorch.

    python -m pytest tests/test_export.py -q
"""
from __future__ import annotations

import pytest
import torch

from export import ExportError, check_onnx, export_onnx, supports_dynamic_hw
from models import build_model

onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (model, path)}: transunet_tiny (static 64^2) and unet_resnet18 (dynamic H/W)."""
    out = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    files = {}
    for name, dynamic_hw in (("transunet_tiny", False), ("unet_resnet18", True)):
        model = build_model(name, in_channels=2, img_size=64).train()
        path = export_onnx(model, out / f"{name}.onnx", in_channels=2, img_size=64,
                           dynamic_hw=dynamic_hw)
        assert path == out / f"{name}.onnx" and model.training  # the caller's model untouched
        files[name] = (model, path)
    return files


@pytest.mark.parametrize("name", ["transunet_tiny", "unet_resnet18"])
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_parity_with_dynamic_batch(exported, name, batch):
    model, path = exported[name]
    torch.manual_seed(batch)
    err = check_onnx(path, model, torch.randn(batch, 2, 64, 64))
    assert err < 1e-4
    assert model.training  # check_onnx evaluates in eval mode and restores the mode


def test_onnx_file_layout(exported):
    session = onnxruntime.InferenceSession(str(exported["transunet_tiny"][1]),
                                           providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("image", "tensor(float)", ["batch", 2, 64, 64])
    assert (out.name, out.shape) == ("logits", ["batch", 1, 64, 64])
    assert not list(exported["transunet_tiny"][1].parent.glob(".*.tmp"))  # no temporary left


def test_smp_model_with_dynamic_height_width(exported):
    model, path = exported["unet_resnet18"]
    assert supports_dynamic_hw(model) and not supports_dynamic_hw(exported["transunet_tiny"][0])
    assert check_onnx(path, model, torch.randn(2, 2, 96, 128)) < 1e-4


def test_user_errors_are_clear(tmp_path, exported):
    model = build_model("transunet_tiny", in_channels=2, img_size=64)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder is expected")
    with pytest.raises(ExportError, match="not_a_folder.*writable folder"):
        export_onnx(model, blocker / "model.onnx", in_channels=2, img_size=64)
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(model, tmp_path, in_channels=2, img_size=64)
    # A wrong channel count fails before anything is written; an existing file is kept.
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(ExportError, match=r"does not accept input \(B, 3, 64, 64\).*in_channels"):
        export_onnx(model, target, in_channels=3, img_size=64)
    assert target.read_bytes() == b"previous export" and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ExportError, match="dynamic height/width"):
        export_onnx(model, target, in_channels=2, img_size=64, dynamic_hw=True)
    with pytest.raises(ExportError, match="does not exist"):
        check_onnx(tmp_path / "missing.onnx", model, torch.zeros(1, 2, 64, 64))
    with pytest.raises(ExportError, match=r"inputs \(1, 2, 32, 32\) do not fit"):
        check_onnx(exported["transunet_tiny"][1], model, torch.zeros(1, 2, 32, 32))


@pytest.mark.slow  # torch.export + onnxscript translation: 25-70 s on 2 busy cores
def test_dynamo_exporter_parity(tmp_path):
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = build_model("transunet_tiny", in_channels=2, img_size=64)
    path = export_onnx(model, tmp_path / "dynamo.onnx", in_channels=2, img_size=64, dynamo=True)
    for batch in (1, 3):
        assert check_onnx(path, model, torch.randn(batch, 2, 64, 64)) < 1e-4
