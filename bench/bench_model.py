"""CPU step-time benchmark: our TransUNet R50-ViT-B_16 vs smp Unet(resnet50), side by side.

    python bench/bench_model.py                       # batch 2, 224^2, 5 timed steps after 1 warm-up
    python bench/bench_model.py --steps=3 --threads=2

One step = forward + backward + SGD step on random (B, 2, S, S) input with a BCE loss. The two
models' steps are interleaved (A, B, A, B, ...) so that a shared, noisy CPU slows both alike; the
median of the timed steps is reported, with their ratio. The official TransUNet measured the same
way on the same 2-core machine took 3.1x the step time of smp Unet('resnet50') (docs/models.md,
"The official TransUNet"). Then transunet_small (batch 16, 128^2) and transunet_tiny (batch 2,
64^2) are timed.
Also printed: forward GFLOP per image (torch's FlopCounterMode, independent of CPU load) and the
peak resident memory of the process.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo
import segmentation_models_pytorch as smp  # noqa: E402

from models import build_model  # noqa: E402

OFFICIAL_RATIO = 3.1  # official TransUNet / smp Unet(resnet50), docs/models.md "The official TransUNet"


def make_step(model: torch.nn.Module, batch: int, size: int, in_channels: int = 2):
    """A closure running one SGD step on fixed random data; returns its wall time in seconds."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, in_channels, size, size)
    target = (torch.rand(batch, 1, size, size) > 0.99).float()
    model.train()

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(x), target).backward()
        opt.step()
        return time.perf_counter() - start

    return step


def gflop_per_image(model: torch.nn.Module, size: int) -> float:
    """Forward FLOPs (2 x multiply-adds) for one image, in GFLOP."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 2, size, size))
    return counter.get_total_flops() / 1e9


def time_interleaved(steps: dict, n_warmup: int, n_steps: int) -> dict[str, float]:
    """Median step time per model, steps interleaved across models."""
    times = {name: [] for name in steps}
    for i in range(n_warmup + n_steps):
        for name, step in steps.items():
            t = step()
            if i >= n_warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + {args.steps} timed steps per model")

    ours = build_model("transunet_r50_vit_b16", in_channels=2, num_classes=1, img_size=224)
    unet = smp.Unet("resnet50", encoder_weights=None, in_channels=2, classes=1)
    flops = {"transunet_r50_vit_b16": gflop_per_image(ours, 224), "smp Unet(resnet50)": gflop_per_image(unet, 224)}
    med = time_interleaved({"transunet_r50_vit_b16": make_step(ours, 2, 224),
                            "smp Unet(resnet50)": make_step(unet, 2, 224)}, args.warmup, args.steps)
    for name, t in med.items():
        print(f"{name:24s} batch 2 @ 224^2: {t:6.3f} s/step (median)   {flops[name]:6.1f} GFLOP fwd/img")
    ratio = med["transunet_r50_vit_b16"] / med["smp Unet(resnet50)"]
    print(f"ratio TransUNet / Unet(resnet50): ours {ratio:.2f}x   official TransUNet {OFFICIAL_RATIO}x")
    del ours, unet

    for name, batch, size in (("transunet_small", 16, 128), ("transunet_tiny", 2, 64)):
        model = build_model(name, in_channels=2, num_classes=1, img_size=size)
        gflop = gflop_per_image(model, size)
        t = time_interleaved({name: make_step(model, batch, size)}, args.warmup, args.steps)[name]
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:24s} batch {batch} @ {size}^2: {t:6.3f} s/step (median)   {gflop:6.2f} GFLOP fwd/img"
              f"   {n:,} parameters")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    print(f"peak RSS of this process: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
