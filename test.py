"""Evaluation and prediction: honest per-study 3-D metrics, autoPET FPV/FNV, masks and pictures.

    python test.py --run_dir=runs/<name>                        # re-evaluate a finished run's test studies
    python test.py --run_dir=runs/<name> --checkpoint=last --tta=True
    python test.py --run_dir=runs/<name> --data_dir=/data/other # every labelled study of another folder
    python test.py --run_dir=runs/<name> --predict_dir=/data/new --output_dir=/tmp/masks   # unlabelled

The same commands run on a GPU: the run's `config.json` says which device to use (`device="auto"`
picks CUDA when present). Everything is rebuilt from `runs/<name>/config.json`, never from this
file's defaults. Outputs (docs/evaluation.md, "Files"): `eval/per_case.csv`, `eval/summary.json`,
`eval/predictions/<case_id>.nii.gz`, `eval/overlays/<case_id>.png`.

Metrics follow the autoPET III/IV official evaluation (docs/evaluation.md):
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

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import config
import data
import factory
import runtime
from data.cache import load_cached
from data.geometry import save_mask_nifti
from data.split import load_split
from inference import predict_volume
from metrics import case_metrics, format_summary, postprocess_mask, summarise_cohort
from pictures import overlay_png

log = logging.getLogger(__name__)

# 18-connectivity (faces + edges, not corners), as in the autoPET evaluation (cc3d connectivity=18).
CSV_COLUMNS = ("case_id", "has_tumor", "dice", "iou", "hd95_mm", "assd_mm", "sensitivity",
               "precision", "fpv_ml", "fnv_ml", "n_lesions", "n_lesions_detected",
               "n_fp_components")


class EvaluationError(ValueError):
    """A user mistake at evaluation time: missing run directory, checkpoint, split or study."""

    user_error = True


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
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


def load_run_model(run_dir: Path, cfg: config.Config, checkpoint_name: str,
                   device: torch.device) -> torch.nn.Module:
    """Build the run's model from its config and load `checkpoints/<checkpoint_name>.pt`."""
    model = factory.build_model(cfg)
    checkpoint.load_weights(model, run_dir / "checkpoints" / f"{checkpoint_name}.pt")
    return model.to(device)


def _test_studies(run_dir: Path, cfg: config.Config, data_dir: Optional[str],
                  subset: str = "test") -> list:
    """The run's test (or "val") studies (split.json + cases.json), or every labelled study of
    data_dir."""
    if data_dir is not None:
        return factory.cache_folder(cfg, data_dir)
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
                     batch_size: int, device: torch.device, amp_dtype: Optional[torch.dtype], tta: bool,
                     context_slices: int, suv_max: float,
                     candidates: Sequence[float] = THRESHOLD_CANDIDATES) -> tuple[float, dict]:
    """The probability threshold that maximises the pooled Dice 2TP / (2TP + FP + FN) over
    `studies` (the VALIDATION studies: test studies never choose anything, docs/study.md). Ties go to
    the higher threshold (fewer false positives). Returns (threshold, {threshold: pooled Dice})."""
    counts = np.zeros((len(candidates), 3))  # TP, FP, FN per candidate
    for cached in studies:
        prob = predict_volume(model, cached, img_size=img_size, batch_size=batch_size,
                              device=device, amp_dtype=amp_dtype, tta=tta, context_slices=context_slices)
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
               amp_dtype: Optional[torch.dtype]) -> tuple[float, Optional[dict]]:
    """cfg.threshold, or (cfg.tune_threshold) the one chosen on the run's validation studies."""
    if not cfg.tune_threshold:
        return cfg.threshold, None
    studies = _test_studies(run_dir, cfg, None, subset="val")
    threshold, curve = choose_threshold(
        model, studies, img_size=cfg.img_size, batch_size=cfg.eval_batch_size,
        device=torch.device(settings["device"]), amp_dtype=amp_dtype, tta=settings["tta"],
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
    amp_dtype = runtime.resolve_amp(cfg.amp, device)  # the dtype the run trained with
    threshold, tuning = _threshold(run_dir, cfg, model, settings, amp_dtype)
    settings["threshold"] = threshold

    rows, pp_rows = [], []
    bar = tqdm(studies, desc="evaluate", unit="study", disable=not progress)
    for cached in bar:
        prob = predict_volume(model, cached, img_size=cfg.img_size, batch_size=cfg.eval_batch_size,
                              device=device, amp_dtype=amp_dtype, tta=settings["tta"],
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
            png = overlay_png(suv, ref, pred, cached.spacing,
                              title=f"{cached.case_id}  Dice {row['dice']:.3f}  FPV {row['fpv_ml']:.2f} ml")
            _atomic_write_bytes(out / "overlays" / f"{cached.case_id}.png", png)
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
    studies = factory.cache_folder(cfg, input_dir, require_mask=False)
    model = load_run_model(run_dir, cfg, checkpoint, device)
    amp_dtype = runtime.resolve_amp(cfg.amp, device)
    threshold, _ = _threshold(run_dir, cfg, model, settings, amp_dtype)
    written = []
    for cached in tqdm(studies, desc="predict", unit="study", disable=not progress):
        prob = predict_volume(model, cached, img_size=cfg.img_size, batch_size=cfg.eval_batch_size,
                              device=device, amp_dtype=amp_dtype, tta=settings["tta"],
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
