"""What each focal-Tversky weighting costs at real PET/CT imbalance: the table in docs/loss.md.

    python bench/loss_weighting.py            # CPU, ~15 s; prints markdown tables

Setting (docs/loss.md, "What each weighting costs"): a batch of 16 x 256 x 256 voxels (1,048,576)
with 100 tumour voxels (imbalance ~1e-4), and 16 x 800 x 800 with 100 tumour voxels (~1e-5). Soft
predictions: every tumour voxel has probability `lesion_p` (0.9), every background voxel
`background_p` (0.01, 1e-4, 1e-8 at 1e-4 imbalance; 1e-5 at 1e-5). The losses reduce over the whole
batch, so where the voxels lie does not matter. For each loss term:
- "base": its value on that prediction;
- "+1 lesion-volume FP": the increase when 100 background voxels get probability lesion_p;
- "half lesion missed": the increase when 50 tumour voxels drop to background_p;
- "grad tumour / Dice": mean |dL/dlogit| over tumour voxels divided by the same for the soft
  Dice loss 1 - Dice on the base prediction (how hard the term pulls the lesion up);
- "grad bg / Dice": the same over background voxels (how hard it pushes false positives down).
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loss import BinaryWeightedFocalTverskyLoss, DiceLoss  # noqa: E402


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def make_case(shape, n_pos, lesion_p, background_p, n_extra_fp=0, n_missed=0):
    """Logits and target (B, 1, H, W): tumour = the first n_pos voxels of the flattened batch."""
    numel = math.prod(shape)
    target = torch.zeros(numel)
    target[:n_pos] = 1.0
    logits = torch.full((numel,), logit(background_p))
    logits[n_missed:n_pos] = logit(lesion_p)  # the first n_missed tumour voxels are missed
    logits[n_pos:n_pos + n_extra_fp] = logit(lesion_p)  # false positives next to the lesion
    return logits.reshape(shape), target.reshape(shape)


def terms(power_choices):
    out = {
        "Dice 1-D (reference)": DiceLoss(),
        "-log Dice (published Dice term)": DiceLoss(log=True),
        "BWFT published": BinaryWeightedFocalTverskyLoss(weighting="published"),
        "BWFT swapped": BinaryWeightedFocalTverskyLoss(weighting="swapped"),
        "BWFT none": BinaryWeightedFocalTverskyLoss(weighting="none"),
    }
    for power in power_choices:
        out[f"BWFT corrected, FN x ratio^{power}"] = BinaryWeightedFocalTverskyLoss(
            weighting="corrected", fn_power=power)
    return out


def grads(loss_fn, logits, target):
    """Mean |dL/dlogit| over tumour voxels and over background voxels."""
    x = logits.clone().requires_grad_(True)
    loss_fn(x, target).backward()
    g = x.grad.abs()
    return g[target > 0].mean().item(), g[target == 0].mean().item()


def table(shape, n_pos, lesion_p, background_p, power_choices):
    base = make_case(shape, n_pos, lesion_p, background_p)
    with_fp = make_case(shape, n_pos, lesion_p, background_p, n_extra_fp=n_pos)
    missed = make_case(shape, n_pos, lesion_p, background_p, n_missed=n_pos // 2)
    fns = terms(power_choices)
    dice_g_pos, dice_g_neg = grads(fns["Dice 1-D (reference)"], *base)
    numel = math.prod(shape)
    print(f"\n**{'x'.join(map(str, shape[:1] + shape[2:]))} batch, {n_pos} tumour voxels "
          f"(imbalance {n_pos / numel:.1e}), lesion p = {lesion_p}, "
          f"background p = {background_p}**\n")
    print("| term | base | +1 lesion-volume FP | half lesion missed | grad tumour / Dice "
          "| grad bg / Dice |")
    print("|---|---|---|---|---|---|")
    for name, fn in fns.items():
        with torch.no_grad():
            v0, v_fp, v_miss = (fn(*case).item() for case in (base, with_fp, missed))
        g_pos, g_neg = grads(fn, *base)
        print(f"| {name} | {v0:.4g} | {v_fp - v0:+.3g} | {v_miss - v0:+.3g} | "
              f"{g_pos / dice_g_pos:.3g} | {g_neg / dice_g_neg:.3g} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lesion_p", type=float, default=0.9)
    parser.add_argument("--n_pos", type=int, default=100)
    parser.add_argument("--powers", type=float, nargs="+", default=[0.25, 0.5])
    args = parser.parse_args()
    # background p: 0.01 = early training (10,000 soft false positives), 1e-4 = a trained
    # network (soft false positives ~ one lesion volume), 1e-8 = a clean background (logit -18.4)
    settings = [((16, 1, 256, 256), 0.01), ((16, 1, 256, 256), 1e-4), ((16, 1, 256, 256), 1e-8),
                ((16, 1, 800, 800), 1e-5)]
    for shape, background_p in settings:
        table(shape, args.n_pos, args.lesion_p, background_p, args.powers)


if __name__ == "__main__":
    main()
