"""float32 against bf16 autocast on this CPU, side by side: the speed behind `--amp=auto`.

    python bench/bench_precision.py                 # transunet_small, batch 16 at 128², 5 timed steps
    python bench/bench_precision.py --threads=1 --steps=3

One training step is what `training.train_step` does: forward under autocast (or not), the
combined loss on the float32 logits, backward, AdamW step. One inference call is
`eval_batch_size` (32) slices in eval mode without gradients, as validation and test.py run it.
float32 and bf16 are interleaved (A, B, A, B, ...) so that a shared CPU slows both alike; the
median of the timed repeats is reported with the ratio. The first line says whether this CPU has
bf16 in hardware (`runtime.cpu_has_native_bf16`, what `--amp=auto` follows on a CPU): without it
the bf16 side is emulated and the ratio falls below 1.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo
import config  # noqa: E402
import factory  # noqa: E402
import runtime  # noqa: E402


def train_step(model: torch.nn.Module, loss_fn, dtype: torch.dtype | None, batch: int, size: int):
    """A closure running one training step on fixed random data; returns its wall time (s)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 2, size, size)
    target = (torch.rand(batch, 1, size, size) > 0.99).float()

    def step() -> float:
        model.train()
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = loss_fn(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def infer(model: torch.nn.Module, dtype: torch.dtype | None, batch: int, size: int):
    x = torch.randn(batch, 2, size, size)

    def call() -> float:
        model.eval()
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32,
                                             enabled=dtype is not None):
            torch.sigmoid(model(x).float())
        return time.perf_counter() - start

    return call


def interleaved(calls: dict, n_warmup: int, n_steps: int) -> dict[str, float]:
    times = {name: [] for name in calls}
    for i in range(n_warmup + n_steps):
        for name, call in calls.items():
            t = call()
            if i >= n_warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config.parse_cli([])  # the cpu preset: transunet_small, batch 16 at 128², its loss
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 in hardware: "
          f"{runtime.cpu_has_native_bf16()}; {cfg.model} batch {cfg.batch_size} at "
          f"{cfg.img_size}²; {args.warmup} warm-up + {args.steps} timed repeats")
    torch.manual_seed(0)
    models = {"float32": factory.build_model(cfg), "bf16": factory.build_model(cfg)}
    models["bf16"].load_state_dict(models["float32"].state_dict())
    dtypes = {"float32": None, "bf16": torch.bfloat16}
    loss_fn = factory.build_loss(cfg)
    train = interleaved({k: train_step(models[k], loss_fn, dtypes[k], cfg.batch_size, cfg.img_size)
                         for k in models}, args.warmup, args.steps)
    pred = interleaved({k: infer(models[k], dtypes[k], cfg.eval_batch_size, cfg.img_size)
                        for k in models}, args.warmup, args.steps)
    for k in models:
        print(f"{k:8s} training step {train[k]:6.3f} s   inference of {cfg.eval_batch_size} "
              f"slices {pred[k]:6.3f} s (medians)")
    print(f"ratio float32/bf16 training step: {train['float32'] / train['bf16']:.2f}x")
    print(f"ratio float32/bf16 inference: {pred['float32'] / pred['bf16']:.2f}x")


if __name__ == "__main__":
    main()
