"""Slice-wise inference of a 2-D (2.5-D) model over a whole 3-D study, shared by training.py
(validation on whole studies) and test.py (evaluation, prediction).

Not a script; used as `inference.predict_study(model, cached_study, **factory.inference_options(cfg),
device=..., amp_dtype=..., tta=...)`, which takes the run's in-plane path: `predict_volume`
(inplane="resize": each slice resized to img_size²) or `predict_volume_sliding` (inplane="patch":
sliding-window tiles of img_size² at the cached resolution).
"""

from __future__ import annotations

import contextlib
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


def _forward_logits(model: torch.nn.Module, x: torch.Tensor, out_hw: tuple[int, int],
                    img_size: int, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """(B, C, X, Y) images -> (B, K, X, Y) float32 logits on the input grid (resized to
    img_size² for the model, autocast with amp_dtype, bilinear back on the logits). A NaN or
    infinite logit raises NonFiniteError: sigmoid / softmax would turn +-inf into a confident
    1 / 0."""
    x = to_model_grid(x, img_size)  # (B, C, S, S)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        logits = model(x)  # (B, K, S, S)
    if not torch.isfinite(logits).all():
        raise NonFiniteError(f"non-finite logits under autocast {amp_dtype}")
    return from_model_grid(logits.float(), out_hw)  # (B, K, X, Y)


def _forward_probs(model: torch.nn.Module, x: torch.Tensor, out_hw: tuple[int, int],
                   img_size: int, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """(B, C, X, Y) images -> (B, X, Y) float32 tumour probabilities on the input grid."""
    return torch.sigmoid(_forward_logits(model, x, out_hw, img_size, amp_dtype))[:, 0]


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
    def forward(x: torch.Tensor) -> torch.Tensor:  # (B, C, X, Y) -> (B, X, Y) probabilities
        return _forward_probs(model, x, tuple(x.shape[-2:]), img_size, amp_dtype)

    with _eval_mode(model):
        return _predict_slices(study, forward, batch_size=batch_size, device=device, tta=tta,
                               context_slices=context_slices, amp_dtype=amp_dtype)


def predict_aux_background(model: torch.nn.Module, study: Any, *, img_size: int,
                           batch_size: int = 32, device: torch.device | str = "cpu",
                           amp_dtype: torch.dtype | None = None, tta: bool = False,
                           context_slices: int = 0) -> np.ndarray:
    """The auxiliary head's background probability of one study, slice by slice, on the path of
    `predict_volume` (the same inputs, resizing, autocast and flip TTA; probabilities averaged):
    softmax over the K aux logits, class 0, on the study's grid. For an organ head that is "no
    organ here" (the phantom labels lesion voxels background), for an uptake head "no
    physiological uptake". Call it inside `models.aux_outputs(model)`, which makes the eval-mode
    forward return the aux logits after the lesion logits; evaluation and prediction never do
    (bench/component_filters.py is the one caller). Returns (X, Y, Z) float32; a model without
    the head, or one called outside aux_outputs, is a ValueError naming the fix."""
    head = getattr(model, "aux_head", None)
    n_aux = getattr(head, "out_channels", 0)
    if not n_aux or not getattr(head, "in_eval", False):
        raise ValueError("predict_aux_background needs a model with an auxiliary head, called "
                         "inside models.aux_outputs(model)")

    def forward(x: torch.Tensor) -> torch.Tensor:  # (B, C, X, Y) -> (B, X, Y) probabilities
        logits = _forward_logits(model, x, tuple(x.shape[-2:]), img_size, amp_dtype)
        return torch.softmax(logits[:, -n_aux:], dim=1)[:, 0]  # the aux logits come last

    with _eval_mode(model):
        return _predict_slices(study, forward, batch_size=batch_size, device=device, tta=tta,
                               context_slices=context_slices, amp_dtype=amp_dtype)


def _predict_slices(study: Any, forward: Any, *, batch_size: int, device: torch.device | str,
                    tta: bool, context_slices: int, amp_dtype: torch.dtype | None) -> np.ndarray:
    """The slice loop both predictors share: read batch_size slices (with their 2.5-D context)
    of the cached study, `forward` them ((B, C, X, Y) -> (B, X, Y) probabilities), average the
    flip TTA terms, and raise NonFiniteError naming the study and slices for a non-finite logit.
    Returns (X, Y, Z) float32."""
    device = torch.device(device)
    image = study.image()  # (Z, 2, X, Y) float16 memmap
    n_z, _, size_x, size_y = image.shape
    index = context_indices(n_z, context_slices)  # (Z, 2k+1)
    out = np.empty((size_x, size_y, n_z), dtype=np.float32)
    flips = [None, (-2,), (-1,)] if tta else [None]
    with torch.inference_mode():
        for start in range(0, n_z, batch_size):
            rows = index[start:start + batch_size]  # (B, 2k+1)
            x = np.asarray(image[rows.ravel()], dtype=np.float32)  # (B*(2k+1), 2, X, Y)
            x = torch.from_numpy(x.reshape(len(rows), -1, size_x, size_y)).to(device)
            probs = torch.zeros((len(rows), size_x, size_y), device=device)
            for dims in flips:
                xi = x if dims is None else torch.flip(x, dims)
                try:
                    p = forward(xi)  # (B, X, Y)
                except NonFiniteError:
                    raise NonFiniteError(
                        f"study {getattr(study, 'case_id', '?')}: the model gave non-finite "
                        f"logits in slices {start}-{start + len(rows) - 1} (autocast "
                        f"{amp_dtype}); evaluate in float32 (--amp=False) or check the "
                        "checkpoint") from None
                probs += p if dims is None else torch.flip(p, dims)
            probs /= len(flips)
            out[:, :, start:start + len(rows)] = probs.permute(1, 2, 0).cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------
# Sliding-window inference: tiles of patch x patch on the slice's own grid (no resampling)

PAD_VALUE = -1.0  # in the cache's [-1, 1] units: CT at the window's lower bound (air at the
# default ct_window (-1000, 1000) HU) and SUV 0 (no uptake), i.e. what lies outside the body.
# (nnU-Net pads with 0, the mean of its z-scored images; our 0 would be CT mid-window and SUV
# suv_max / 2, a tumour-like uptake.)
MIN_OVERLAP = 0.5


def tile_step(patch: int, overlap: float) -> int:
    """Step between tile starts: round(patch * (1 - overlap)), at least 1 pixel.

    overlap: fraction of a tile shared with its neighbour, 0.5 <= overlap < 1 (0.5 is nnU-Net's
    default, tile_step_size 0.5). Below 0.5 some pixels would be seen only near a tile's edge,
    where the network has the least context; with >= 0.5 every pixel farther than patch / 4
    from the image border lies in the central half of some tile.
    """
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch={patch!r}: the sliding-window tile size must be a positive int "
                         "(the model's training img_size, e.g. 224)")
    if not MIN_OVERLAP <= overlap < 1:
        raise ValueError(f"overlap={overlap}: sliding-window overlap must be in [{MIN_OVERLAP}, 1) "
                         "(0.5 = nnU-Net's default; 0.75 is smoother and 4x slower); set e.g. "
                         "overlap=0.5")
    return max(1, round(patch * (1.0 - overlap)))


def tile_starts(size: int, patch: int, step: int) -> list[int]:
    """Tile start offsets along one axis of length `size` (already >= patch, or one tile at 0):
    0, step, 2 step, ... while the tile ends inside, then one tile flush with the border
    (start size - patch), so the last step may be shorter than `step`.

    e.g. size 100, patch 32, step 16 -> [0, 16, 32, 48, 64, 68].
    (nnU-Net instead spreads the tiles evenly, step <= patch * step_size; both cover every
    pixel and keep at least the requested overlap between neighbours.)
    """
    if size <= patch:
        return [0]
    return [*range(0, size - patch, step), size - patch]


def gaussian_importance_map(patch: int, sigma_scale: float = 1.0 / 8,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """(patch, patch) float32 tile weights, highest at the centre (nnU-Net, Isensee et al. 2021,
    Nature Methods 18:203, "Gaussian importance weighting" of sliding-window predictions).

        w(i, j) = g(i) g(j) / max(g)^2,  g(i) = exp(-(i - c)^2 / (2 sigma^2)),
        c = (patch - 1) / 2 (the tile's centre),  sigma = sigma_scale * patch (nnU-Net: 1/8)

    so the maximum is 1 (the centre pixel for odd patch, the central 2 x 2 for even) and a
    corner gets ~exp(-16) = 1.1e-7 at sigma_scale 1/8. Values that underflow to 0 in float32
    (tiny sigma_scale) are replaced by the smallest non-zero value, as nnU-Net does, so every
    pixel of a tile has a positive weight and the weighted mean is never 0 / 0.
    Written here from that description: nnU-Net builds the map by filtering a unit impulse at
    index patch // 2 with scipy's gaussian_filter; the analytic form above is centred exactly,
    so a flipped tile gets the same weights.
    """
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale={sigma_scale}: must be > 0 (nnU-Net uses 1/8)")
    coords = torch.arange(patch, dtype=torch.float64) - (patch - 1) / 2.0
    g = torch.exp(-coords ** 2 / (2.0 * (sigma_scale * patch) ** 2))  # (patch,)
    w = (torch.outer(g, g) / g.max() ** 2).to(torch.float32)  # (patch, patch), max 1
    if (w == 0).any():
        w[w == 0] = w[w > 0].min()
    return w.to(device) if device is not None else w


def pad_to_patch(image: torch.Tensor, patch: int, value: float = PAD_VALUE
                 ) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """Pad (N, C, X, Y) to at least patch x patch, split evenly before / after each axis (extra
    pixel after), with `value` (PAD_VALUE: air / no uptake). Returns the padded tensor and the
    (slice_x, slice_y) that crops it back to (X, Y)."""
    size_x, size_y = image.shape[-2:]
    pad_x, pad_y = max(0, patch - size_x), max(0, patch - size_y)
    before_x, before_y = pad_x // 2, pad_y // 2
    if pad_x or pad_y:  # the last axis first: (Y before, Y after, X before, X after)
        pads = (before_y, pad_y - before_y, before_x, pad_x - before_x)
        image = torch.nn.functional.pad(image, pads, value=value)
    return image, (slice(before_x, before_x + size_x), slice(before_y, before_y + size_y))


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """torch.autocast on `device` with `amp_dtype`, or no autocast for None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """model.eval() inside the block, the previous train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def sliding_window_logits(model: torch.nn.Module, image: torch.Tensor, *, patch: int,
                          overlap: float = 0.5, batch_size: int = 32, gaussian: bool = True,
                          sigma_scale: float = 1.0 / 8,
                          amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits of a 2-D model over whole images, tile by tile, at the images' own resolution.

    image: (N, C, X, Y) on the model's device, any X, Y. Returns (N, K, X, Y) float32 logits.

    Tiles are patch x patch, starting every step = round(patch (1 - overlap)) pixels along
    each axis with the last one flush with the border (`tile_starts`); an image smaller than
    the patch along an axis is first padded to it with PAD_VALUE = -1 (air and zero uptake in
    the normalised cache), centred, and cropped back at the end. With w the tile weights
    (`gaussian_importance_map`, or all ones for gaussian=False) and f_t the logits of tile t,

        logits(p) = sum_t w(p - o_t) f_t(p - o_t) / sum_t w(p - o_t)   over tiles t covering p

    (o_t: the tile's offset), a weighted mean of logits. Logits, not probabilities, are
    averaged, as nnU-Net v2 does (it accumulates Gaussian-weighted network outputs and divides
    by the summed Gaussian; nnU-Net v1 averaged softmax outputs): the function returns logits
    so callers can threshold, calibrate or apply a sigmoid/softmax afterwards; for a model
    whose output at a pixel does not depend on the tile's position both means are exact.
    Flip test-time augmentation is left to the caller (predict_volume_sliding averages
    probabilities, as predict_volume does).

    batch_size: tiles per forward pass (tiles of several images are batched together).
    amp_dtype: autocast dtype (e.g. torch.bfloat16) on the image's device, or None for none;
        the logits are accumulated in float32 either way.
    The model runs in eval mode under torch.inference_mode(); its previous mode is restored.
    """
    if image.ndim != 4:
        raise ValueError(f"image of shape {tuple(image.shape)}: expected (N, C, X, Y)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    step = tile_step(patch, overlap)
    x, crop = pad_to_patch(image.float(), patch)
    n, _, size_x, size_y = x.shape
    device = x.device
    positions = [(a, b) for a in tile_starts(size_x, patch, step)
                 for b in tile_starts(size_y, patch, step)]
    weight = (gaussian_importance_map(patch, sigma_scale, device) if gaussian
              else torch.ones((patch, patch), device=device))  # (P, P)
    weight_sum = torch.zeros((size_x, size_y), device=device)  # (X', Y'), the same for every image
    for a, b in positions:
        weight_sum[a:a + patch, b:b + patch] += weight
    jobs = [(i, a, b) for i in range(n) for a, b in positions]
    logits_sum = None  # (N, K, X', Y'), allocated once K is known
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            tiles = torch.stack([x[i, :, a:a + patch, b:b + patch] for i, a, b in chunk])  # (B, C, P, P)
            with _autocast(device, amp_dtype):
                out = model(tiles)
            out = out.float()  # (B, K, P, P)
            if out.ndim != 4 or out.shape[0] != len(chunk) or out.shape[-2:] != (patch, patch):
                raise ValueError(f"the model returned {tuple(out.shape)} for tiles {tuple(tiles.shape)}; "
                                 "sliding-window inference needs logits (B, K, P, P) of the tile's size")
            if logits_sum is None:
                logits_sum = torch.zeros((n, out.shape[1], size_x, size_y), device=device)
            for (i, a, b), tile_logits in zip(chunk, out):
                logits_sum[i, :, a:a + patch, b:b + patch] += tile_logits * weight
    return (logits_sum / weight_sum)[:, :, crop[0], crop[1]]


def predict_volume_sliding(model: torch.nn.Module, study: Any, *, patch: int, overlap: float = 0.5,
                           batch_size: int = 32, device: torch.device | str = "cpu",
                           amp_dtype: torch.dtype | None = None, tta: bool = False,
                           context_slices: int = 0, gaussian: bool = True,
                           sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Tumour probabilities of one study, slice by slice, with sliding-window tiles.

    Same input convention as `predict_volume`: study is a `data.CachedStudy` (`.image()` float16
    (Z, 2, X, Y) in [-1, 1]); slice z gets channels [CT_{z-k}, PET_{z-k}, ..., CT_{z+k},
    PET_{z+k}] (k = context_slices, clamped at the ends), C = 2 (2k + 1). Unlike predict_volume
    the slice is not resampled to img_size: `sliding_window_logits` tiles it at its own
    resolution with patch x patch tiles (the model must have been trained on patches at that
    resolution). p = sigmoid(logits of channel 0) in float32.

    tta: flip test-time augmentation, p = mean(f(x), flip_X(f(flip_X x)), flip_Y(f(flip_Y x)))
    (probabilities averaged, as in predict_volume). batch_size: slices read per chunk and tiles
    per forward pass. amp_dtype: autocast dtype or None (see sliding_window_logits).

    Returns float32 probabilities (X, Y, Z) on the study's grid.
    """
    def forward(x: torch.Tensor) -> torch.Tensor:  # (B, C, X, Y) -> (B, X, Y) probabilities
        logits = sliding_window_logits(model, x, patch=patch, overlap=overlap,
                                       batch_size=batch_size, gaussian=gaussian,
                                       sigma_scale=sigma_scale, amp_dtype=amp_dtype)
        if not torch.isfinite(logits).all():  # never a silent 0 / 1
            raise NonFiniteError(f"non-finite logits under autocast {amp_dtype}")
        return torch.sigmoid(logits[:, 0])

    return _predict_slices(study, forward, batch_size=batch_size, device=device, tta=tta,
                           context_slices=context_slices, amp_dtype=amp_dtype)


INPLANE_MODES = ("resize", "patch")


def predict_study(model: torch.nn.Module, study: Any, *, inplane: str = "resize", img_size: int,
                  overlap: float = 0.5, batch_size: int = 32, device: torch.device | str = "cpu",
                  amp_dtype: torch.dtype | None = None, tta: bool = False,
                  context_slices: int = 0) -> np.ndarray:
    """Tumour probabilities (X, Y, Z) float32 of one cached study on its cache grid, by the path
    the model was trained for; the one call validation (training.validate_study), evaluation,
    threshold tuning and prediction (test.py) make, with `factory.inference_options(cfg)`.

    inplane "resize": `predict_volume` (every slice resized to img_size², logits resized back);
    "patch": `predict_volume_sliding` with patch = img_size and `overlap` (Gaussian-weighted
    tiles at the slice's own resolution, the model having been trained on img_size² crops).
    A study cached with target_spacing comes back on the resampled grid: CachedStudy.to_original
    maps it onto the study's own grid.
    """
    common = dict(batch_size=batch_size, device=device, amp_dtype=amp_dtype, tta=tta,
                  context_slices=context_slices)
    if inplane == "resize":
        return predict_volume(model, study, img_size=img_size, **common)
    if inplane == "patch":
        return predict_volume_sliding(model, study, patch=img_size, overlap=overlap, **common)
    raise ValueError(f"inplane={inplane!r}: use one of {', '.join(INPLANE_MODES)} "
                     "(the run's --inplane setting)")
