"""The auxiliary (organ) loss as loss.AuxSegLoss computes it against the one-hot formulation it
replaced, side by side: forward + backward time, and the largest difference in value and gradient.

    python bench/bench_aux_loss.py                  # batch 16, 16 classes, 128², 20 timed repeats
    python bench/bench_aux_loss.py --classes=4 --repeats=50

The one-hot formulation is the textbook one (F.cross_entropy, then a softmax and a (B, K, H, W)
one-hot mask for the batch Dice); AuxSegLoss takes one log-softmax and gathers the true-class
terms. The two are interleaved (A, B, A, B, ...) so that a shared CPU slows both alike; the
median of the repeats is reported with the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo
from loss import AuxSegLoss  # noqa: E402


def one_hot_loss(logits: torch.Tensor, target: torch.Tensor, k: int, smooth: float = 1e-5):
    """CE + (1 - mean foreground batch Dice) with a one-hot mask: the reference formulation."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    p = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, k).movedim(-1, 1).to(p.dtype)
    axes = [0, *range(2, p.dim())]
    tp = (p * onehot).sum(axes)
    fp, fn = p.sum(axes) - tp, onehot.sum(axes) - tp
    return ce + 1.0 - ((2 * tp + smooth) / (2 * tp + fp + fn + smooth).clamp_min(1e-8))[1:].mean()


def timed(fn, logits: torch.Tensor, target: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    x = logits.detach().clone().requires_grad_()
    start = time.perf_counter()
    value = fn(x, target)
    value.backward()
    return time.perf_counter() - start, value.detach(), x.grad


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logits = 3.0 * torch.randn(args.batch, args.classes, args.size, args.size)
    target = torch.randint(0, args.classes, (args.batch, args.size, args.size))
    new = AuxSegLoss(args.classes)
    ref = lambda x, t: one_hot_loss(x, t, args.classes)  # noqa: E731
    times = {"one-hot": [], "gathered": []}
    for _ in range(2):  # warm-up
        timed(ref, logits, target), timed(new, logits, target)
    for _ in range(args.repeats):
        t_ref, v_ref, g_ref = timed(ref, logits, target)
        t_new, v_new, g_new = timed(new, logits, target)
        times["one-hot"].append(t_ref)
        times["gathered"].append(t_new)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"aux loss forward + backward, batch {args.batch}, {args.classes} classes, {args.size}², "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  one-hot (F.cross_entropy + one-hot Dice)  {1000 * med['one-hot']:9.3f} ms")
    print(f"  gathered (loss.AuxSegLoss)                {1000 * med['gathered']:9.3f} ms")
    print(f"  ratio one-hot / gathered                  {med['one-hot'] / med['gathered']:8.2f}x")
    print(f"  |value difference| {abs(float(v_ref - v_new)):.1e}, "
          f"max |gradient difference| {float((g_ref - g_new).abs().max()):.1e} "
          f"(largest gradient {float(g_ref.abs().max()):.1e})")


if __name__ == "__main__":
    main()
