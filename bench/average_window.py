"""Which window of kept weights to average, chosen on the validation studies.

    python bench/average_window.py --run_dir=runs/<name> [--run_dir=runs/<other> ...] \
        --fractions=0.5,0.625,0.75,0.875 --cache_dir=cache --out=results/<name>/average_window.md

A run trained with `--keep_epoch_checkpoints=True` and `--tune_postprocess=True` (the cpu_long
preset) can be evaluated on the mean of the weights it kept after any fraction of its steps
(`test.py --checkpoint=average --average_from=F`; stochastic weight averaging of checkpoints,
Izmailov et al., UAI 2018). The preset averages the last quarter (F = 0.75). This script scores
each fraction as test.py does (`test.evaluate`: the threshold and post-processing chosen on the
validation studies for those weights, then the test studies) and names the fraction the
validation studies prefer: the highest value of the run's own post-processing objective
(`pp_objective`: the pooled Dice of the validation voxels by default) at the setting chosen for
that fraction. Ties go to the run's own fraction, then to the larger window. The test columns
only measure: a fraction chosen on them would turn the test studies into validation studies.

Each evaluation lands in the run's `eval-average<F>/` folder (`eval/` for the run's own
fraction); a folder that is already there is read, not computed again. Writes --out (markdown)
and the same rows as JSON beside it (.json): per run and fraction the averaged epochs, the
validation score and chosen setting, test Dice / false-positive volume on tumour-free studies /
lesion recall of the raw and post-processed masks; and over the runs, the test figures of the
validation's choice against the run's own fraction.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
import runtime  # noqa: E402
import sweep  # noqa: E402 - the commit label of the tables

FIGURES = ("dice", "fpv_ml_tumor_free", "recall")


class WindowError(ValueError):
    """A run or setting this comparison cannot use (a user matter: one line, exit 2)."""

    user_error = True


def parse_fractions(text: str) -> list[float]:
    """"0.5,0.75" -> [0.5, 0.75]: each in (0, 1), no repeats."""
    try:
        fractions = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise WindowError(f"--fractions={text!r}: give numbers in (0, 1) separated by commas, "
                          "e.g. --fractions=0.5,0.625,0.75,0.875") from None
    if not fractions or any(not 0 < f < 1 for f in fractions) or len(set(fractions)) < len(fractions):
        raise WindowError(f"--fractions={text!r}: give distinct numbers in (0, 1), e.g. "
                          "--fractions=0.5,0.625,0.75,0.875 (0.75 averages the last quarter)")
    return fractions


def run_settings(run_dir: Path) -> dict:
    """The run's config.json, checked for what this comparison needs, before anything is
    evaluated."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise WindowError(f"{path} not found; pass --run_dir=runs/<name> (a run written by "
                          "main.py)")
    cfg = json.loads(path.read_text())["config"]
    if not cfg.get("keep_epoch_checkpoints"):
        raise WindowError(f"{run_dir} was trained without --keep_epoch_checkpoints=True: it kept "
                          "no weights to average (the cpu_long preset keeps them)")
    if not cfg.get("tune_postprocess"):
        raise WindowError(f"{run_dir} was trained without --tune_postprocess=True: the "
                          "validation studies choose no setting, so they cannot compare windows")
    return cfg


def evaluate_fraction(run_dir: Path, cfg: dict, fraction: float, device: str | None,
                      cache_dir: str | None) -> dict:
    """The summary of the evaluation of the mean weights after `fraction` of the run: read from
    its folder when there (`eval/` for the run's own fraction, else `eval-average<F>/`, named
    by test.py), else computed by test.evaluate (which writes that folder)."""
    import test  # torch, models, MedPy

    return test.evaluate(run_dir, checkpoint="average", average_from=fraction, device=device,
                         cache_dir=cache_dir, progress=False, reuse=True)


def _figures(cohort: dict) -> dict:
    return {"dice": float(cohort["metrics"]["dice"]["mean"]),
            "fpv_ml_tumor_free": float(cohort["metrics"]["fpv_ml_tumor_free"]["mean"]),
            "recall": float(cohort["lesions"]["recall"])}


def row_of(fraction: float, summary: dict) -> dict:
    """One table row from an evaluation summary."""
    tuning = summary.get("threshold_tuning", {})
    objective = tuning.get("objective")
    if objective is None:
        raise WindowError(f"{summary.get('output_dir', 'an evaluation')}: its summary records no "
                          "post-processing chosen on validation studies; evaluate with the run's "
                          "own tune_postprocess setting")
    score = tuning["val_mean_dice"] if objective == "mean_dice" else tuning["val_pooled_dice"]
    return {"fraction": fraction, "epochs": summary["settings"].get("averaged_epochs", []),
            "objective": objective, "val_score": float(score), "chosen": tuning["chosen"],
            "raw": _figures(summary), "pp": _figures(summary.get("postprocessed", summary))}


def validation_choice(rows: list[dict], own_fraction: float) -> float:
    """The fraction with the highest validation score; ties to the run's own, then to the
    larger window (the smaller fraction)."""
    best = max(r["val_score"] for r in rows)
    tied = [r["fraction"] for r in rows if r["val_score"] == best]
    return own_fraction if own_fraction in tied else min(tied)


