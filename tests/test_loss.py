"""loss.py against the test vectors of docs/loss.md "Reference values", smp as an oracle, and its
promised properties."""

import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch import losses as smp_losses

import loss
from loss import BinaryWeightedFocalTverskyLoss, CombinedLoss, DiceLoss

WEIGHTINGS = ("published", "swapped", "none", "corrected")


def vector(name: str):
    """The test vectors of docs/loss.md, "Reference values" (float32, CPU)."""
    if name == "A":
        torch.manual_seed(0)
        x = torch.randn(2, 1, 8, 8) * 3
        t = (torch.rand(2, 1, 8, 8) > 0.9).float()
    elif name == "B":
        torch.manual_seed(1)
        x = torch.randn(2, 1, 16, 16) * 2 - 1
        t = (torch.rand(2, 1, 16, 16) > 0.95).float()
        t[1] = 0
    else:
        torch.manual_seed(2)
        x = torch.randn(2, 1, 4, 8, 8) * 3
        t = torch.zeros(2, 1, 4, 8, 8)
    return x, t


REFERENCE = {  # name: (x.sum(), BCE, 1 - Dice, published BWFT); docs/loss.md, "Reference values"
    "A": (20.137394, 1.49986901, 0.85616803, 0.98495104),
    "B": (-514.785522, 0.67708975, 0.95872736, 0.99882338),
    "C": (None, 1.43436014, 0.0, 1.0),
}


def published_bwft(x, t, alpha=0.5, beta=0.5, gamma=1.0, eps=1e-7):
    """The published formula (docs/loss.md, "The published formula"), independent of loss.py."""
    p, t = torch.sigmoid(x).flatten(), t.flatten()
    n_pos = t.sum()
    n_neg = t.numel() - n_pos
    tp, fp, fn = (p * t).sum(), (p * (1 - t)).sum(), ((1 - p) * t).sum()
    w_fp, w_fn = n_neg / (n_pos + eps), n_pos / (n_neg + eps)
    ti = (tp + eps) / (tp + alpha * fp * w_fp + beta * fn * w_fn + eps)
    return (1 - ti) ** gamma


def lesion_batch(shape=(2, 1, 32, 32), n_pos=20, bg_logit=-6.0, lesion_logit=3.0):
    """Logits/target with a lesion of n_pos voxels in sample 0; everything else background."""
    t = torch.zeros(shape)
    t.view(-1)[:n_pos] = 1
    x = torch.where(t > 0, torch.tensor(lesion_logit), torch.tensor(bg_logit))
    return x, t


# ---------------------------------------------------------------- reference values

@pytest.mark.parametrize("name", "ABC")
def test_reference_vectors(name):
    x, t = vector(name)
    x_sum, bce, dice, bwft = REFERENCE[name]
    if x_sum is not None:  # the random draw is the one docs/loss.md, "Reference values", fixes
        assert x.sum().item() == pytest.approx(x_sum, abs=1e-4)
    parts = CombinedLoss(weighting="published", w_bce=1, w_tversky=1, w_dice=1).parts(x, t)
    assert parts["bce"].item() == pytest.approx(bce, abs=1e-6)
    assert parts["dice"].item() == pytest.approx(dice, abs=1e-6)
    assert parts["tversky"].item() == pytest.approx(bwft, abs=1e-6)
    published = BinaryWeightedFocalTverskyLoss(weighting="published")
    assert published(x, t).item() == pytest.approx(bwft, abs=1e-6)
    assert DiceLoss()(x, t).item() == pytest.approx(dice, abs=1e-6)


@pytest.mark.parametrize("name", "ABC")
def test_published_total(name):
    """weighting='published', dice_log=True is 0.6 BCE + 0.4 BWFT + 0.6 (-log Dice), smp oracles."""
    x, t = vector(name)
    ref = (0.6 * smp_losses.SoftBCEWithLogitsLoss()(x, t)
           + 0.4 * published_bwft(x, t)
           + 0.6 * smp_losses.DiceLoss("binary", log_loss=True, from_logits=True)(*f64(x, t)))
    got = CombinedLoss(weighting="published", dice_log=True)(x, t)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)


# ---------------------------------------------------------------- smp as an oracle
# smp is run in float64: smp 0.6 computes TP as (sum p + sum t - |p - t|_1) / 2, which in float32
# loses ~1e-5 to cancellation (vector B's -log Dice: smp float32 3.1875656, float64 3.1875555,
# ours float32 3.1875556).

def f64(x, t):
    return x.double(), t.double()


