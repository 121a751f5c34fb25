"""Evaluation and prediction: honest per-study 3-D metrics, PET quantification, masks, pictures
and a report, for a finished run.

    python test.py --run_dir=runs/<name>                        # re-evaluate a run's test studies
    python test.py --run_dir=runs/<name> --checkpoint=last --tta=True
    python test.py --run_dir=runs/<name> --checkpoint=average --average_from=0.75  # mean weights
    python test.py --run_dir=runs/<name> --pp_thresholds=0.3,0.5,0.7,0.9  # re-tune post-processing
    python test.py --run_dir=runs/<name> --data_dir=/data/other # every labelled study of another folder
    python test.py --run_dir=runs/<name> --predict_dir=/data/new --output_dir=/tmp/masks   # unlabelled
    python test.py --run_dir=runs/<name> --export_onnx=model.onnx   # + parity check with ONNX Runtime
    python test.py --run_dir=copied/<name> --cache_dir=cache   # prepare the studies in ./cache

The same commands run on a GPU (the run's config.json says which device; `auto` picks CUDA).
Everything is rebuilt from `runs/<name>/config.json`, never from this file's defaults.

Where results go (docs/evaluation.md, "Files"): main.py's evaluation of the run's own checkpoint
(the best one, or the averaged weights of a run trained with --average_from) on the run's test
studies is `eval/`. Every other variant gets its own folder named after what
differs, e.g. `eval-last`, `eval-tta`, `eval-pp-floor1.5`, `eval-data-<folder>-<hash>`; a folder
is written whole into a temporary folder and renamed, so it never mixes files of two
evaluations. Evaluating a variant again either reproduces the folder that is there (same
numbers: nothing is written, the match is reported) or goes to a new folder `<name>-2`, ...
beside it (the earlier one is never overwritten). The run's own test studies must be exactly
the data it recorded (cases.json: the hash of each study's cached bytes); a `--data_dir` that
holds studies the run trained or validated on is refused, or with `--allow_seen=True` labelled
study by study. (The file is named test.py after the TransUNet convention; pytest collects only
`tests/`.)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import config
import data
import factory
import quantification
import report
import runtime
from data.geometry import save_mask_nifti, spacing_from_affine
from data.prepare import check_same_data, load_manifest
from data.split import load_split
from inference import predict_study
from metrics import (THRESHOLD_CANDIDATES, case_metrics, choose_postprocessing,
                     counts_above, format_summary, postprocess_counts, postprocess_grid, postprocess_mask,
                     postprocess_objective, summarise_cohort, tumour_free_fpv_ml)
from pictures import overlay_png

log = logging.getLogger(__name__)

# per_case.csv column order (docs/evaluation.md, "Files"); other columns follow these.
CSV_COLUMNS = ("case_id", "has_tumor", "dice", "iou", "hd95_mm", "assd_mm", "sensitivity",
               "precision", "fpv_ml", "fnv_ml", "n_lesions", "n_lesions_detected",
               "n_fp_components")


class EvaluationError(ValueError):
    """A user mistake at evaluation time: missing run directory, checkpoint, split or study."""

    user_error = True


# ---------------------------------------------------------------------------------------------
# files


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
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
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


def _write_summary(summary: dict, path: Path) -> None:
    _atomic_write_bytes(path, (json.dumps(_json_safe(summary), indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# the studies and the model of a run


def study_volumes(cached: Any, suv_max: float) -> tuple[np.ndarray, np.ndarray, str]:
    """(SUV, mask) of a study on its (X, Y, Z) grid from its original files (unclipped SUV,
    the user's exact mask, on the study's own grid even when the cache resampled it with
    target_spacing), read again through the StudyRef it was cached from; for a study that has
    no files (an in-memory Study) they are recovered from the cache (mask voxel-exact,
    SUV = (ch1 + 1) * suv_max / 2 in float16, clipped at suv_max; on the cache grid) and the
    origin says "cache"."""
    ref = cached.study_ref() if hasattr(cached, "study_ref") else None
    if ref is not None:
        study = data.load_study(ref)
        expected = tuple(getattr(cached, "original_shape", None) or cached.shape)
        if tuple(study.shape) != expected:
            raise EvaluationError(f"study {cached.case_id}: its files ({ref.paths}) now hold a "
                                  f"{study.shape} volume, the cache a {expected} one; "
                                  "the source changed after caching: run again to re-cache it")
        mask = study.mask if study.mask is not None else np.zeros(study.shape, np.uint8)
        return study.pet, mask, "original"
    image = cached.image()  # (Z, 2, X, Y)
    suv = (np.moveaxis(np.asarray(image[:, 1], np.float32), 0, -1) + 1.0) * (suv_max / 2.0)
    mask = np.moveaxis(np.asarray(cached.mask()), 0, -1)  # (Z, X, Y) -> (X, Y, Z)
    return suv, mask, "cache"


def _on_original_grid(cached: Any) -> bool:
    """True when a study's scores and mask belong on its own grid rather than the cache's: it was
    resampled (target_spacing) and its original files can be read again (study_volumes)."""
    return bool(getattr(cached, "resampled", False)) and cached.study_ref() is not None


def scoring_grid(cached: Any) -> tuple[tuple[float, float, float], np.ndarray]:
    """(spacing mm, affine (4, 4)) of the grid a study is scored on and its mask written on: the
    study's own grid (what its files and reference mask hold), i.e. the grid before any
    target_spacing resampling; for an in-memory study (no files) the cache grid."""
    if _on_original_grid(cached):
        affine = np.asarray(cached.original_affine, np.float64)
        return spacing_from_affine(affine), affine
    return tuple(float(v) for v in cached.spacing), np.asarray(cached.affine, np.float64)


def to_scoring_grid(cached: Any, volume: np.ndarray) -> np.ndarray:
    """A probability volume (X, Y, Z) on the cache grid, on the study's scoring grid
    (`scoring_grid`): mapped back linearly onto the study's own grid when the cache resampled it
    (CachedStudy.to_original), else as it is."""
    return cached.to_original(volume, order=1) if _on_original_grid(cached) else volume


def study_probabilities(model: torch.nn.Module, cached: Any, **options: Any) -> np.ndarray:
    """Tumour probabilities (X, Y, Z) float32 on the study's scoring grid (`scoring_grid`):
    `inference.predict_study(model, cached, **options)` (options: factory.inference_options(cfg)
    + device, amp_dtype, tta) on the cache grid, then `to_scoring_grid`."""
    return to_scoring_grid(cached, predict_study(model, cached, **options))


def own_checkpoint(cfg: config.Config) -> str:
    """The checkpoint a run is evaluated with by main.py (its `eval/` folder): "best", or with
    average_from > 0 "average<fraction>", the mean of the weights kept after the validations of
    the run's last (1 - fraction) of steps."""
    return f"average{cfg.average_from:g}" if cfg.average_from > 0 else "best"


