"""Would a filter on whole predicted components remove the false positives a run has left?

    python bench/component_filters.py --run_dir=runs/<name> [--cache_dir=cache] --out=results/<name>/component_filters.md

Starts from the masks a run's evaluation scores (`<run_dir>/eval/summary.json` settings: its
checkpoint, TTA, threshold and the post-processing tune_postprocess chose), predicts its
validation and test studies again, and labels the 18-connected components of each mask (as
metrics.py and autoPET count them). A component is a true-positive component when it touches a
reference voxel, else a false-positive one. Candidate filters, each dropping the components
whose feature is below a cut (ct_core_hu: within a density window, see there):
  prob_max     the component's highest tumour probability: a confidence filter (drop blobs the
               network is unsure of everywhere);
  ct_mean_hu   the mean CT density (HU) over the component: brown adipose tissue, the largest
               source of false positives on the phantom, is fat on CT (the BARCIST 1.0 criteria
               define it by CT density -190 to -10 HU with an SUV threshold; Chen et al., J Nucl
               Med 2016;57:1429-1439), tumour is soft tissue.
  ct_core_hu   the mean CT density over the component's hot core (its voxels with SUV >= 70 % of
               the component's SUVmax): the same criterion on the voxels that made the component
               hot, so that a small node in fat or a nodule in lung, whose component reaches
               into the fat or lung around it, is judged by its own density. This filter is a
               window, not a floor: it drops a component whose core lies within the BARCIST
               brown-fat range, -190 HU up to the cut (BARCIST's upper bound is -10 HU), and
               keeps denser cores (soft tissue, bone) and lung-dense ones (< -190 HU) alike.
  aux_background  (runs trained with an auxiliary head, --aux_target=organs or uptake) the mean
               over the component of the head's background probability (inference.
               predict_aux_background): the organ head learns to call lesion voxels background
               and brown fat, bowel, the urinary tract "organ", so a component it calls organ
               nearly everywhere is physiological uptake. The head is read at inference here
               only, as an analysis: LesionTracer (Rokuss et al. 2024, arXiv:2409.09478), whose
               organ head this is, drops it at inference, and so do test.py and predict.
Each cut is chosen on the VALIDATION studies as tune_postprocess chooses (pooled Dice, "no
filter" among the candidates, ties to the stricter cut), then scored on the test studies with
metrics.case_metrics / summarise_cohort, the figures the evaluation reports. The report also
gives the features' quantiles over the test studies' true- and false-positive components, the
reason a filter works or not. Nothing here changes a run or its evaluations.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "bench"):  # the project, and fp_by_organ's report writer
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import data  # noqa: E402
import factory  # noqa: E402
import inference  # noqa: E402
from models import aux_outputs  # noqa: E402
import runtime  # noqa: E402
import test as evaluation  # noqa: E402
from fp_by_organ import evaluated_settings, run_report_main  # noqa: E402
from metrics import (CONNECTIVITY_18, case_metrics, choose_postprocessing,  # noqa: E402
                     postprocess_mask, postprocess_objective, summarise_cohort)

FILTERS = {"prob_max": (0.9, 0.95, 0.98, 0.99), "ct_mean_hu": (-100.0, -60.0, -30.0),
           "ct_core_hu": (-60.0, -30.0, -10.0), "aux_background": (0.1, 0.25, 0.5, 0.75)}
# How a filter reads its cut: "floor" drops the components whose feature is below it;
# "fat_window" drops those whose feature lies in [FAT_HU_LOW, cut] (BARCIST 1.0's brown-fat
# density range is -190 to -10 HU: Chen et al., J Nucl Med 2016;57:1429-1439).
WINDOW_FILTERS = ("ct_core_hu",)
FAT_HU_LOW = -190.0
CORE_FRACTION = 0.7  # ct_core_hu: the core is the component's voxels with SUV >= this x SUVmax
AUX_FILTERS = ("aux_background",)  # only for runs with an auxiliary head
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75)


def component_features(mask: np.ndarray, ref: np.ndarray, prob: np.ndarray, ct: np.ndarray,
                       aux_background: np.ndarray | None = None,
                       suv: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per 18-connected component of `mask` (label order of scipy.ndimage.label): "voxels",
    "tumour_voxels" (reference voxels inside it), "prob_max", "ct_mean_hu", with
    `aux_background` (the aux head's background probability, same grid) also its mean
    "aux_background", with `suv` (same grid) also "ct_core_hu", the mean CT over the voxels
    with SUV >= CORE_FRACTION x the component's SUVmax; and "labels", the label volume itself
    (what `filtered_mask` keeps components of)."""
    labels, n = ndimage.label(np.asarray(mask, bool), structure=CONNECTIVITY_18)
    index = np.arange(1, n + 1)
    voxels = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    tumour = np.bincount(labels[np.asarray(ref) > 0], minlength=n + 1)[1:]
    features = {"labels": labels, "voxels": voxels, "tumour_voxels": tumour}
    ct = np.asarray(ct, np.float64)
    volumes = {"prob_max": (ndimage.maximum, prob), "ct_mean_hu": (ndimage.mean, ct)}
    if aux_background is not None:
        volumes["aux_background"] = (ndimage.mean, aux_background)
    for name, (reduce, volume) in volumes.items():
        features[name] = (np.asarray(reduce(np.asarray(volume, np.float64), labels, index),
                                     np.float64) if n else np.zeros(0))
    if suv is not None:
        features["ct_core_hu"] = _core_mean(labels, n, np.asarray(suv, np.float64), ct)
    return features


