"""How far can post-processing alone take a run's weights? Every setting of the post-processing
grid scored on the TEST studies, beside the setting the run chose on its validation studies.

    python bench/pp_frontier.py --run_dir=runs/<name> [--cache_dir=cache] --out=results/<name>/pp_frontier.md

The masks are the ones the run's evaluation scores (`<run_dir>/eval/summary.json` settings: its
checkpoint and TTA), thresholded and post-processed (metrics.postprocess_mask) with each of the
grid's settings (metrics.POSTPROCESS_GRID with the run's `pp_thresholds`: 162 by default). For
each setting, on the test studies: the mean Dice of the tumour studies, the mean false-positive
volume of the tumour-free studies (autoPET's FPV, ml) and the lesion recall (detected lesions
over all lesions, a detection being a predicted component with Dice >= 0.1: metrics.
match_lesions), the three figures of issue #13's targets, computed as metrics.case_metrics does
(tested against it).

A setting picked here is picked on the test studies: an oracle, not a method. The report says
whether ANY setting meets the targets with these weights (if none does, no post-processing
chosen on validation can), the settings on the trade between false-positive volume and recall,
and where the validation choice falls. Nothing here changes a run or its evaluations.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "bench"):  # the project, and fp_by_organ's report writer
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import factory  # noqa: E402
import runtime  # noqa: E402
import test as evaluation  # noqa: E402
from fp_by_organ import evaluated_settings, run_report_main  # noqa: E402
from metrics import (CONNECTIVITY_18, LESION_MATCH_DICE, _union_bbox, component_stats,  # noqa: E402
                     match_lesions, postprocess_grid)

TARGETS = {"dice": 0.45, "fpv_ml": 1.0, "recall": 0.6}  # issue #13, the 15-minute run
SETTING_KEYS = ("threshold", "suv_floor", "min_component_ml", "min_component_suvmax")


def study_scores(mask: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict:
    """Dice (tumour studies; NaN otherwise), FPV ml, lesions and detected lesions of one study
    from its mask (the reference _study_grid_scores is tested against),
    with metrics.case_metrics's definitions (its crop, its 18-connected matching)."""
    mask, ref = np.asarray(mask, bool), np.asarray(ref, bool)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_pred, n_ref = int(mask.sum()), int(ref.sum())
    row = {"dice": float("nan"), "fpv_ml": 0.0, "n_lesions": 0, "n_detected": 0}
    if n_pred == 0 and n_ref == 0:
        return row
    box = _union_bbox(mask, ref)
    match = match_lesions(mask[box], ref[box])
    row["fpv_ml"] = float(match["pred_sizes"][~match["pred_touched"]].sum()) * voxel_ml
    if n_ref:
        tp = int((mask & ref).sum())
        row["dice"] = 2.0 * tp / (n_pred + n_ref)
        row["n_lesions"] = int(match["ref_sizes"].size)
        row["n_detected"] = int(match["ref_detected"].sum())
    return row


def grid_settings(grid: dict) -> list[dict]:
    return [dict(zip(SETTING_KEYS, values)) for values in
            itertools.product(*(grid[k] for k in SETTING_KEYS))]


def _components(prob: np.ndarray, suv: np.ndarray, grid: dict):
    """(threshold, SUV floor, labels, n, voxels per label, SUVmax per label) for each threshold
    and floor of `grid`: metrics.component_stats of the mask before the component filters."""
    suv = np.asarray(suv, np.float64)
    for threshold in grid["threshold"]:
        above = prob > threshold
        for floor in grid["suv_floor"]:
            base = above & (suv >= floor) if floor > 0 else above
            yield (threshold, floor, *component_stats(base, suv))


def _keeps(sizes_ml: np.ndarray, suvmax: np.ndarray, grid: dict):
    """(min_component_ml, min_component_suvmax, labels kept) for each pair of the grid's
    component filters, as metrics.postprocess_mask keeps them (keep[0], background, False)."""
    for min_ml, min_suvmax in itertools.product(grid["min_component_ml"], grid["min_component_suvmax"]):
        keep = np.ones(len(sizes_ml), bool)
        if min_ml > 0:
            keep &= sizes_ml >= min_ml
        if min_suvmax > 0:
            keep &= suvmax >= min_suvmax
        keep[0] = False
        yield min_ml, min_suvmax, keep


def _setting(threshold: float, floor: float, min_ml: float, min_suvmax: float) -> dict:
    return dict(zip(SETTING_KEYS, (threshold, floor, min_ml, min_suvmax)))


