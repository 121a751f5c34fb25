"""Benchmark of the phantom's six acceptance properties (docs/phantom.md, "Acceptance properties").

    python bench/bench_phantom.py                         # 40 demo studies, 2 workers (~2 min on 2 cores)
    python bench/bench_phantom.py --size=autopet --n_cases=10 --workers=8   # a bigger machine

Properties: 1 tumour fractions and balance; 2 SUV > 2.5 thresholding (and 41 % of SUVmax per
component) mean per-study Dice < 0.3 with nearly all false positives in physiological uptake;
3 >= 30 % of distractor components with recovered SUVmax inside the lesions' IQR; 4 an
oracle (SUV > 2.5 minus voxels within one voxel of hot distractors, 41 % of SUVmax per
component) mean Dice >= 0.55 (demo) / 0.7 (autopet); 5 partial volume: median recovered /
true SUVmax < 0.6 for 6-8 mm and > 0.85 for >= 20 mm lesions; 6 determinism (array hashes)
and generation time of `n_cases` studies with `workers` processes (target 40 s for 40 demo
studies on 2 cores). Dice means are over studies with tumour (autoPET convention).
Lesion-level numbers exclude low-contrast lesions from property 5 (their "true" SUVmax is a
multiple of the local background, not a partial-volume question).
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import _anatomy as A  # noqa: E402
from data.phantom import _START, generate, render  # noqa: E402

FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: "within one voxel"
PHYSIOLOGICAL = (A.LIVER, A.SPLEEN, A.MARROW, A.CORTEX, A.AORTA, A.BLOOD) + tuple(
    t for ids in A.DISTRACTOR_GROUPS.values() for t in ids)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P & R| / (|P| + |R|); NaN when both are empty (only studies with tumour are averaged)."""
    s = int(pred.sum()) + int(ref.sum())
    return float("nan") if s == 0 else 2 * int((pred & ref).sum()) / s


