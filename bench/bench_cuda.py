"""CUDA step-time benchmark of the paper setting (TransUNet R50-ViT-B_16 at 224^2, 2 channels).

    python bench/bench_cuda.py                        # GPU: both suites below
    python bench/bench_cuda.py --suite=speedup --batch=64 --steps=20
    python bench/bench_cuda.py --suite=models --steps=15
    python bench/bench_cuda.py --device=cpu --model=transunet_tiny --img_size=64 --batch=2 --steps=2

One step = forward + backward + optimizer step on random 2-channel input with a BCE loss, under
autocast (bf16 by default; `--amp=off` for float32) with channels_last, as training.py runs it
on CUDA. CUDA is synchronised before and after each timed step; warm-up steps (which include
torch.compile's compilation) are excluded; the median of the timed steps is reported.

suite "speedup" (`--model`, default the paper model), one configuration after the other:
    1. eager, SGD (momentum 0.9, weight decay 1e-4: the paper recipe), batch --baseline_batch
       (default min(24, --batch)): today's baseline (328 images/s on one H200, torch 2.11,
       results/h200/cuda_check.txt)
    2. eager, torch.optim.AdamW(fused=True), batch --batch (default 64)
    3. torch.compile (default mode), fused AdamW, batch --batch (skipped with --no-compile)
    and prints images/s, ms/step, peak GPU memory and the ratio to configuration 1 side by
    side. A larger batch changes the optimisation too (learning rate, steps per epoch): the
    ratio is throughput only.
suite "models" (CUDA only): transunet_r50_vit_b16 vs smp Unet(resnet50), eager SGD, batch 24
    at 224^2, steps interleaved, with the ratio; then transunet_small at batch 16, 128^2.

On the CPU (`--device=cpu`) only the speedup suite runs; with a tiny model it is a smoke test of
the code paths (torch.compile on the CPU needs a C++ compiler); its times mean nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import segmentation_models_pytorch as smp  # noqa: E402

from models import build_model  # noqa: E402

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on the CPU), so wall time covers the whole step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(params, name: str) -> torch.optim.Optimizer:
    """"sgd": the paper recipe (lr 0.01, momentum 0.9, wd 1e-4, foreach); "adamw_fused":
    AdamW (lr 1e-4, wd 1e-2) with the fused kernel (one launch for all parameters)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=True)
    raise ValueError(f"optimizer {name!r}: use 'sgd' or 'adamw_fused'")


