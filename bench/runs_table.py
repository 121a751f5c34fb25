"""One table of several runs of the same test studies, each paired with a reference run.

    python bench/runs_table.py --collect runs/a runs/b ... --evidence=results/cpu2core/levers-1400
    python bench/runs_table.py --evidence=results/cpu2core/levers-1400 --reference=main_cpu \\
        --out=results/cpu2core/levers-1400/table.md

--collect copies from each run folder the small files behind its numbers (config.json with the
commit, split.json, metrics.jsonl, eval/summary.json, eval/per_case.csv, eval/lesions.csv)
into <evidence>/<run name>/; an evidence folder that is already there is refused, never
overwritten. The table (one row per evidence folder) gives what a run changed against the
reference's config, its validation-chosen epoch, and test Dice (tumour studies), false-positive
volume (tumour-free studies) and lesion recall, raw and after the post-processing chosen on
the validation studies, with the paired difference to the reference over the same test
studies (post-processed masks; percentile bootstrap CI, 10000 resamples, and the Wilcoxon
signed-rank p: metrics.paired_comparison). Runs whose test studies differ are refused.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

FILES = ("config.json", "split.json", "metrics.jsonl", "eval/summary.json", "eval/per_case.csv",
         "eval/lesions.csv")
SMALL_ML = 1.0  # lesions below this volume are "small" in the recall-by-size column
IGNORED = {"run_name", "out_dir", "resume", "keep_epoch_checkpoints", "cache_dir"}


class TableError(ValueError):
    user_error = True


def collect(run_dirs: list[Path], evidence: Path) -> None:
    for run in run_dirs:
        target = evidence / run.name
        if target.exists():
            raise TableError(f"{target} exists already: remove it first or use another run name")
        missing = [f for f in FILES if not (run / f).is_file()]
        if missing:
            raise TableError(f"{run} lacks {', '.join(missing)}: is it a finished, evaluated run?")
        for name in FILES:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run / name, target / name)


def _load(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    with open(folder / "eval" / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    with open(folder / "eval" / "lesions.csv", newline="") as f:
        lesions = [(float(r["volume_ml"]), r["detected"] == "True") for r in csv.DictReader(f)]
    return {"lesions": lesions, "config": config["config"], "commit": config["environment"].get("git_commit") or "unknown",
            "summary": summary, "rows": rows, "history": history}


def _figures(cohort: dict) -> tuple[float, float, float]:
    return (cohort["metrics"]["dice"]["mean"], cohort["metrics"]["fpv_ml_tumor_free"]["mean"],
            cohort["lesions"]["recall"])


def _per_study(run: dict, column: str, tumour: bool) -> dict[str, float]:
    key = f"pp_{column}" if "postprocessed" in run["summary"] else column
    return {r["case_id"]: float(r[key]) for r in run["rows"] if (r["has_tumor"] == "True") == tumour}


def _recall_by_size(lesions: list[tuple[float, bool]]) -> str:
    """Lesion recall below / from SMALL_ML (the masks lesions.csv's `detected` is of)."""
    parts = []
    for hits in ([d for v, d in lesions if v < SMALL_ML], [d for v, d in lesions if v >= SMALL_ML]):
        parts.append(f"{sum(hits) / len(hits):.2f}" if hits else "—")
    return " / ".join(parts)


def _changes(config: dict, reference: dict) -> str:
    diff = [f"{k}={config[k]}" for k in sorted(config) if k not in IGNORED
            and config.get(k) != reference.get(k)]
    return ", ".join(diff) or "(the reference's settings)"


def table(evidence: Path, reference: str) -> str:
    import metrics

    folders = sorted(p for p in evidence.iterdir() if (p / "config.json").is_file())
    runs = {p.name: _load(p) for p in folders}
    if reference not in runs:
        raise TableError(f"no evidence folder {evidence / reference} for --reference")
    ref = runs[reference]
    ref_cases = sorted(r["case_id"] for r in ref["rows"])
    lines = [f"Runs of `{evidence}` on the same {len(ref_cases)} test studies, one seed each "
             f"(`python bench/runs_table.py`); Δ = run − `{reference}` on the post-processed "
             "masks, paired over the test studies (95 % bootstrap CI, Wilcoxon p).", "",
             "| run | changed against the reference | best epoch / steps | Dice raw / pp | "
             "FPV ml raw / pp | recall raw / pp | recall pp < / ≥ 1 ml | Δ Dice [CI], p | "
             "Δ FPV ml [CI], p | commit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        if sorted(r["case_id"] for r in run["rows"]) != ref_cases:
            raise TableError(f"{evidence / name} was tested on other studies than {reference}")
        raw = _figures(run["summary"])
        post = _figures(run["summary"].get("postprocessed", run["summary"]))
        validated = [h for h in run["history"] if h.get("val_pseudo_dice") is not None]
        best = max(validated, key=lambda h: h["val_pseudo_dice"]) if validated else None
        steps = run["history"][-1]["step"] if run["history"] else 0
        if run["config"].get("select_by", "pseudo_dice") != "pseudo_dice" and validated:
            best = max(validated, key=lambda h: h.get("val_tuned_pseudo_dice") or 0.0)
        deltas = []
        for column, tumour in (("dice", True), ("fpv_ml", False)):
            if name == reference:
                deltas.append("—")
                continue
            a, b = _per_study(run, column, tumour), _per_study(ref, column, tumour)
            cases = sorted(a)
            res = metrics.paired_comparison([a[c] for c in cases], [b[c] for c in cases],
                                            n_bootstrap=10000, seed=0)
            lo, hi = res["ci95"] or (math.nan, math.nan)
            deltas.append(f"{res['mean_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], {res['wilcoxon_p']:.2g}")
        commit = run["commit"]
        commit = commit[:7] + ("*" if commit.endswith("+dirty") else "") if commit != "unknown" else commit
        lines.append(
            f"| {name} | {_changes(run['config'], ref['config']) if name != reference else 'reference'} | "
            f"{best['epoch'] if best else '—'} / {steps} | {raw[0]:.3f} / {post[0]:.3f} | "
            f"{raw[1]:.2f} / {post[1]:.2f} | {raw[2]:.2f} / {post[2]:.2f} | "
            f"{_recall_by_size(run['lesions'])} | {deltas[0]} | "
            f"{deltas[1]} | `{commit}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evidence", required=True, help="folder of evidence folders, one per run")
    ap.add_argument("--collect", nargs="*", default=[], help="run folders to copy evidence from")
    ap.add_argument("--reference", default=None, help="evidence folder name of the reference run")
    ap.add_argument("--out", default=None, help="write the table here (markdown)")
    args = ap.parse_args(argv)
    evidence = Path(args.evidence)
    if args.collect:
        collect([Path(p) for p in args.collect], evidence)
    if args.reference:
        text = table(evidence, args.reference)
        if args.out:
            Path(args.out).write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    import runtime

    with runtime.exit_on_user_error():
        sys.exit(main(sys.argv[1:]))