def resolve_checkpoint(cfg: config.Config, checkpoint_name: Optional[str],
                       average_from: Optional[float] = None) -> str:
    """The checkpoint name an evaluation uses: None -> the run's own (`own_checkpoint`);
    "average" -> "average<fraction>" with `average_from`, else the run's own fraction (a run
    trained without averaging must be given one); "best", "last", "epoch_<k>" as they are."""
    if average_from is not None and checkpoint_name not in (None, "average"):
        raise EvaluationError(f"--average_from={average_from} chooses the weights of "
                              f"--checkpoint=average, not of --checkpoint={checkpoint_name}")
    if checkpoint_name is None and average_from is None:
        return own_checkpoint(cfg)
    if checkpoint_name in (None, "average"):
        fraction = cfg.average_from if average_from is None else float(average_from)
        if not 0 < fraction < 1:
            raise EvaluationError(
                "--checkpoint=average needs --average_from in (0, 1), e.g. 0.75 for the weights "
                "kept in the last quarter of the run" + ("" if average_from is not None else
                                                        " (the run was trained without averaging)"))
        return f"average{fraction:g}"
    return checkpoint_name


def load_run_model(run_dir: Path, cfg: config.Config, checkpoint_name: str,
                   device: torch.device) -> torch.nn.Module:
    """Build the run's model from its config and load `checkpoints/<checkpoint_name>.pt`, or for
    "average<fraction>" the mean of the epoch checkpoints after that fraction of the run
    (checkpoint.averaged_epochs / average_weights)."""
    model = factory.build_model(cfg)
    if checkpoint_name.startswith("average"):
        checkpoint.load_weights(model, averaged_paths(run_dir, cfg, checkpoint_name))
    else:
        checkpoint.load_weights(model, run_dir / "checkpoints" / f"{checkpoint_name}.pt")
    return model.to(device)


def averaged_paths(run_dir: Path, cfg: config.Config, checkpoint_name: str) -> list[Path]:
    """The epoch checkpoints an "average<fraction>" checkpoint is the mean of."""
    return checkpoint.averaged_epochs(run_dir / "checkpoints", float(checkpoint_name[7:]),
                                      cfg.epochs, cfg.steps_per_epoch)


def run_studies(run_dir: Path, cfg: config.Config, subset: str = "test") -> list:
    """The run's `subset` ("test" or "val") studies, exactly as the run recorded them: the data
    is prepared again with the run's settings (the phantom is regenerated if it is gone, a cache
    entry rebuilt from unchanged files), then every study must have the cached bytes whose hash
    cases.json holds. Anything else is refused, naming the studies."""
    ids = load_split(run_dir / "split.json")[subset]
    if not ids:
        raise EvaluationError(f"{run_dir}/split.json has no {subset} studies (n_{subset}=0); "
                              "pass --data_dir=<labelled studies>")
    recorded = load_manifest(run_dir / "cases.json")
    if recorded["format"] == 1:  # recorded before content hashes: use the cache folders named
        log.warning("%s/cases.json predates content hashes: its studies cannot be verified", run_dir)
        by_id = {r["case_id"]: r["directory"] for r in recorded["studies"]}
        return [data.load_cached(by_id[c]) for c in ids]
    manifest = factory.prepare_data(cfg)
    return check_same_data(recorded, manifest.studies, ids, f"{subset}")


def folder_studies(run_dir: Path, cfg: config.Config, data_dir: str, allow_seen: bool
                   ) -> tuple[list, dict[str, str]]:
    """Every labelled study of `data_dir`, and {case_id: "train" | "val"} for those the run
    trained or validated on (same cached bytes, or the same source files). Such studies are
    refused unless `allow_seen`, and then labelled."""
    studies = factory.cache_folder(cfg, data_dir)
    split = load_split(run_dir / "split.json")
    recorded = load_manifest(run_dir / "cases.json")
    role = {c: name for name in ("train", "val") for c in split[name]}
    hashes = {r["content_hash"]: role[r["case_id"]] for r in recorded["studies"]
              if r["case_id"] in role and r["content_hash"]}
    sources = {r["source"]: role[r["case_id"]] for r in recorded["studies"] if r["case_id"] in role}
    seen = {}
    for s in studies:
        where = hashes.get(s.content_hash) or sources.get(s.source)
        if where:
            seen[s.case_id] = where
    if seen and not allow_seen:
        listed = ", ".join(f"{c} ({w})" for c, w in list(seen.items())[:10])
        raise EvaluationError(f"{data_dir} holds {len(seen)} studies that {run_dir} trained or "
                              f"validated on: {listed}{' ...' if len(seen) > 10 else ''}; their "
                              "scores would not be a test. Evaluate a folder of unseen studies, "
                              "or pass --allow_seen=True to score them labelled as seen")
    return studies, seen