def make_step(model: nn.Module, *, batch: int, size: int, device: torch.device,
              amp: torch.dtype | None, optimizer: str = "sgd", compile: bool = False,
              channels_last: bool = True) -> Callable[[], float]:
    """A closure running one training step on fixed random data; returns its wall seconds."""
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), optimizer)
    net = torch.compile(model) if compile else model
    x = torch.randn(batch, 2, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = (torch.rand(batch, 1, size, size, device=device) > 0.99).float()

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = net(x)
        F.binary_cross_entropy_with_logits(logits.float(), target).backward()
        opt.step()
        synchronize(device)
        return time.perf_counter() - start

    return step


def measure(step: Callable[[], float], *, batch: int, device: torch.device, warmup: int,
            steps: int) -> dict:
    """Warm-up steps (timed separately: the first includes compilation), then the median of
    `steps` timed steps; peak GPU memory over both on CUDA."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = [step() for _ in range(warmup)]
    times = [step() for _ in range(steps)]
    t = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return dict(seconds=t, images_per_s=batch / t, peak_gib=peak, warmup_s=sum(warm), batch=batch)


def speedup_configs(baseline_batch: int, batch: int, compile: bool) -> list[dict]:
    """The configurations of the speedup suite, baseline first."""
    configs = [
        dict(label="eager, SGD (baseline)", batch=baseline_batch, optimizer="sgd", compile=False),
        dict(label="eager, fused AdamW", batch=batch, optimizer="adamw_fused", compile=False),
    ]
    if compile:
        configs.append(dict(label="torch.compile, fused AdamW", batch=batch,
                            optimizer="adamw_fused", compile=True))
    return configs


def run_speedup(args, device: torch.device, amp: torch.dtype | None) -> list[dict]:
    """Time each configuration (a fresh model each, same init), print a row as it finishes,
    then the ratios; returns the result rows."""
    baseline_batch = args.baseline_batch or min(24, args.batch)
    print(f"== speedup: {args.model} at {args.img_size}^2, 2 channels, amp {args.amp}, "
          f"channels_last, warm-up {args.warmup} + {args.steps} timed steps", flush=True)
    print(f"{'configuration':<28} {'batch':>5} {'ms/step':>9} {'img/s':>9} {'peak GiB':>9} "
          f"{'warm-up s':>9}", flush=True)
    rows = []
    for config in speedup_configs(baseline_batch, args.batch, args.compile):
        torch.manual_seed(0)
        model = build_model(args.model, in_channels=2, img_size=args.img_size)
        step = make_step(model, batch=config["batch"], size=args.img_size, device=device, amp=amp,
                         optimizer=config["optimizer"], compile=config["compile"])
        r = {**config, **measure(step, batch=config["batch"], device=device,
                                 warmup=args.warmup, steps=args.steps)}
        rows.append(r)
        print(f"{r['label']:<28} {r['batch']:>5} {r['seconds'] * 1000:>9.1f} "
              f"{r['images_per_s']:>9.1f} {r['peak_gib']:>9.1f} {r['warmup_s']:>9.1f}", flush=True)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["images_per_s"]
    for r in rows[1:]:
        print(f"ratio {r['label']} / baseline: {r['images_per_s'] / base:.2f}x images/s", flush=True)
    return rows


def time_models(models: dict, batch: int, size: int, device: torch.device, amp, warmup: int,
                steps: int) -> dict:
    """Eager SGD steps of several models, interleaved after a warm-up of each."""
    step_fns = {name: make_step(m, batch=batch, size=size, device=device, amp=amp)
                for name, m in models.items()}
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
    results = {}
    for name in models:
        t = statistics.median(times[name])
        results[name] = dict(seconds=t, images_per_s=batch / t, peak_gib=peaks[name])
    return results


def run_models(args, device: torch.device, amp) -> None:
    print(f"== models: eager SGD, amp {args.amp}, channels_last, batch 24 at 224^2", flush=True)
    paper = time_models({
        "transunet_r50_vit_b16": build_model("transunet_r50_vit_b16", in_channels=2, img_size=224),
        "smp Unet(resnet50)": smp.Unet("resnet50", encoder_weights=None, in_channels=2, classes=1),
    }, 24, 224, device, amp, args.warmup, args.steps)
    for name, r in paper.items():
        print(f"{name:<24} {r['seconds'] * 1000:8.1f} ms/step {r['images_per_s']:8.0f} img/s "
              f"peak {r['peak_gib']:.1f} GiB")
    ratio = paper["transunet_r50_vit_b16"]["seconds"] / paper["smp Unet(resnet50)"]["seconds"]
    print(f"ratio transunet_r50_vit_b16 / Unet(resnet50): {ratio:.2f}")
    small = {"transunet_small": build_model("transunet_small", in_channels=2, img_size=128)}
    for name, r in time_models(small, 16, 128, device, amp, args.warmup, args.steps).items():
        print(f"{name:<24} {r['seconds'] * 1000:8.1f} ms/step {r['images_per_s']:8.0f} img/s "
              f"(batch 16 at 128^2)", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    parser.add_argument("--suite", choices=["all", "speedup", "models"], default=None,
                        help="default: all on CUDA, speedup on the CPU")
    parser.add_argument("--model", default="transunet_r50_vit_b16", help="speedup suite's model")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64, help="batch of the fast configurations")
    parser.add_argument("--baseline_batch", type=int, default=None,
                        help="batch of the baseline (default min(24, --batch))")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="time the torch.compile configuration (--no-compile skips it)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 2 with compile)")
    parser.add_argument("--amp", choices=list(AMP), default="bf16")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; pass --device=cpu (a smoke test) or use "
                         "bench/bench_model.py for CPU timings")
    suite = args.suite or ("all" if device.type == "cuda" else "speedup")
    if suite != "speedup" and device.type != "cuda":
        raise SystemExit(f"error: --suite={suite} needs CUDA (two 224^2 R50-size models at batch "
                         "24); on the CPU use --suite=speedup with a small --model")
    amp = AMP[args.amp]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    if suite in ("all", "speedup"):
        run_speedup(args, device, amp)
    if suite in ("all", "models"):
        run_models(args, device, amp)


if __name__ == "__main__":
    main()
