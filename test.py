"""Evaluation and prediction: honest per-study 3-D metrics, autoPET FPV/FNV, masks and pictures.

    python test.py --run_dir=runs/<name>                        # re-evaluate a finished run's test studies
    python test.py --run_dir=runs/<name> --checkpoint=last --tta=True
    python test.py --run_dir=runs/<name> --data_dir=/data/other # every labelled study of another folder
    python test.py --run_dir=runs/<name> --predict_dir=/data/new --output_dir=/tmp/masks   # unlabelled

The same commands run on a GPU: the run's `config.json` says which device to use (`device="auto"`
picks CUDA when present). Everything is rebuilt from `runs/<name>/config.json`, never from this
file's defaults. Outputs (DESIGN.md "Run directory"): `eval/per_case.csv`, `eval/summary.json`,
`eval/predictions/<case_id>.nii.gz`, `eval/overlays/<case_id>.png`.

Metrics follow the autoPET III/IV official evaluation (REFERENCE.md §4, docs/evaluation.md):
Dice per 3-D study, false-positive / false-negative volume over 18-connected components, and an
explicit empty-case policy instead of MedPy's accidents. (The file is named test.py after the
TransUNet convention; pytest only collects `tests/`, see pyproject.toml.)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import nibabel as nib
import numpy as np
import torch
from medpy.metric import binary as mp
from scipy import ndimage
from tqdm import tqdm

import config
import data
import models
import runtime
from data.cache import load_cached
from data.split import load_split
from inference import predict_volume

log = logging.getLogger(__name__)

# 18-connectivity (faces + edges, not corners), as in the autoPET evaluation (cc3d connectivity=18).
CONNECTIVITY_18 = ndimage.generate_binary_structure(3, 2)

# per_case.csv column order (DESIGN.md); extra columns may follow these.
CSV_COLUMNS = ("case_id", "has_tumor", "dice", "iou", "hd95_mm", "assd_mm", "sensitivity",
               "precision", "fpv_ml", "fnv_ml", "n_lesions", "n_lesions_detected",
               "n_fp_components")


class EvaluationError(ValueError):
    """A user mistake at evaluation time: missing run directory, checkpoint, split or study."""

    user_error = True


# ---------------------------------------------------------------------------------------------
# per-study metrics


def _union_bbox(pred: np.ndarray, ref: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the bounding box of pred | ref grown by `margin` voxels (clipped to the volume)."""
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin,
                                                             union.shape[axis])))
    return tuple(box)