# ---------------------------------------------------------------------------------------------
# settings, variants, threshold


def _settings(cfg: config.Config, tta: Optional[bool], postprocess: Optional[dict],
              threshold: Optional[float], device: Optional[torch.device | str],
              pp_thresholds: Optional[Sequence[float]] = None,
              pp_objective: Optional[str] = None,
              pp_max_fpv_ml: Optional[float] = None) -> dict:
    post = {"min_component_ml": cfg.min_component_ml, "suv_floor": cfg.suv_floor,
            "min_component_suvmax": cfg.min_component_suvmax, **(postprocess or {})}
    tune_postprocess = cfg.tune_postprocess and threshold is None and not postprocess
    if pp_thresholds is not None and not tune_postprocess:
        raise EvaluationError("--pp_thresholds is the threshold axis that tune_postprocess searches "
                              "on the validation studies; this evaluation tunes nothing (the run "
                              "has tune_postprocess=False, or --threshold / post-processing "
                              "values were given)")
    if pp_objective is not None and not tune_postprocess:
        raise EvaluationError("--pp_objective is how tune_postprocess chooses on the validation "
                              "studies; this evaluation tunes nothing (the run has "
                              "tune_postprocess=False, or --threshold / post-processing values "
                              "were given)")
    objective = cfg.pp_objective if pp_objective is None else pp_objective
    if pp_max_fpv_ml is not None and objective != "mean_dice_fpv":
        raise EvaluationError(f"--pp_max_fpv_ml is the limit of pp_objective=mean_dice_fpv; this "
                              f"evaluation chooses by {objective}: add --pp_objective=mean_dice_fpv")
    if pp_max_fpv_ml is not None and not pp_max_fpv_ml >= 0:
        raise EvaluationError(f"--pp_max_fpv_ml={pp_max_fpv_ml}: a volume in ml, >= 0")
    return {"threshold": cfg.threshold if threshold is None else float(threshold),
            "tune_threshold": cfg.tune_threshold and threshold is None,
            "tune_postprocess": tune_postprocess,
            "pp_thresholds": [float(t) for t in (cfg.pp_thresholds if pp_thresholds is None
                                                 else pp_thresholds)],
            "pp_objective": objective,
            "pp_max_fpv_ml": float(cfg.pp_max_fpv_ml if pp_max_fpv_ml is None else pp_max_fpv_ml),
            "tta": cfg.tta if tta is None else bool(tta), "postprocess": post,
            "device": str(runtime.resolve_device(str(device or cfg.device)))}


def _objective_tag(objective: str, max_fpv_ml: float) -> str:
    """pp_objective in a folder name: "meandice"; mean_dice_fpv with its limit, "meandicefpv1"."""
    return objective.replace("_", "") + (f"{max_fpv_ml:g}" if objective == "mean_dice_fpv" else "")


def variant_name(cfg: config.Config, settings: dict, checkpoint_name: str,
                 data_dir: Optional[str], allow_seen: bool = False) -> str:
    """The folder of an evaluation: "eval" for the run's own setting (what main.py writes),
    "eval-<what differs>" for every other variant, so two variants never share a folder."""
    parts = []
    if checkpoint_name != own_checkpoint(cfg):
        parts.append(checkpoint_name)
    if settings["tta"] != cfg.tta:
        parts.append("tta" if settings["tta"] else "notta")
    if settings["threshold"] != cfg.threshold or settings["tune_threshold"] != cfg.tune_threshold:
        parts.append(f"thr{settings['threshold']:g}")
    if settings["tune_postprocess"] and settings["pp_thresholds"] != [float(t) for t in cfg.pp_thresholds]:
        parts.append("ppthr" + "_".join(f"{t:g}" for t in settings["pp_thresholds"]))
    objective = _objective_tag(settings["pp_objective"], settings["pp_max_fpv_ml"])
    if settings["tune_postprocess"] and objective != _objective_tag(cfg.pp_objective,
                                                                    cfg.pp_max_fpv_ml):
        parts.append(f"pp{objective}")
    post = settings["postprocess"]
    if (post["suv_floor"], post["min_component_ml"], post["min_component_suvmax"]) != \
            (cfg.suv_floor, cfg.min_component_ml, cfg.min_component_suvmax) or \
            settings["tune_postprocess"] != cfg.tune_postprocess:
        parts.append(f"pp-floor{post['suv_floor']:g}-min{post['min_component_ml']:g}"
                     + (f"-suvmax{post['min_component_suvmax']:g}"
                        if post["min_component_suvmax"] else ""))
    if data_dir is not None:
        absolute = str(Path(data_dir).absolute())
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(absolute).name)[:40] or "data"
        parts.append(f"data-{name}-{hashlib.sha1(absolute.encode()).hexdigest()[:6]}")
        if allow_seen:
            parts.append("seen")
    return "-".join(["eval", *parts])




def choose_threshold(model: torch.nn.Module, studies: Sequence[Any], *, img_size: int,
                     batch_size: int, device: torch.device, amp_dtype: Optional[torch.dtype],
                     tta: bool, context_slices: int, suv_max: float, inplane: str = "resize",
                     overlap: float = 0.5,
                     candidates: Sequence[float] = THRESHOLD_CANDIDATES) -> tuple[float, dict]:
    """The probability threshold that maximises the pooled Dice 2TP / (2TP + FP + FN) over
    `studies` (the VALIDATION studies: test studies never choose anything, docs/study.md). Ties go
    to the higher threshold (fewer false positives). Probabilities as in `evaluate`
    (`study_probabilities`: the run's in-plane path, on the study's own grid). Returns
    (threshold, {threshold: pooled Dice})."""
    counts = np.zeros((len(candidates), 3))  # TP, FP, FN per candidate
    for cached in studies:
        prob = study_probabilities(model, cached, inplane=inplane, img_size=img_size,
                                   overlap=overlap, batch_size=batch_size, device=device,
                                   amp_dtype=amp_dtype, tta=tta, context_slices=context_slices)
        _, ref, _ = study_volumes(cached, suv_max)
        counts += counts_above(prob, ref.astype(bool), candidates)
    tp, fp, fn = counts.T
    dice = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    best = max(range(len(candidates)), key=lambda k: (dice[k], candidates[k]))
    return float(candidates[best]), {f"{c:.2f}": float(d) for c, d in zip(candidates, dice)}


