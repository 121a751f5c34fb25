"""Benchmark: peak memory of prepare_cache for 5 vs 20 autoPET-size studies (must not grow).

    python bench/bench_preprocess.py                    # phantom "autopet" size, ~4-5 min on 2 cores
    python bench/bench_preprocess.py --source=synthetic # 400 x 400 x 326 random arrays, no readers
    python bench/bench_preprocess.py --counts=5,20,40

Each count runs in a fresh subprocess (so peaks do not carry over) that preprocesses N studies
into an empty cache and reports its peak resident set size (VmHWM / ru_maxrss) and
the tracemalloc peak of the prepare_cache call (numpy allocations included).
--source=phantom (default when data.phantom and data.io exist): one `autopet`-size phantom
study is written to disk once (NIfTI, autoPET layout) and N StudyRefs with distinct case ids
point at it, so every study is really read by data.io.load_study, normalised and written.
--source=synthetic: a lazy iterator yields N in-memory 400 x 400 x 326 Studies (one alive at
a time). Prints both peaks per count and the ratio of the largest to the smallest count.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere


def synthetic_studies(n: int, shape=(400, 400, 326)):
    from data.study import Study
    for i in range(n):
        rng = np.random.default_rng(i)
        ct = rng.uniform(-1024, 1500, shape).astype(np.float32)
        pet = rng.uniform(0, 30, shape).astype(np.float32)
        mask = np.zeros(shape, np.uint8)
        mask[200:210, 200:210, 150:160] = i % 2
        yield Study(ct=ct, pet=pet, mask=mask, spacing=(2.04, 2.04, 3.0),
                    affine=np.diag([2.04, 2.04, 3.0, 1.0]), case_id=f"syn_{i:03d}",
                    patient_id=f"syn_{i:03d}", source="synthetic")
        del ct, pet, mask


def phantom_refs(n: int, data_dir: str):
    from data.io import find_studies
    from data.study import StudyRef
    (ref,) = find_studies(data_dir)
    return [StudyRef(f"{ref.case_id}_{i:03d}", f"{ref.patient_id}_{i:03d}", ref.layout, ref.paths)
            for i in range(n)]


def peak_rss_mib() -> float:
    """Peak resident set of this process. Linux: VmHWM, which starts afresh at exec (ru_maxrss
    would keep the forking parent's peak, e.g. that of the phantom generator)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, kB on Linux


def child(n: int, source: str, data_dir: str, cache_dir: str) -> None:
    """Preprocess n studies; print one JSON line with the peaks (in MiB)."""
    from data.cache import prepare_cache
    base_rss = peak_rss_mib()
    items = phantom_refs(n, data_dir) if source == "phantom" else synthetic_studies(n)
    tracemalloc.start()
    t0 = time.perf_counter()
    cached = prepare_cache(items, cache_dir, progress=False)
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({
        "n": len(cached), "seconds": seconds, "shape": list(cached[0].shape),
        "rss_peak_mib": peak_rss_mib(),
        "rss_after_imports_mib": base_rss, "traced_peak_mib": traced_peak / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="5,20")
    parser.add_argument("--source", choices=("auto", "phantom", "synthetic"), default="auto")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data_dir", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.source, args.data_dir, args.cache_dir)

    source = args.source
    if source == "auto":
        try:
            import data.io  # noqa: F401
            import data.phantom  # noqa: F401
            source = "phantom"
        except ImportError as err:
            print(f"phantom / readers unavailable ({err}); using synthetic arrays")
            source = "synthetic"
    counts = [int(c) for c in args.counts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(Path(tmp) / "data")
        if source == "phantom":
            from data.phantom import generate
            t0 = time.perf_counter()
            generate(data_dir, 1, size="autopet", seed=0, progress=False)
            print(f"wrote one autopet-size phantom study in {time.perf_counter() - t0:.0f} s")
        rows = []
        for n in counts:
            cache_dir = str(Path(tmp) / f"cache_{n}")
            out = subprocess.run(
                [sys.executable, __file__, f"--child={n}", f"--source={source}",
                 f"--data_dir={data_dir}", f"--cache_dir={cache_dir}"],
                capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"child for {n} studies failed:\n{out.stderr}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['n']:3d} studies {tuple(r['shape'])} ({source}): peak RSS "
                  f"{r['rss_peak_mib']:7.0f} MiB (after imports {r['rss_after_imports_mib']:.0f}), "
                  f"tracemalloc peak {r['traced_peak_mib']:7.0f} MiB, {r['seconds']:.0f} s "
                  f"({r['seconds'] / r['n']:.1f} s/study)")
    lo, hi = rows[0], rows[-1]
    print(f"ratio {hi['n']} vs {lo['n']} studies: peak RSS x{hi['rss_peak_mib'] / lo['rss_peak_mib']:.2f}, "
          f"tracemalloc peak x{hi['traced_peak_mib'] / lo['traced_peak_mib']:.2f} "
          f"(1.00 = independent of the count)")


if __name__ == "__main__":
    main()
