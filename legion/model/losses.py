"""LEGION's training losses (docs/model.md §9): next-token CE, per-mask BCE and Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DICE_SCALE = 1000.0
DICE_EPS = 1e-6
MASK_COUNT_EPS = 1e-8


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF shifted cross-entropy: logits [B, T, V] predict labels [B, T] one step ahead.

    Mean over every supervised (!= -100) target of the batch; computed in fp32.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def _check_binary(gt: torch.Tensor) -> None:
    if not bool(((gt == 0) | (gt == 1)).all()):
        raise ValueError("ground-truth masks must contain only 0 and 1 (overlapping polygons summed to 2?)")


def mask_bce(pred_logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-mask mean BCE-with-logits. pred_logits, gt [N, H, W] -> [N]."""
    _check_binary(gt)
    loss = F.binary_cross_entropy_with_logits(pred_logits.float(), gt.float(), reduction="none")
    return loss.flatten(1).mean(1)


def mask_dice(pred_logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-mask Dice loss with the reference's 1/1000 scaling and eps 1e-6. [N, H, W] -> [N]."""
    _check_binary(gt)
    p = pred_logits.float().sigmoid().flatten(1) / DICE_SCALE
    g = gt.float().flatten(1)
    numerator = 2 * (p * g).sum(1) + DICE_EPS
    denominator = p.sum(1) + g.sum(1) / DICE_SCALE + DICE_EPS
    return 1 - numerator / denominator


def mask_losses(pred_masks: list[torch.Tensor], gt_masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) averaged over all M masks of the batch: sum_m loss_m / (M + 1e-8).

    pred_masks / gt_masks: per image [N_i, H_i, W_i] (logits / {0,1}). With M = 0 both are 0.
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predicted mask groups for {len(gt_masks)} images")
    device = pred_masks[0].device if pred_masks else torch.device("cpu")
    bce = torch.zeros((), device=device)
    dice = torch.zeros((), device=device)
    count = 0
    for pred, gt in zip(pred_masks, gt_masks):
        if pred.shape != gt.shape:
            raise ValueError(f"predicted masks {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ")
        if pred.shape[0] == 0:
            continue
        gt = gt.to(pred.device)
        bce = bce + mask_bce(pred, gt).sum()
        dice = dice + mask_dice(pred, gt).sum()
        count += pred.shape[0]
    return bce / (count + MASK_COUNT_EPS), dice / (count + MASK_COUNT_EPS)