def _threshold(run_dir: Path, cfg: config.Config, model: torch.nn.Module, settings: dict,
               amp_dtype: Optional[torch.dtype]) -> tuple[float, Optional[dict]]:
    """The fixed threshold, or (tune_threshold) the one chosen on the run's validation studies,
    or (tune_postprocess) threshold and post-processing chosen together there; the chosen
    post-processing replaces settings["postprocess"]."""
    if settings["tune_postprocess"]:
        return _tune_postprocess(run_dir, cfg, model, settings, amp_dtype)
    if not settings["tune_threshold"]:
        return settings["threshold"], None
    studies = run_studies(run_dir, cfg, subset="val")
    threshold, curve = choose_threshold(
        model, studies, **factory.inference_options(cfg), device=torch.device(settings["device"]),
        amp_dtype=amp_dtype, tta=settings["tta"], suv_max=cfg.suv_max)
    log.info("threshold %.2f chosen on %d validation studies (pooled Dice %.3f)", threshold,
             len(studies), curve[f"{threshold:.2f}"])
    return threshold, {"chosen": threshold, "n_val_studies": len(studies), "val_pooled_dice": curve}


def check_tuning_studies(objective: str, has_tumour: Sequence[bool], where: str) -> None:
    """EvaluationError unless the validation studies (`has_tumour`: whether each has tumour)
    can score pp_objective `objective`: mean_dice averages the tumour studies' Dice, so it needs
    one; mean_dice_fpv also limits the tumour-free studies' false-positive volume, so it needs
    one of those too. main.py asks before training, tune_postprocess before inference."""
    if objective in ("mean_dice", "mean_dice_fpv") and not any(has_tumour):
        raise EvaluationError(f"{where}: tune_postprocess with pp_objective={objective} averages "
                              f"the Dice of the validation studies with tumour, and none of its "
                              f"{len(has_tumour)} has any; use --pp_objective=pooled_dice, or "
                              f"validation studies with tumour (a larger --n_val)")
    if objective == "mean_dice_fpv" and all(has_tumour):
        raise EvaluationError(f"{where}: tune_postprocess with pp_objective=mean_dice_fpv limits "
                              f"the false-positive volume of the tumour-free validation studies, "
                              f"and all {len(has_tumour)} have tumour; use --pp_objective=mean_dice, "
                              f"or tumour-free validation studies too (a larger --n_val)")


def _tune_postprocess(run_dir: Path, cfg: config.Config, model: torch.nn.Module, settings: dict,
                      amp_dtype: Optional[torch.dtype]) -> tuple[float, dict]:
    """Threshold, suv_floor, min_component_ml and min_component_suvmax chosen together on the
    validation studies: the highest settings["pp_objective"] (metrics.postprocess_objective:
    pooled Dice, or the mean of the tumour studies' Dice) over metrics.POSTPROCESS_GRID with the
    threshold axis settings["pp_thresholds"] (config pp_thresholds unless overridden)."""
    grid = postprocess_grid(settings["pp_thresholds"])
    studies = run_studies(run_dir, cfg, subset="val")
    objective = settings["pp_objective"]
    if objective != "pooled_dice":
        check_tuning_studies(objective, [bool(study_volumes(c, cfg.suv_max)[1].any())
                                         for c in studies], str(run_dir))
    counts, voxel_ml = [], []
    for cached in studies:
        prob = study_probabilities(model, cached, **factory.inference_options(cfg),
                                   device=torch.device(settings["device"]), amp_dtype=amp_dtype,
                                   tta=settings["tta"])
        suv, ref, _ = study_volumes(cached, cfg.suv_max)
        spacing = scoring_grid(cached)[0]
        counts.append(postprocess_counts(prob, ref, suv, spacing, grid))
        voxel_ml.append(float(np.prod(spacing)) / 1000)
    counts = np.stack(counts)  # (n_studies, *grid shape, 3)
    chosen, score = choose_postprocessing(counts, grid, objective, voxel_ml,
                                          settings["pp_max_fpv_ml"])
    index = tuple(list(values).index(chosen[key]) for key, values in grid.items())
    settings["postprocess"] = {k: chosen[k] for k in ("suv_floor", "min_component_ml",
                                                      "min_component_suvmax")}
    log.info("chosen on %d validation studies (%s %.3f): %s", len(studies), objective, score,
             chosen)
    return chosen["threshold"], {
        "chosen": chosen, "n_val_studies": len(studies), "objective": objective,
        "val_pooled_dice": float(postprocess_objective(counts, "pooled_dice")[index]),
        **({"val_mean_dice": score} if objective == "mean_dice" else {}),
        **(_fpv_limited(counts, index, voxel_ml, settings["pp_max_fpv_ml"])
           if objective == "mean_dice_fpv" else {}), "grid": grid}


