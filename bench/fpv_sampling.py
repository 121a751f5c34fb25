"""How well n tumour-free validation studies can predict a run's false-positive volume.

    python bench/fpv_sampling.py --eval=results/<run>/eval
    python bench/fpv_sampling.py --eval=<evaluation folder> --observed=0.374 --n=13 --out=<file.md>

The post-processing objective `mean_dice_fpv` (docs/evaluation.md "Post-processing") keeps the
mean false-positive volume (FPV) of the tumour-free validation studies under a limit; whether the
test studies then stay under it depends on how many tumour-free studies the validation has and on
how the volume is spread over studies. This reads an evaluation's `per_case.csv` (the
post-processed volume `pp_fpv_ml` where the evaluation post-processed, else `fpv_ml`), takes its
tumour-free studies as the population, and draws n studies from them with replacement (a
bootstrap, numpy seed 0, `--draws` times) for each size n of `--sizes`: the 2.5th, 50th and
97.5th percentiles of the mean of n studies say how far a validation set of that size can land
from the population mean. With `--observed=X --n=N` it also gives the fraction of draws of N
studies whose mean is <= X: how often a validation set like the one the run had would report a
volume as low as the one it reported, if validation and test studies came from the same
distribution. The table also lists the per-study volumes, largest first, and the share of the
total volume carried by the largest fifth of the studies.

Nothing is predicted again; the figures are only as good as the population (25 tumour-free test
studies in this repo's study).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def tumour_free_fpv(per_case: Path) -> tuple[np.ndarray, str]:
    """The false-positive volumes (ml) of the tumour-free studies of a per_case.csv, and the
    column read: the post-processed one where the evaluation has it."""
    with open(per_case, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{per_case}: no studies")
    column = "pp_fpv_ml" if rows[0].get("pp_fpv_ml") not in (None, "") else "fpv_ml"
    values = [float(r[column]) for r in rows if r["has_tumor"] == "False"]
    if not values:
        raise SystemExit(f"{per_case}: no tumour-free studies; the false-positive volume is "
                         "measured on them")
    return np.asarray(values), column


def sample_means(values: np.ndarray, n: int, draws: int, seed: int = 0) -> np.ndarray:
    """Means of `draws` samples of n values drawn with replacement."""
    rng = np.random.default_rng(seed)
    return values[rng.integers(0, len(values), size=(draws, n))].mean(axis=1)


def report(values: np.ndarray, column: str, sizes: list[int], draws: int,
           observed: float | None = None, n: int | None = None, source: str = "") -> str:
    top = max(1, round(len(values) / 5))
    ordered = np.sort(values)[::-1]
    total = float(values.sum())
    lines = [f"False-positive volume of the {len(values)} tumour-free studies of `{source}` "
             f"(`{column}`): mean {values.mean():.3f} ml; per study, largest first: "
             + ", ".join(f"{v:.2f}" for v in ordered) + " ml; the largest "
             f"{top} carry {ordered[:top].sum() / total:.0%} of the total."
             if total > 0 else f"No false-positive volume in the {len(values)} tumour-free "
             f"studies of `{source}`.", "",
             f"Mean of n studies drawn with replacement ({draws} draws, seed 0):", "",
             "| n | 2.5th percentile | median | 97.5th percentile |", "|---|---|---|---|"]
    for size in sizes:
        lo, mid, hi = np.percentile(sample_means(values, size, draws), [2.5, 50, 97.5])
        lines.append(f"| {size} | {lo:.3f} ml | {mid:.3f} ml | {hi:.3f} ml |")
    if observed is not None:
        frac = float((sample_means(values, n, draws) <= observed).mean())
        lines += ["", f"Draws of {n} studies whose mean is <= {observed:g} ml: {frac:.1%}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", required=True,
                        help="an evaluation folder (with per_case.csv), e.g. runs/<name>/eval")
    parser.add_argument("--sizes", default="13,25,50,100",
                        help="numbers of tumour-free studies to draw, comma-separated")
    parser.add_argument("--observed", type=float, default=None,
                        help="a mean volume (ml) that a validation set reported")
    parser.add_argument("--n", type=int, default=None,
                        help="that validation set's number of tumour-free studies")
    parser.add_argument("--draws", type=int, default=100_000)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    per_case = Path(args.eval) / "per_case.csv"
    if not per_case.is_file():
        raise SystemExit(f"--eval={args.eval}: no per_case.csv there; give the folder an "
                         "evaluation wrote (main.py's eval/ or test.py's eval-*/)")
    if (args.observed is None) != (args.n is None):
        raise SystemExit("--observed and --n go together: the volume a validation set reported "
                         "and its number of tumour-free studies")
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--sizes={args.sizes}: give whole numbers separated by commas") from None
    if min(sizes + ([args.n] if args.n is not None else [])) < 1 or args.draws < 1:
        raise SystemExit("--sizes, --n and --draws must be >= 1")
    values, column = tumour_free_fpv(per_case)
    text = report(values, column, sizes, args.draws, args.observed, args.n, source=args.eval)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        if out.exists():
            raise SystemExit(f"--out={out} exists; give a new file (earlier results are kept)")
        out.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