def _masks(prob: np.ndarray, suv: np.ndarray, spacing: Sequence[float], grid: dict):
    """(setting, mask) for every setting of `grid`: metrics.postprocess_mask's masks (tested
    equal), with the components labelled once per threshold and SUV floor."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    for threshold, floor, labels, _, sizes, suvmax in _components(prob, suv, grid):
        for min_ml, min_suvmax, keep in _keeps(sizes * voxel_ml, suvmax, grid):
            yield _setting(threshold, floor, min_ml, min_suvmax), keep[labels]


def _study_grid_scores(prob: np.ndarray, ref: np.ndarray, suv: np.ndarray,
                       spacing: Sequence[float], grid: dict):
    """(setting, study_scores of that setting's mask) for every setting (tested equal to
    study_scores on _masks), from one overlap table of reference lesions x predicted components
    per threshold and floor: filtering whole components neither splits nor merges any, so each
    setting's components are a subset of those labels and its matching a subset of the table."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ref = np.asarray(ref, bool)
    ref_labels, n_ref = ndimage.label(ref, structure=CONNECTIVITY_18)
    ref_sizes = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)[1:]
    n_ref_voxels = int(ref_sizes.sum())
    for threshold, floor, labels, n, sizes, suvmax in _components(prob, suv, grid):
        both = (ref_labels > 0) & (labels > 0)
        overlap = np.bincount(ref_labels[both].astype(np.int64) * (n + 1) + labels[both],
                              minlength=(n_ref + 1) * (n + 1)).reshape(n_ref + 1, n + 1)[1:, 1:]
        dice = 2.0 * overlap / np.maximum(ref_sizes[:, None] + sizes[None, 1:], 1)  # (n_ref, n)
        touched = overlap.sum(axis=0) > 0  # (n,): the autoPET rule, any contact
        matched = dice >= LESION_MATCH_DICE
        for min_ml, min_suvmax, keep in _keeps(sizes * voxel_ml, suvmax, grid):
            k = keep[1:]
            n_pred = int(sizes[1:][k].sum())
            row = {"dice": float("nan"), "fpv_ml": float(sizes[1:][k & ~touched].sum()) * voxel_ml,
                   "n_lesions": 0, "n_detected": 0}
            if n_ref:
                row["dice"] = 2.0 * int(overlap[:, k].sum()) / (n_pred + n_ref_voxels)
                row["n_lesions"] = n_ref
                row["n_detected"] = int(matched[:, k].any(axis=1).sum())
            yield _setting(threshold, floor, min_ml, min_suvmax), row


def score_grid(studies: Sequence[tuple], grid: dict) -> list[dict]:
    """One row per setting: the setting, mean Dice (tumour studies), mean FPV (tumour-free
    studies), recall (all lesions pooled), over `studies` = [(prob, ref, suv, spacing), ...]."""
    per_setting: dict[tuple, list] = {}
    for prob, ref, suv, spacing in studies:
        has = bool(np.any(ref))
        for setting, scores in _study_grid_scores(prob, ref, suv, spacing, grid):
            per_setting.setdefault(tuple(setting[k] for k in SETTING_KEYS), []).append((has, scores))
    rows = []
    for setting in grid_settings(grid):
        per_study = per_setting[tuple(setting[k] for k in SETTING_KEYS)]
        tumour = [s for has, s in per_study if has]
        free = [s for has, s in per_study if not has]
        n_lesions = sum(s["n_lesions"] for s in tumour)
        rows.append({**setting,
                     "dice": float(np.mean([s["dice"] for s in tumour])) if tumour else float("nan"),
                     "fpv_ml": float(np.mean([s["fpv_ml"] for s in free])) if free else float("nan"),
                     "recall": sum(s["n_detected"] for s in tumour) / n_lesions if n_lesions else float("nan"),
                     "n_tumour": len(tumour), "n_tumour_free": len(free), "n_lesions": n_lesions})
    return rows


def meets(row: dict, targets: dict = TARGETS) -> dict[str, bool]:
    return {"dice": row["dice"] >= targets["dice"], "fpv_ml": row["fpv_ml"] <= targets["fpv_ml"],
            "recall": row["recall"] >= targets["recall"]}


def trade_off(rows: Sequence[dict]) -> list[dict]:
    """The settings no other setting beats on false-positive volume, recall and Dice at once
    (the Pareto front: lower FPV, higher recall, higher Dice), by increasing FPV."""
    def dominated(r: dict) -> bool:
        return any(o["fpv_ml"] <= r["fpv_ml"] and o["recall"] >= r["recall"] and o["dice"] >= r["dice"]
                   and (o["fpv_ml"], o["recall"], o["dice"]) != (r["fpv_ml"], r["recall"], r["dice"])
                   for o in rows)
    return sorted((r for r in rows if not dominated(r)), key=lambda r: (r["fpv_ml"], -r["recall"]))