def per_component_41(pet: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Connected components of `candidates`, each thresholded at 41 % of its own SUVmax."""
    lab, n = ndimage.label(candidates, structure=FULL)
    if n == 0:
        return candidates.copy()
    peak = np.asarray(ndimage.maximum(pet, lab, index=np.arange(1, n + 1)), dtype=np.float32)
    thr = np.concatenate([[np.inf], 0.41 * peak]).astype(np.float32)
    return (lab > 0) & (pet >= thr[lab])


def analyse(job: tuple) -> dict:
    """All per-study quantities of properties 1-5 for study `index`."""
    index, size, seed = job
    r = render(index, size, seed)
    pet, ref, tissue = r.pet, r.seg.astype(bool), r.tissue
    voxel_ml = float(np.prod(r.spacing)) / 1000
    thr = pet > 2.5
    thr41 = per_component_41(pet, thr)
    hot = ndimage.binary_dilation(np.isin(tissue, A.ORACLE_EXCLUDED), structure=FULL)
    oracle = per_component_41(pet, thr & ~hot)
    physio = ndimage.binary_dilation(np.isin(tissue, PHYSIOLOGICAL), structure=FULL)
    fp = thr & ~ref
    distractor_max = []
    for ids in A.DISTRACTOR_GROUPS.values():
        lab, n = ndimage.label(np.isin(tissue, ids), structure=FULL)
        if n:
            distractor_max += list(ndimage.maximum(pet, lab, index=np.arange(1, n + 1)))
    return {
        "index": index, "has_tumor": r.meta["has_tumor"], "voxels": ref.size,
        "tumour_voxels": int(ref.sum()), "slices": ref.shape[2],
        "tumour_slices": int(ref.any(axis=(0, 1)).sum()),
        "dice_thr": dice(thr, ref), "dice_thr41": dice(thr41, ref), "dice_oracle": dice(oracle, ref),
        "fp_thr_ml": float(fp.sum()) * voxel_ml, "fp_thr_physio_ml": float((fp & physio).sum()) * voxel_ml,
        "fp_oracle_ml": float((oracle & ~ref).sum()) * voxel_ml,
        "lesions": r.meta["lesions"], "distractor_max": [float(x) for x in distractor_max],
    }


def study_hash(index: int, size: str, seed: int) -> str:
    r = render(index, size, seed)
    h = hashlib.sha256()
    for a in (r.ct, r.pet, r.seg):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(
        description="phantom acceptance benchmark (docs/phantom.md, properties 1-6)")
    ap.add_argument("--size", default="demo")
    ap.add_argument("--n_cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    # 6: generation time (writing the autoPET layout) and determinism
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        generate(tmp, args.n_cases, size=args.size, seed=args.seed, workers=args.workers,
                 progress=False)
        gen_s = time.time() - t0
    same = all(study_hash(i, args.size, args.seed) == study_hash(i, args.size, args.seed)
               for i in range(2))

    jobs = [(i, args.size, args.seed) for i in range(args.n_cases)]
    if args.workers > 1:
        with mp.get_context(_START).Pool(args.workers) as pool:
            rows = pool.map(analyse, jobs)
    else:
        rows = [analyse(j) for j in jobs]
    pos = [r for r in rows if r["has_tumor"]]
    les = [l for r in rows for l in r["lesions"]]
    rec = np.array([l["recovered_suvmax"] for l in les])
    q1, q3 = np.percentile(rec, [25, 75])
    dmax = np.array([x for r in rows for x in r["distractor_max"]])
    in_iqr = float(((dmax >= q1) & (dmax <= q3)).mean())

    def pv(lo, hi):
        x = [l["recovered_suvmax"] / l["true_suvmax"] for l in les
             if lo <= l["diameter_mm"] < hi and not l["low_contrast"]]
        return (float(np.median(x)) if x else float("nan")), len(x)

    pv_small, n_small = pv(6, 8)
    pv_large, n_large = pv(20, 1e9)
    fp_all = sum(r["fp_thr_ml"] for r in rows)
    fp_phys = sum(r["fp_thr_physio_ml"] for r in rows) / max(fp_all, 1e-9)
    tumour_frac = sum(r["tumour_voxels"] for r in rows) / sum(r["voxels"] for r in rows)
    free_studies = 1 - len(pos) / len(rows)
    free_slices = 1 - sum(r["tumour_slices"] for r in rows) / sum(r["slices"] for r in rows)
    m = {k: float(np.mean([r[k] for r in pos])) for k in ("dice_thr", "dice_thr41", "dice_oracle")}
    oracle_target = 0.7 if args.size == "autopet" else 0.55
    neg_fp = [r["fp_oracle_ml"] for r in rows if not r["has_tumor"]]
    table = [
        ("1 tumour voxel fraction", f"{tumour_frac:.2e}", "< 1e-3", tumour_frac < 1e-3),
        ("1 tumour-free studies", f"{free_studies:.0%}", "45-55 %", 0.45 <= free_studies <= 0.55),
        ("1 tumour-free slices", f"{free_slices:.1%}", ">= 85 %", free_slices >= 0.85),
        ("2 Dice SUV > 2.5", f"{m['dice_thr']:.3f}", "< 0.3", m["dice_thr"] < 0.3),
        ("2 Dice SUV > 2.5, 41 %/component", f"{m['dice_thr41']:.3f}", "< 0.3", m["dice_thr41"] < 0.3),
        ("2 FP volume in physiological uptake", f"{fp_phys:.1%}", "nearly all", fp_phys >= 0.9),
        ("3 distractors in lesion IQR", f"{in_iqr:.0%} of {dmax.size} "
         f"(IQR {q1:.1f}-{q3:.1f})", ">= 30 %", in_iqr >= 0.3),
        ("4 oracle Dice", f"{m['dice_oracle']:.3f}", f">= {oracle_target}", m["dice_oracle"] >= oracle_target),
        ("5 PV ratio 6-8 mm (median)", f"{pv_small:.2f} (n={n_small})", "< 0.6", pv_small < 0.6),
        ("5 PV ratio >= 20 mm (median)", f"{pv_large:.2f} (n={n_large})", "> 0.85", pv_large > 0.85),
        ("6 deterministic (hashes)", str(same), "True", same),
        (f"6 generate {args.n_cases} {args.size}, {args.workers} workers", f"{gen_s:.1f} s",
         "~40 s for 40 demo", args.size != "demo" or gen_s <= 40 * args.n_cases / 40 * 1.25),
    ]
    print(f"phantom size={args.size} n_cases={args.n_cases} seed={args.seed} "
          f"workers={args.workers}: {len(pos)} studies with tumour, {len(les)} lesions")
    print(f"{'property':42s} {'measured':28s} {'target':18s} ok")
    for name, val, target, ok in table:
        print(f"{name:42s} {val:28s} {target:18s} {'yes' if ok else 'NO'}")
    print(f"(oracle false-positive volume on tumour-free studies: mean {np.mean(neg_fp):.1f} ml)")
    return 0 if all(t[3] for t in table) else 1


if __name__ == "__main__":
    sys.exit(main())