def _fpv_limited(counts: np.ndarray, index: tuple, voxel_ml: list[float],
                 max_fpv_ml: float) -> dict:
    """What pp_objective=mean_dice_fpv saw at the chosen combination `index` of the grid: its
    mean Dice and tumour-free false-positive volume on the validation studies, the limit, and
    whether any combination met it (if none did, the one with the lowest volume was chosen)."""
    fpv = tumour_free_fpv_ml(counts, voxel_ml)
    return {"val_mean_dice": float(postprocess_objective(counts, "mean_dice")[index]),
            "val_fpv_ml_tumor_free": float(fpv[index]), "max_fpv_ml": float(max_fpv_ml),
            "limit_met": bool((fpv <= max_fpv_ml).any())}


# ---------------------------------------------------------------------------------------------
# evaluation of a run


def _score_study(cached: Any, prob: np.ndarray, *, threshold: float, post: dict, suv_max: float,
                 out: Path, save_overlays: bool) -> tuple[dict, Optional[dict], list[dict]]:
    """Metrics (and post-processed metrics), PET quantities and lesion rows of one study; writes
    its predicted mask (and overlay) into `out`. prob (X, Y, Z) on the study's scoring grid
    (`study_probabilities`), the grid of its reference mask."""
    suv, ref, origin = study_volumes(cached, suv_max)
    spacing, affine = scoring_grid(cached)
    if prob.shape != ref.shape:  # a bug, not a user error: the two grids must be the same
        raise RuntimeError(f"study {cached.case_id}: probabilities {prob.shape} and reference "
                           f"{ref.shape} are on different grids")
    pred = prob > threshold
    row = {"case_id": cached.case_id, **case_metrics(pred, ref, spacing, lesions=True),
           "mask_from": origin}
    pp_row = None
    if any(value > 0 for value in post.values()):
        pred = postprocess_mask(pred, spacing=spacing, suv=suv, **post)
        pp_row = {"case_id": cached.case_id, **case_metrics(pred, ref, spacing, lesions=True)}
        row.update({f"pp_{k}": v for k, v in pp_row.items() if k in CSV_COLUMNS[2:]})
    detected = (pp_row or row).pop("lesion_detected")
    row.pop("lesion_detected", None)
    if pp_row is not None:
        pp_row.pop("lesion_detected", None)
    lesions = []
    if origin == "original":  # PET quantities need the unclipped SUV of the study's own file
        row.update(quantification.study_columns(suv, pred, ref, spacing))
        lesions = quantification.lesion_table(suv, ref, spacing, detected,
                                              case_id=cached.case_id)
    save_mask_nifti(pred, affine, out / "predictions" / f"{cached.case_id}.nii.gz")
    if save_overlays:
        scored = pp_row or row
        png = overlay_png(suv, ref, pred, spacing, title=f"{cached.case_id}  Dice "
                          f"{scored['dice']:.3f}  FPV {scored['fpv_ml']:.2f} ml")
        _atomic_write_bytes(out / "overlays" / f"{cached.case_id}.png", png)
    return row, pp_row, lesions


def _comparable(folder: Path) -> tuple[str, dict]:
    """What must match for two evaluations to be the same: per_case.csv and the summary's
    numbers (not where or when they were computed)."""
    summary = json.loads((folder / "summary.json").read_text())
    for key in ("settings", "environment", "output_dir"):
        summary.pop(key, None)
    return (folder / "per_case.csv").read_text(), summary


def _publish(tmp: Path, final: Path) -> tuple[Path, str]:
    """Move a finished evaluation into place without touching an earlier one. Returns (the
    folder holding the result, "new" | "reproduced" | "differs")."""
    if not final.exists():
        os.rename(tmp, final)
        return final, "new"
    try:
        same = _comparable(tmp) == _comparable(final)
    except (OSError, ValueError):
        same = False
    if same:
        shutil.rmtree(tmp)
        return final, "reproduced"
    k = 2
    while final.with_name(f"{final.name}-{k}").exists():
        k += 1
    os.rename(tmp, final.with_name(f"{final.name}-{k}"))
    return final.with_name(f"{final.name}-{k}"), "differs"


def run_config(run_dir: Path, cache_dir: str | os.PathLike | None = None) -> config.Config:
    """The run's config.json; with `cache_dir`, studies are prepared (the phantom regenerated,
    files cached) in that folder instead of the one the run recorded: a run copied from another
    machine, or kept from `bench/main_run.py`, whose temporary cache is gone. The data stays
    checked against cases.json's content hashes, so another folder cannot change what is scored."""
    cfg = config.load_config(run_dir / "config.json")
    if cache_dir is None:
        return cfg
    return dataclasses.replace(cfg, cache_dir=str(Path(cache_dir).absolute()))


