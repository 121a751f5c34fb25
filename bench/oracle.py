"""The phantom's oracle scored like a model: the same metrics, on the same test studies.

    python bench/oracle.py                                  # the cpu preset's 50 test studies
    python bench/oracle.py --seed=1 --n_cases=50 --out=results/oracle

The oracle of docs/phantom.md (acceptance property 4; `bench/bench_phantom.py`): SUV > 2.5,
minus the voxels within one voxel of the hot physiological structures whose masks only the
phantom knows (`data._anatomy.ORACLE_EXCLUDED`), then 41 % of each remaining component's
SUVmax. It is told where the physiological uptake is, which no model is: it bounds what an
SUV-driven method reaches on these studies, it is not a method. Each study `i` of the phantom
(size, seed) is rendered (`data.phantom.render`, the arrays `main.py`'s phantom writes) and
scored with `metrics.case_metrics` and `metrics.summarise_cohort`, the functions
`test.py` reports with (Dice over tumour studies, autoPET's false-positive volume on
tumour-free studies, lesion recall at Dice >= 0.1 per lesion), so its figures stand beside a
run's `eval/summary.json`. Writes --out/summary.json and --out/per_case.csv when --out is
given, and prints a table with lesion recall by lesion volume.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_phantom import FULL, per_component_41  # noqa: E402
from data import _anatomy as A  # noqa: E402
from data.phantom import render  # noqa: E402
from metrics import CONNECTIVITY_18, case_metrics, summarise_cohort  # noqa: E402

CSV_COLUMNS = ("index", "has_tumor", "dice", "fpv_ml", "fnv_ml", "n_lesions", "n_lesions_detected",
               "n_fp_components")
VOLUME_BINS_ML = (0.0, 0.5, 1.0, 3.0, 10.0, np.inf)


def oracle_mask(pet: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """SUV > 2.5 away from the known hot structures, 41 % of SUVmax per component."""
    hot = ndimage.binary_dilation(np.isin(tissue, A.ORACLE_EXCLUDED), structure=FULL)
    return per_component_41(pet, (pet > 2.5) & ~hot)


def score_study(job: tuple[int, str, int]) -> tuple[dict, list[tuple[float, bool]]]:
    """(case_metrics row, [(lesion volume ml, detected)]) of the oracle on study `index`."""
    index, size, seed = job
    r = render(index, size, seed)
    ref = r.seg.astype(bool)
    row = case_metrics(oracle_mask(r.pet, r.tissue), ref, r.spacing, lesions=True)
    detected = row.pop("lesion_detected")
    labels, n = ndimage.label(ref, structure=CONNECTIVITY_18)  # case_metrics' lesion order
    voxel_ml = float(np.prod(r.spacing)) / 1000
    volumes = ndimage.sum(ref, labels, index=np.arange(1, n + 1)) * voxel_ml if n else []
    return {"index": index, **row}, list(zip(map(float, volumes), map(bool, detected)))


def run(n_cases: int, size: str, seed: int, workers: int) -> tuple[list[dict], list]:
    jobs = [(i, size, seed) for i in range(n_cases)]
    if workers > 1:
        with mp.Pool(workers) as pool:
            results = pool.map(score_study, jobs)
    else:
        results = list(map(score_study, jobs))
    return [r for r, _ in results], [lesion for _, ls in results for lesion in ls]


def recall_by_volume(lesions: list[tuple[float, bool]]) -> list[tuple[str, int, float]]:
    out = []
    for lo, hi in zip(VOLUME_BINS_ML[:-1], VOLUME_BINS_ML[1:]):
        hits = [d for v, d in lesions if lo <= v < hi]
        name = f">= {lo:g} ml" if np.isinf(hi) else f"{lo:g}-{hi:g} ml"
        out.append((name, len(hits), float(np.mean(hits)) if hits else float("nan")))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_cases", type=int, default=50, help="studies 0 .. n_cases-1 (default: the "
                    "cpu preset's n_test)")
    ap.add_argument("--size", default="demo", choices=["unit", "demo", "autopet"])
    ap.add_argument("--seed", type=int, default=1, help="phantom seed (default: the cpu preset's "
                    "phantom_test_seed)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for summary.json and per_case.csv")
    args = ap.parse_args(argv)
    if args.n_cases < 1 or args.workers < 1:
        print("error: --n_cases and --workers must be >= 1", file=sys.stderr)
        return 2
    rows, lesions = run(args.n_cases, args.size, args.seed, args.workers)
    summary = summarise_cohort(rows, n_bootstrap=1000, seed=0)
    m, les = summary["metrics"], summary["lesions"]
    by_volume = recall_by_volume(lesions)
    print(f"oracle on {args.n_cases} {args.size} studies of phantom seed {args.seed} "
          f"({summary['n_tumor']} with tumour):")
    print(f"  Dice, tumour studies                      {m['dice']['mean']:.3f}")
    print(f"  false-positive volume, tumour-free studies {m['fpv_ml_tumor_free']['mean']:.2f} ml")
    print(f"  lesions detected (Dice >= 0.1)            {les['detected']} of {les['n_lesions']} "
          f"(recall {les['recall']:.2f}), {les['false_positive_components']} false-positive components")
    for name, n, rec in by_volume:
        print(f"  recall, lesions {name:<12} {rec:.2f} (n={n})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary["recall_by_volume"] = [dict(volume=name, n=n, recall=rec) for name, n, rec in by_volume]
        import runtime  # imports torch: only here, to record the commit

        summary["settings"] = {"n_cases": args.n_cases, "size": args.size, "seed": args.seed,
                               "git_commit": runtime.git_commit()}
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
        with open(out / "per_case.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
