"""Which non-tumour voxels does the uptake target (data/targets.py) hold at each SUV threshold?

    python bench/uptake_threshold.py                        # 20 demo studies, seed 0 (~30 s on 2 cores)
    python bench/uptake_threshold.py --n_cases=10 --size=autopet

For thresholds t, over the non-tumour voxels with SUV > t: the share inside a hot physiological
structure (brain, heart, kidney cortex, renal pelvis, bladder, ureter boluses, brown fat,
salivary glands, focal muscle uptake), the share within 2 voxels of one (spill-in from the PET
blur), the share on a lesion's rim (within 2 voxels of tumour) and the rest ("elsewhere": liver
noise, bowel, ...) with its commonest tissues; then the share of each moderately hot organ that
the target covers. The default threshold data.targets.UPTAKE_SUV is chosen from this table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import _anatomy as A  # noqa: E402
from data.phantom import render  # noqa: E402

HOT = (*A.ORACLE_EXCLUDED, A.MUSCLE_FOCUS)
COVERAGE = {"kidney": (A.KIDNEY,), "glands": (A.GLAND,), "myocardium": (A.MYOCARDIUM,),
            "brain": (A.BRAIN_GM, A.BRAIN_WM), "bladder": (A.BLADDER,), "liver": (A.LIVER,)}
TISSUE_NAMES = {v: k for k, v in vars(A).items() if k.isupper() and isinstance(v, int) and 0 <= v <= A.LESION}


def measure(n_cases: int, size: str, seed: int, thresholds: list[float]) -> dict:
    """Voxel counts per threshold: n, inside, spill, rim, elsewhere (+ tissues), organ coverage."""
    out = {t: {"n": 0, "inside": 0, "spill": 0, "rim": 0, "elsewhere": {}, "cover": {}} for t in thresholds}
    for i in range(n_cases):
        r = render(i, size, seed)
        tumour = r.seg > 0
        rim = ndimage.binary_dilation(tumour, iterations=2) & ~tumour
        hot = np.isin(r.tissue, HOT)
        near = ndimage.binary_dilation(hot, iterations=2) & ~hot
        for t in thresholds:
            acc, above = out[t], (r.pet > t) & ~tumour
            acc["n"] += int(above.sum())
            acc["inside"] += int((above & hot).sum())
            acc["spill"] += int((above & near).sum())
            acc["rim"] += int((above & rim & ~hot & ~near).sum())
            rest = above & ~hot & ~near & ~rim
            for tissue, count in zip(*np.unique(r.tissue[rest], return_counts=True)):
                acc["elsewhere"][int(tissue)] = acc["elsewhere"].get(int(tissue), 0) + int(count)
            for name, ids in COVERAGE.items():
                organ = np.isin(r.tissue, ids)
                got, total = acc["cover"].get(name, (0, 0))
                acc["cover"][name] = (got + int((organ & (r.pet > t)).sum()), total + int(organ.sum()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_cases", type=int, default=20)
    ap.add_argument("--size", default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thresholds", default="2.0,2.5,3.0,3.5,4.0")
    args = ap.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    res = measure(args.n_cases, args.size, args.seed, thresholds)
    print(f"phantom size={args.size} n_cases={args.n_cases} seed={args.seed}: non-tumour voxels above t")
    print("| SUV > t | voxels | in hot organs | spill-in (<= 2 vox) | physiological | lesion rim | elsewhere (top tissues) |")
    print("|---|---|---|---|---|---|---|")
    for t in thresholds:
        a = res[t]
        n = max(a["n"], 1)
        rest = sum(a["elsewhere"].values())
        top = sorted(a["elsewhere"].items(), key=lambda kv: -kv[1])[:3]
        names = ", ".join(f"{TISSUE_NAMES.get(k, k).lower()} {v / n:.2%}" for k, v in top)
        print(f"| {t} | {a['n']} | {a['inside'] / n:.1%} | {a['spill'] / n:.1%} | "
              f"{(a['inside'] + a['spill']) / n:.1%} | {a['rim'] / n:.2%} | {rest / n:.2%} ({names}) |")
    print("\nshare of each organ's voxels above t (what the target covers)")
    for t in thresholds:
        cover = ", ".join(f"{k} {g / max(n, 1):.0%}" for k, (g, n) in res[t]["cover"].items())
        print(f"SUV > {t}: {cover}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
