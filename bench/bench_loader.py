"""Benchmark: slice-loader throughput against the model's consumption, in one run.

    python bench/bench_loader.py                        # cpu preset: demo phantom, 128², batch 16, ~1-2 min
    python bench/bench_loader.py --n_studies=8 --batches=40 --steps=6

Studies: `data.phantom.make_study(i, "demo")` (synthetic 128 x 128 x 116 arrays if the phantom
is missing), preprocessed with data.prepare_cache into a temporary folder. The loader runs
the cpu preset's PetCtSliceDataset (augmentation, fg_fraction, hot_fraction, context_slices) through a
DataLoader with num_workers 0 and 2; the model side is one optimiser step (forward, loss,
backward, AdamW) of `models.build_model("transunet_small", img_size=128)`. Prints slices/s of
each and the ratio loader / model: with num_workers=0 the loader runs in the training process,
so a ratio r costs the training loop about 1 / (1 + r) of its time. The preset's hard negatives
(hot_fraction) against none, alternated: the loader's slices/s of each and their ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
import config  # noqa: E402
from data.cache import prepare_cache  # noqa: E402
from data.dataset import PetCtSliceDataset, worker_init_fn  # noqa: E402
from data.study import Study  # noqa: E402


def demo_studies(n: int):
    """Lazily yield n demo-size studies (phantom if present, else synthetic arrays)."""
    try:
        from data.phantom import make_study
    except ImportError:
        make_study = None
    for i in range(n):
        if make_study is not None:
            ct, pet, seg, spacing, _ = make_study(i, size="demo", seed=0)
        else:
            rng = np.random.default_rng(i)
            shape = (128, 128, 116)
            ct = rng.normal(0, 300, shape).astype(np.float32)
            pet = rng.gamma(2.0, 1.0, shape).astype(np.float32)
            seg = np.zeros(shape, np.uint8)
            if i % 2 == 0:
                seg[60:66, 60:66, 50:56] = 1
            spacing = (4.0, 4.0, 4.0)
        yield Study(ct=ct, pet=pet, mask=seg, spacing=spacing, affine=np.diag([*spacing, 1.0]),
                    case_id=f"bench_{i:03d}", patient_id=f"bench_{i:03d}", source="bench")


def loader_rate(train_set, batch_size: int, num_workers: int, batches: int) -> float:
    """Slices/s over `batches` batches, after the first batch (worker start-up excluded)."""
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, worker_init_fn=worker_init_fn)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        image, mask = next(it)
    return batches * batch_size / (time.perf_counter() - t0)


def model_rate(cfg, steps: int) -> tuple[float | None, str]:
    """Slices/s of training steps of the cpu preset's model, or None and the reason."""
    try:
        import models
        model = models.build_model(cfg.model, in_channels=cfg.in_channels, num_classes=1,
                                   img_size=cfg.img_size)
    except (ImportError, AttributeError) as err:
        return None, f"models.build_model unavailable ({err})"
    try:
        from loss import CombinedLoss
        loss_fn = CombinedLoss(w_bce=cfg.w_bce, w_tversky=cfg.w_tversky, w_dice=cfg.w_dice,
                               alpha=cfg.tversky_fp_weight, beta=cfg.tversky_fn_weight,
                               gamma=cfg.tversky_gamma, weighting=cfg.tversky_weighting,
                               dice_log=cfg.dice_log)
        name = "CombinedLoss"
    except (ImportError, TypeError):
        loss_fn, name = torch.nn.BCEWithLogitsLoss(), "BCE"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x = torch.randn(cfg.batch_size, cfg.in_channels, cfg.img_size, cfg.img_size)
    y = (torch.rand(cfg.batch_size, 1, cfg.img_size, cfg.img_size) > 0.99).float()
    model.train()
    for step in range(steps + 1):
        if step == 1:  # the first step allocates; time the others
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return steps * cfg.batch_size / (time.perf_counter() - t0), f"{cfg.model} + {name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_studies", type=int, default=6)
    parser.add_argument("--batches", type=int, default=30, help="timed loader batches")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    args = parser.parse_args()
    cfg = config.make_config({"preset": "cpu"})
    print(f"torch threads {torch.get_num_threads()}, batch {cfg.batch_size}, img_size "
          f"{cfg.img_size}, context_slices {cfg.context_slices}, fg_fraction {cfg.fg_fraction}, "
          f"augment {cfg.augment}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        studies = prepare_cache(demo_studies(args.n_studies), tmp, ct_window=cfg.ct_window,
                                suv_max=cfg.suv_max, progress=False)
        print(f"prepared {len(studies)} studies ({sum(s.shape[2] for s in studies)} slices, "
              f"in-plane {studies[0].shape[:2]}) in {time.perf_counter() - t0:.1f} s")
        def make(hot_fraction: float) -> tuple[PetCtSliceDataset, float]:
            start = time.perf_counter()
            ds = PetCtSliceDataset(
                studies, img_size=cfg.img_size, fg_fraction=cfg.fg_fraction,
                augment=cfg.augment, context_slices=cfg.context_slices,
                samples_per_epoch=(args.batches + 2) * cfg.batch_size, seed=0,
                hot_fraction=hot_fraction, uptake_suv=cfg.uptake_suv)
            return ds, time.perf_counter() - start

        # the preset's set, and one without hard negatives beside it
        hot = {h: make(h) for h in (0.0, cfg.hot_fraction)}
        train_set = hot[cfg.hot_fraction][0]
        rates = {w: loader_rate(train_set, cfg.batch_size, w, args.batches) for w in (0, 2)}
        # the preset's hard negatives against none, num_workers=0, alternated so a shared CPU
        # slows both alike: what drawing the hot slices costs (building the set scans the PET)
        hot_rates: dict[float, list[float]] = {h: [] for h in hot}
        for _ in range(3):
            for h, (ds, _) in hot.items():
                hot_rates[h].append(loader_rate(ds, cfg.batch_size, 0, args.batches))
    consume, what = model_rate(cfg, args.steps)
    for w, rate in rates.items():
        print(f"loader num_workers={w}: {rate:8.1f} slices/s")
    for h, (_, built) in hot.items():
        print(f"loader num_workers=0, hot_fraction={h:g}: {np.median(hot_rates[h]):8.1f} slices/s "
              f"(median of 3), set built in {built:.2f} s")
    h0, h1 = 0.0, cfg.hot_fraction
    print(f"ratio loader hot_fraction={h0:g} / hot_fraction={h1:g}: "
          f"{np.median(hot_rates[h0]) / np.median(hot_rates[h1]):.2f}x")
    if consume is None:
        print(f"model: not measured: {what}")
        return
    print(f"model ({what}, training step): {consume:8.1f} slices/s")
    for w, rate in rates.items():
        note = (f"loading takes ~{100 * consume / (rate + consume):.1f} % of the training loop"
                if w == 0 else "workers load beside the model: a bottleneck only if < 1x")
        print(f"ratio loader/model (num_workers={w}): {rate / consume:6.1f}x ({note})")


if __name__ == "__main__":
    main()