def random_cases():
    torch.manual_seed(3)
    x3 = torch.randn(3, 1, 4, 6, 6) * 4
    t3 = (torch.rand(3, 1, 4, 6, 6) > 0.8).float()
    return [vector("A"), vector("B"), vector("C"), (x3, t3)]


@pytest.mark.parametrize("log", [False, True])
def test_dice_matches_smp(log):
    oracle = smp_losses.DiceLoss("binary", log_loss=log, from_logits=True, smooth=0.0, eps=1e-7)
    for x, t in random_cases():
        assert DiceLoss(log=log)(x, t).item() == pytest.approx(oracle(*f64(x, t)).item(), abs=1e-6)


@pytest.mark.parametrize("alpha,beta,gamma", [(0.5, 0.5, 1.0), (0.3, 0.7, 1.0), (0.7, 0.3, 2.0),
                                              (0.3, 0.7, 0.75)])
def test_plain_tversky_matches_smp(alpha, beta, gamma):
    """weighting='none' is smp's TverskyLoss; smp's alpha is also the FP weight.
    smp computes (TP + smooth) / (TP + a FP + b FN + smooth): smooth = eps = 1e-7 matches ours."""
    oracle = smp_losses.TverskyLoss("binary", from_logits=True, smooth=1e-7, eps=1e-7,
                                    alpha=alpha, beta=beta, gamma=gamma)
    ours = BinaryWeightedFocalTverskyLoss(alpha=alpha, beta=beta, gamma=gamma, weighting="none")
    for x, t in random_cases():
        assert ours(x, t).item() == pytest.approx(oracle(*f64(x, t)).item(), abs=1e-6)


def test_sample_reduction_matches_smp_per_sample():
    """reduction='sample' = mean over samples with tumour of smp's per-sample loss."""
    x, t = random_cases()[3]
    t[1] = 0  # one tumour-free sample, ignored
    dice = smp_losses.DiceLoss("binary", from_logits=True)
    tversky = smp_losses.TverskyLoss("binary", from_logits=True, smooth=1e-7, alpha=0.3, beta=0.7)
    keep = [b for b in range(x.shape[0]) if t[b].sum() > 0]
    ref_dice = sum(dice(*f64(x[b:b + 1], t[b:b + 1])) for b in keep) / len(keep)
    ref_tv = sum(tversky(*f64(x[b:b + 1], t[b:b + 1])) for b in keep) / len(keep)
    assert DiceLoss(reduction="sample")(x, t).item() == pytest.approx(ref_dice.item(), abs=1e-6)
    ours = BinaryWeightedFocalTverskyLoss(0.3, 0.7, weighting="none", reduction="sample")
    assert ours(x, t).item() == pytest.approx(ref_tv.item(), abs=1e-6)


@pytest.mark.parametrize("pos_weight", [None, 5.0])
def test_bce_matches_smp(pos_weight):
    oracle = smp_losses.SoftBCEWithLogitsLoss(
        pos_weight=None if pos_weight is None else torch.tensor(pos_weight))
    for x, t in random_cases():
        got = CombinedLoss(w_bce=1, w_tversky=0, w_dice=0, pos_weight=pos_weight)(x, t)
        assert got.item() == pytest.approx(oracle(*f64(x, t)).item(), abs=1e-6)


# ---------------------------------------------------------------- properties

@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("reduction", ["batch", "sample"])
def test_perfect_prediction_is_zero(weighting, reduction):
    _, t = lesion_batch()
    x = 30.0 * (2 * t - 1)
    parts = CombinedLoss(weighting=weighting, reduction=reduction, dice_log=True).parts(x, t)
    for name, value in parts.items():
        assert value.item() == pytest.approx(0.0, abs=1e-5), name


def miss_and_fp_costs(loss_fn, k=5, bg_logit=-6.0):
    """Loss increase for k missed tumour voxels and for k extra false-positive voxels."""
    x, t = lesion_batch(bg_logit=bg_logit)
    base = loss_fn(x, t)
    missed = x.clone()
    missed.view(-1)[:k] = bg_logit
    extra_fp = x.clone()
    extra_fp.view(-1)[100:100 + k] = 3.0
    return (loss_fn(missed, t) - base).item(), (loss_fn(extra_fp, t) - base).item()


