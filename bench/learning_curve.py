"""Learning curve of one run: every `checkpoints/epoch_<k>.pt` evaluated on the run's test
studies, beside the validation Dice the run logged after the same epoch.

    python main.py --keep_epoch_checkpoints=True ...           # the weights after every validation
    python bench/learning_curve.py --run_dir=runs/<name> --out=results/curves/<name>
    python sweep.py --grid=headline_long --budget=long         # runs that keep them (budget `long`)

Each evaluation is `test.evaluate(run_dir, checkpoint="epoch_<k>")` with the run's own settings
and lands in the run's `eval-epoch_<k>/` folder; a folder that is already there is read, not
computed again. The validation figures are metrics.jsonl's (pseudo-Dice and mean per-study
Dice at the training threshold, on the validation studies). Writes into --out:
    learning_curve.csv  epoch, step, val_pseudo_dice, val_mean_dice, test_dice,
                        test_fpv_ml_tumor_free, lesion_recall (one row per epoch checkpoint)
    learning_curve.png  test and validation Dice against the optimiser step
The figures are of the post-processed masks when the run's config post-processes (as in
sweep.py's leaderboard). The test curve only measures: an epoch chosen on it would turn the
test studies into validation studies (docs/study.md, "Rules").
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
import checkpoint  # noqa: E402 - the epoch files a run kept
import runtime  # noqa: E402

COLUMNS = ("epoch", "step", "val_pseudo_dice", "val_mean_dice", "test_dice",
           "test_fpv_ml_tumor_free", "lesion_recall")


class CurveError(ValueError):
    """A run without epoch checkpoints or metrics (a user matter: one line, exit 2)."""

    user_error = True


def epoch_checkpoints(run_dir: Path) -> list[int]:
    """The epochs k with a checkpoints/epoch_<k>.pt, ascending."""
    found = list(checkpoint.epoch_files(run_dir / "checkpoints"))
    if not found:
        raise CurveError(f"{run_dir}/checkpoints holds no epoch_<k>.pt; train with "
                         "--keep_epoch_checkpoints=True (sweep.py budget `long` does)")
    return sorted(found)


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def evaluate_epoch(run_dir: Path, epoch: int, device: str | None = None,
                   cache_dir: str | None = None) -> dict:
    """The test figures of checkpoint epoch_<epoch>: its eval-epoch_<epoch>/summary.json when
    there, else test.evaluate (which writes that folder)."""
    import test  # torch, models, MedPy

    summary = test.evaluate(run_dir, checkpoint=f"epoch_{epoch}", device=device,
                            cache_dir=cache_dir, progress=False, reuse=True)
    cohort = summary.get("postprocessed", summary)
    return {"test_dice": _nan(cohort["metrics"]["dice"]["mean"]),
            "test_fpv_ml_tumor_free": _nan(cohort["metrics"]["fpv_ml_tumor_free"]["mean"]),
            "lesion_recall": _nan(cohort["lesions"]["recall"])}


def learning_curve(run_dir: str | Path, device: str | None = None, every: int = 1,
                   cache_dir: str | None = None) -> list[dict]:
    """One row (COLUMNS) per epoch checkpoint of the run: the validation figures logged for
    that epoch (metrics.jsonl; NaN when it was not validated) and the test figures. every=N
    evaluates every N-th epoch checkpoint and the last one (the others keep their validation
    figures, test columns NaN). `cache_dir`: where the test studies are prepared instead of the
    run's recorded cache folder (test.run_config)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise CurveError(f"{run_dir}/metrics.jsonl not found; pass --run_dir=runs/<name>")
    logged = {r["epoch"]: r for r in map(json.loads,
                                         (run_dir / "metrics.jsonl").read_text().splitlines())}
    if every < 1:
        raise CurveError(f"--every={every}: give 1 (every epoch) or more")
    rows, epochs = [], epoch_checkpoints(run_dir)
    for epoch in epochs:
        record = logged.get(epoch, {})
        test = (evaluate_epoch(run_dir, epoch, device, cache_dir)
                if epoch % every == 0 or epoch == epochs[-1]
                else dict.fromkeys(COLUMNS[4:], math.nan))
        rows.append({"epoch": epoch, "step": record.get("step", math.nan),
                     "val_pseudo_dice": _nan(record.get("val_pseudo_dice")),
                     "val_mean_dice": _nan(record.get("val_mean_dice")), **test})
    return rows


def write_curve(rows: list[dict], out: Path, title: str) -> None:
    """learning_curve.csv and learning_curve.png into `out`."""
    from matplotlib.figure import Figure  # no pyplot: no global state

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "learning_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    steps = [r["step"] for r in rows]
    for key, label, style in (("test_dice", "test Dice (tumour studies)", "o-"),
                              ("val_mean_dice", "validation mean Dice", "s--"),
                              ("val_pseudo_dice", "validation pseudo-Dice", "^:")):
        points = [(x, r[key]) for x, r in zip(steps, rows) if not math.isnan(r[key])]
        ax.plot([x for x, _ in points], [y for _, y in points], style, label=label)
    ax.set(xlabel="optimiser step", ylabel="Dice", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=110)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Test and validation Dice of every epoch "
                                                 "checkpoint of a run (see the module docstring).")
    parser.add_argument("--run_dir", required=True, help="runs/<name>, trained with "
                        "--keep_epoch_checkpoints=True")
    parser.add_argument("--out", required=True, help="folder for learning_curve.{csv,png}")
    parser.add_argument("--subset", default="test", choices=["test"],
                        help="the studies evaluated per epoch: the run's test studies (the "
                             "validation curve is metrics.jsonl's)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda (config default)")
    parser.add_argument("--every", type=int, default=1,
                        help="evaluate every N-th epoch checkpoint (and the last) on the test "
                             "studies")
    parser.add_argument("--cache_dir", default=None,
                        help="prepare the test studies here instead of the run's recorded "
                             "cache_dir (a run kept by bench/main_run.py, whose cache is gone)")
    args = parser.parse_args(argv)
    rows = learning_curve(args.run_dir, args.device, args.every, args.cache_dir)
    write_curve(rows, Path(args.out), f"learning curve of {Path(args.run_dir).name}")
    print(f"{len(rows)} epochs: {Path(args.out) / 'learning_curve.csv'}, learning_curve.png")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with runtime.exit_on_user_error():
        main(sys.argv[1:])
