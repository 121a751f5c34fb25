"""Slice-wise inference of a 2-D (2.5-D) model over a whole 3-D study, shared by training.py
(validation on whole studies) and test.py (evaluation, prediction).

Not a script; used as `inference.predict_volume(model, cached_study, img_size=..., device=...)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data import from_model_grid, to_model_grid


def context_indices(n_slices: int, context_slices: int) -> np.ndarray:
    """(Z, 2k+1) slice indices z-k .. z+k for every z, clamped at the ends (as the dataset does)."""
    offsets = np.arange(-context_slices, context_slices + 1)
    return np.clip(np.arange(n_slices)[:, None] + offsets[None, :], 0, n_slices - 1)


class NonFiniteError(RuntimeError):
    """The model produced NaN / inf for a study (an overflow under autocast, or broken weights)."""

    user_error = True


def _forward_probs(model: torch.nn.Module, x: torch.Tensor, out_hw: tuple[int, int],
                   img_size: int, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """(B, C, X, Y) images -> (B, X, Y) float32 probabilities on the input grid."""
    x = to_model_grid(x, img_size)  # (B, C, S, S)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        logits = model(x)  # (B, 1, S, S)
    if not torch.isfinite(logits).all():  # sigmoid would turn +-inf into a confident 1 / 0
        raise NonFiniteError(f"non-finite logits under autocast {amp_dtype}")
    logits = from_model_grid(logits.float(), out_hw)  # (B, 1, X, Y), bilinear on logits
    return torch.sigmoid(logits)[:, 0]


def predict_volume(model: torch.nn.Module, study: Any, *, img_size: int, batch_size: int = 32,
                   device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                   tta: bool = False, context_slices: int = 0) -> np.ndarray:
    """Tumour probabilities of one study, slice by slice.

    study: a `data.CachedStudy` (`.image()` float16 (Z, 2, X, Y) in [-1, 1], `.shape` (X, Y, Z)).
    Each axial slice z gets the same input as in training (`PetCtSliceDataset`): the CT/PET
    pairs of slices z-k .. z+k (k = context_slices, clamped at the first/last slice), i.e.
    C = 2 (2k + 1) channels ordered [CT_{z-k}, PET_{z-k}, ..., CT_{z+k}, PET_{z+k}], resized to
    img_size² with `data.to_model_grid`; the logits are resized back with `data.from_model_grid`
    and passed through a float32 sigmoid. The forward pass runs under autocast with `amp_dtype`
(the dtype the run trained with, `runtime.resolve_amp`; None = float32).

    tta: flip test-time augmentation, p = mean(f(x), flip_X(f(flip_X x)), flip_Y(f(flip_Y x)))
    over the identity and a flip of each in-plane axis (probabilities averaged, not logits).

    Returns float32 probabilities (X, Y, Z) on the study's grid. A NaN or infinite logit (e.g. an
    fp16 overflow) raises NonFiniteError naming the study: it is never thresholded into an empty
    mask silently.
    """
    device = torch.device(device)
    image = study.image()  # (Z, 2, X, Y) float16 memmap
    n_z, _, size_x, size_y = image.shape
    index = context_indices(n_z, context_slices)  # (Z, 2k+1)
    out = np.empty((size_x, size_y, n_z), dtype=np.float32)
    flips = [None, (-2,), (-1,)] if tta else [None]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n_z, batch_size):
                rows = index[start:start + batch_size]  # (B, 2k+1)
                x = np.asarray(image[rows.ravel()], dtype=np.float32)  # (B*(2k+1), 2, X, Y)
                x = torch.from_numpy(x.reshape(len(rows), -1, size_x, size_y)).to(device)
                probs = torch.zeros((len(rows), size_x, size_y), device=device)
                for dims in flips:
                    xi = x if dims is None else torch.flip(x, dims)
                    try:
                        p = _forward_probs(model, xi, (size_x, size_y), img_size, amp_dtype)
                    except NonFiniteError:
                        raise NonFiniteError(
                            f"study {getattr(study, 'case_id', '?')}: the model gave non-finite "
                            f"logits in slices {start}-{start + len(rows) - 1} (autocast "
                            f"{amp_dtype}); evaluate in float32 (--amp=False) or check the "
                            "checkpoint") from None
                    probs += p if dims is None else torch.flip(p, dims)  # (B, X, Y)
                probs /= len(flips)
                out[:, :, start:start + len(rows)] = probs.permute(1, 2, 0).cpu().numpy()
    finally:
        model.train(was_training)
    return out