def evaluate(run_dir: str | os.PathLike, *, data_dir: Optional[str] = None,
             checkpoint: Optional[str] = None, average_from: Optional[float] = None,
             tta: Optional[bool] = None,
             postprocess: Optional[dict] = None, threshold: Optional[float] = None,
             device: Optional[torch.device | str] = None, allow_seen: bool = False,
             pp_thresholds: Optional[Sequence[float]] = None,
             pp_objective: Optional[str] = None, pp_max_fpv_ml: Optional[float] = None,
             cache_dir: str | os.PathLike | None = None,
             progress: bool = True, reuse: bool = False) -> dict[str, Any]:
    """Evaluate a finished run on its test studies (or on every labelled study of `data_dir`).

    Everything comes from `run_dir/config.json`; `checkpoint` (None: the run's own,
    `own_checkpoint`; "best", "last", "epoch_<k>", or "average" with `average_from`), `tta`,
    `postprocess` ({"min_component_ml", "suv_floor"}), `threshold`, `device` and `pp_thresholds` (the threshold candidates of a run
    with tune_postprocess; its own variant folder, `eval-ppthr0.3_..._0.95`) override it;
    `cache_dir` only moves where the studies are prepared (`run_config`), not what is scored.
    Per study: probabilities (inference.predict_study by the run's in-plane path, under the
    autocast dtype the run trained with) > threshold -> metrics (metrics.case_metrics) against
    the study's own mask on its own grid (a study cached with target_spacing: the probabilities
    mapped back, `study_probabilities`) and PET quantities (quantification.study_columns) on its
    unclipped SUV; with post-processing configured, the post-processed mask is scored too
    (columns `pp_*`, summary "postprocessed") and is the one written. The folder (see the module docstring) gets per_case.csv, lesions.csv,
    summary.json, predictions/, overlays/, the agreement plots and report.html. Returns the
    summary, with "output_dir" and "status" (new / reproduced / differs).

    `reuse=True` returns the summary already in this variant's folder (status "existing")
    without loading a model or a study, and evaluates only when there is none: how the bench
    scripts read back an earlier evaluation of the same checkpoint and settings without naming
    its folder themselves (`variant_name` is the only place that knows the names).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvaluationError(f"run directory {run_dir} not found; pass --run_dir=runs/<name>")
    cfg = run_config(run_dir, cache_dir)
    checkpoint = resolve_checkpoint(cfg, checkpoint, average_from)
    settings = _settings(cfg, tta, postprocess, threshold, device, pp_thresholds, pp_objective,
                         pp_max_fpv_ml)
    device = torch.device(settings["device"])
    name = variant_name(cfg, settings, checkpoint, data_dir, allow_seen)
    if reuse and (run_dir / name / "summary.json").is_file():
        earlier = json.loads((run_dir / name / "summary.json").read_text())
        return {**earlier, "output_dir": str(run_dir / name), "status": "existing"}
    seen: dict[str, str] = {}
    if data_dir is None:
        studies = run_studies(run_dir, cfg)
    else:
        studies, seen = folder_studies(run_dir, cfg, data_dir, allow_seen)
    model = load_run_model(run_dir, cfg, checkpoint, device)
    amp_dtype = runtime.resolve_amp(cfg.amp, device)  # the dtype the run trained with
    settings["threshold"], tuning = _threshold(run_dir, cfg, model, settings, amp_dtype)

    tmp = run_dir / f".{name}-tmp-{uuid.uuid4().hex[:8]}"
    try:
        rows, pp_rows, lesions = [], [], []
        bar = tqdm(studies, desc="evaluate", unit="study", disable=not progress)
        for cached in bar:
            prob = study_probabilities(model, cached, **factory.inference_options(cfg),
                                       device=device, amp_dtype=amp_dtype,
                                       tta=settings["tta"])  # (X, Y, Z) on the scoring grid
            row, pp_row, study_lesions = _score_study(
                cached, prob, threshold=settings["threshold"], post=settings["postprocess"],
                suv_max=cfg.suv_max, out=tmp, save_overlays=cfg.save_overlays)
            if seen:
                row["seen_in_run"] = seen.get(cached.case_id, "")
            rows.append(row)
            pp_rows += [pp_row] if pp_row else []
            lesions += study_lesions
            bar.set_postfix(dice=f"{row['dice']:.3f}")
        summary = _summary(rows, pp_rows, cfg, settings, tuning, seen,
                           run_dir=run_dir, checkpoint_name=checkpoint, data_dir=data_dir)
        _write_outputs(tmp, rows, lesions, summary, run_dir)
        folder, status = _publish(tmp, run_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when something failed
    if status == "differs":
        log.warning("the results differ from the earlier evaluation in %s: written to %s "
                    "(the earlier one is kept)", run_dir / name, folder)
    log.info("evaluation of %d studies: %s (%s)", len(rows), folder, status)
    return {**summary, "output_dir": str(folder), "status": status}


def _summary(rows: list[dict], pp_rows: list[dict], cfg: config.Config, settings: dict,
             tuning: Optional[dict], seen: dict, *, run_dir: Path, checkpoint_name: str,
             data_dir: Optional[str]) -> dict:
    summary = summarise_cohort(rows, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    if pp_rows:
        summary["postprocessed"] = summarise_cohort(pp_rows, n_bootstrap=cfg.n_bootstrap,
                                                    seed=cfg.seed)
    summary["agreement"] = quantification.cohort_agreement(rows)
    if tuning:
        summary["threshold_tuning"] = tuning
    if seen:
        summary["seen_in_run"] = {"n_studies": len(seen), "note": "studies the run trained or "
                                  "validated on: not a test"}
    averaged = ({"averaged_epochs": [int(p.stem.removeprefix("epoch_"))
                                     for p in averaged_paths(run_dir, cfg, checkpoint_name)]}
                if checkpoint_name.startswith("average") else {})
    summary["settings"] = {**settings, "run_dir": str(run_dir), "checkpoint": checkpoint_name,
                           **averaged,
                           "data_dir": data_dir, "model": cfg.model, "img_size": cfg.img_size,
                           "context_slices": cfg.context_slices, "inplane": cfg.inplane,
                           "patch_overlap": cfg.patch_overlap,
                           "target_spacing": cfg.target_spacing}
    summary["environment"] = {"git_commit": runtime.git_commit(), "torch": torch.__version__}
    return summary


def _write_outputs(out: Path, rows: list[dict], lesions: list[dict], summary: dict,
                   run_dir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_per_case_csv(rows, out / "per_case.csv")
    quantification.write_lesion_csv(lesions, out / "lesions.csv")
    quantification.save_agreement_plots(rows, out)
    _write_summary(summary, out / "summary.json")
    report.write_report(out, summary=summary, rows=rows, lesion_rows=lesions, run_dir=run_dir,
                        title=f"Evaluation of {run_dir.name}")


# ---------------------------------------------------------------------------------------------
# prediction for new studies


def predict_dir(run_dir: str | os.PathLike, input_dir: str | os.PathLike,
                output_dir: str | os.PathLike, *, checkpoint: Optional[str] = None,
                average_from: Optional[float] = None, tta: Optional[bool] = None, postprocess: Optional[dict] = None,
                threshold: Optional[float] = None, device: Optional[torch.device | str] = None,
                cache_dir: str | os.PathLike | None = None, progress: bool = True) -> list[Path]:
    """Masks for every study of `input_dir` (labelled or not) as `<output_dir>/<case_id>.nii.gz`
    (uint8, the study's own affine and shape, also when the run's cache resamples with
    target_spacing). Threshold, TTA, in-plane path and post-processing as in `evaluate`.
    Nothing is written into input_dir, and no existing file of output_dir is replaced; the
    studies are cached in their own folders of the run's cache_dir."""
    run_dir, input_dir, output_dir = Path(run_dir), Path(input_dir), Path(output_dir)
    if not run_dir.is_dir():
        raise EvaluationError(f"run directory {run_dir} not found; pass --run_dir=runs/<name>")
    if output_dir.resolve() == input_dir.resolve() or input_dir.resolve() in output_dir.resolve().parents:
        raise EvaluationError(f"--output_dir={output_dir} lies inside --predict_dir={input_dir}; "
                              f"input folders are never written, choose another folder")
    cfg = run_config(run_dir, cache_dir)
    checkpoint = resolve_checkpoint(cfg, checkpoint, average_from)
    settings = _settings(cfg, tta, postprocess, threshold, device)
    device = torch.device(settings["device"])
    post = settings["postprocess"]
    studies = factory.cache_folder(cfg, input_dir, require_mask=False)
    clash = [output_dir / f"{s.case_id}.nii.gz" for s in studies
             if (output_dir / f"{s.case_id}.nii.gz").exists()]
    if clash:
        raise EvaluationError(f"{output_dir} already holds {len(clash)} of the masks to write "
                              f"(e.g. {clash[0].name}); nothing is overwritten: choose an empty "
                              "--output_dir")
    model = load_run_model(run_dir, cfg, checkpoint, device)
    amp_dtype = runtime.resolve_amp(cfg.amp, device)
    threshold, _ = _threshold(run_dir, cfg, model, settings, amp_dtype)
    written = []
    for cached in tqdm(studies, desc="predict", unit="study", disable=not progress):
        prob = study_probabilities(model, cached, **factory.inference_options(cfg), device=device,
                                   amp_dtype=amp_dtype, tta=settings["tta"])  # (X, Y, Z)
        spacing, affine = scoring_grid(cached)
        pred = prob > threshold
        if any(value > 0 for value in post.values()):
            suv, _, _ = study_volumes(cached, cfg.suv_max)
            pred = postprocess_mask(pred, spacing=spacing, suv=suv, **post)
        path = output_dir / f"{cached.case_id}.nii.gz"
        save_mask_nifti(pred, affine, path)
        written.append(path)
    log.info("%d masks written to %s", len(written), output_dir)
    return written


