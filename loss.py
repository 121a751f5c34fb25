"""Losses for binary tumour segmentation at extreme class imbalance (tumour < 0.01 % of voxels).

    total = w_bce * BCE + w_tversky * BinaryWeightedFocalTversky + w_dice * Dice
          = 0.6 * BCE + 0.4 * BWFT + 0.6 * Dice          (the published weights)

Everything takes logits (B, 1, ...) of any spatial rank (2-D (B, 1, H, W) or 3-D (B, 1, D, H, W))
and a binary target of the same shape, and is computed in float32 even under torch.autocast.
Formulas, sources and measurements: docs/loss.md (its table: `python bench/loss_weighting.py`).

Conventions (they differ between libraries, so they are spelled out here):
- alpha weights FALSE POSITIVES and beta weights FALSE NEGATIVES, as in smp and MONAI
  (Salehi et al. 2017). The focal-Tversky authors' code (Abraham & Khan 2019) uses the
  OPPOSITE: there alpha = 0.7 weights false negatives. To reproduce their setting here pass
  alpha=0.3, beta=0.7.
- The focal exponent is applied as clamp_min(1 - TI, eps) ** gamma (smp and the published code
  use (1 - TI) ** gamma; the focal-Tversky paper writes (1 - TI) ** (1 / gamma) with gamma = 4/3,
  i.e. gamma = 0.75 here). The clamp keeps gradients finite for gamma < 1 when 1 - TI rounds to 0.

Usage:
    loss_fn = CombinedLoss()                      # corrected weighting, the default
    loss = loss_fn(logits, target)                # 0-dim float32 tensor
    parts = loss_fn.parts(logits, target)         # {"bce", "tversky", "dice", "total"}

Auxiliary head (organ / uptake classes, training only; models/aux.py):
    loss_fn = WithAuxiliary(CombinedLoss(), AuxSegLoss(num_classes=K), w_aux=1.0)
    parts = loss_fn.parts(logits, target, aux)    # logits (B, 1 + K, ...), aux (B, ...) int64
    # {"bce", "tversky", "dice", "lesion", "aux_ce", "aux_dice", "aux", "total"}
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Imbalance weightings of the focal-Tversky term (see BinaryWeightedFocalTverskyLoss).
WEIGHTINGS = ("corrected", "published", "swapped", "none")
# The default weighting; the loss study (docs/study.md) may change it. Numbers behind the choice:
# docs/loss.md and the BinaryWeightedFocalTverskyLoss docstring.
DEFAULT_WEIGHTING = "corrected"
# "corrected" multiplies FN by (n_neg / n_pos) ** CORRECTED_POWER: 10x at 1e-4, 18x at 1e-5.
CORRECTED_POWER = 0.25
REDUCTIONS = ("batch", "sample")


def _check_inputs(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(
            f"loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape; "
            "pass the target with the logits' shape (B, 1, ...)."
        )
    if logits.dim() < 3 or logits.shape[1] != 1:
        raise ValueError(
            f"loss: expected binary logits of shape (B, 1, ...) with a spatial part, got "
            f"{tuple(logits.shape)}; build the model with num_classes=1."
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"loss: {name}={value!r} is not one of {choices}.")


def _no_autocast(t: torch.Tensor):
    """A context that turns autocast off on the tensor's device: the losses stay in float32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _soft_counts(logits: torch.Tensor, target: torch.Tensor, reduction: str):
    """Soft confusion counts from logits, float32.

    Shapes: logits, target (B, 1, ...) -> TP, FP, FN, n_pos, n_neg each (G,), where G = 1 for
    reduction "batch" (all samples and voxels together) and G = B for "sample".
    TP = sum p*t, FP = sum p*(1-t), FN = sum (1-p)*t, p = sigmoid(logits).
    """
    groups = 1 if reduction == "batch" else logits.shape[0]
    p = torch.sigmoid(logits.float()).reshape(groups, -1)  # (G, N)
    t = target.float().reshape(groups, -1)  # (G, N)
    tp = (p * t).sum(1)
    fp = (p * (1.0 - t)).sum(1)
    fn = ((1.0 - p) * t).sum(1)
    n_pos = t.sum(1)
    n_neg = t.shape[1] - n_pos
    return tp, fp, fn, n_pos, n_neg


