"""One table of several runs of the same test studies, each paired with a reference run.

    python bench/runs_table.py --collect runs/a runs/b ... --evidence=results/cpu2core/levers-1400
    python bench/runs_table.py --evidence=results/cpu2core/levers-1400 --reference=main_cpu \\
        --out=results/cpu2core/levers-1400/table.md

--collect copies from each run folder the small files behind its numbers (config.json with the
commit, split.json, metrics.jsonl, eval/summary.json, eval/per_case.csv, eval/lesions.csv)
into <evidence>/<run name>/ (with --eval=eval-last, the evaluation of the last weights that
`python test.py --run_dir=R --checkpoint=last` wrote, into <evidence>/<run name>.eval-last/); an evidence folder that is already there is refused, never
overwritten. The table has one row per configuration: evidence folders whose configs differ only in
what sweep.py's settings fingerprint leaves out (the seed, paths, speed settings) are one row,
their figures mean ± SD over the seeds. A row gives what it
changed against the reference's config, the validation-chosen epoch of each seed, and test Dice
(tumour studies), false-positive volume (tumour-free studies) and lesion recall, raw and after
the post-processing chosen on the validation studies, with the paired difference to the
reference's row over the same test studies (post-processed masks; each study's value averaged
over the seeds both rows have; percentile bootstrap CI, 10000 resamples, and the Wilcoxon
signed-rank p: sweep.compare_runs, the study's paired tests; with several seeds, how many of
them share the sign of the difference). Runs whose test studies differ are refused.

    python bench/runs_table.py --evidence=results/cpu2core/levers-1400 \\
        --versus_n_train cpu_long_s3 cpu_long_d230_s3 ... --out=results/.../versus_n_train.md

--versus_n_train: the named evidence folders, one recipe that differs in the number of studies
alone (phantom_cases; seeds may differ), as a learning curve against the training set size:
--out gets the table (per size: seeds, mean ± SD of Dice, false-positive volume and recall,
raw / post-processed), with the rows as .csv and the curve as .png beside it. Folders of
another recipe or other test studies are refused, naming what differs.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
import config  # noqa: E402
import sweep  # noqa: E402 - the settings fingerprint, the paired tests, the commit label

FILES = ("config.json", "split.json", "metrics.jsonl", "eval/summary.json", "eval/per_case.csv",
         "eval/lesions.csv")
SMALL_ML = 1.0  # lesions below this volume are "small" in the recall-by-size column


class TableError(ValueError):
    user_error = True


def collect(run_dirs: list[Path], evidence: Path, eval_name: str = "eval") -> None:
    """Copy each run's FILES into <evidence>/<run name>/ (another evaluation of the run,
    e.g. eval-last from `test.py --checkpoint=last`, into <evidence>/<run name>.<eval_name>/,
    its files under eval/ all the same)."""
    for run in run_dirs:
        target = evidence / (run.name if eval_name == "eval" else f"{run.name}.{eval_name}")
        if target.exists():
            raise TableError(f"{target} exists already: remove it first or use another run name")
        sources = {name: run / (name.replace("eval/", f"{eval_name}/", 1)) for name in FILES}
        missing = [str(path.relative_to(run)) for path in sources.values() if not path.is_file()]
        if missing:
            raise TableError(f"{run} lacks {', '.join(missing)}: is it a finished, evaluated run?")
        for name, source in sources.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _load(folder: Path) -> dict:
    # config.load_config: settings an earlier run's commit lacked take today's defaults (a
    # setting is added with the default that keeps the earlier behaviour), so an earlier run and
    # a later one of the same recipe are the same configuration
    settings = config.load_config(folder).to_dict()
    environment = json.loads((folder / "config.json").read_text()).get("environment", {})
    settings["amp"] = cpu_precision(settings.get("amp"), environment)
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    # which weights the evaluation scored (test.py --checkpoint): part of what a row is. An
    # averaged checkpoint ("average0.75") is checkpoint=average with its average_from, whether
    # the run was trained with --average_from or evaluated so later (test.py --average_from)
    scored = summary.get("settings", {}).get("checkpoint", "best")
    # weights whose BatchNorm statistics bench/precise_bn.py re-estimated: "bn<N>-<source>"
    # is the source checkpoint with bn_reestimate=N (a setting only such rows have)
    reestimated = re.fullmatch(r"bn(\d+)-(.+)", scored)
    if reestimated:
        settings["bn_reestimate"], scored = int(reestimated[1]), reestimated[2]
    settings["checkpoint"] = "average" if scored.startswith("average") else scored
    settings["average_from"] = float(scored[7:]) if scored.startswith("average") else 0.0
    # and whether it predicted with flip TTA (test.py --tta)
    settings["tta"] = summary.get("settings", {}).get("tta", settings["tta"])
    # and the threshold candidates it tuned post-processing over (test.py --pp_thresholds)
    if "pp_thresholds" in summary.get("settings", {}):
        settings["pp_thresholds"] = summary["settings"]["pp_thresholds"]
    # and what it maximised when it did (test.py --pp_objective)
    if "pp_objective" in summary.get("settings", {}):
        settings["pp_objective"] = summary["settings"]["pp_objective"]
    if "pp_max_fpv_ml" in summary.get("settings", {}):
        settings["pp_max_fpv_ml"] = summary["settings"]["pp_max_fpv_ml"]
    with open(folder / "eval" / "per_case.csv", newline="") as f:
        cases = sorted(r["case_id"] for r in csv.DictReader(f))
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    with open(folder / "eval" / "lesions.csv", newline="") as f:
        lesions = [(float(r["volume_ml"]), r["detected"] == "True") for r in csv.DictReader(f)]
    return {"folder": folder, "lesions": lesions, "config": settings, "summary": summary,
            "commit": environment.get("git_commit") or "unknown", "cases": cases,
            "history": history}


def cpu_precision(amp, environment: dict):
    """The precision a CPU run computed in, for what makes a row: `amp="auto"` was float32 on
    every CPU until runtime.resolve_amp took bf16 on a CPU with bf16 in hardware (recorded since
    as environment.cpu_native_bf16), so "auto" becomes "bf16" or "False" by that record, and a
    bf16 run is never one row with float32 runs. GPU runs and explicit settings are as recorded."""
    amp = sweep.computed_amp(amp, environment)
    return "False" if amp == "auto" and not environment.get("gpus") else amp


def _figures(cohort: dict) -> tuple[float, float, float]:
    return (cohort["metrics"]["dice"]["mean"], cohort["metrics"]["fpv_ml_tumor_free"]["mean"],
            cohort["lesions"]["recall"])


def _recall_by_size(lesions: list[tuple[float, bool]]) -> tuple[float, float]:
    """Lesion recall below / from SMALL_ML (the masks lesions.csv's `detected` is of)."""
    parts = []
    for hits in ([d for v, d in lesions if v < SMALL_ML], [d for v, d in lesions if v >= SMALL_ML]):
        parts.append(sum(hits) / len(hits) if hits else math.nan)
    return parts[0], parts[1]


def _settings(settings: dict) -> str:
    """What makes two runs the same configuration (sweep.settings_fingerprint: every setting but
    the seed, the paths and what only changes speed), plus the weights an evaluation scored."""
    return json.dumps(sweep.settings_fingerprint(settings), sort_keys=True)


def _changes(settings: dict, reference: dict) -> str:
    # both as JSON values, as the fingerprint compares them: a default tuple read by
    # load_config equals the same thresholds a summary.json recorded as a list
    reference = sweep.json_values(reference)
    fingerprint = sweep.settings_fingerprint(settings)
    diff = [f"{k}={settings[k]}" for k, value in fingerprint.items() if value != reference.get(k)]
    return ", ".join(diff) or "(the reference's settings)"


def _mean_sd(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _best_epoch(run: dict) -> str:
    """The epoch the run's weights are from: the last, or the one the training loop's own rule
    (training._update_best under the run's select_by) chose from its validations."""
    if run["config"]["checkpoint"] == "last" and run["history"]:
        return f"{run['history'][-1]['epoch']} (last)"
    averaged = run["summary"].get("settings", {}).get("averaged_epochs")
    if run["config"]["checkpoint"] == "average" and averaged:
        return f"mean of {averaged[0]}-{averaged[-1]}"
    if run["config"]["checkpoint"] == "average":  # the summary of a re-estimated average
        return f"mean after {run['config']['average_from']:g} of the steps"
    validated = [h for h in run["history"] if h.get("val_pseudo_dice") is not None]
    if not validated:
        return "—"
    import training  # torch: only for the rule itself

    state = training.LoopState()
    for record in validated:
        training._update_best(state, record, has_val=True, validated=True, patience=0,
                              select_by=run["config"]["select_by"])
    return str(state.best_epoch)


def _delta(group: list[dict], ref_group: list[dict]) -> list[str]:
    """Dice (tumour studies) and FPV (tumour-free) against the reference's row, paired over the
    test studies on the seeds both rows have (sweep.compare_runs: each study's value averaged
    over those seeds; `k/n seeds`: the seeds whose own mean difference has that sign)."""
    ref_by_seed = {r["config"]["seed"]: r for r in ref_group}
    pairs = [(r, ref_by_seed[r["config"]["seed"]]) for r in group if r["config"]["seed"] in ref_by_seed]
    if not pairs:
        return ["no common seed"] * len(sweep.PAIRED_METRICS)

    def side(run: dict) -> tuple[dict, Path]:
        return (dict(config=run["folder"].name, machine="", seed=run["config"]["seed"],
                     postprocessed="postprocessed" in run["summary"]), run["folder"])

    entries = sweep.compare_runs([side(a) for a, _ in pairs], [side(b) for _, b in pairs])
    cells = []
    for e in entries:
        if e["refused"]:
            cells.append(f"refused: {e['refused']}")
            continue
        text = (f"{e['mean_diff']:+.3f} [{e['ci95_low']:+.3f}, {e['ci95_high']:+.3f}], "
                f"{e['wilcoxon_p']:.2g}")
        cells.append(text + (f" ({e['seeds_same_sign']} seeds)" if len(pairs) > 1 else ""))
    return cells


def table(evidence: Path, reference: str) -> str:
    folders = sorted(p for p in evidence.iterdir() if (p / "config.json").is_file())
    runs = {p.name: _load(p) for p in folders}
    if reference not in runs:
        raise TableError(f"no evidence folder {evidence / reference} for --reference")
    ref = runs[reference]
    ref_cases = ref["cases"]
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, run in runs.items():
        if run["cases"] != ref_cases:
            raise TableError(f"{evidence / name} was tested on other studies than {reference}")
        groups.setdefault(_settings(run["config"]), []).append((name, run))
    ref_key = _settings(ref["config"])
    ref_group = [run for _, run in groups[ref_key]]
    lines = [f"Runs of `{evidence}` on the same {len(ref_cases)} test studies "
             f"(`python bench/runs_table.py`); runs that differ only in the seed are one row "
             f"(figures mean ± SD over seeds). Δ = row − the row of `{reference}` on the "
             "post-processed masks, paired over the test studies (each study's value averaged "
             "over the seeds both rows have; 95 % bootstrap CI, Wilcoxon p; `k/n seeds`: the "
             "seeds whose own difference has that sign).", "",
             "| runs | changed against the reference | seeds | best epoch / steps | Dice raw / pp | "
             "FPV ml raw / pp | recall raw / pp | recall pp < / ≥ 1 ml | Δ Dice [CI], p | "
             "Δ FPV ml [CI], p | commit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, members in groups.items():
        members.sort(key=lambda m: m[1]["config"]["seed"])
        group = [run for _, run in members]
        raw = [_figures(r["summary"]) for r in group]
        post = [_figures(r["summary"].get("postprocessed", r["summary"])) for r in group]
        by_size = [_recall_by_size(r["lesions"]) for r in group]

        def cell(i: int, digits: int) -> str:
            return (f"{_mean_sd([f[i] for f in raw], digits)} / "
                    f"{_mean_sd([f[i] for f in post], digits)}")

        steps = sorted({r["history"][-1]["step"] if r["history"] else 0 for r in group})
        if key == ref_key:
            deltas, changed = ["—", "—"], "reference"
        else:
            deltas = _delta(group, ref_group)
            changed = _changes(group[0]["config"], ref["config"])
        commits = list(dict.fromkeys(sweep.short_commit(r["commit"]) for r in group))
        lines.append(
            f"| {', '.join(name for name, _ in members)} | {changed} | "
            f"{', '.join(str(r['config']['seed']) for r in group)} | "
            f"{', '.join(_best_epoch(r) for r in group)} / {', '.join(map(str, steps))} | "
            f"{cell(0, 3)} | {cell(1, 2)} | {cell(2, 2)} | "
            f"{_mean_sd([s[0] for s in by_size], 2)} / {_mean_sd([s[1] for s in by_size], 2)} | "
            f"{deltas[0]} | {deltas[1]} | {', '.join(f'`{c}`' for c in commits)} |")
    return "\n".join(lines) + "\n"


def versus_training_studies(evidence: Path, names: list[str]) -> list[dict]:
    """One row per evidence folder in `names`, sorted by training studies (split.json's "train")
    then seed: test Dice, false-positive volume (tumour-free studies) and lesion recall, raw and
    post-processed. The runs must be one recipe that differs in the number of studies alone
    (phantom_cases; the seed may differ too) and be tested on the same studies: a learning curve
    against the training set size, not a mix of configurations."""
    runs = {}
    for name in names:
        if not (evidence / name / "config.json").is_file():
            raise TableError(f"no evidence folder {evidence / name} (collect it first: "
                             "--collect runs/NAME)")
        runs[name] = _load(evidence / name)
    first, base = names[0], None
    rows = []
    for name, run in runs.items():
        fingerprint = sweep.settings_fingerprint(run["config"])
        fingerprint.pop("phantom_cases", None)
        if base is None:
            base = fingerprint
        elif fingerprint != base:
            other = sorted(k for k in set(base) | set(fingerprint) if base.get(k) != fingerprint.get(k))
            raise TableError(f"{evidence / name} differs from {first} in {', '.join(other)}, not only "
                             "in the number of studies: a curve against training studies needs one "
                             "recipe")
        if run["cases"] != runs[first]["cases"]:
            raise TableError(f"{evidence / name} was tested on other studies than {first}")
        split = json.loads((evidence / name / "split.json").read_text())
        raw = _figures(run["summary"])
        post = _figures(run["summary"].get("postprocessed", run["summary"]))
        rows.append({"run": name, "seed": run["config"]["seed"], "n_train": len(split["train"]),
                     "dice_raw": raw[0], "dice_pp": post[0], "fpv_ml_raw": raw[1],
                     "fpv_ml_pp": post[1], "recall_raw": raw[2], "recall_pp": post[2],
                     "commit": sweep.short_commit(run["commit"])})
    return sorted(rows, key=lambda r: (r["n_train"], r["seed"]))


def versus_markdown(rows: list[dict], command: str) -> str:
    """Per training set size: the seeds and mean ± SD of each figure, raw / post-processed."""
    lines = [f"`{command}`: test figures against the number of training studies, one recipe "
             "(mean ± SD over seeds; raw / post-processed masks).", "",
             "| training studies | runs | seeds | Dice raw / pp | FPV tumour-free ml raw / pp | "
             "lesion recall raw / pp | commit |", "|---|---|---|---|---|---|---|"]
    for n in sorted({r["n_train"] for r in rows}):
        group = [r for r in rows if r["n_train"] == n]

        def cell(key: str, digits: int) -> str:
            return (f"{_mean_sd([r[key + '_raw'] for r in group], digits)} / "
                    f"{_mean_sd([r[key + '_pp'] for r in group], digits)}")

        commits = ", ".join(f"`{c}`" for c in dict.fromkeys(r["commit"] for r in group))
        lines.append(f"| {n} | {', '.join(r['run'] for r in group)} | "
                     f"{', '.join(str(r['seed']) for r in group)} | {cell('dice', 3)} | "
                     f"{cell('fpv_ml', 2)} | {cell('recall', 2)} | {commits} |")
    return "\n".join(lines) + "\n"


def plot_versus_training_studies(rows: list[dict], path: Path, title: str) -> None:
    """Test Dice and false-positive volume against training studies: each seed a point, the
    mean over seeds a line, raw and post-processed masks."""
    from matplotlib.figure import Figure  # no pyplot: no global state

    fig = Figure(figsize=(9, 3.8))
    axes = fig.subplots(1, 2)
    sizes = sorted({r["n_train"] for r in rows})
    for ax, key, label in ((axes[0], "dice", "test Dice (tumour studies)"),
                           (axes[1], "fpv_ml", "FPV, tumour-free studies (ml)")):
        for masks, style, colour in (("raw", "o-", "C0"), ("pp", "s--", "C1")):
            column = f"{key}_{masks}"
            ax.scatter([r["n_train"] for r in rows], [r[column] for r in rows], s=12, alpha=0.5,
                       color=colour)
            ax.plot(sizes, [statistics.fmean(r[column] for r in rows if r["n_train"] == n)
                            for n in sizes], style, color=colour,
                    label="raw (mean; dots: seeds)" if masks == "raw" else "post-processed")
        ax.set(xlabel="training studies", ylabel=label, xticks=sizes)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evidence", required=True, help="folder of evidence folders, one per run")
    ap.add_argument("--collect", nargs="*", default=[], help="run folders to copy evidence from")
    ap.add_argument("--eval", default="eval", help="--collect this evaluation folder of each run "
                    "(eval-last: test.py --checkpoint=last) into <evidence>/<run>.<eval>/")
    ap.add_argument("--reference", default=None, help="evidence folder name of the reference run")
    ap.add_argument("--out", default=None, help="write the table here (markdown)")
    ap.add_argument("--versus_n_train", nargs="*", default=[],
                    help="evidence folder names of one recipe run with different numbers of "
                         "training studies: --out gets their table against the training set size "
                         "(and a .png, .csv beside it)")
    args = ap.parse_args(argv)
    evidence = Path(args.evidence)
    if args.versus_n_train:
        if not args.out:
            raise TableError("--versus_n_train needs --out=FILE.md (the .png and .csv go beside it)")
        rows = versus_training_studies(evidence, args.versus_n_train)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python bench/runs_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
        out.write_text(versus_markdown(rows, command))
        with open(out.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot_versus_training_studies(rows, out.with_suffix(".png"),
                                     "test figures against training studies")
        print(out.read_text())
        return 0
    if args.collect:
        collect([Path(p) for p in args.collect], evidence, args.eval)
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