def _component_overlap(mask: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """18-connected components of `mask`: (voxel count per component, touches `other` per component)."""
    labels, n = ndimage.label(mask, structure=CONNECTIVITY_18)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    touched = np.bincount(labels[other].ravel(), minlength=n + 1)[1:] > 0
    return sizes, touched


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, Any]:
    """Segmentation metrics of one 3-D study.

    pred, ref: (X, Y, Z) arrays, any non-zero value is foreground. spacing: voxel size in mm in
    array-axis order (nibabel arrays are x, y, z). Voxel volume v = prod(spacing) / 1000 ml.

    Overlap (MedPy 0.5.2 `dc`, `jc`, `recall`, `precision`), with TP/FP/FN voxel counts:
        dice = 2 TP / (2 TP + FP + FN)     iou = TP / (TP + FP + FN)
        sensitivity = TP / (TP + FN)       precision = TP / (TP + FP)
    Surface distances (MedPy `hd95`, `assd`, connectivity 1, in mm): 95th percentile of the
    symmetric surface distances, and the average symmetric surface distance (bit-identical to
    MedPy's functions on the full volume, computed once for both, see `_hd95_assd`).
    autoPET (official III/IV evaluation, 18-connected components):
        fpv_ml = v * voxels of predicted components that touch no ground-truth voxel
        fnv_ml = v * voxels of ground-truth components that no predicted voxel touches
    Lesion-wise: n_lesions (ground-truth components), n_lesions_detected (those touched by the
    prediction), n_fp_components (predicted components touching no ground truth).

    Empty-case policy (autoPET III/IV convention; never raises, MedPy never sees an empty mask):
        ref empty  -> dice, iou, fnv_ml, sensitivity = NaN (a tumour-free study is judged by fpv_ml)
        pred empty -> fpv_ml = 0, precision = NaN
        either empty -> hd95_mm, assd_mm = NaN
    So ref empty & pred empty gives fpv_ml = 0 and NaN for everything else but the counts.

    All metrics are computed on the crop to the union bounding box of both masks (+1 voxel):
    overlap counts, components and distances cannot change (tested bit-identical), and the
    distance transform then costs the size of the lesions, not of the body.
    """
    pred = np.asarray(pred) != 0
    ref = np.asarray(ref) != 0
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and ref {ref.shape} must be 3-D arrays of one shape")
    spacing = tuple(float(s) for s in spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    nan = float("nan")
    row: dict[str, Any] = dict(
        has_tumor=n_ref > 0, dice=nan, iou=nan, hd95_mm=nan, assd_mm=nan, sensitivity=nan,
        precision=nan, fpv_ml=0.0, fnv_ml=nan, n_lesions=0, n_lesions_detected=0,
        n_fp_components=0, pred_volume_ml=n_pred * voxel_ml, ref_volume_ml=n_ref * voxel_ml)
    if n_pred == 0 and n_ref == 0:
        return row
    box = _union_bbox(pred, ref)
    p, r = pred[box], ref[box]

    pred_sizes, pred_hits = _component_overlap(p, r)
    ref_sizes, ref_hits = _component_overlap(r, p)
    row["fpv_ml"] = float(pred_sizes[~pred_hits].sum()) * voxel_ml
    row["n_fp_components"] = int((~pred_hits).sum())
    if n_ref > 0:
        row["dice"] = float(mp.dc(p, r))
        row["iou"] = float(mp.jc(p, r))
        row["sensitivity"] = float(mp.recall(p, r))
        row["fnv_ml"] = float(ref_sizes[~ref_hits].sum()) * voxel_ml
        row["n_lesions"] = int(ref_sizes.size)
        row["n_lesions_detected"] = int(ref_hits.sum())
    if n_pred > 0:
        row["precision"] = float(mp.precision(p, r))
    if n_pred > 0 and n_ref > 0:
        row["hd95_mm"], row["assd_mm"] = _hd95_assd(p, r, spacing)
    return row


def _hd95_assd(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """MedPy's `hd95` and `assd`, sharing one pair of surface-distance computations.

    Both MedPy functions compute the same two directed surface-distance arrays (one distance
    transform each); computing them once and combining them exactly as MedPy 0.5.2 does
    (`percentile(hstack, 95)`, `concatenate(...).mean()`) halves the cost. Equality with the
    public functions is tested (tests/test_metrics.py), so a MedPy change would be caught.
    """
    surface_distances = getattr(mp, "__surface_distances")  # module-level, not name-mangled
    d_pred = surface_distances(pred, ref, spacing, 1)
    d_ref = surface_distances(ref, pred, spacing, 1)
    hd95 = np.percentile(np.hstack((d_pred, d_ref)), 95)
    assd = np.concatenate([d_pred, d_ref]).mean()
    return float(hd95), float(assd)


# ---------------------------------------------------------------------------------------------
# cohort summary


def _bootstrap_ci(values: np.ndarray, n_bootstrap: int, rng: np.random.Generator,
                  ) -> Optional[list[float]]:
    """Percentile bootstrap 95 % CI of the mean, resampling studies with replacement."""
    if values.size == 0 or n_bootstrap <= 0:
        return None
    idx = rng.integers(0, values.size, size=(n_bootstrap, values.size))  # (B, n)
    means = values[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def _mean(rows: list[dict], key: str, where=lambda row: True) -> np.ndarray:
    """Finite values of `key` over the rows selected by `where` (NaN = not defined, skipped)."""
    values = np.array([float(row[key]) for row in rows if where(row)], dtype=np.float64)
    return values[np.isfinite(values)]


def summarise_cohort(rows: Sequence[dict], n_bootstrap: int = 1000, seed: int = 0,
                     ) -> dict[str, Any]:
    """Cohort figures from `case_metrics` rows (one per study).

    Means skip NaN, so (autoPET III/IV): mean Dice / IoU / FNV / sensitivity are over studies
    with tumour, mean FPV is reported over tumour-free studies (`fpv_ml_tumor_free`, the
    false alarms a healthy patient gets) and over all studies (`fpv_ml`), HD95 / ASSD over
    studies where both masks are non-empty; `n` beside every mean says how many studies it
    covers. Lesion detection pools counts over all studies:
        TP = sum n_lesions_detected, FN = sum n_lesions - TP, FP = sum n_fp_components
        recall = TP / (TP + FN), precision = TP / (TP + FP), F1 = 2 TP / (2 TP + FP + FN)
    `ci95`: percentile bootstrap (n_bootstrap resamples of the studies a mean covers, seeded)
    for Dice, FPV and FNV.
    """
    rows = list(rows)
    rng = np.random.default_rng(seed)
    tumour = lambda row: bool(row["has_tumor"])  # noqa: E731
    free = lambda row: not bool(row["has_tumor"])  # noqa: E731
    subsets = {  # name -> (column, rows it is averaged over)
        "dice": ("dice", tumour), "iou": ("iou", tumour), "sensitivity": ("sensitivity", tumour),
        "precision": ("precision", lambda row: True), "fnv_ml": ("fnv_ml", tumour),
        "fpv_ml": ("fpv_ml", lambda row: True), "fpv_ml_tumor_free": ("fpv_ml", free),
        "fpv_ml_tumor": ("fpv_ml", tumour), "hd95_mm": ("hd95_mm", lambda row: True),
        "assd_mm": ("assd_mm", lambda row: True)}
    means: dict[str, dict[str, Any]] = {}
    for name, (column, where) in subsets.items():
        values = _mean(rows, column, where)
        means[name] = {"mean": float(values.mean()) if values.size else float("nan"),
                       "n": int(values.size)}
        if name in ("dice", "fpv_ml_tumor_free", "fpv_ml", "fnv_ml"):
            means[name]["ci95"] = _bootstrap_ci(values, n_bootstrap, rng)

    tp = sum(int(row["n_lesions_detected"]) for row in rows)
    fn = sum(int(row["n_lesions"]) for row in rows) - tp
    fp = sum(int(row["n_fp_components"]) for row in rows)
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {
        "n_studies": len(rows),
        "n_tumor": sum(tumour(row) for row in rows),
        "n_tumor_free": sum(free(row) for row in rows),
        "n_tumor_free_with_fp": sum(free(row) and float(row["fpv_ml"]) > 0 for row in rows),
        "n_tumor_missed": sum(tumour(row) and int(row["n_lesions_detected"]) == 0 for row in rows),
        "metrics": means,
        "lesions": {"n_lesions": tp + fn, "detected": tp, "false_positive_components": fp,
                    "recall": ratio(tp, tp + fn), "precision": ratio(tp, tp + fp),
                    "f1": ratio(2 * tp, 2 * tp + fp + fn)},
        "bootstrap": {"n_bootstrap": n_bootstrap, "seed": seed, "method": "percentile"},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A short plain-text table of a `summarise_cohort` result."""
    def ci(entry: dict) -> str:
        bounds = entry.get("ci95")
        return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""

    m = summary["metrics"]
    lines = [f"studies: {summary['n_studies']} ({summary['n_tumor']} with tumour, "
             f"{summary['n_tumor_free']} tumour-free; {summary['n_tumor_free_with_fp']} "
             f"tumour-free with false positives, {summary['n_tumor_missed']} tumour studies "
             f"with no lesion found)",
             f"{'metric':<26}{'mean':>10}{'n':>6}  95% CI"]
    rows = [("Dice (tumour studies)", "dice"), ("IoU (tumour studies)", "iou"),
            ("FPV ml (tumour-free)", "fpv_ml_tumor_free"), ("FPV ml (all)", "fpv_ml"),
            ("FNV ml (tumour studies)", "fnv_ml"), ("HD95 mm", "hd95_mm"),
            ("ASSD mm", "assd_mm"), ("sensitivity (voxels)", "sensitivity"),
            ("precision (voxels)", "precision")]
    for label, key in rows:
        lines.append(f"{label:<26}{m[key]['mean']:>10.3f}{m[key]['n']:>6}  {ci(m[key])}")
    les = summary["lesions"]
    lines.append(f"lesions: {les['detected']}/{les['n_lesions']} detected, "
                 f"{les['false_positive_components']} false-positive components; recall "
                 f"{les['recall']:.3f}, precision {les['precision']:.3f}, F1 {les['f1']:.3f}")
    return "\n".join(lines)



# ---------------------------------------------------------------------------------------------
# evaluation of a run


def postprocess_mask(mask: np.ndarray, *, spacing: Sequence[float], suv: Optional[np.ndarray] = None,
                     suv_floor: float = 0.0, min_component_ml: float = 0.0) -> np.ndarray:
    """Optional clean-up of a binary (X, Y, Z) prediction (REFERENCE.md §3):
    drop voxels with SUV < suv_floor (needs `suv`), then drop 18-connected components smaller
    than min_component_ml (volume = voxels * prod(spacing) / 1000). Zero settings disable."""
    mask = np.asarray(mask, dtype=bool)
    if suv_floor > 0:
        mask = mask & (suv >= suv_floor)
    if min_component_ml > 0 and mask.any():
        labels, n = ndimage.label(mask, structure=CONNECTIVITY_18)
        sizes_ml = np.bincount(labels.ravel(), minlength=n + 1) * (float(np.prod(spacing)) / 1000)
        keep = sizes_ml >= min_component_ml
        keep[0] = False
        mask = keep[labels]
    return mask


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def save_mask_nifti(mask: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Binary (X, Y, Z) mask -> uint8 NIfTI with the study's affine (atomic: temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), np.asarray(affine, np.float64))
    image.set_qform(image.affine, code=1)  # scanner coordinates, so viewers align with the PET
    image.set_sform(image.affine, code=1)
    tmp = path.with_name(f".tmp-{path.name}")  # keeps the .nii.gz suffix nibabel reads
    nib.save(image, tmp)
    os.replace(tmp, path)


def _json_safe(value: Any) -> Any:
    """NaN / inf -> None so that summary.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_per_case_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """per_case.csv: CSV_COLUMNS first (NaN written as `nan`), other keys after them."""
    extra = [k for k in rows[0] if k not in CSV_COLUMNS] if rows else []
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()})
    _atomic_write_bytes(Path(path), buffer.getvalue().encode())


def _study_volumes(cached: Any, suv_max: float) -> tuple[np.ndarray, np.ndarray, str]:
    """(SUV, mask) of a study on its (X, Y, Z) grid, from the original files when they can be
    read back (the mask is then exactly the user's), else recovered from the cache (the mask
    is a voxel-exact copy; SUV = (ch1 + 1) * suv_max / 2, float16, clipped at suv_max)."""
    try:
        study = data.load_study(cached.source)
        if study.case_id == cached.case_id and tuple(study.shape) == tuple(cached.shape):
            mask = study.mask if study.mask is not None else np.zeros(study.shape, np.uint8)
            return study.pet, mask, "original"
    except data.DataError as err:
        log.debug("%s: reading %s failed (%s); using the cache", cached.case_id, cached.source, err)
    image = cached.image()  # (Z, 2, X, Y)
    suv = (np.moveaxis(np.asarray(image[:, 1], np.float32), 0, -1) + 1.0) * (suv_max / 2.0)
    mask = np.moveaxis(np.asarray(cached.mask()), 0, -1)  # (Z, X, Y) -> (X, Y, Z)
    return suv, mask, "cache"


def load_run_model(run_dir: Path, cfg: config.Config, checkpoint: str,
                   device: torch.device) -> torch.nn.Module:
    """Build the run's model from its config and load `checkpoints/<checkpoint>.pt`."""
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise EvaluationError(f"{path} not found; train first (python main.py) or pick "
                              f"--checkpoint=best|last that exists in {path.parent}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is the user's file
        raise EvaluationError(f"{path} is not a readable checkpoint ({err}); re-train or copy "
                              f"it again") from None
    # DDP / torch.compile wrappers prefix the parameter names
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    options = dict(n_skip=cfg.n_skip) if cfg.model.startswith("transunet") else {}
    model = models.build_model(cfg.model, in_channels=cfg.in_channels, num_classes=1,
                               img_size=cfg.img_size, **options)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise EvaluationError(f"{path} does not fit model {cfg.model!r} of {run_dir}/config.json "
                              f"({str(err).splitlines()[0]}); was config.json edited?") from None
    return model.to(device)


def cache_studies(cfg: config.Config, data_dir: str, require_mask: bool = True) -> list:
    """Every study under `data_dir`, preprocessed once into the run's cache (main.py uses it too)."""
    # absolute paths: the run's cases.json and the cache's sources stay valid from any folder
    refs = data.find_studies(Path(data_dir).absolute(), layout=cfg.layout,
                             ct_channel=cfg.ct_channel, pet_channel=cfg.pet_channel,
                             require_mask=require_mask)
    return data.prepare_cache(refs, Path(cfg.cache_dir).absolute() / "studies",
                              ct_window=cfg.ct_window, suv_max=cfg.suv_max, resample=cfg.resample)


def _test_studies(run_dir: Path, cfg: config.Config, data_dir: Optional[str],
                  subset: str = "test") -> list:
    """The run's test (or "val") studies (split.json + cases.json), or every labelled study of
    data_dir."""
    if data_dir is not None:
        return cache_studies(cfg, data_dir)
    cases_path = run_dir / "cases.json"
    try:
        directories = json.loads(cases_path.read_text())
    except FileNotFoundError:
        raise EvaluationError(f"{cases_path} not found; it is written by main.py. Pass "
                              f"--data_dir=<labelled studies> to evaluate on a folder") from None
    by_id = {}
    for directory in directories:
        cached = load_cached(directory)
        by_id[cached.case_id] = cached
    test_ids = load_split(run_dir / "split.json")[subset]
    missing = [c for c in test_ids if c not in by_id]
    if missing:
        raise EvaluationError(f"{subset} studies {missing[:5]} of {run_dir}/split.json are not in "
                              f"{cases_path}; re-run main.py or pass --data_dir")
    if not test_ids:
        raise EvaluationError(f"{run_dir}/split.json has no {subset} studies (n_{subset}=0); "
                              f"pass --data_dir=<labelled studies>")
    return [by_id[c] for c in test_ids]


def _settings(cfg: config.Config, tta: Optional[bool], postprocess: Optional[dict],
              device: Optional[torch.device | str]) -> dict:
    post = {"min_component_ml": cfg.min_component_ml, "suv_floor": cfg.suv_floor,
            **(postprocess or {})}
    return {"threshold": cfg.threshold, "tta": cfg.tta if tta is None else bool(tta),
            "postprocess": post, "device": str(runtime.resolve_device(str(device or cfg.device)))}


THRESHOLD_CANDIDATES = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95


def choose_threshold(model: torch.nn.Module, studies: Sequence[Any], *, img_size: int,
                     batch_size: int, device: torch.device, amp: bool, tta: bool,
                     context_slices: int, suv_max: float,
                     candidates: Sequence[float] = THRESHOLD_CANDIDATES) -> tuple[float, dict]:
    """The probability threshold that maximises the pooled Dice 2TP / (2TP + FP + FN) over
    `studies` (the VALIDATION studies: test studies never choose anything, STUDY.md). Ties go to
    the higher threshold (fewer false positives). Returns (threshold, {threshold: pooled Dice})."""
    counts = np.zeros((len(candidates), 3))  # TP, FP, FN per candidate
    for cached in studies:
        prob = predict_volume(model, cached, img_size=img_size, batch_size=batch_size,
                              device=device, amp=amp, tta=tta, context_slices=context_slices)
        _, ref, _ = _study_volumes(cached, suv_max)
        ref = ref.astype(bool)
        for k, threshold in enumerate(candidates):
            pred = prob > threshold
            counts[k] += [np.count_nonzero(pred & ref), np.count_nonzero(pred & ~ref),
                          np.count_nonzero(~pred & ref)]
    tp, fp, fn = counts.T
    dice = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    best = max(range(len(candidates)), key=lambda k: (dice[k], candidates[k]))
    return float(candidates[best]), {f"{c:.2f}": float(d) for c, d in zip(candidates, dice)}


def _threshold(run_dir: Path, cfg: config.Config, model: torch.nn.Module, settings: dict,
               amp: bool) -> tuple[float, Optional[dict]]:
    """cfg.threshold, or (cfg.tune_threshold) the one chosen on the run's validation studies."""
    if not cfg.tune_threshold:
        return cfg.threshold, None
    studies = _test_studies(run_dir, cfg, None, subset="val")
    threshold, curve = choose_threshold(
        model, studies, img_size=cfg.img_size, batch_size=cfg.eval_batch_size,
        device=torch.device(settings["device"]), amp=amp, tta=settings["tta"],
        context_slices=cfg.context_slices, suv_max=cfg.suv_max)
    log.info("threshold %.2f chosen on %d validation studies (pooled Dice %.3f)", threshold,
             len(studies), curve[f"{threshold:.2f}"])
    return threshold, {"chosen": threshold, "n_val_studies": len(studies), "val_pooled_dice": curve}


def evaluate(run_dir: str | os.PathLike, *, data_dir: Optional[str] = None,
             checkpoint: str = "best", tta: Optional[bool] = None,
             postprocess: Optional[dict] = None, device: Optional[torch.device | str] = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate a finished run on its test studies (or on every labelled study of `data_dir`).

    Everything comes from `run_dir/config.json` (model, image size, context slices, threshold,
    TTA, post-processing, cache); `tta`, `postprocess` ({"min_component_ml", "suv_floor"}) and
    `device` override it. Per study: probabilities (inference.predict_volume) > threshold ->
    metrics (case_metrics) vs the study's own mask; with post-processing configured, the
    post-processed mask is scored too (columns `pp_*`, summary "postprocessed") and is the
    one written. Writes eval/per_case.csv, eval/summary.json, eval/predictions/<case_id>.nii.gz,
    eval/overlays/<case_id>.png (atomically) and returns the summary dict.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvaluationError(f"run directory {run_dir} not found; pass --run_dir=runs/<name>")
    cfg = config.load_config(run_dir / "config.json")
    settings = _settings(cfg, tta, postprocess, device)
    device = torch.device(settings["device"])
    post = settings["postprocess"]
    use_post = post["min_component_ml"] > 0 or post["suv_floor"] > 0
    studies = _test_studies(run_dir, cfg, data_dir)
    model = load_run_model(run_dir, cfg, checkpoint, device)
    out = run_dir / "eval"
    amp = cfg.amp == "True" or (cfg.amp == "auto" and device.type == "cuda")
    threshold, tuning = _threshold(run_dir, cfg, model, settings, amp)
    settings["threshold"] = threshold

    rows, pp_rows = [], []
    bar = tqdm(studies, desc="evaluate", unit="study", disable=not progress)
    for cached in bar:
        prob = predict_volume(model, cached, img_size=cfg.img_size, batch_size=cfg.eval_batch_size,
                              device=device, amp=amp, tta=settings["tta"],
                              context_slices=cfg.context_slices)  # (X, Y, Z)
        suv, ref, origin = _study_volumes(cached, cfg.suv_max)
        pred = prob > threshold
        row = {"case_id": cached.case_id, **case_metrics(pred, ref, cached.spacing),
               "mask_from": origin}
        rows.append(row)
        if use_post:
            pred = postprocess_mask(pred, spacing=cached.spacing, suv=suv, **post)
            pp_rows.append({"case_id": cached.case_id, **case_metrics(pred, ref, cached.spacing)})
            row.update({f"pp_{k}": v for k, v in pp_rows[-1].items() if k in CSV_COLUMNS[2:]})
        save_mask_nifti(pred, np.asarray(cached.affine), out / "predictions" / f"{cached.case_id}.nii.gz")
        if cfg.save_overlays:
            save_overlay(suv, ref, pred, cached.spacing, out / "overlays" / f"{cached.case_id}.png",
                         title=f"{cached.case_id}  Dice {row['dice']:.3f}  FPV {row['fpv_ml']:.2f} ml")
        bar.set_postfix(dice=f"{row['dice']:.3f}")

    summary = summarise_cohort(rows, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    if use_post:
        summary["postprocessed"] = summarise_cohort(pp_rows, n_bootstrap=cfg.n_bootstrap,
                                                    seed=cfg.seed)
    if tuning:
        summary["threshold_tuning"] = tuning
    summary["settings"] = {**settings, "run_dir": str(run_dir), "checkpoint": checkpoint,
                           "data_dir": data_dir, "model": cfg.model, "img_size": cfg.img_size,
                           "context_slices": cfg.context_slices}
    write_per_case_csv(rows, out / "per_case.csv")
    _atomic_write_bytes(out / "summary.json",
                        (json.dumps(_json_safe(summary), indent=2) + "\n").encode())
    log.info("evaluation of %d studies written to %s", len(rows), out)
    return summary


# ---------------------------------------------------------------------------------------------
# pictures


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


def save_overlay(suv: np.ndarray, ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                 path: str | os.PathLike, title: str = "", max_slices: int = 4) -> None:
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
    _atomic_write_bytes(Path(path), buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# prediction for new studies


def predict_dir(run_dir: str | os.PathLike, input_dir: str | os.PathLike,
                output_dir: str | os.PathLike, *, checkpoint: str = "best",
                tta: Optional[bool] = None, postprocess: Optional[dict] = None,
                device: Optional[torch.device | str] = None, progress: bool = True) -> list[Path]:
    """Masks for every study of `input_dir` (labelled or not) as `<output_dir>/<case_id>.nii.gz`
    (uint8, the study's affine and shape). Threshold, TTA and post-processing as in `evaluate`.
    Nothing is written into input_dir; the preprocessing cache goes to the run's cache_dir."""
    run_dir, input_dir, output_dir = Path(run_dir), Path(input_dir), Path(output_dir)
    if not run_dir.is_dir():
        raise EvaluationError(f"run directory {run_dir} not found; pass --run_dir=runs/<name>")
    if output_dir.resolve() == input_dir.resolve() or input_dir.resolve() in output_dir.resolve().parents:
        raise EvaluationError(f"--output_dir={output_dir} lies inside --predict_dir={input_dir}; "
                              f"input folders are never written, choose another folder")
    cfg = config.load_config(run_dir / "config.json")
    settings = _settings(cfg, tta, postprocess, device)
    device = torch.device(settings["device"])
    post = settings["postprocess"]
    studies = cache_studies(cfg, input_dir, require_mask=False)
    model = load_run_model(run_dir, cfg, checkpoint, device)
    amp = cfg.amp == "True" or (cfg.amp == "auto" and device.type == "cuda")
    threshold, _ = _threshold(run_dir, cfg, model, settings, amp)
    written = []
    for cached in tqdm(studies, desc="predict", unit="study", disable=not progress):
        prob = predict_volume(model, cached, img_size=cfg.img_size, batch_size=cfg.eval_batch_size,
                              device=device, amp=amp, tta=settings["tta"],
                              context_slices=cfg.context_slices)  # (X, Y, Z)
        pred = prob > threshold
        if post["min_component_ml"] > 0 or post["suv_floor"] > 0:
            suv, _, _ = _study_volumes(cached, cfg.suv_max)
            pred = postprocess_mask(pred, spacing=cached.spacing, suv=suv, **post)
        path = output_dir / f"{cached.case_id}.nii.gz"
        save_mask_nifti(pred, np.asarray(cached.affine), path)
        written.append(path)
    log.info("%d masks written to %s", len(written), output_dir)
    return written


# ---------------------------------------------------------------------------------------------
# command line


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a run or predict masks for new "
                                                 "studies (see the module docstring).")
    parser.add_argument("--run_dir", required=True, help="runs/<name>, written by main.py")
    parser.add_argument("--data_dir", default=None, help="evaluate every labelled study here")
    parser.add_argument("--predict_dir", default=None, help="predict masks for these studies")
    parser.add_argument("--output_dir", default=None, help="where --predict_dir masks go")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
    parser.add_argument("--tta", type=_parse_bool, default=None, help="flip TTA (config default)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda (config default)")
    args = parser.parse_args(argv)
    if args.predict_dir is not None:
        if args.output_dir is None:
            raise EvaluationError("--predict_dir needs --output_dir=<folder for the masks>")
        written = predict_dir(args.run_dir, args.predict_dir, args.output_dir,
                              checkpoint=args.checkpoint, tta=args.tta, device=args.device)
        print(f"{len(written)} masks written to {args.output_dir}")
        return
    summary = evaluate(args.run_dir, data_dir=args.data_dir, checkpoint=args.checkpoint,
                       tta=args.tta, device=args.device)
    print(format_summary(summary))
    if "postprocessed" in summary:
        print("\nafter post-processing:\n" + format_summary(summary["postprocessed"]))
    print(f"written to {Path(args.run_dir) / 'eval'}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # runtime handles every class marked `user_error = True` (models.WeightsError included);
    # the three named here are caught explicitly as well, whatever their marking.
    with runtime.exit_on_user_error():
        try:
            main(sys.argv[1:])
        except (EvaluationError, data.DataError, config.ConfigError) as exc:
            sys.stderr.write(f"error: {exc}\n")
            sys.exit(runtime.EXIT_USER_ERROR)
