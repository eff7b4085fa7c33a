"""CE / BCE / Dice on small hand-computed examples (docs/model.md §9)."""

import math

import pytest
import torch

from legion.model.losses import causal_lm_loss, mask_bce, mask_dice, mask_losses


def test_causal_lm_loss_is_shifted_mean_over_supervised_tokens():
    # vocab 3; position t predicts label t+1
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[-100, 1, -100, 0]])
    # supervised targets: label[1]=1 predicted by logits[0]; label[3]=0 predicted by logits[2]
    nll_a = -math.log(math.exp(0) / (math.exp(2) + 2))
    nll_b = -math.log(1 / (2 + math.exp(3)))
    assert causal_lm_loss(logits, labels).item() == pytest.approx((nll_a + nll_b) / 2, rel=1e-6)


def test_bce_per_mask_mean():
    pred = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[2.0, -2.0], [0.0, 0.0]]])
    gt = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]]])
    got = mask_bce(pred, gt)
    sp = lambda x: math.log1p(math.exp(x))  # BCE with logit x: target 1 -> sp(-x), target 0 -> sp(x)
    assert got[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert got[1].item() == pytest.approx((sp(-2.0) + sp(-2.0) + math.log(2) + math.log(2)) / 4, rel=1e-6)


def test_dice_with_scale_1000_and_eps():
    pred = torch.zeros(1, 2, 2)  # sigmoid = 0.5 everywhere
    gt = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # p = 0.5/1000 per pixel; sum(p*g) = 0.001; sum(p) = 0.002; sum(g)/1000 = 0.002
    expected = 1 - (2 * 0.001 + 1e-6) / (0.002 + 0.002 + 1e-6)
    assert mask_dice(pred, gt).item() == pytest.approx(expected, rel=1e-6)
    # empty GT and confident-negative prediction: eps makes it ~0, not NaN
    assert mask_dice(torch.full((1, 2, 2), -50.0), torch.zeros(1, 2, 2)).item() == pytest.approx(0.0, abs=1e-6)


def test_mask_losses_average_over_all_masks_of_the_batch():
    preds = [torch.zeros(2, 2, 2), torch.zeros(0, 3, 3), torch.full((1, 1, 2), 3.0)]
    gts = [torch.ones(2, 2, 2), torch.zeros(0, 3, 3), torch.tensor([[[1.0, 0.0]]])]
    bce, dice = mask_losses(preds, gts)
    per_bce = torch.cat([mask_bce(preds[0], gts[0]), mask_bce(preds[2], gts[2])])
    per_dice = torch.cat([mask_dice(preds[0], gts[0]), mask_dice(preds[2], gts[2])])
    assert bce.item() == pytest.approx(per_bce.sum().item() / (3 + 1e-8), rel=1e-6)
    assert dice.item() == pytest.approx(per_dice.sum().item() / (3 + 1e-8), rel=1e-6)


def test_no_masks_gives_zero_mask_losses():
    bce, dice = mask_losses([torch.zeros(0, 4, 4)], [torch.zeros(0, 4, 4)])
    assert bce.item() == 0.0 and dice.item() == 0.0


def test_non_binary_ground_truth_is_rejected():
    with pytest.raises(ValueError, match="only 0 and 1"):
        mask_bce(torch.zeros(1, 2, 2), torch.tensor([[[2.0, 0.0], [1.0, 0.0]]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        mask_dice(torch.zeros(1, 1, 2), torch.tensor([[[0.5, 0.0]]]))


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="differ"):
        mask_losses([torch.zeros(1, 4, 4)], [torch.zeros(1, 4, 5)])
