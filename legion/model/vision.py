"""Global image path: the CLIP vision tower and the `mm_projector` (docs/model.md §4).

CLIP runs frozen and without gradients; its weights are never part of a LEGION checkpoint (they
are loaded from the local CLIP directory named by `mm_vision_tower`), so `LegionModel` hides the
`vision_tower.*` keys from its state dict.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel


class CLIPVisionTower(nn.Module):
    """Frozen CLIP ViT; returns the patch features of one hidden layer.

    Stored as `model.vision_tower`, holding the HF model as `.vision_tower` (GLaMM's layout; with
    transformers 5 the HF module tree has no `vision_model` level). Never saved: load CLIP with
    `CLIPVisionModel.from_pretrained(local_dir)` into `.vision_tower`.

    Args:
        vision_config: kwargs of `transformers.CLIPVisionConfig` (`LegionConfig.vision_config`).
        select_layer: index into `hidden_states` (-2 = output of the penultimate layer).
        select_feature: "patch" (drop CLS) or "cls_patch" (keep it).
    """

    def __init__(self, vision_config: dict, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"unknown mm_vision_select_feature {select_feature!r} (expected 'patch' or 'cls_patch')")
        self.vision_tower = CLIPVisionModel(CLIPVisionConfig(**vision_config))
        self.vision_tower.requires_grad_(False)
        self.select_layer = select_layer
        self.select_feature = select_feature

    def load_pretrained(self, source, dtype: torch.dtype | None = None, device=None) -> None:
        """Replace the tower by real CLIP weights.

        source: a local directory (CLIPVisionModel or full CLIPModel checkpoint) or a
        CLIPVisionModel. Its sizes must match this tower's config (image size, patch, width, depth).
        Needed after `from_pretrained` of a LEGION checkpoint, which holds no CLIP weights (the
        tower is then left unmaterialized).
        """
        model = source if isinstance(source, CLIPVisionModel) else CLIPVisionModel.from_pretrained(source)
        want, got = self.vision_tower.config, model.config
        for field in ("image_size", "patch_size", "hidden_size", "num_hidden_layers"):
            if getattr(want, field) != getattr(got, field):
                raise ValueError(
                    f"CLIP tower {field} is {getattr(got, field)}, the LEGION config expects {getattr(want, field)}"
                )
        model.requires_grad_(False)
        model.eval()
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        self.vision_tower = model

    def train(self, mode: bool = True) -> CLIPVisionTower:
        # Frozen feature extractor: stays in eval mode (no dropout, no activation checkpointing).
        return super().train(False)

    @property
    def num_patches(self) -> int:
        cfg = self.vision_tower.config
        return (cfg.image_size // cfg.patch_size) ** 2

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All hidden states (embeddings + one per layer), each [B, 1 + N_patch, C], no grad."""
        with torch.no_grad():
            out = self.vision_tower(pixel_values.to(self.dtype), output_hidden_states=True)
        return out.hidden_states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] (CLIP-normalized) -> features [B, N_patch, C] (no CLS)."""
        feats = self.hidden_states(pixel_values)[self.select_layer]
        if self.select_feature == "patch":
            feats = feats[:, 1:]
        return feats


def build_mm_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """`mlp2x_gelu` (keys `0`, `2`): Linear(mm_hidden -> hidden) -> GELU -> Linear(hidden -> hidden)."""
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    if projector_type == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(mm_hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
    raise ValueError(f"unknown mm_projector_type {projector_type!r} (supported: 'mlp2x_gelu', 'linear')")