@pytest.mark.parametrize("weighting", ["none", "corrected"])
def test_beta_over_alpha_makes_misses_cost_more(weighting):
    miss, fp = miss_and_fp_costs(BinaryWeightedFocalTverskyLoss(0.3, 0.7, weighting=weighting))
    miss_r, fp_r = miss_and_fp_costs(BinaryWeightedFocalTverskyLoss(0.7, 0.3, weighting=weighting))
    assert miss > 0 and fp > 0 and miss_r > 0 and fp_r > 0
    if weighting == "none":
        assert miss > fp and fp_r > miss_r
    # corrected multiplies FN by (n_neg/n_pos)**0.25 (3.2x here), so a miss may still cost more
    # at alpha > beta, but beta > alpha moves cost from false positives to misses. (The published
    # weighting, FN x n_pos/n_neg, makes beta irrelevant: see the next test.)
    assert miss / fp > miss_r / fp_r


@pytest.mark.parametrize("name", "AB")
@pytest.mark.parametrize("weighting", ["corrected", "swapped", "none"])
def test_weightings_by_hand(name, weighting):
    """The other weightings, written out independently (docs/loss.md table)."""
    x, t = vector(name)
    p, t_ = torch.sigmoid(x.double()).flatten(), t.double().flatten()
    n_pos = t_.sum()
    n_neg = t_.numel() - n_pos
    tp, fp, fn = (p * t_).sum(), (p * (1 - t_)).sum(), ((1 - p) * t_).sum()
    w_fp, w_fn = {"corrected": (1.0, (n_neg / n_pos) ** loss.CORRECTED_POWER),
                  "swapped": (n_pos / n_neg, n_neg / n_pos), "none": (1.0, 1.0)}[weighting]
    expected = 1 - tp / (tp + 0.3 * w_fp * fp + 0.7 * w_fn * fn)
    got = BinaryWeightedFocalTverskyLoss(0.3, 0.7, weighting=weighting)(x, t)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_weightings_direction_at_alpha_equal_beta():
    """corrected: a missed voxel costs more than a false positive; published: the reverse
    (from a clean background; from a noisy one the published term is saturated, see below)."""
    for bg_logit in (-6.0, -30.0):
        corrected = BinaryWeightedFocalTverskyLoss(weighting="corrected")
        miss, fp = miss_and_fp_costs(corrected, bg_logit=bg_logit)
        assert miss > 2 * fp > 0
    published = BinaryWeightedFocalTverskyLoss(weighting="published")
    miss, fp = miss_and_fp_costs(published, bg_logit=-30.0)
    assert fp > 100 * miss > 0


def test_corrected_is_not_saturated_at_1e4_imbalance():
    """Gradient on tumour voxels vs the Dice term's (the bench/loss_weighting.py measurement,
    smaller): corrected comparable, published several orders of magnitude smaller."""
    x, t = lesion_batch(shape=(4, 1, 128, 128), n_pos=7, bg_logit=-9.2, lesion_logit=2.2)

    def tumour_grad(fn):
        x_ = x.clone().requires_grad_(True)
        fn(x_, t).backward()
        return x_.grad[t > 0].abs().mean().item()

    dice = tumour_grad(DiceLoss())
    assert 0.5 < tumour_grad(BinaryWeightedFocalTverskyLoss(weighting="corrected")) / dice < 20
    assert tumour_grad(BinaryWeightedFocalTverskyLoss(weighting="published")) / dice < 1e-2
    assert BinaryWeightedFocalTverskyLoss(weighting="published")(x, t).item() > 0.999


def grad_cases():
    for shape in [(2, 1, 8, 8), (2, 1, 3, 8, 8)]:
        t = torch.zeros(shape)
        t.view(-1)[5:12] = 1
        for target in (t, torch.zeros(shape)):
            for x in (torch.full(shape, 30.0), torch.full(shape, -30.0), 30.0 * (2 * target - 1),
                      -30.0 * (2 * target - 1), torch.zeros(shape)):
                yield x, target


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("gamma", [1.0, 0.75])
@pytest.mark.parametrize("reduction", ["batch", "sample"])
def test_finite_values_and_gradients(weighting, gamma, reduction):
    for dice_log in (False, True):
        loss_fn = CombinedLoss(weighting=weighting, gamma=gamma, reduction=reduction,
                               dice_log=dice_log, pos_weight=10.0)
        for x, t in grad_cases():
            x = x.clone().requires_grad_(True)
            parts = loss_fn.parts(x, t)
            parts["total"].backward()
            assert all(torch.isfinite(v) for v in parts.values()), (x.flatten()[0], t.sum())
            assert torch.isfinite(x.grad).all(), (x.flatten()[0], t.sum())


