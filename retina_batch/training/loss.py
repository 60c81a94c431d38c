"""Training losses, chosen with `train --loss`.

bce+dice (the default): BCE gives well-calibrated per-pixel gradients, Dice counters the ~9:1
background:vessel imbalance that would otherwise push thin vessels below threshold.
bce: plain cross-entropy, as Little W-Net trains; the soft Dice term sharpens probabilities
towards 0/1, which may cost the ranking that ROC AUC measures (the card's threshold, tuned on
validation, takes care of the imbalance at the mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    return 1 - (2 * inter + eps) / (prob.sum() + target.sum() + eps)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits, target = logits.float(), target.float()
    return F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(logits, target)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


LOSSES = {"bce+dice": bce_dice_loss, "bce": bce_loss}