# ---------------------------------------------------------------------------------------------
# ONNX export


def export_run_onnx(run_dir: str | os.PathLike, path: str | os.PathLike, *,
                    checkpoint: Optional[str] = None, average_from: Optional[float] = None,
                    n_check_slices: int = 16,
                    cache_dir: str | os.PathLike | None = None) -> tuple[Path, float]:
    """Export the run's model (eval mode: lesion logits, dynamic batch) to ONNX, then run the
    file with ONNX Runtime on slices of the run's test studies and return the largest absolute
    logit difference to PyTorch. Returns (path, max |difference|)."""
    import export

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, cache_dir)
    checkpoint = resolve_checkpoint(cfg, checkpoint, average_from)
    model = load_run_model(run_dir, cfg, checkpoint, torch.device("cpu")).eval()
    written = export.export_onnx(model, path, in_channels=cfg.in_channels, img_size=cfg.img_size)
    inputs = _test_slices(run_dir, cfg, n_check_slices)
    return written, export.check_onnx(written, model, inputs)


def _test_slices(run_dir: Path, cfg: config.Config, n: int) -> torch.Tensor:
    """(n, C, S, S) model inputs from the run's test studies (tumour slices first), exactly as
    inference builds them: resize mode the whole slice resized to S²; patch mode an S x S tile
    of the slice at its cached resolution (a sliding-window tile), placed around the slice's
    tumour (its bounding-box centre) or at the slice's centre, padded with -1 if the slice is
    smaller."""
    from data import crop_or_pad, to_model_grid
    from inference import PAD_VALUE, context_indices

    slices, size = [], cfg.img_size
    for cached in run_studies(run_dir, cfg):
        image, mask = cached.image(), cached.mask()  # (Z, 2, X, Y), (Z, X, Y)
        zs = list(cached.fg_slices) + [image.shape[0] // 2]
        index = context_indices(image.shape[0], cfg.context_slices)
        for z in zs[:max(1, n // 4)]:
            x = torch.from_numpy(np.asarray(image[index[z]], np.float32).reshape(-1, *image.shape[2:]))
            if cfg.inplane == "patch":
                slices.append(crop_or_pad(x, _tile_start(np.asarray(mask[z]), size), size,
                                          PAD_VALUE)[None])
            else:
                slices.append(to_model_grid(x[None], size))
        if len(slices) >= n:
            break
    return torch.cat(slices[:n])


def _tile_start(mask: np.ndarray, size: int) -> tuple[int, int]:
    """(x0, y0) of the size x size tile centred on the bounding box of the tumour in `mask`
    (X, Y), or on the slice's centre without tumour, moved inside the slice where it is larger."""
    starts = []
    for axis, n in enumerate(mask.shape):
        found = np.flatnonzero(mask.any(axis=1 - axis))
        centre = (found[0] + found[-1] + 1) // 2 if len(found) else n // 2
        starts.append(int(np.clip(centre - size // 2, min(0, n - size), max(0, n - size))))
    return starts[0], starts[1]


# ---------------------------------------------------------------------------------------------
# command line


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a run, predict masks for new studies "
                                                 "or export the model (see the module docstring).")
    parser.add_argument("--run_dir", required=True, help="runs/<name>, written by main.py")
    parser.add_argument("--data_dir", default=None, help="evaluate every labelled study here")
    parser.add_argument("--allow_seen", type=_parse_bool, default=False,
                        help="score studies of --data_dir the run trained on (labelled as seen)")
    parser.add_argument("--predict_dir", default=None, help="predict masks for these studies")
    parser.add_argument("--output_dir", default=None, help="where --predict_dir masks go")
    parser.add_argument("--export_onnx", default=None, help="write the model as ONNX here")
    parser.add_argument("--checkpoint", default=None, choices=["best", "last", "average"],
                        help="best (validation), last, or average: the mean of the weights kept "
                             "after the validations of the run's end (default: the run's own, "
                             "average when it was trained with --average_from, else best)")
    parser.add_argument("--average_from", type=float, default=None,
                        help="--checkpoint=average: average the weights kept after this fraction "
                             "of the run's steps (0.75: the last quarter; default: the run's)")
    parser.add_argument("--tta", type=_parse_bool, default=None, help="flip TTA (config default)")
    parser.add_argument("--threshold", type=float, default=None, help="probability threshold")
    parser.add_argument("--suv_floor", type=float, default=None, help="post-processing")
    parser.add_argument("--min_component_ml", type=float, default=None, help="post-processing")
    parser.add_argument("--min_component_suvmax", type=float, default=None, help="post-processing")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda (config default)")
    parser.add_argument("--cache_dir", default=None,
                        help="prepare the studies here instead of the run's recorded cache_dir "
                             "(a copied run, or one kept by bench/main_run.py)")
    parser.add_argument("--pp_thresholds", default=None,
                        help="threshold candidates of tune_postprocess, e.g. 0.3,0.5,0.7,0.9")
    parser.add_argument("--pp_objective", default=None, choices=list(config.CHOICES["pp_objective"]),
                        help="what tune_postprocess maximises on the validation studies: "
                             "pooled_dice, mean_dice (of the tumour studies) or mean_dice_fpv "
                             "(mean_dice within --pp_max_fpv_ml); default: the run's")
    parser.add_argument("--pp_max_fpv_ml", default=None, type=float,
                        help="pp_objective=mean_dice_fpv: the highest mean false-positive volume "
                             "(ml) of the tumour-free validation studies (default: the run's, 1)")
    args = parser.parse_args(argv)
    if args.pp_thresholds is not None:
        value = config.parse_value(args.pp_thresholds)  # as main.py reads --key=value
        try:
            args.pp_thresholds = config.check_pp_thresholds(
                value if isinstance(value, (tuple, list)) else (value,), "--pp_thresholds")
        except config.ConfigError as error:
            raise EvaluationError(str(error)) from None
        if args.predict_dir is not None or args.export_onnx is not None:
            raise EvaluationError("--pp_thresholds chooses post-processing for an evaluation of "
                                  "labelled studies; --predict_dir and --export_onnx use the run's")
    if args.predict_dir is not None and args.data_dir is not None:
        raise EvaluationError("--predict_dir (masks for new studies) and --data_dir (evaluate a "
                              "labelled folder) do different things; give one of them")
    if args.predict_dir is not None and args.output_dir is None:
        raise EvaluationError("--predict_dir needs --output_dir=<folder for the masks>")
    if args.output_dir is not None and args.predict_dir is None:
        raise EvaluationError("--output_dir is where --predict_dir writes masks; evaluations go "
                              "to the run directory's eval*/ folders")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise EvaluationError(f"--threshold={args.threshold} must lie in (0, 1)")
    for key in ("suv_floor", "min_component_ml", "min_component_suvmax"):
        if getattr(args, key) is not None and getattr(args, key) < 0:
            raise EvaluationError(f"--{key}={getattr(args, key)} must be >= 0")
    return args


def main(argv: Sequence[str]) -> None:
    args = _parse_args(argv)
    post = {k: getattr(args, k) for k in ("suv_floor", "min_component_ml", "min_component_suvmax")
            if getattr(args, k) is not None} or None
    common = dict(checkpoint=args.checkpoint, average_from=args.average_from, tta=args.tta,
                  postprocess=post,
                  threshold=args.threshold, device=args.device, cache_dir=args.cache_dir)
    if args.export_onnx is not None:
        path, diff = export_run_onnx(args.run_dir, args.export_onnx, checkpoint=args.checkpoint,
                                     average_from=args.average_from, cache_dir=args.cache_dir)
        print(f"ONNX model written to {path}; max |logit difference| to PyTorch on the run's "
              f"test slices (ONNX Runtime, CPU): {diff:.3g}")
        return
    if args.predict_dir is not None:
        written = predict_dir(args.run_dir, args.predict_dir, args.output_dir, **common)
        print(f"{len(written)} masks written to {args.output_dir}")
        return
    summary = evaluate(args.run_dir, data_dir=args.data_dir, allow_seen=args.allow_seen,
                       pp_thresholds=args.pp_thresholds, pp_objective=args.pp_objective,
                       pp_max_fpv_ml=args.pp_max_fpv_ml,
                       **common)
    print(format_summary(summary))
    if "postprocessed" in summary:
        print("\nafter post-processing:\n" + format_summary(summary["postprocessed"]))
    note = {"new": "written to", "reproduced": "identical to the evaluation already in",
            "differs": "DIFFERS from the earlier evaluation; written beside it to"}
    print(f"{note[summary['status']]} {summary['output_dir']}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with runtime.exit_on_user_error():  # every class marked user_error = True: one line, exit 2
        main(sys.argv[1:])
