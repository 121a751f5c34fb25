"""A demo evaluation report from synthetic whole-body PET studies (no data, no model, CPU).

    python bench/report_demo.py --out=/tmp/demo_run/eval               # 40 studies, ~1 min
    python bench/report_demo.py --out=/tmp/demo_run/eval --screenshot=docs/report_screenshot.png

Each study: a body ellipsoid (SUV ~1), liver (~2), brain and bladder (hot, not tumour), and
0-5 spherical lesions (SUV 3-25, some above the cache clip of 20); the "prediction" is the
reference shifted, grown or shrunk, with a missed small lesion now and then and a false
positive blob in some studies. Everything the evaluation would write is written into --out
(per-study metrics from test.case_metrics, overlays from test.save_overlay, PET quantities
and agreement plots from quantification, lesions.csv, report.html) and timed; a synthetic
training history gives the run's curves.png (training.plot_curves) in --out's parent.
--screenshot needs chromium, chromedriver and selenium (tests/test_report.py says how).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
import quantification  # noqa: E402
import report  # noqa: E402
import test as evaluation  # noqa: E402

SHAPE = (96, 80, 120)
SPACING = (4.0, 4.0, 4.0)


def ball(shape, centre, radii) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1


def make_study(rng: np.random.Generator, has_tumor: bool):
    """(suv, ref, pred), (X, Y, Z) on SHAPE."""
    suv = np.full(SHAPE, 0.05, np.float32)
    suv[ball(SHAPE, (48, 40, 55), (36, 26, 58))] = 1.0
    suv[ball(SHAPE, (32, 38, 72), (14, 12, 10))] = 2.0      # liver
    suv[ball(SHAPE, (48, 40, 112), (9, 10, 7))] = 7.0       # brain
    suv[ball(SHAPE, (48, 46, 8), (6, 6, 4))] = 12.0         # bladder
    ref = np.zeros(SHAPE, bool)
    if has_tumor:
        for _ in range(rng.integers(1, 6)):
            centre = rng.integers([24, 24, 20], [72, 56, 100])
            radius = rng.uniform(1.2, 5.5)
            lesion = ball(SHAPE, centre, (radius,) * 3)
            ref |= lesion
            grids = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
            r2 = sum((g - c) ** 2 for g, c in zip(grids, centre)) / radius ** 2  # 0 .. 1 inside
            peak = rng.uniform(3, 25)  # hotter centre, colder rim: SUVmax depends on the mask
            suv[lesion] = (peak * (1.0 - 0.6 * r2))[lesion]
    suv = np.clip(suv * rng.normal(1, 0.08, SHAPE).astype(np.float32), 0, None)
    suv = ndimage.gaussian_filter(suv, 0.7).astype(np.float32)
    pred = np.roll(ref, tuple(rng.integers(-1, 2, 3)), axis=(0, 1, 2))
    if rng.random() < 0.3:
        pred = ndimage.binary_dilation(pred)
    elif rng.random() < 0.3:
        pred = ndimage.binary_erosion(pred)
    labels, n = ndimage.label(pred)
    if n > 1 and rng.random() < 0.3:  # miss the smallest lesion
        sizes = np.bincount(labels.ravel())[1:]
        pred[labels == 1 + int(np.argmin(sizes))] = False
    if rng.random() < 0.25:  # a false positive near the liver
        pred |= ball(SHAPE, (30, 36, 80), (2, 2, 2))
    return suv, ref, pred


def build(out: Path, n_studies: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    rows, lesion_rows, times = [], [], {"metrics": 0.0, "quantification": 0.0, "overlay": 0.0}
    for i in range(n_studies):
        case_id = f"PETCT_{i:04d}"
        suv, ref, pred = make_study(rng, has_tumor=rng.random() < 0.6)
        t = time.perf_counter()
        row = {"case_id": case_id, **evaluation.case_metrics(pred, ref, SPACING)}
        times["metrics"] += time.perf_counter() - t
        t = time.perf_counter()
        row.update(quantification.study_columns(suv, pred, ref, SPACING))
        labels, n = quantification.label_lesions(ref)
        detected = [bool(pred[labels == k].any()) for k in range(1, n + 1)]
        lesion_rows += quantification.lesion_table(suv, ref, SPACING, detected, case_id=case_id)
        times["quantification"] += time.perf_counter() - t
        rows.append(row)
        t = time.perf_counter()
        title = f"{case_id}  Dice {row['dice']:.3f}  FPV {row['fpv_ml']:.2f} ml"
        evaluation.save_overlay(suv, ref, pred, SPACING, out / "overlays" / f"{case_id}.png",
                                title=title)
        times["overlay"] += time.perf_counter() - t
        (out / "predictions").mkdir(parents=True, exist_ok=True)
        (out / "predictions" / f"{case_id}.nii.gz").write_bytes(b"")  # placeholder for the link
    summary = evaluation.summarise_cohort(rows, n_bootstrap=1000, seed=0)
    summary["agreement"] = quantification.cohort_agreement(rows)
    summary["settings"] = {"threshold": 0.5, "tta": False, "device": "cpu",
                           "postprocess": {"min_component_ml": 0.0, "suv_floor": 0.0},
                           "model": "transunet_small", "img_size": 224, "context_slices": 1,
                           "checkpoint": "best", "data": f"synthetic demo, {n_studies} studies"}
    t = time.perf_counter()
    quantification.save_agreement_plots(rows, out)
    times["agreement_plots"] = time.perf_counter() - t
    evaluation.write_per_case_csv(rows, out / "per_case.csv")
    quantification.write_lesion_csv(lesion_rows, out / "lesions.csv")
    (out / "summary.json").write_text(json.dumps(evaluation._json_safe(summary), indent=2))
    import training  # the run's curves.png, as training writes it (synthetic history)

    epochs = np.arange(1, 41)
    history = [{"epoch": int(e), "train_loss": float(0.25 + 0.9 * np.exp(-e / 9)),
                **{f"train_{p}": float(0.12 + 0.45 * np.exp(-e / (7 + 3 * k)))
                   for k, p in enumerate(training.LOSS_PARTS)},
                "val_pseudo_dice": float(0.72 * (1 - np.exp(-e / 8))) if e % 2 == 0 else None,
                "val_mean_dice": float(0.66 * (1 - np.exp(-e / 8))) if e % 2 == 0 else None}
               for e in epochs]
    training.plot_curves(history, out.parent / "curves.png")
    t = time.perf_counter()
    report.write_report(out, summary=summary, rows=rows, lesion_rows=lesion_rows,
                        title="Evaluation report: synthetic demo (transunet_small)")
    times["report"] = time.perf_counter() - t
    return times


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1150) -> None:
    """A PNG of the page in headless Chromium, table sorted by Dice (descending)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(page.resolve().as_uri())
            button = driver.find_element(By.CSS_SELECTOR, 'th[data-key="dice"] button')
            button.click()
            button.click()  # best Dice first
            driver.execute_script("window.scrollTo(0, 0)")  # the click scrolled to the table
            time.sleep(1.0)  # pictures loaded
            driver.save_screenshot(str(png))
        finally:
            driver.quit()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the demo eval outputs")
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--screenshot", default=None, help="PNG of the report (needs chromium)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    times = build(out, args.studies)
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()))
    print(f"report: {out / 'report.html'}")
    if args.screenshot:
        screenshot(out / "report.html", Path(args.screenshot))
        print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
