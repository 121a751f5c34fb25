"""Where a run's false positives sit: false-positive volume and components per organ class.

    python bench/fp_by_organ.py --run_dir=runs/<name>                 # main.py's eval/ folder
    python bench/fp_by_organ.py --run_dir=runs/<name> --eval=eval-tta --out=results/<name>/fp_by_organ.md
    python bench/fp_by_organ.py --run_dir=runs/<kept by bench/main_run.py> --cache_dir=cache

Reads the masks an evaluation wrote (`<run_dir>/<eval>/predictions/<case>.nii.gz`: the
post-processed ones when the run post-processes) and the organ labels of the run's test studies
(the cache's organs.npy: ORGANS.nii.gz of the phantom, docs/phantom.md "Organ labels"; real data
with an organ segmentation works the same way). Nothing is predicted again.

False positives as the evaluation counts them (docs/evaluation.md, autoPET's rule): a
false-positive component is a connected component of the prediction (18-connectivity, as metrics.py and autoPET) that
touches no reference voxel, and the false-positive volume is the volume of those components.
Each of their voxels is given the organ label of the nearest labelled organ voxel within
`--reach` voxels (default 2: partial volume and the PET blur put the uptake of an organ a voxel
or two beyond its label), else "none" (fat, air, background far from every organ); a component
is counted under the organ that holds most of its voxels. So the volumes of a table add up to
the run's mean FPV. (The evaluation's count of false-positive components is that of the
lesion matching, components without a lesion at Dice >= 0.1; in tumour-free studies the two
counts are the same.)
Prints (and with --out writes) a markdown table, organs sorted by false-positive volume on the
tumour-free studies, the volume that the target `FPV <= 1 ml` is about.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import test as evaluation  # noqa: E402
from data.organs import ORGAN_LABELS  # noqa: E402
from metrics import CONNECTIVITY_18  # noqa: E402


def organ_of_voxels(organs: np.ndarray, reach: int) -> np.ndarray:
    """(X, Y, Z) int: every voxel's own organ label, or that of the nearest organ voxel within
    `reach` voxels (Euclidean, in voxels) where it is background (0); 0 beyond reach."""
    if not organs.any():
        return np.zeros(organs.shape, np.int64)
    dist, (ix, iy, iz) = ndimage.distance_transform_edt(organs == 0, return_indices=True)
    nearest = organs[ix, iy, iz].astype(np.int64)
    nearest[dist > reach] = 0
    return nearest


def study_fp(pred: np.ndarray, ref: np.ndarray, organs: np.ndarray, voxel_ml: float,
             reach: int) -> tuple[np.ndarray, np.ndarray]:
    """(FP ml per organ label, FP components per organ label), arrays of len(ORGAN_LABELS) (or
    max label + 1): the components of `pred` that touch no voxel of `ref`."""
    n = max(len(ORGAN_LABELS), int(organs.max()) + 1)
    label = organ_of_voxels(organs, reach)
    volume = np.zeros(n, np.float64)
    components = np.zeros(n, np.int64)
    comp, n_comp = ndimage.label(pred, structure=CONNECTIVITY_18)
    for k in range(1, n_comp + 1):
        voxels = comp == k
        if (voxels & ref).any():
            continue
        per_organ = np.bincount(label[voxels], minlength=n)
        volume += per_organ * voxel_ml
        components[per_organ.argmax()] += 1
    return volume, components


def analyse(run_dir: Path, eval_name: str = "eval", reach: int = 2,
            cache_dir: str | None = None) -> dict:
    """`cache_dir`: where the run's studies are prepared (test.py --cache_dir; None: the folder
    the run recorded, which for a run kept by bench/main_run.py was a temporary one)."""
    cfg = evaluation.run_config(run_dir, cache_dir)
    folder = run_dir / eval_name
    if not (folder / "predictions").is_dir():
        raise SystemExit(f"{folder}/predictions not found: evaluate the run first "
                         f"(python test.py --run_dir={run_dir})")
    studies = evaluation.run_studies(run_dir, cfg)
    lacking = [s.case_id for s in studies if not s.has_organs]
    if lacking:
        raise SystemExit(f"studies without organ labels (first: {lacking[0]}); this analysis "
                         "needs ORGANS.nii.gz per study (docs/phantom.md, 'Organ labels')")
    n = max(len(ORGAN_LABELS), max(s.max_organ_label for s in studies) + 1)
    totals = {"free": (np.zeros(n), np.zeros(n, np.int64)), "tumour": (np.zeros(n), np.zeros(n, np.int64))}
    counts = {"free": 0, "tumour": 0}
    for s in studies:
        path = folder / "predictions" / f"{s.case_id}.nii.gz"
        pred = np.asarray(nib.load(str(path)).dataobj) > 0
        ref = np.moveaxis(np.asarray(s.mask()), 0, -1) > 0
        organs = np.moveaxis(np.asarray(s.organs()), 0, -1)
        if pred.shape != ref.shape or organs.shape != ref.shape:
            raise SystemExit(f"{path}: shape {pred.shape}, reference {ref.shape}, organs "
                             f"{organs.shape}: not on one grid")
        voxel_ml = float(np.prod(s.spacing)) / 1000.0
        volume, comps = study_fp(pred, ref, organs, voxel_ml, reach)
        key = "tumour" if ref.any() else "free"
        totals[key][0][:] += volume
        totals[key][1][:] += comps
        counts[key] += 1
    names = {k: ORGAN_LABELS.get(k, f"label {k}") for k in range(n)}
    names[0] = "none (no organ within reach)"
    rows = []
    for k in range(n):
        rows.append({"organ": names[k],
                     "fpv_ml_free": totals["free"][0][k] / max(counts["free"], 1),
                     "fp_components_free": int(totals["free"][1][k]),
                     "fpv_ml_tumour": totals["tumour"][0][k] / max(counts["tumour"], 1),
                     "fp_components_tumour": int(totals["tumour"][1][k])})
    rows.sort(key=lambda r: (-r["fpv_ml_free"], -r["fp_components_free"]))
    return {"run_dir": str(run_dir), "eval": eval_name, "reach": reach, "n_free": counts["free"],
            "n_tumour": counts["tumour"], "rows": rows}


def to_markdown(result: dict) -> str:
    free, tumour = result["n_free"], result["n_tumour"]
    lines = [f"False positives of `{result['run_dir']}/{result['eval']}` by organ (nearest organ "
             f"label within {result['reach']} voxels; `python bench/fp_by_organ.py`). FPV = mean "
             f"false-positive volume per study.", "",
             f"| organ | FPV ml, {free} tumour-free | FP components | FPV ml, {tumour} tumour "
             f"studies | FP components |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["fp_components_free"] or r["fp_components_tumour"] or r["fpv_ml_free"] or r["fpv_ml_tumour"]:
            lines.append(f"| {r['organ']} | {r['fpv_ml_free']:.3f} | {r['fp_components_free']} | "
                         f"{r['fpv_ml_tumour']:.3f} | {r['fp_components_tumour']} |")
    total = [sum(r[k] for r in result["rows"]) for k in
             ("fpv_ml_free", "fp_components_free", "fpv_ml_tumour", "fp_components_tumour")]
    lines.append(f"| **all** | {total[0]:.3f} | {total[1]} | {total[2]:.3f} | {total[3]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--eval", default="eval", help="evaluation folder of the run")
    parser.add_argument("--reach", type=int, default=2)
    parser.add_argument("--cache_dir", default=None, help="where the studies are prepared "
                        "(test.py --cache_dir): for a run kept by bench/main_run.py")
    parser.add_argument("--out", help="write the table here (.md) and the numbers beside it (.json)")
    args = parser.parse_args(argv)
    report(analyse(Path(args.run_dir), args.eval, args.reach, args.cache_dir), to_markdown,
           args.out)


def evaluated_settings(run_dir: Path) -> dict:
    """The settings of a run's evaluation (`<run_dir>/eval/summary.json`: checkpoint, TTA,
    threshold, post-processing), or a clear stop when the run has not been evaluated."""
    summary_path = run_dir / "eval" / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"{summary_path} not found: evaluate the run first "
                         f"(python test.py --run_dir={run_dir})")
    return json.loads(summary_path.read_text())["settings"]


def run_report_main(argv: list[str], analyse, render, doc: str) -> None:
    """The command line of the benches that analyse one evaluated run (component_filters.py,
    pp_frontier.py): --run_dir, --cache_dir, --out; prints and writes `render(analyse(...))`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--cache_dir", default=None, help="where the studies are prepared "
                        "(test.py --cache_dir): for a run kept by bench/main_run.py")
    parser.add_argument("--out", help="write the table here (.md) and the numbers beside it (.json)")
    args = parser.parse_args(argv)
    report(analyse(Path(args.run_dir), args.cache_dir), render, args.out)


def report(result: dict, render, out: str | None) -> None:
    """Print `render(result)` (markdown); with `out`, write it there and the numbers beside it
    (.json)."""
    text = render(result)
    print(text, end="")
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
