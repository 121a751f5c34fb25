"""ONNX export of a segmentation model and a parity check against PyTorch with ONNX Runtime.

    from export import export_onnx, check_onnx
    path = export_onnx(model, "runs/x/model.onnx", in_channels=2, img_size=224)
    err = check_onnx(path, model, torch.randn(3, 2, 224, 224))  # max |logit difference|

Not a script; `main.py` / `test.py` wire it in. Running the file is shown in docs/export.md.

The file: one input "image" float32 (B, in_channels, S, S), normalised exactly as the cache
(docs/export.md), and one output "logits" float32 (B, num_classes, S, S); the batch axis B is
dynamic. Height and width are fixed at img_size for TransUNet: its position embedding is a
learned grid for img_size, resized in Python only when the input size differs, and that branch
is decided at export time, so an exported TransUNet accepts img_size x img_size only (tile
larger slices with a sliding window, as inference.sliding_window_logits does). The smp models
are fully convolutional and can be exported with dynamic_hw=True (any multiple of 32).

Exporter: torch 2.14 offers the TorchScript tracer (`dynamo=False`, deprecated since torch 2.9
but still shipped) and the torch.export-based exporter (`dynamo=True`, the default in
torch.onnx.export, needs the `onnxscript` package). Both reproduce TransUNet (timm ViT with
fused scaled-dot-product attention, ResNet-V2 with StdConv) and the smp models to ~1e-7 here,
but on the project's 2 CPU cores the tracer exports transunet_tiny in ~4 s and the dynamo
exporter in 25-70 s, and R50-ViT-B/16 in ~50 s vs minutes. So the tracer is the default and
`dynamo=True` is available (tested as slow). The file is written atomically: exported to a
temporary file next to `path`, checked with `onnx.checker`, then renamed over `path`; a failed
export leaves an existing file untouched. Weights are stored inside the file (no external
data), which limits it to protobuf's 2 GiB (R50-ViT-B/16: ~0.42 GB).
"""
from __future__ import annotations

import copy
import functools
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

DEFAULT_OPSET = 17  # ONNX Runtime >= 1.11, TensorRT >= 8.6; has LayerNormalization
INPUT_NAME, OUTPUT_NAME = "image", "logits"
_EXPORT_BATCH = 2  # traced with batch 2 so nothing is specialised to a batch of 1


class ExportError(ValueError):
    """An export or check that cannot be done as asked (message names the file and the fix)."""

    user_error = True  # runtime.exit_on_user_error prints it without a traceback


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def supports_dynamic_hw(model: nn.Module) -> bool:
    """False for TransUNet (position grid fixed at img_size at export time), True otherwise."""
    return not hasattr(unwrap(model), "vit")