def _mean_over_positive(loss: torch.Tensor, n_pos: torch.Tensor) -> torch.Tensor:
    """Mean of loss (G,) over the groups that contain tumour; 0 (with zero gradient) if none."""
    has_pos = (n_pos > 0).to(loss.dtype)  # (G,)
    return (loss * has_pos).sum() / has_pos.sum().clamp_min(1.0)


class DiceLoss(nn.Module):
    """Soft Dice loss from logits (sigmoid), float32.

        p = sigmoid(logits);  Dice = 2 * sum(p*t) / clamp_min(sum(p) + sum(t), eps)
        loss = 1 - Dice            (log=False)
        loss = -log(clamp_min(Dice, eps))   (log=True, as in the published code)

    Sums run over all samples and voxels together for reduction="batch" (smp's binary DiceLoss
    with smooth=0, eps=eps: the same formula; tested to 1e-6 against smp run in float64); the loss
    is then multiplied by 0 when the batch contains no tumour voxel, like smp: an empty batch
    costs 0 and gives no gradient (the BCE term is what pushes false positives down there).
    reduction="sample" computes Dice per sample and averages over the samples that contain
    tumour (0 if none).

    Shapes: logits, target (B, 1, ...) -> 0-dim float32 tensor.
    """

    def __init__(self, log: bool = False, reduction: str = "batch", eps: float = 1e-7) -> None:
        super().__init__()
        _check_choice("reduction", reduction, REDUCTIONS)
        self.log, self.reduction, self.eps = log, reduction, eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_inputs(logits, target)
        with _no_autocast(logits):
            tp, fp, fn, n_pos, _ = _soft_counts(logits, target, self.reduction)
            dice = 2.0 * tp / (2.0 * tp + fp + fn).clamp_min(self.eps)  # (G,)
            loss = -torch.log(dice.clamp_min(self.eps)) if self.log else 1.0 - dice
            return _mean_over_positive(loss, n_pos)