def _core_mean(labels: np.ndarray, n: int, suv: np.ndarray, ct: np.ndarray) -> np.ndarray:
    """Per component 1..n: the mean of `ct` over its voxels with suv >= CORE_FRACTION x its
    own SUVmax (never empty: the SUVmax voxel itself qualifies)."""
    if not n:
        return np.zeros(0)
    suv_max = np.r_[0.0, ndimage.maximum(suv, labels, np.arange(1, n + 1))]
    core = (labels > 0) & (suv >= CORE_FRACTION * suv_max[labels])
    total = np.bincount(labels[core], weights=ct[core], minlength=n + 1)[1:]
    count = np.bincount(labels[core], minlength=n + 1)[1:]
    return total / count


def _keep(features: dict[str, np.ndarray], name: str, cut: float) -> np.ndarray:
    """The components a filter keeps: `name` >= cut, or for a window filter `name` outside
    [FAT_HU_LOW, cut]; every one for name "" (no filter)."""
    if not name:
        return np.ones(len(features["voxels"]), bool)
    if name in WINDOW_FILTERS:
        return (features[name] < FAT_HU_LOW) | (features[name] > cut)
    return features[name] >= cut


def kept_counts(features: dict[str, np.ndarray], n_ref: int, name: str, cut: float
                ) -> tuple[int, int, int]:
    """(TP, FP, FN) voxels of one study after dropping the components whose `name` < cut."""
    keep = _keep(features, name, cut)
    tp = int(features["tumour_voxels"][keep].sum())
    return tp, int(features["voxels"][keep].sum()) - tp, n_ref - tp


def choose_cut(val: list[tuple[dict, int]], name: str) -> tuple[float, dict[float, float]]:
    """The cut of FILTERS[name] (0 = no filter) with the highest pooled validation Dice, by
    metrics.choose_postprocessing over the one-axis grid (no filter, *cuts): ties go to the
    stricter cut (the later candidate), as tune_postprocess breaks them. Returns (cut, the
    pooled Dice of every candidate)."""
    grid = {"cut": (0.0, *FILTERS[name])}
    counts = np.array([[kept_counts(f, n, name if cut else "", cut) for cut in grid["cut"]]
                       for f, n in val])  # (n_studies, n_candidates, 3)
    chosen, _ = choose_postprocessing(counts, grid, "pooled_dice")
    scores = postprocess_objective(counts, "pooled_dice")
    return chosen["cut"], {cut: float(score) for cut, score in zip(grid["cut"], scores)}


def filtered_mask(features: dict, name: str, cut: float) -> np.ndarray:
    """The study's mask with the components a filter drops removed."""
    return np.r_[False, _keep(features, name, cut)][features["labels"]]


def _test_row(test: list, name: str, cut: float, val_score: float, chosen: bool) -> dict:
    """The test figures of one filter cut, as the evaluation reports them."""
    rows = [case_metrics(filtered_mask(f, name, cut), r, s) for r, s, f in test]
    cohort = summarise_cohort(rows, n_bootstrap=0)
    return {"filter": name or "none (the run's evaluation)", "cut": cut,
            "chosen_on_validation": chosen, "val_pooled_dice": val_score,
            "test_dice": cohort["metrics"]["dice"]["mean"],
            "test_fpv_ml_tumor_free": cohort["metrics"]["fpv_ml_tumor_free"]["mean"],
            "lesion_recall": cohort["lesions"]["recall"]}