def _prepare_target(path: str | os.PathLike) -> Path:
    """Create the parent folder; ExportError naming the path if it cannot be written there."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"ONNX output path {path} is a directory; pass a file name such as "
                          f"{path / 'model.onnx'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create the folder for the ONNX file {path} ({err.strerror}: "
                          f"{err.filename}); choose a path in a writable folder") from err
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"cannot write the ONNX file {path}: folder {path.parent} is not "
                          "writable; choose a path in a writable folder")
    return path


def export_onnx(model: nn.Module, path: str | os.PathLike, *, in_channels: int, img_size: int,
                opset: int = DEFAULT_OPSET, dynamic_hw: bool = False, dynamo: bool = False) -> Path:
    """Write `model` (eval mode, float32, CPU copy) to the ONNX file `path`; returns the path.

    Input "image" (B, in_channels, S, S) float32 with S = img_size and B dynamic; output
    "logits" (B, K, S, S). dynamic_hw=True also makes S dynamic (smp models only; TransUNet ->
    ExportError, see the module docstring). dynamo: use torch's torch.export-based exporter
    (needs onnxscript) instead of the TorchScript tracer. The caller's model is not changed
    (a deep copy is exported). DDP / torch.compile wrappers are unwrapped.
    """
    path = _prepare_target(path)
    net = copy.deepcopy(unwrap(model)).cpu().float().eval()
    name = getattr(net, "name", type(net).__name__)
    if dynamic_hw and not supports_dynamic_hw(net):
        raise ExportError(f"{name}: dynamic height/width cannot be exported (its position "
                          "embedding grid is fixed at img_size); export with dynamic_hw=False "
                          "and tile larger images (inference.sliding_window_logits)")
    dummy = torch.zeros(_EXPORT_BATCH, in_channels, img_size, img_size)
    try:
        with torch.no_grad():
            net(dummy)
    except Exception as err:  # any failure of the trial forward is a wrong size / channel count
        raise ExportError(
            f"{name} does not accept input (B, {in_channels}, {img_size}, {img_size}) "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); pass the "
            "in_channels and img_size the model was built and trained with (the run's "
            "config.json)") from err
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if dynamo:
            _export_dynamo(net, dummy, tmp, opset, dynamic_hw)
        else:
            _export_torchscript(net, dummy, tmp, opset, dynamic_hw)
        with torch.no_grad():
            num_classes = net(dummy).shape[1]
        _finalise_file(tmp, num_classes=num_classes, img_size=img_size, dynamic_hw=dynamic_hw,
                       metadata={"model": name, "in_channels": in_channels, "img_size": img_size,
                                 "input": f"{INPUT_NAME} (B, {in_channels}, S, S) float32 in "
                                          "[-1, 1] as the cache normalises it",
                                 "output": f"{OUTPUT_NAME} (B, {num_classes}, S, S) float32"})
        os.replace(tmp, path)
    except OSError as err:
        raise ExportError(f"cannot write the ONNX file {path} ({err}); choose a path in a "
                          "writable folder with free space") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _export_torchscript(net: nn.Module, dummy: torch.Tensor, tmp: Path, opset: int,
                        dynamic_hw: bool) -> None:
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    with warnings.catch_warnings():
        # The tracer's deprecation notice, and TracerWarnings about shape checks in forward()
        # that are decided at export time (static height/width, documented above).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # timm's StdConv2d standardises its weight with F.batch_norm(training=True): exported
        # as BatchNormalization(training_mode=1) on the weight, which is what it computes.
        warnings.filterwarnings("ignore", message=".*operator 'batch_norm' is set to train=True")
        torch.onnx.export(net, (dummy,), str(tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes})


def _export_dynamo(net: nn.Module, dummy: torch.Tensor, tmp: Path, opset: int,
                   dynamic_hw: bool) -> None:
    try:
        import onnxscript  # noqa: F401  torch's dynamo exporter translates with it
    except ImportError as err:
        raise ExportError("dynamo=True needs the onnxscript package: pip install -r "
                          "requirements.txt (or use dynamo=False, the default)") from err
    shapes = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_hw:
        shapes[2] = 32 * torch.export.Dim("h32", min=1, max=128)
        shapes[3] = 32 * torch.export.Dim("w32", min=1, max=128)
    torch.onnx.export(net, (dummy,), str(tmp), dynamo=True, opset_version=opset,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes=({**shapes},), external_data=False, verbose=False)


def _finalise_file(path: Path, *, num_classes: int, img_size: int, dynamic_hw: bool,
                   metadata: dict) -> None:
    """Declare the output shape (B, K, S, S) (the tracer's shape inference leaves names such as
    'Convlogits_dim_3' there), add `metadata` as metadata_props, run onnx.checker, save."""
    try:
        import onnx
    except ImportError as err:
        raise ExportError("ONNX export needs the onnx package: pip install -r requirements.txt") from err
    proto = onnx.load(str(path))
    spatial = ["height", "width"] if dynamic_hw else [img_size, img_size]
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, ["batch", num_classes, *spatial]):
        dim.Clear()
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in metadata.items()})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


@functools.lru_cache(maxsize=4)
def _session(path: str, mtime_ns: int, size: int):
    """ONNX Runtime CPU session of a file, reused while the file is unchanged (mtime, size)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ExportError("check_onnx needs onnxruntime: pip install -r requirements.txt") from err
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def check_onnx(path: str | os.PathLike, model: nn.Module, inputs: torch.Tensor) -> float:
    """Run the ONNX file with ONNX Runtime (CPUExecutionProvider) on `inputs` (N, C, S, S) and
    return max |logits_onnx - logits_torch| against `model` in eval mode (float32, no grad;
    the model's train/eval mode is restored)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} does not exist; export it first (export_onnx)")
    stat = path.stat()
    session = _session(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    spec = session.get_inputs()[0]
    expected = tuple(spec.shape)  # ints for fixed axes, names for dynamic ones
    if len(expected) != inputs.ndim or any(isinstance(e, int) and e != s
                                           for e, s in zip(expected, inputs.shape)):
        raise ExportError(f"inputs {tuple(inputs.shape)} do not fit {path}, whose input "
                          f"'{spec.name}' is {expected}; pass (N, C, S, S) with the exported "
                          "channels and size")
    x = inputs.detach().float().cpu()
    out = session.run(None, {spec.name: x.numpy()})[0]
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            device = next(net.parameters()).device
            ref = net(x.to(device)).float().cpu().numpy()
    finally:
        net.train(was_training)
    if out.shape != ref.shape:
        raise ExportError(f"{path} returns {out.shape}, the model {ref.shape}: the file was "
                          "exported from another model; export this one again")
    return float(np.abs(out - ref).max())