def compare_runs(run_dirs: list[Path], fractions: list[float], device: str | None = None,
                 cache_dir: str | None = None) -> list[dict]:
    """Per run: its rows (one per fraction, ascending), its own fraction and the validation's
    choice. Every run is checked before the first evaluation."""
    settings = [run_settings(run_dir) for run_dir in run_dirs]
    results = []
    for run_dir, cfg in zip(run_dirs, settings):
        own = float(cfg.get("average_from", 0.0))
        wanted = sorted(set(fractions) | ({own} if own > 0 else set()))
        rows = [row_of(f, evaluate_fraction(run_dir, cfg, f, device, cache_dir)) for f in wanted]
        results.append({"run": run_dir.name, "own_fraction": own,
                        "chosen_fraction": validation_choice(rows, own), "rows": rows})
    return results


def _cell(row: dict, key: str) -> str:
    return f"{row['raw'][key]:.3f} / {row['pp'][key]:.3f}" if key != "fpv_ml_tumor_free" else \
        f"{row['raw'][key]:.2f} / {row['pp'][key]:.2f}"


def render(results: list[dict], command: str, commit: str) -> str:
    lines = [f"`{command}` (commit `{commit}`). Each fraction F: the mean of the weights kept "
             "after F of the run's steps, the threshold and post-processing chosen on the "
             "validation studies for them (the run's own objective), scored on the test "
             "studies (raw / post-processed). `←` the validation's choice; `(own)` the run's "
             "own fraction.", ""]
    for result in results:
        lines += [f"### {result['run']}", "",
                  "| F | epochs averaged | validation score | chosen threshold, SUV floor, "
                  "min ml, min SUVmax | test Dice | FPV tumour-free ml | lesion recall |",
                  "|---|---|---|---|---|---|---|"]
        for row in result["rows"]:
            marks = (" (own)" if row["fraction"] == result["own_fraction"] else "") + \
                (" ←" if row["fraction"] == result["chosen_fraction"] else "")
            epochs = row["epochs"]
            span = f"{epochs[0]}-{epochs[-1]} ({len(epochs)})" if epochs else "?"
            c = row["chosen"]
            lines.append(f"| {row['fraction']:g}{marks} | {span} | {row['objective']} "
                         f"{row['val_score']:.4f} | {c['threshold']:g}, {c['suv_floor']:g}, "
                         f"{c['min_component_ml']:g}, {c['min_component_suvmax']:g} | "
                         f"{_cell(row, 'dice')} | {_cell(row, 'fpv_ml_tumor_free')} | "
                         f"{_cell(row, 'recall')} |")
        lines.append("")
    lines += ["### The validation's choice against the run's own fraction (post-processed)", "",
              "| run | own F | chosen F | Δ test Dice | Δ FPV ml | Δ recall |",
              "|---|---|---|---|---|---|"]
    deltas = {key: [] for key in FIGURES}
    for result in results:
        by_fraction = {r["fraction"]: r for r in result["rows"]}
        own, chosen = by_fraction.get(result["own_fraction"]), by_fraction[result["chosen_fraction"]]
        if own is None:
            continue
        diff = {key: chosen["pp"][key] - own["pp"][key] for key in FIGURES}
        for key in diff:
            deltas[key].append(diff[key])
        lines.append(f"| {result['run']} | {result['own_fraction']:g} | "
                     f"{result['chosen_fraction']:g} | {diff['dice']:+.3f} | "
                     f"{diff['fpv_ml_tumor_free']:+.2f} | {diff['recall']:+.3f} |")
    if deltas["dice"]:
        mean = {k: sum(v) / len(v) for k, v in deltas.items()}
        lines.append(f"| mean over {len(deltas['dice'])} runs | | | {mean['dice']:+.3f} | "
                     f"{mean['fpv_ml_tumor_free']:+.2f} | {mean['recall']:+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", action="append", required=True,
                        help="runs/<name> trained with --keep_epoch_checkpoints=True and "
                             "--tune_postprocess=True; repeat for several runs")
    parser.add_argument("--fractions", default="0.5,0.625,0.75,0.875",
                        help="average_from values to compare (the run's own is always added)")
    parser.add_argument("--out", required=True, help="markdown file (and .json beside it)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda (config default)")
    parser.add_argument("--cache_dir", default=None,
                        help="prepare the studies here instead of the run's recorded cache_dir "
                             "(a run kept by bench/main_run.py, whose cache is gone)")
    args = parser.parse_args(argv)
    fractions = parse_fractions(args.fractions)
    run_dirs = [Path(p) for p in args.run_dir]
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise WindowError(f"--run_dir={run_dir}: no such folder; pass runs/<name>")
    results = compare_runs(run_dirs, fractions, args.device, args.cache_dir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/average_window.py " + " ".join(argv)
    commit = sweep.short_commit(runtime.git_commit() or "unknown")
    out.write_text(render(results, command, commit))
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "commit": commit, "runs": results}, indent=1) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with runtime.exit_on_user_error():
        main(sys.argv[1:])
