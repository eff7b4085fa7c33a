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


def supervised_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, targets) of the shifted next-token loss: for labels [B, T] (CPU: no device read), the flat indices
    into hidden[:, :-1] of every position whose next label is supervised, and those labels."""
    shift = labels[:, 1:]
    rows = (shift != IGNORE_INDEX).reshape(-1).nonzero(as_tuple=True)[0]
    return rows, shift.reshape(-1)[rows]


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight[:vocab].T (+ bias), target), fp32 softmax, `chunk` rows at a time.

    The forward also computes the gradients (as liger-kernel's fused linear cross-entropy does): per chunk
    dlogits = softmax - onehot, dhidden = dlogits @ W, dW += dlogits.T @ h (accumulated in fp32); the backward
    only scales them by the incoming gradient. At most [chunk, V] logits exist at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, vocab: int, need_grad: bool):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad and ctx.needs_input_grad[0] else None
        want_weight = need_grad and ctx.needs_input_grad[1]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        want_bias = need_grad and bias is not None and ctx.needs_input_grad[2]
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_bias else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight, bias)[:, :vocab].float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            dlogits = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
            dlogits[torch.arange(len(t), device=t.device), t] -= 1.0
            if grad_bias is not None:
                grad_bias[:vocab] += dlogits.sum(0)
            dlogits = dlogits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = dlogits @ weight[:vocab]
            if grad_weight is not None:
                grad_weight[:vocab] += _matmul_fp32(dlogits.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_output.to(hidden_dtype)).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_output).to(weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


_FP32_OUT_MATMUL: dict[str, bool] = {}


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32: bf16/fp16 inputs multiply in their dtype with an fp32 result where torch offers it (CUDA
    `out_dtype`), else the product is rounded to the input dtype first."""
    if a.dtype == torch.float32:
        return a @ b
    key = a.device.type
    if _FP32_OUT_MATMUL.get(key, key == "cuda"):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_MATMUL[key] = False
    return (a @ b).float()


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels_host: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int = 2048,
    vocab_multiple: int = 1,
) -> torch.Tensor:
    """`causal_lm_loss(hidden @ weight.T + bias, labels)` without the logits of unsupervised positions.

    hidden [B, T, D] final-layer states; weight [V, D] (+ bias [V]) the LM head; labels_host [B, T] on the CPU
    (which rows are supervised is known without reading the device). Only the supervised rows are
    multiplied by the head, `chunk` rows at a time, each chunk's fp32 softmax freed before the next:
    the same mean CE, values and gradients equal to the plain path within fp rounding
    (tests/test_training_speed.py). vocab_multiple: pad the head's rows to a multiple (aligned GEMMs, as
    legion.model.legion.lm_logits does). No supervised row gives NaN, like F.cross_entropy.
    """
    rows, targets = supervised_rows(labels_host.cpu())
    length, width = hidden.shape[1], hidden.shape[-1]
    rows_in_hidden = rows // (length - 1) * length + rows % (length - 1)  # [B, T-1] row -> [B * T] row, no copy
    selected = hidden.reshape(-1, width)[rows_in_hidden.to(hidden.device, non_blocking=True)]
    vocab = weight.shape[0]
    pad = -vocab % max(vocab_multiple, 1)
    if pad:
        weight = F.pad(weight, (0, 0, 0, pad))
        bias = None if bias is None else F.pad(bias, (0, pad))
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = _LinearCrossEntropy.apply(
        selected, weight, bias, targets.to(hidden.device, non_blocking=True), int(chunk), vocab, need_grad
    )
    return total / len(rows) if len(rows) else total * float("nan")


def _check_binary(gt: torch.Tensor) -> None:
    binary = ((gt == 0) | (gt == 1)).all()
    if gt.is_cuda:  # checked on the device, without waiting for it (a failure aborts the CUDA context)
        torch._assert_async(binary, "ground-truth masks must contain only 0 and 1")
    elif not bool(binary):
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
