"""Pictures of a study's segmentation: overlays of ground truth and prediction on the PET.

    from pictures import save_overlay
    png = overlay_png(suv, ref, pred, spacing, title="case 1")   # (X, Y, Z) arrays -> PNG bytes

matplotlib without pyplot (an Agg canvas per figure, no global state); numpy / scipy otherwise. It returns
bytes and writes nothing: the caller decides where (test.py writes them atomically).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from scipy import ndimage

from metrics import CONNECTIVITY_18


def _overlay_slices(ref: np.ndarray, pred: np.ndarray, max_slices: int) -> list[int]:
    """Axial slices through the centre of each ground-truth lesion (largest first), else
    through the largest predicted component, else the middle slice."""
    for mask in (ref, pred):
        labels, n = ndimage.label(mask, structure=CONNECTIVITY_18)
        if n:
            sizes = np.bincount(labels.ravel())[1:]
            order = np.argsort(-sizes, kind="stable")[:max_slices] + 1
            centres = ndimage.center_of_mass(mask, labels, order)
            return sorted({int(round(c[2])) for c in centres})
    return [mask.shape[2] // 2]


def overlay_png(suv: np.ndarray, ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                title: str = "", max_slices: int = 4) -> bytes:
    """PNG: coronal PET maximum-intensity projection + axial PET slices through the lesions,
    ground truth contoured in green, prediction in red. Arrays (X, Y, Z); matplotlib without
    pyplot (Agg canvas, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ref, pred = np.asarray(ref) > 0, np.asarray(pred) > 0
    vmax = max(float(np.percentile(suv, 99.9)), 1e-6)
    zs = _overlay_slices(ref, pred, max_slices)
    fig = Figure(figsize=(3.2 * (1 + len(zs)), 4.2), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(zs), squeeze=False)[0]
    sx, sy, sz = (float(s) for s in spacing)
    # coronal MIP: max over Y (anterior-posterior), shown with head up: (Z, X) flipped on Z
    panels = [(suv.max(axis=1).T, ref.any(axis=1).T, pred.any(axis=1).T, sz / sx, "PET MIP")]
    panels += [(suv[:, :, z].T, ref[:, :, z].T, pred[:, :, z].T, sy / sx, f"z = {z}") for z in zs]
    for ax, (img, gt, pr, aspect, label) in zip(axes, panels):
        ax.imshow(img, cmap="gray_r", vmin=0, vmax=vmax, aspect=aspect, origin="lower")
        for mask, colour in ((gt, "lime"), (pr, "red")):
            if mask.any():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title}\ngreen: ground truth, red: prediction", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
