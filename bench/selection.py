"""Which epoch a run keeps under each checkpoint criterion (config `select_by`), and what the
two choices score on the test studies, paired study by study.

    python main.py --keep_epoch_checkpoints=True ...       # the weights after every validation
    python bench/selection.py --run_dir=runs/<name> --out=results/selection/<name>

Every checkpoints/epoch_<k>.pt predicts the run's validation studies again with the loop's own
validation (`training.validate_study`, `training.summarise_validation`), which gives both
criteria for every epoch: the pooled pseudo-Dice at the run's threshold (`pseudo_dice`, what
the run chose by unless it says otherwise) and the best pooled pseudo-Dice over the thresholds
0.05..0.95 (`tuned_pseudo_dice`, blind to how the epoch's probabilities are calibrated). The
recomputed pseudo-Dice is checked against the run's metrics.jsonl. The epoch each criterion
picks (training._update_best, ties to the lower FPV) is then evaluated on the test studies
exactly as `python test.py` would with that checkpoint (`test.evaluate(checkpoint=
"epoch_<k>")`, the run's post-processing tuned on the validation studies again; the folder
`eval-epoch_<k>/` is reused when present). Only validation studies choose anything; the test
figures are reported, never used to choose (docs/study.md, "Rules").

Writes into --out: selection.csv (one row per epoch: both criteria, the tuned threshold, the
FPV on the tumour-free validation studies) and selection.md (the chosen epochs, their test
figures and the paired comparison of the two over the test studies: percentile bootstrap CI
and Wilcoxon signed-rank test, metrics.paired_comparison).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime  # noqa: E402
from learning_curve import epoch_checkpoints  # noqa: E402

CRITERIA = ("pseudo_dice", "tuned_pseudo_dice")
COLUMNS = ("epoch", "step", "val_pseudo_dice", "val_tuned_pseudo_dice", "val_tuned_threshold",
           "val_fpv_ml", "logged_val_pseudo_dice")


def validation_records(run_dir: Path, device: str = "cpu") -> list[dict]:
    """Both criteria for every epoch checkpoint of the run, from its validation studies."""
    import torch

    import config
    import factory
    import test
    import training

    cfg = config.load_config(run_dir / "config.json")
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    logged = {r["epoch"]: r for r in map(json.loads, filter(None, lines)) if "epoch" in r}
    studies = test.run_studies(run_dir, cfg, subset="val")
    amp_dtype = runtime.resolve_amp(cfg.amp, torch.device(device))
    records = []
    for epoch in epoch_checkpoints(run_dir):
        model = test.load_run_model(run_dir, cfg, f"epoch_{epoch}", torch.device(device)).eval()
        loop = SimpleNamespace(eval_model=model, device=torch.device(device),
                               validation=dict(**factory.inference_options(cfg), amp_dtype=amp_dtype))
        with torch.no_grad():
            rows = [training.validate_study(loop, study, cfg.threshold) for study in studies]
        val = training.summarise_validation(rows)
        log_row = logged.get(epoch, {})
        records.append({"epoch": epoch, "step": log_row.get("step", math.nan),
                        **{k: val[k] for k in COLUMNS[2:6]},
                        "logged_val_pseudo_dice": log_row.get("val_pseudo_dice", math.nan)})
    return records


def chosen_epochs(records: list[dict]) -> dict[str, int]:
    """The epoch each criterion keeps (the training loop's own rule, in epoch order)."""
    import training

    out = {}
    for select_by in CRITERIA:
        state = training.LoopState()
        for record in records:
            training._update_best(state, record, has_val=True, validated=True, patience=0,
                                  select_by=select_by)
        out[select_by] = state.best_epoch
    return out


def test_values(run_dir: Path, epoch: int, device: str) -> tuple[dict, dict]:
    """(summary figures, {metric: {case_id: value}}) of checkpoint epoch_<epoch> on the test
    studies (post-processed figures when the run post-processes)."""
    import test

    summary = test.evaluate(run_dir, checkpoint=f"epoch_{epoch}", device=device, progress=False,
                            reuse=True)
    folder = Path(summary["output_dir"])
    post = "postprocessed" in summary
    cohort = summary["postprocessed"] if post else summary
    prefix = "pp_" if post else ""
    with open(folder / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    values = {
        "Dice (tumour studies)": {r["case_id"]: float(r[f"{prefix}dice"]) for r in rows
                                  if r["has_tumor"] == "True"},
        "FPV ml (tumour-free studies)": {r["case_id"]: float(r[f"{prefix}fpv_ml"]) for r in rows
                                         if r["has_tumor"] != "True"}}
    figures = {"dice": cohort["metrics"]["dice"]["mean"],
               "fpv_ml_tumor_free": cohort["metrics"]["fpv_ml_tumor_free"]["mean"],
               "recall": cohort["lesions"]["recall"], "postprocessed": post,
               "threshold": summary["settings"]["threshold"]}
    return figures, values


def report(run_dir: Path, records: list[dict], chosen: dict[str, int], device: str) -> str:
    import metrics

    lines = [f"Checkpoint criteria of `{run_dir.name}` (`python bench/selection.py`): every epoch's "
             f"weights scored again on the run's validation studies; the "
             "chosen epochs evaluated on the test studies as `python test.py` would "
             "(post-processing tuned on the validation studies).", "",
             "| epoch | val pseudo-Dice at the run's threshold | val pseudo-Dice at the best "
             "threshold (threshold) | val FPV ml |", "|---|---|---|---|"]
    for r in records:
        marks = [c for c in CRITERIA if chosen[c] == r["epoch"]]
        lines.append(f"| {r['epoch']}{' (' + ', '.join(marks) + ')' if marks else ''} | "
                     f"{r['val_pseudo_dice']:.3f} | {r['val_tuned_pseudo_dice']:.3f} "
                     f"({r['val_tuned_threshold']:.2f}) | {r['val_fpv_ml']:.2f} |")
    results = {c: test_values(run_dir, chosen[c], device) for c in CRITERIA}
    lines += ["", "| select_by | epoch | test Dice | test FPV ml (tumour-free) | lesion recall | "
              "threshold |", "|---|---|---|---|---|---|"]
    for c in CRITERIA:
        f = results[c][0]
        lines.append(f"| {c} | {chosen[c]} | {f['dice']:.3f} | {f['fpv_ml_tumor_free']:.2f} | "
                     f"{f['recall']:.2f} | {f['threshold']} |")
    if chosen["pseudo_dice"] == chosen["tuned_pseudo_dice"]:
        lines += ["", "Both criteria keep the same epoch."]
        return "\n".join(lines) + "\n"
    lines += ["", "Paired over the test studies, a = tuned_pseudo_dice, b = pseudo_dice "
              "(95 % percentile bootstrap CI, 10000 resamples; two-sided Wilcoxon signed-rank):",
              "", "| metric (studies) | a | b | Δ [95 % CI] | p |", "|---|---|---|---|---|"]
    for name in results["pseudo_dice"][1]:
        a, b = (results[c][1][name] for c in ("tuned_pseudo_dice", "pseudo_dice"))
        cases = sorted(a)
        res = metrics.paired_comparison([a[k] for k in cases], [b[k] for k in cases],
                                        n_bootstrap=10000, seed=0)
        lo, hi = res["ci95"] or (math.nan, math.nan)
        lines.append(f"| {name} ({res['n']}) | {res['mean_a']:.3f} | {res['mean_b']:.3f} | "
                     f"{res['mean_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {res['wilcoxon_p']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--out", required=True, help="folder for selection.csv and selection.md")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    run_dir, out = Path(args.run_dir), Path(args.out)
    records = validation_records(run_dir, args.device)
    chosen = chosen_epochs(records)
    text = report(run_dir, records, chosen, args.device)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "selection.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(records)
    (out / "selection.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with runtime.exit_on_user_error():
        sys.exit(main(sys.argv[1:]))