class BinaryWeightedFocalTverskyLoss(nn.Module):
    """Focal Tversky loss with an imbalance weighting, from logits, float32.

        TI = (TP + eps) / (TP + alpha * w_fp * FP + beta * w_fn * FN + eps)
        loss = clamp_min(1 - TI, eps) ** gamma

    alpha weights FALSE POSITIVES, beta FALSE NEGATIVES (smp / MONAI / Salehi et al. 2017).
    !! The focal-Tversky authors' code (Abraham & Khan 2019) uses the opposite: their alpha=0.7
    !! weights false negatives. Their setting is alpha=0.3, beta=0.7 here.

    TP, FP, FN are soft counts (p = sigmoid(logits)), n_pos = sum(t), n_neg = N - n_pos, over the
    whole batch (reduction="batch") or per sample (reduction="sample"). The weighting sets
    (w_fp, w_fn):
    - "published": (n_neg / (n_pos + eps), n_pos / (n_neg + eps)): the formula of the published
      code, reproduced exactly (docs/loss.md, "The published formula"; only difference: the
      clamp, which matters only when 1 - TI < eps). It weights the wrong way for its stated
      intent (FP x 1e4, FN x 1e-4 at 1e-4 imbalance) and is saturated: ~1 with ~no gradient
      until background logits reach about -18; an empty batch costs exactly 1 (no guard in the
      published code).
      Kept for replication, not recommended.
    - "swapped": (n_pos / (n_neg + eps), n_neg / (n_pos + eps)), the published weights swapped;
      a diagnostic only: false positives become almost free, and the 10 % soft miss of a
      lesion predicted at p = 0.9 (FN x 1e4) already saturates it (docs/loss.md).
    - "none": (1, 1), plain focal Tversky (= soft Dice for alpha = beta = 0.5, gamma = 1).
    - "corrected" (default): (1, max(1, n_neg / max(n_pos, 1)) ** fn_power), fn_power = 0.25:
      a missed tumour voxel costs 10x a false-positive voxel at 1e-4 imbalance, 18x at 1e-5.
      Why tempered: raw-ratio weights are 1e4-1e5 and saturate the term. Measured with
      bench/loss_weighting.py (16x256x256 batch, 100 tumour voxels, lesion p = 0.9,
      background p = 1e-4): value 0.53 (published 0.9998), missing half the lesion +0.35
      (published +8e-5, none +0.25), one lesion-volume of false positives +0.09 (published
      +8e-5), gradient on tumour voxels 3.2x the Dice term's (published 4e-4x), on background
      0.58x (published 8e-4x). At 1e-5 (16x800x800, background p = 1e-5): 0.61, +0.31, +0.06,
      3.8x, 0.40x. fn_power = 0.5 (100x) is nearly saturated again (value 0.86-0.95, false
      positives almost free: +0.009 / +0.001, background gradient 0.05x / 0.007x).
    "none" and "corrected" give 0 for a batch (or sample) without tumour, like smp and the
    Dice term; "published" and "swapped" keep the published code's missing guard (value ~1,
    gradient ~0). reduction="sample" averages over samples with tumour (0 if none) for all.

    Shapes: logits, target (B, 1, ...) -> 0-dim float32 tensor.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.5,
        gamma: float = 1.0,
        eps: float = 1e-7,
        reduction: str = "batch",
        weighting: str = DEFAULT_WEIGHTING,
        fn_power: float = CORRECTED_POWER,
    ) -> None:
        super().__init__()
        _check_choice("weighting", weighting, WEIGHTINGS)
        _check_choice("reduction", reduction, REDUCTIONS)
        if alpha < 0 or beta < 0 or gamma <= 0:
            raise ValueError(
                f"loss: need alpha, beta >= 0 and gamma > 0, got {alpha}, {beta}, {gamma}.")
        self.alpha, self.beta, self.gamma, self.eps = alpha, beta, gamma, eps
        self.reduction, self.weighting, self.fn_power = reduction, weighting, fn_power

    def _weights(self, n_pos: torch.Tensor, n_neg: torch.Tensor) -> tuple:
        """(w_fp, w_fn), each a float or a (G,) tensor; they depend on the target only."""
        eps = self.eps
        if self.weighting == "published":
            return n_neg / (n_pos + eps), n_pos / (n_neg + eps)
        if self.weighting == "swapped":
            return n_pos / (n_neg + eps), n_neg / (n_pos + eps)
        if self.weighting == "none":
            return 1.0, 1.0
        ratio = (n_neg / n_pos.clamp_min(1.0)).clamp_min(1.0)  # never down-weight a miss
        return 1.0, ratio**self.fn_power

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_inputs(logits, target)
        with _no_autocast(logits):
            tp, fp, fn, n_pos, n_neg = _soft_counts(logits, target, self.reduction)
            w_fp, w_fn = self._weights(n_pos, n_neg)
            eps = self.eps
            ti = (tp + eps) / (tp + self.alpha * w_fp * fp + self.beta * w_fn * fn + eps)  # (G,)
            loss = (1.0 - ti).clamp_min(eps) ** self.gamma
            if self.weighting in ("published", "swapped") and self.reduction == "batch":
                return loss.sum()  # G = 1; no empty-batch guard, exactly as published
            return _mean_over_positive(loss, n_pos)


class CombinedLoss(nn.Module):
    """total = w_bce * BCE + w_tversky * BWFT + w_dice * Dice, from logits, float32.

    - BCE: binary cross-entropy with logits, mean over all voxels, positive-class weight
      `pos_weight` (None = 1; the fair BCE baseline of docs/study.md sets it).
    - BWFT: BinaryWeightedFocalTverskyLoss(alpha, beta, gamma, reduction, weighting).
    - Dice: DiceLoss(log=dice_log, reduction): 1 - Dice, or -log(Dice) for dice_log=True.
    With weighting="published", dice_log=True and the default weights this is the published
    total 0.6 * BCE + 0.4 * publishedBWFT + 0.6 * (-log soft Dice).
    A weight of 0 skips that term (its part is reported as 0).

    `loss_fn(logits, target)` -> 0-dim float32 tensor; `loss_fn.parts(logits, target)` ->
    {"bce", "tversky", "dice": the UNWEIGHTED terms, "total": the weighted sum}.
    Shapes: logits, target (B, 1, ...) with any spatial rank.
    """

    def __init__(
        self,
        w_bce: float = 0.6,
        w_tversky: float = 0.4,
        w_dice: float = 0.6,
        alpha: float = 0.5,
        beta: float = 0.5,
        gamma: float = 1.0,
        weighting: str = DEFAULT_WEIGHTING,
        dice_log: bool = False,
        pos_weight: float | None = None,
        reduction: str = "batch",
    ) -> None:
        super().__init__()
        self.w_bce, self.w_tversky, self.w_dice = w_bce, w_tversky, w_dice
        self.pos_weight = pos_weight
        self.tversky = BinaryWeightedFocalTverskyLoss(
            alpha=alpha, beta=beta, gamma=gamma, reduction=reduction, weighting=weighting
        )
        self.dice = DiceLoss(log=dice_log, reduction=reduction)

    def _bce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pos_weight = None
        if self.pos_weight is not None:
            pos_weight = torch.tensor(self.pos_weight, dtype=torch.float32, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(),
                                                  pos_weight=pos_weight)

    def parts(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_inputs(logits, target)
        zero = torch.zeros((), dtype=torch.float32, device=logits.device)
        terms = {"bce": (self.w_bce, self._bce), "tversky": (self.w_tversky, self.tversky),
                 "dice": (self.w_dice, self.dice)}
        out, total = {}, zero
        with _no_autocast(logits):
            for name, (weight, fn) in terms.items():
                out[name] = fn(logits, target) if weight != 0 else zero
                total = total + weight * out[name]
        out["total"] = total
        return out

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.parts(logits, target)["total"]


# ---------------------------------------------------------------------------------------------
# auxiliary multi-class head (organs / physiological uptake), training only

class AuxSegLoss(nn.Module):
    """Softmax cross-entropy + soft Dice over the foreground classes, from logits, float32.

        CE   = mean over voxels of -log softmax(logits)[target]
        p    = softmax(logits, dim=1);  for each class c = 1 .. K-1 (background 0 left out):
        TP_c = sum p_c * [t == c],  FP_c = sum p_c * [t != c],  FN_c = sum (1 - p_c) * [t == c]
        Dice_c = (2 TP_c + smooth) / max(2 TP_c + FP_c + FN_c + smooth, 1e-8)
        loss = CE + (1 - mean_c Dice_c)

    Sums run over the batch and all voxels together ("batch Dice"), smooth = 1e-5: nnU-Net's
    DC_and_CE_loss with batch_dice=True, do_bg=False (Isensee et al. 2021, nnU-Net, Nature
    Methods 18:203). nnU-Net adds -mean Dice instead of 1 - mean Dice: the same gradient, offset 1
    (here a perfect prediction costs 0). A class absent from the batch and not predicted has
    Dice ~1; predicting it anyway drives its Dice to ~0 (smooth / (FP + smooth)).

    Shapes: logits (B, K, ...), target (B, ...) int64 class indices in 0 .. K-1, any spatial rank.
    `parts(logits, target)` -> {"ce", "dice" (1 - mean Dice), "total"}; forward returns "total".
    """

    def __init__(self, num_classes: int, smooth: float = 1e-5, w_ce: float = 1.0,
                 w_dice: float = 1.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"loss: AuxSegLoss needs num_classes >= 2 (background included), got {num_classes}.")
        self.num_classes, self.smooth, self.w_ce, self.w_dice = num_classes, smooth, w_ce, w_dice

    def _check(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.dim() < 3 or logits.shape[1] != self.num_classes:
            raise ValueError(f"loss: aux logits {tuple(logits.shape)} should be (B, {self.num_classes}, ...); "
                             f"build the model with aux_classes={self.num_classes}.")
        if target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"loss: aux target {tuple(target.shape)} should be (B, ...) = "
                             f"{tuple(logits.shape[:1] + logits.shape[2:])}, class indices without a channel axis.")
        if target.dtype != torch.int64:
            raise ValueError(f"loss: aux target dtype {target.dtype}; pass int64 class indices (target.long()).")

    def _terms(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE, 1 - mean foreground Dice), float32, from one log-softmax and no one-hot tensor.

        CE = -mean log p[true class]; per class k: TP_k = the true-class probabilities of the
        voxels of class k summed (index_add), FP_k = sum p_k - TP_k, FN_k = n_k - TP_k. The same
        values and gradients as F.cross_entropy plus a one-hot Dice (tested), without a
        (B, K, ...) one-hot copy and a second softmax: about half the loss's time at K = 16 on
        a CPU (bench/bench_aux_loss.py).
        """
        logp = torch.log_softmax(logits.float(), dim=1)  # (B, K, ...)
        logp_true = logp.gather(1, target.unsqueeze(1)).reshape(-1)  # (N,)
        ce = -logp_true.mean()
        p = logp.exp()
        flat = target.reshape(-1)
        tp = torch.zeros(self.num_classes, dtype=p.dtype, device=p.device).index_add(
            0, flat, logp_true.exp())  # (K,)
        n = torch.bincount(flat, minlength=self.num_classes).to(p.dtype)  # (K,)
        fp = p.sum([0, *range(2, p.dim())]) - tp
        fn = n - tp
        dice = (2 * tp + self.smooth) / (2 * tp + fp + fn + self.smooth).clamp_min(1e-8)
        return ce, 1.0 - dice[1:].mean()

    def parts(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(logits, target)
        with _no_autocast(logits):
            ce, dice = self._terms(logits, target)
            return {"ce": ce, "dice": dice, "total": self.w_ce * ce + self.w_dice * dice}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.parts(logits, target)["total"]


class WithAuxiliary(nn.Module):
    """Lesion loss + w_aux * auxiliary loss on a model output that carries both heads.

        total = lesion_loss(logits[:, :1], target) + w_aux * aux_loss(logits[:, 1:], aux)

    logits (B, 1 + K, ...): channel 0 the lesion logits, then K aux logits (a model built with
    aux_classes=K, in train mode); target (B, 1, ...) binary tumour mask; aux (B, ...) int64 class
    indices. LesionTracer weights the organ loss 1:1 with the lesion loss (w_aux = 1).
    `parts(logits, target, aux)` -> {**lesion_loss.parts (e.g. "bce", "tversky", "dice"),
    "lesion": the lesion total, "aux_ce", "aux_dice", "aux": the aux total, "total"}, all 0-dim
    float32 (also under autocast). With aux=None and a 1-channel output (a model in eval mode)
    it is the lesion loss alone ("aux" = 0), so validation can call the same object.
    """

    def __init__(self, lesion_loss: nn.Module, aux_loss: AuxSegLoss, w_aux: float = 1.0) -> None:
        super().__init__()
        if w_aux < 0:
            raise ValueError(f"loss: w_aux={w_aux} must be >= 0.")
        self.lesion_loss, self.aux_loss, self.w_aux = lesion_loss, aux_loss, w_aux

    def _lesion_parts(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if hasattr(self.lesion_loss, "parts"):
            return dict(self.lesion_loss.parts(logits, target))
        return {"total": self.lesion_loss(logits, target).float()}

    def parts(self, logits: torch.Tensor, target: torch.Tensor,
              aux: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        k = self.aux_loss.num_classes
        zero = torch.zeros((), dtype=torch.float32, device=logits.device)
        if aux is None:
            if logits.shape[1] != 1:
                raise ValueError(f"loss: logits {tuple(logits.shape)} carry aux channels but no aux "
                                 "target was given; pass the dataset's aux target as the third argument.")
            out = self._lesion_parts(logits, target)
            out["lesion"] = out["total"]
            out.update(aux_ce=zero, aux_dice=zero, aux=zero)
            return out
        if logits.dim() < 3 or logits.shape[1] != 1 + k:
            raise ValueError(f"loss: logits {tuple(logits.shape)} should be (B, 1 + {k}, ...): the lesion "
                             f"channel then {k} aux channels (model.train() with aux_classes={k}).")
        out = self._lesion_parts(logits[:, :1], target)
        aux_parts = self.aux_loss.parts(logits[:, 1:], aux)
        out["lesion"] = out["total"]
        out.update(aux_ce=aux_parts["ce"], aux_dice=aux_parts["dice"], aux=aux_parts["total"])
        out["total"] = out["lesion"].float() + self.w_aux * out["aux"]
        return out

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                aux: torch.Tensor | None = None) -> torch.Tensor:
        return self.parts(logits, target, aux)["total"]