@pytest.mark.parametrize("reduction", ["batch", "sample"])
def test_empty_batch(reduction):
    """Documented: Dice and none/corrected Tversky give 0 with zero gradient on a batch without
    tumour; published/swapped keep the published missing guard (value 1, gradient ~0)."""
    x = torch.randn(2, 1, 4, 8, 8, requires_grad=True)
    t = torch.zeros(2, 1, 4, 8, 8)
    for fn in (DiceLoss(reduction=reduction), DiceLoss(log=True, reduction=reduction),
               BinaryWeightedFocalTverskyLoss(weighting="none", reduction=reduction),
               BinaryWeightedFocalTverskyLoss(weighting="corrected", reduction=reduction)):
        value = fn(x, t)
        (grad,) = torch.autograd.grad(value, x)
        assert value.item() == 0.0 and grad.abs().max().item() == 0.0
    published = BinaryWeightedFocalTverskyLoss(weighting="published", reduction=reduction)
    value = published(x, t)
    (grad,) = torch.autograd.grad(value, x)
    expected = 1.0 if reduction == "batch" else 0.0
    assert value.item() == pytest.approx(expected, abs=1e-6)
    assert grad.abs().max().item() < 1e-12


def test_sample_reduction_ignores_empty_samples():
    x, t = vector("B")  # sample 1 is tumour-free
    for fn in (DiceLoss(reduction="sample"), BinaryWeightedFocalTverskyLoss(reduction="sample")):
        assert fn(x, t).item() == pytest.approx(fn(x[:1], t[:1]).item(), abs=1e-7)


def test_2d_and_3d_agree_for_batch_reduction():
    x, t = random_cases()[3]  # (3, 1, 4, 6, 6)
    x2, t2 = x.reshape(3, 1, 24, 6), t.reshape(3, 1, 24, 6)
    for weighting in WEIGHTINGS:
        fn = CombinedLoss(weighting=weighting)
        assert fn(x, t).item() == pytest.approx(fn(x2, t2).item(), abs=1e-7)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_parts_sum_to_total(weighting):
    x, t = vector("A")
    fn = CombinedLoss(w_bce=0.6, w_tversky=0.4, w_dice=0.6, weighting=weighting)
    p = fn.parts(x, t)
    assert set(p) == {"bce", "tversky", "dice", "total"}
    expected = 0.6 * p["bce"] + 0.4 * p["tversky"] + 0.6 * p["dice"]
    assert p["total"].item() == pytest.approx(expected.item(), abs=1e-7)
    assert fn(x, t).item() == p["total"].item()
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in p.values())


def test_zero_weight_skips_term():
    x, t = vector("A")
    p = CombinedLoss(w_bce=1.0, w_tversky=0.0, w_dice=0.0).parts(x, t)
    assert p["tversky"].item() == 0.0 and p["dice"].item() == 0.0
    assert p["total"].item() == pytest.approx(F.binary_cross_entropy_with_logits(x, t).item())


def test_autocast_bfloat16_gives_float32():
    x, t = vector("A")
    fn = CombinedLoss(weighting="corrected", gamma=0.75)
    ref = fn(x, t)
    conv = torch.nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fn(x, t)  # float32 logits fed inside autocast
        logits_bf16 = conv(x)  # bfloat16 logits, as a model under autocast returns them
        assert logits_bf16.dtype == torch.bfloat16
        from_bf16 = fn(logits_bf16, t)
    assert inside.dtype == torch.float32 and inside.item() == ref.item()
    assert from_bf16.dtype == torch.float32
    # computed in float32 from the bf16 logits: equal to a float64 hand computation on the same
    # rounded logits to float32 precision (a bf16 computation would be ~1e-2 off)
    bce = CombinedLoss(w_bce=1.0, w_tversky=0.0, w_dice=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bce(conv(x), t)
    expected = F.binary_cross_entropy_with_logits(logits_bf16.double(), t.double())
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected.item(), abs=2e-6)
    bf16_result = F.binary_cross_entropy_with_logits(logits_bf16, t.bfloat16())
    assert abs(bf16_result.item() - expected.item()) > 2e-6  # the check can tell them apart


def test_default_weighting_is_the_module_constant():
    assert loss.DEFAULT_WEIGHTING in loss.WEIGHTINGS
    assert CombinedLoss().tversky.weighting == loss.DEFAULT_WEIGHTING
    assert BinaryWeightedFocalTverskyLoss().weighting == loss.DEFAULT_WEIGHTING


def test_user_errors():
    x, t = vector("A")
    with pytest.raises(ValueError, match="shape"):
        CombinedLoss()(x, t[:, :, :4])
    with pytest.raises(ValueError, match="num_classes=1"):
        CombinedLoss()(x.repeat(1, 2, 1, 1), t.repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match="weighting"):
        CombinedLoss(weighting="inverse")
    with pytest.raises(ValueError, match="reduction"):
        DiceLoss(reduction="mean")
