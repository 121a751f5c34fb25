"""Benchmark: MedPy hd95 + assd on the full volume vs metrics.case_metrics' bounding-box crop.

    python bench/bench_metrics.py                 # 300x200x200 study, 4 small lesions, ~1 min on a CPU
    (two placements: lesions in one region, and spread over the whole volume)
    python bench/bench_metrics.py --repeats=5

The prediction is the reference shifted by one voxel plus a small false-positive blob, so both
masks are small against the body, as in a whole-body PET/CT study. Prints the times, checks
that the values are bit-identical, and prints the speed-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from medpy.metric import binary as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
import metrics  # noqa: E402


def make_volume(shape=(300, 200, 200), seed=0, spread: bool = True,
                ) -> tuple[np.ndarray, np.ndarray]:
    """spread: lesions anywhere in the body (metastatic disease, the worst case for the crop);
    otherwise within one 50-voxel region (a nodal station, a primary with satellites)."""
    rng = np.random.default_rng(seed)
    region_lo = np.array(shape) // 2 - 25
    place = (lambda: rng.integers(20, np.array(shape) - 33)) if spread else \
        (lambda: region_lo + rng.integers(0, 37, 3))
    grid = np.indices((13, 13, 13)) - 6
    ref = np.zeros(shape, dtype=bool)
    for radius in (3, 4, 5, 6):  # spheres of 6-12 voxels diameter (about 1-3 cm at 2 mm)
        ball = (grid ** 2).sum(0) <= radius ** 2
        lo = place()
        ref[tuple(slice(a, a + 13) for a in lo)] |= ball
    pred = np.roll(ref, shift=(1, -1, 1), axis=(0, 1, 2))
    lo = place()
    pred[tuple(slice(a, a + 3) for a in lo)] = True  # a false-positive blob
    return pred, ref


def best_time(fn, repeats: int) -> tuple[float, tuple]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spacing = (2.04, 2.04, 3.0)
    print(f"{'lesions':<12}{'method':<36}{'time s':>9}{'hd95 mm':>12}{'assd mm':>12}")
    for spread in (False, True):
        pred, ref = make_volume(spread=spread)
        full = lambda: (mp.hd95(pred, ref, voxelspacing=spacing),  # noqa: E731
                        mp.assd(pred, ref, voxelspacing=spacing))

        def cropped():
            m = metrics.case_metrics(pred, ref, spacing)
            return m["hd95_mm"], m["assd_mm"]

        t_full, v_full = best_time(full, args.repeats)
        t_crop, v_crop = best_time(cropped, args.repeats)
        name = "spread" if spread else "one region"
        print(f"{name:<12}{'MedPy hd95 + assd, full volume':<36}{t_full:>9.3f}"
              f"{v_full[0]:>12.6f}{v_full[1]:>12.6f}")
        print(f"{name:<12}{'case_metrics (all metrics, crop)':<36}{t_crop:>9.3f}"
              f"{v_crop[0]:>12.6f}{v_crop[1]:>12.6f}")
        print(f"{name:<12}identical: {v_full == v_crop}; speed-up {t_full / t_crop:.1f}x "
              f"(volume {pred.shape}, {int(ref.sum())} / {int(pred.sum())} voxels, "
              f"best of {args.repeats})")


if __name__ == "__main__":
    main()