def summarise(rows: list[dict], chosen: dict | None, targets: dict = TARGETS) -> dict:
    all_three = [r for r in rows if all(meets(r, targets).values())]
    fpv_ok = [r for r in rows if meets(r, targets)["fpv_ml"]]
    recall_ok = [r for r in rows if meets(r, targets)["recall"]]
    chosen_row = None
    if chosen is not None:
        chosen_row = next((r for r in rows if all(np.isclose(r[k], chosen[k]) for k in SETTING_KEYS)), None)
    return {"targets": targets, "n_settings": len(rows), "n_meet_all": len(all_three),
            "meet_all": all_three,
            "best_recall_within_fpv": max(fpv_ok, key=lambda r: (r["recall"], r["dice"]), default=None),
            "lowest_fpv_with_recall": min(recall_ok, key=lambda r: (r["fpv_ml"], -r["dice"]), default=None),
            "chosen_on_validation": chosen_row, "trade_off": trade_off(rows), "grid": rows}


def analyse(run_dir: Path, cache_dir: str | None) -> dict:
    settings = evaluated_settings(run_dir)
    commit = runtime.git_commit()  # the code that computes this, read before the work starts
    cfg = evaluation.run_config(run_dir, cache_dir)
    device = torch.device("cpu")
    model = evaluation.load_run_model(run_dir, cfg, settings["checkpoint"], device)
    amp_dtype = runtime.resolve_amp(cfg.amp, device)
    studies = []
    for cached in evaluation.run_studies(run_dir, cfg, "test"):
        prob = evaluation.study_probabilities(model, cached, **factory.inference_options(cfg),
                                              device=device, amp_dtype=amp_dtype, tta=settings["tta"])
        suv, ref, _ = evaluation.study_volumes(cached, cfg.suv_max)
        studies.append((prob, ref > 0, suv, evaluation.scoring_grid(cached)[0]))
    chosen = {"threshold": settings["threshold"], **settings["postprocess"]}
    result = summarise(score_grid(studies, postprocess_grid(cfg.pp_thresholds)), chosen)
    return {"run_dir": str(run_dir), "git_commit": commit,
            "checkpoint": settings["checkpoint"], "tta": settings["tta"], **result}


def _line(row: dict | None, targets: dict) -> str:
    if row is None:
        return "| none | | | |"
    ok = meets(row, targets)
    setting = ", ".join(f"{k} {row[k]:g}" for k in SETTING_KEYS)
    mark = {k: " ✓" if v else "" for k, v in ok.items()}
    return (f"| {setting} | {row['dice']:.3f}{mark['dice']} | {row['fpv_ml']:.2f}{mark['fpv_ml']} | "
            f"{row['recall']:.2f}{mark['recall']} |")


def to_markdown(result: dict) -> str:
    t = result["targets"]
    head = ("| setting (threshold, SUV floor, min component ml, min component SUVmax) | Dice | "
            "FPV ml | recall |\n|---|---|---|---|")
    lines = [f"# Post-processing on the test studies: {result['run_dir']}", "",
             f"Commit {result['git_commit']}; checkpoint {result['checkpoint']}, TTA "
             f"{result['tta']}; {result['n_settings']} settings of the post-processing grid, each "
             f"scored on the test studies (an oracle choice, not a method). Targets: Dice >= "
             f"{t['dice']}, FPV <= {t['fpv_ml']} ml, recall >= {t['recall']} (✓ = met).", "",
             f"**Settings that meet all three targets: {result['n_meet_all']} of "
             f"{result['n_settings']}.**", "", head]
    picks = [("chosen on the validation studies (the run's evaluation)", result["chosen_on_validation"]),
             (f"highest recall with FPV <= {t['fpv_ml']} ml", result["best_recall_within_fpv"]),
             (f"lowest FPV with recall >= {t['recall']}", result["lowest_fpv_with_recall"])]
    lines[-1] = "| which | " + head.split("\n")[0][2:] + "\n|---|---|---|---|---|"
    for name, row in picks:
        lines.append(f"| {name} " + _line(row, t))
    lines += ["", f"The trade-off ({len(result['trade_off'])} settings no other beats on FPV, "
              "recall and Dice at once), by false-positive volume:", "", head]
    lines += [_line(r, t) for r in result["trade_off"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    run_report_main(argv, analyse, to_markdown, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
