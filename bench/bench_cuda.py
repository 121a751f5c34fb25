"""CUDA step-time benchmark (the paper setting): TransUNet R50-ViT-B_16 vs smp Unet(resnet50).

    python bench/bench_cuda.py                 # on a GPU machine; batch 24 at 224^2 (paper preset)
    python bench/bench_cuda.py --batch=24 --steps=20 --amp=bf16

One step = forward + backward + SGD step (momentum 0.9, weight decay 1e-4) on random 2-channel
input with a BCE loss, under autocast (bf16 by default; `--amp=off` for float32) with
channels_last, as training.py runs it on CUDA. Steps of the two models are interleaved; CUDA is
synchronised around each step; the median of the timed steps is reported with images/s, the
ratio, and the peak GPU memory of each model. Then transunet_small (the cpu preset's model) at
batch 16, 128^2, and the same with torch.compile if `--compile` is given.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import segmentation_models_pytorch as smp  # noqa: E402

from models import build_model  # noqa: E402


def make_step(model, batch: int, size: int, amp: torch.dtype | None):
    device = torch.device("cuda")
    model = model.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 2, size, size, device=device).to(memory_format=torch.channels_last)
    target = (torch.rand(batch, 1, size, size, device=device) > 0.99).float()

    def step() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            logits = model(x)
        F.binary_cross_entropy_with_logits(logits.float(), target).backward()
        opt.step()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def time_models(models: dict, batch: int, size: int, amp, warmup: int, steps: int) -> dict:
    results = {}
    step_fns = {name: make_step(m, batch, size, amp) for name, m in models.items()}
    times = {name: [] for name in models}
    peaks = {}
    for name, fn in step_fns.items():  # warm-up and peak memory, one model at a time
        torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            fn()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    for _ in range(steps):
        for name, fn in step_fns.items():
            times[name].append(fn())
    for name in models:
        t = statistics.median(times[name])
        results[name] = dict(seconds=t, images_per_s=batch / t, peak_gib=peaks[name])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"], default="bf16")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; this benchmark is for a GPU (bench/bench_model.py "
                         "is the CPU one)")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, amp {args.amp}, "
          f"channels_last, batch {args.batch} at 224^2")
    paper = time_models({
        "transunet_r50_vit_b16": build_model("transunet_r50_vit_b16", in_channels=2, img_size=224),
        "smp Unet(resnet50)": smp.Unet("resnet50", encoder_weights=None, in_channels=2, classes=1),
    }, args.batch, 224, amp, args.warmup, args.steps)
    for name, r in paper.items():
        print(f"{name:<24} {r['seconds'] * 1000:8.1f} ms/step {r['images_per_s']:8.0f} img/s "
              f"peak {r['peak_gib']:.1f} GiB")
    ratio = paper["transunet_r50_vit_b16"]["seconds"] / paper["smp Unet(resnet50)"]["seconds"]
    print(f"ratio transunet_r50_vit_b16 / Unet(resnet50): {ratio:.2f}")
    small = {"transunet_small": build_model("transunet_small", in_channels=2, img_size=128)}
    if args.compile:
        small["transunet_small (compiled)"] = torch.compile(
            build_model("transunet_small", in_channels=2, img_size=128))
    for name, r in time_models(small, 16, 128, amp, args.warmup, args.steps).items():
        print(f"{name:<24} {r['seconds'] * 1000:8.1f} ms/step {r['images_per_s']:8.0f} img/s "
              f"(batch 16 at 128^2)")


if __name__ == "__main__":
    main()