def analyse(run_dir: Path, cache_dir: str | None) -> dict:
    settings = evaluated_settings(run_dir)
    cfg = evaluation.run_config(run_dir, cache_dir)
    device = torch.device("cpu")
    model = evaluation.load_run_model(run_dir, cfg, settings["checkpoint"], device)
    amp_dtype = runtime.resolve_amp(cfg.amp, device)
    out: dict = {"run_dir": str(run_dir), "git_commit": runtime.git_commit(),
                 "checkpoint": settings["checkpoint"],
                 "tta": settings["tta"], "threshold": settings["threshold"],
                 "postprocess": settings["postprocess"]}
    with_aux = cfg.aux_target != "none"
    if with_aux and cfg.inplane != "resize":
        raise SystemExit(f"{run_dir}: the aux_background filter reads the head on the resize "
                         f"path only; this run has inplane={cfg.inplane}")
    names = [n for n in FILTERS if with_aux or n not in AUX_FILTERS]
    aux_options = {k: v for k, v in factory.inference_options(cfg).items()
                   if k not in ("inplane", "overlap")}  # predict_aux_background: resize path
    out["aux_target"] = cfg.aux_target
    subsets: dict[str, list] = {}
    for subset in ("val", "test"):
        items = []
        for cached in evaluation.run_studies(run_dir, cfg, subset):
            if cached.study_ref() is None:
                raise SystemExit(f"study {cached.case_id} has no files to read its CT in HU from")
            prob = evaluation.study_probabilities(model, cached, **factory.inference_options(cfg),
                                                  device=device, amp_dtype=amp_dtype,
                                                  tta=settings["tta"])
            suv, ref, _ = evaluation.study_volumes(cached, cfg.suv_max)
            spacing = evaluation.scoring_grid(cached)[0]
            ct = data.load_study(cached.study_ref()).ct
            mask = postprocess_mask(prob > settings["threshold"], spacing=spacing, suv=suv,
                                    **settings["postprocess"])
            aux_bg = None
            if with_aux:
                with aux_outputs(model):
                    aux_bg = evaluation.to_scoring_grid(cached, inference.predict_aux_background(
                        model, cached, **aux_options, device=device, amp_dtype=amp_dtype,
                        tta=settings["tta"]))
            features = component_features(mask, ref, prob, ct, aux_bg, suv)
            if subset == "val":  # only counts are needed there, not the label volume
                del features["labels"]
            items.append((ref > 0, spacing, features))
        subsets[subset] = items
    test = subsets["test"]
    out["features"] = {}
    for name in names:
        tp = np.concatenate([f[name][f["tumour_voxels"] > 0] for *_, f in test])
        fp = np.concatenate([f[name][f["tumour_voxels"] == 0] for *_, f in test])
        out["features"][name] = {
            "tp_components": len(tp), "fp_components": len(fp),
            "tp_quantiles": [float(np.quantile(tp, q)) for q in QUANTILES] if len(tp) else [],
            "fp_quantiles": [float(np.quantile(fp, q)) for q in QUANTILES] if len(fp) else []}
    val = [(f, int(r.sum())) for r, _, f in subsets["val"]]
    out["filters"], out["chosen_on_validation"] = [], {}
    for name in names:
        chosen, scores = choose_cut(val, name)
        if not out["filters"]:  # the run's own masks: the no-filter candidate of every filter
            out["filters"].append(_test_row(test, "", 0.0, scores[0.0], False))
        out["chosen_on_validation"][name] = chosen
        out["filters"] += [_test_row(test, name, cut, scores[cut], cut == chosen)
                           for cut in FILTERS[name]]
    return out


def to_markdown(result: dict) -> str:
    lines = [f"Component filters on `{result['run_dir']}` (`python bench/component_filters.py`, "
             f"commit `{(result.get('git_commit') or 'unknown')[:12]}`): "
             f"its evaluation's masks (checkpoint {result['checkpoint']}, TTA {result['tta']}, "
             f"threshold {result['threshold']:g}, post-processing {result['postprocess']}), "
             "then the components whose feature is below a cut dropped (ct_core_hu: whose "
             f"core density lies in [{FAT_HU_LOW:g} HU, cut]). * marks the cut the "
             "validation studies choose (pooled Dice, ties to the stricter cut); test figures "
             "as the evaluation reports them.", "",
             "| filter | cut | validation pooled Dice | test Dice | test FPV ml, tumour-free "
             "| lesion recall |", "|---|---|---|---|---|---|"]
    for row in result["filters"]:
        cut = "" if row["filter"].startswith("none") else \
            f"{row['cut']:g}{' *' if row['chosen_on_validation'] else ''}"
        lines.append(f"| {row['filter']} | {cut} | {row['val_pooled_dice']:.4f} | "
                     f"{row['test_dice']:.3f} | {row['test_fpv_ml_tumor_free']:.2f} | "
                     f"{row['lesion_recall']:.2f} |")
    for name, cut in result["chosen_on_validation"].items():
        if cut == 0.0:
            lines.append(f"\n{name}: the validation studies choose no filter (no cut scores "
                         "higher than none).")
    lines += ["", "Features of the test studies' components (count: quantiles "
              + " / ".join(f"{q:g}" for q in QUANTILES) + "):", "",
              "| feature | true-positive components | false-positive components |", "|---|---|---|"]
    for name, f in result["features"].items():
        fmt = "{:.0f}" if name.startswith("ct_") else "{:.3f}"
        cells = [f"{n}: " + " / ".join(fmt.format(v) for v in values) for n, values in
                 ((f["tp_components"], f["tp_quantiles"]), (f["fp_components"], f["fp_quantiles"]))]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    run_report_main(argv, analyse, to_markdown, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
