"""Fused input projections for inference: one GEMM for q/k/v and one for gate/up in every LLaMA decoder layer.

At batch 1 a decode step is a chain of matrix-vector products; reading q, k and v (or gate and up) as one
weight makes one larger kernel instead of three (two) small ones. transformers' LlamaAttention calls
`q_proj(x)`, `k_proj(x)`, `v_proj(x)` on the same tensor, and LlamaMLP `gate_proj(x)`, `up_proj(x)`:

    fuse_projections(model.model)      # LlamaModel; in place, inference only
    unfuse_projections(model.model)    # back to separate nn.Linear layers (contiguous copies)

After fusing, each projection is a `FusedProjection` whose `weight` (and `bias`) is a view of its group's
concatenated weight, so the memory use stays the same and `state_dict()` keys and values are unchanged.
The first projection of a group computes the whole group's product for its input and keeps the other
parts for the next calls with that same tensor; a call with another tensor computes its own part alone.
The numbers equal the separate products up to floating-point summation order (one GEMM with a wider
output may block the reduction differently): tests/test_fused_projections.py checks logits within 1e-5
in fp32 and identical greedy tokens on the tiny model. Not for training (LoRA wraps q_proj / v_proj),
quantized layers or exporting (the views share storage, which safetensors refuses: unfuse first).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


class _Group:
    """The concatenated weight [sum(out), in] (+ bias) of a group, and the split product of the last input."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]):
        self.weight, self.bias, self.sizes = weight, bias, sizes
        self.input: torch.Tensor | None = None
        self.parts: list[torch.Tensor] | None = None
        self.pending: set[int] = set()


class FusedProjection(nn.Module):
    """One projection of a fused group (the same in/out features, weight and bias values as the nn.Linear it
    replaced); see the module docstring."""

    def __init__(self, group: _Group, index: int, weight: torch.Tensor, bias: torch.Tensor | None, trainable: bool):
        super().__init__()
        self._group = group
        self.index = index
        self.was_trainable = trainable  # the replaced weight's requires_grad, restored by unfuse_projections
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)  # a view of the group's weight (shared storage)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._group
        if group.input is x and self.index in group.pending:
            group.pending.discard(self.index)
            part = group.parts[self.index]
            if not group.pending:
                group.input = group.parts = None
            return part
        if self.index != 0:
            return F.linear(x, self.weight, self.bias)
        parts = list(F.linear(x, group.weight, group.bias).split(group.sizes, dim=-1))
        group.input, group.parts, group.pending = x, parts, set(range(1, len(parts)))
        return parts[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused part {self.index}"


def fuse_projections(decoder: nn.Module) -> int:
    """Fuse q/k/v and gate/up of every layer of `decoder` (a LlamaModel) in place; returns the groups fused.

    Layers whose projections are not plain nn.Linear (LoRA, bitsandbytes) or already fused are left alone."""
    fused = 0
    for layer in decoder.layers:
        for block_name, names in GROUPS.items():
            block = getattr(layer, block_name)
            linears = [getattr(block, n) for n in names]
            if not all(type(m) is nn.Linear for m in linears):
                continue
            if len({(m.in_features, m.weight.dtype, m.weight.device, m.bias is None) for m in linears}) != 1:
                continue
            with torch.no_grad():
                weight = torch.cat([m.weight for m in linears])
                bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
            sizes = [m.out_features for m in linears]
            group = _Group(weight, bias, sizes)
            weights, biases = weight.split(sizes), (bias.split(sizes) if bias is not None else [None] * len(sizes))
            for i, (name, w, b) in enumerate(zip(names, weights, biases)):
                trainable = linears[i].weight.requires_grad
                setattr(block, name, FusedProjection(group, i, w, b, trainable))
            fused += 1
    return fused


def unfuse_projections(decoder: nn.Module) -> int:
    """Undo `fuse_projections`: every FusedProjection becomes an nn.Linear with its own (copied) weight."""
    restored = 0
    for layer in decoder.layers:
        for block_name, names in GROUPS.items():
            block = getattr(layer, block_name)
            for name in names:
                module = getattr(block, name)
                if not isinstance(module, FusedProjection):
                    continue
                w, bias = module.weight, module.bias is not None
                linear = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    linear.weight.copy_(w)
                    if bias:
                        linear.bias.copy_(module.bias)
                linear.requires_grad_(module.was_trainable)
                setattr(block, name, linear)
                restored += 1
    return restored


def projections_fused(decoder: nn.Module) -> bool:
    return any(isinstance(m, FusedProjection) for m in decoder.modules())
