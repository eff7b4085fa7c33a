"""GLaMM's region encoder (`MLVLROIQueryModule`), kept for checkpoint compatibility (docs/model.md §12).

LEGION never feeds `<bbox>` regions, so this module only has to carry GLaMM's weights under GLaMM's
key names; its forward works (RoIAlign = `torchvision.ops.roi_align(aligned=True)`, what mmcv's
RoIAlign computes) so that the module is real, not a weight container.

Key layout (full size: C = 1024 CLIP width, D = 4096 LLM width, R = 14 RoI size):
    mlvl_fuse.input_conv.{0..3}.{weight [C, C+2, 1, 1], bias}
    mlvl_fuse.fuse_convs.{0..4}.conv.weight [C, C, 3, 3]; .gn.{weight, bias} [C]
    roi_align.pconvs.{0..3}.{weight [C, C, 3, 3], bias}
    roi_align.pos_embedd.{0,2,3,5}.*  (Linear 4->256, ReLU, LN 256, Linear 256->C, ReLU, LN C)
    roi_align.flatten_linear.{weight [C, C*R*R], bias}
    roi_align.updims.{weight [D, C], bias}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align


class ConvGNReLU(nn.Module):
    """Conv3x3 (no bias) -> GroupNorm -> ReLU, with the attribute names of mmcv's ConvModule."""

    def __init__(self, channels: int, gn_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(gn_groups, channels, eps=1e-5)
        self.activate = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.gn(self.conv(x)))


def _coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """[B, 2, H, W]: x then y coordinates, each linspace(-1, 1)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y])[None].expand(b, -1, -1, -1)


class MultiLevelFuse(nn.Module):
    """Adds coordinates, projects each level, then exchanges channels between neighbouring levels.

    Levels are ordered fine -> coarse. In each round, level l keeps its first C/2 channels and takes
    C/4 channels from the coarser level l+1 and C/4 from the finer level l-1 (clamped at the ends),
    resized bilinearly to its own size, then applies that round's Conv-GN-ReLU.
    """

    def __init__(self, channels: int, num_levels: int, fuse_rounds: int, gn_groups: int):
        super().__init__()
        self.num_levels = num_levels
        self.shuffle = channels // 4
        self.keep = channels - 2 * self.shuffle
        self.input_conv = nn.ModuleList([nn.Conv2d(channels + 2, channels, 1) for _ in range(num_levels)])
        self.fuse_convs = nn.ModuleList([ConvGNReLU(channels, gn_groups) for _ in range(fuse_rounds)])

    def _exchange(self, feats: list[torch.Tensor], conv: nn.Module) -> list[torch.Tensor]:
        out = []
        for lvl, own in enumerate(feats):
            coarser = feats[min(lvl + 1, self.num_levels - 1)][:, self.keep + self.shuffle :]
            finer = feats[max(lvl - 1, 0)][:, self.keep : self.keep + self.shuffle]
            size = own.shape[-2:]
            coarser = F.interpolate(coarser.float(), size=size, mode="bilinear", align_corners=True)
            finer = F.interpolate(finer.float(), size=size, mode="bilinear", align_corners=True)
            out.append(conv(torch.cat([own[:, : self.keep], coarser.to(own.dtype), finer.to(own.dtype)], 1)))
        return out

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """feats: per level [B, C, H_l, W_l] -> same shapes."""
        feats = [conv(torch.cat([f, _coordinate_channels(f)], 1)) for conv, f in zip(self.input_conv, feats)]
        for conv in self.fuse_convs:
            feats = self._exchange(feats, conv)
        return feats


class MultiLevelRoIExtractor(nn.Module):
    """RoIAlign on every level, per-level conv, sum, flatten, + box position embedding, up-project."""

    def __init__(
        self,
        channels: int,
        out_dim: int,
        strides: list[float],
        roi_output_size: int,
        sampling_ratio: int,
        pos_embed_dim: int,
        box_scale: float,
    ):
        super().__init__()
        self.strides = list(strides)
        self.roi_output_size = roi_output_size
        self.sampling_ratio = sampling_ratio
        self.box_scale = box_scale
        self.pconvs = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1) for _ in strides])
        self.pos_embedd = nn.Sequential(
            nn.Linear(4, pos_embed_dim),
            nn.ReLU(),
            nn.LayerNorm(pos_embed_dim),
            nn.Linear(pos_embed_dim, channels),
            nn.ReLU(),
            nn.LayerNorm(channels),
        )
        self.updims = nn.Linear(channels, out_dim)
        self.flatten_linear = nn.Linear(channels * roi_output_size**2, channels)

    def forward(self, feats: list[torch.Tensor], boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        """feats: per level [B, C, H_l, W_l]; boxes: per image [K_i, 4] normalized xyxy in [0, 1]
        -> per image [K_i, out_dim]."""
        dtype = feats[0].dtype
        all_boxes = torch.cat(boxes, 0).to(dtype)
        image_ids = torch.cat(
            [torch.full((len(b),), i, device=all_boxes.device, dtype=torch.float32) for i, b in enumerate(boxes)]
        )
        rois = torch.cat([image_ids[:, None], all_boxes.float() * self.box_scale], 1)  # [K, 5] pixels
        pooled = 0
        for feat, stride, conv in zip(feats, self.strides, self.pconvs):
            level = roi_align(
                feat.float(),
                rois,
                output_size=self.roi_output_size,
                spatial_scale=1.0 / stride,
                sampling_ratio=self.sampling_ratio,
                aligned=True,
            )
            pooled = pooled + conv(level.to(dtype))
        queries = self.flatten_linear(F.relu(pooled).flatten(1)) + self.pos_embedd(all_boxes)
        queries = self.updims(queries)
        return list(queries.split([len(b) for b in boxes]))


class RegionEncoder(nn.Module):
    """GLaMM's MLVLROIQueryModule: multi-level CLIP features + boxes -> one LLM embedding per box.

    Args:
        channels: CLIP width (`mm_hidden_size`); out_dim: LLM width (`hidden_size`).
        upsample_factors: per level, how much the CLIP grid is upsampled (GLaMM: 8, 4, 2, 1).
        patch_size: CLIP patch size; level strides are patch_size / factor (GLaMM: 1.75 ... 14).
    """

    def __init__(
        self,
        channels: int,
        out_dim: int,
        patch_size: int,
        num_levels: int = 4,
        feature_layers=(14, 17, 20, 23),
        upsample_factors=(8, 4, 2, 1),
        roi_output_size: int = 14,
        sampling_ratio: int = 2,
        fuse_rounds: int = 5,
        gn_groups: int = 64,
        pos_embed_dim: int = 256,
        box_scale: float = 224.0,
    ):
        super().__init__()
        if not (len(feature_layers) == len(upsample_factors) == num_levels):
            raise ValueError("feature_layers and upsample_factors need one entry per level")
        self.feature_layers = list(feature_layers)
        self.upsample_factors = list(upsample_factors)
        self.mlvl_fuse = MultiLevelFuse(channels, num_levels, fuse_rounds, gn_groups)
        self.roi_align = MultiLevelRoIExtractor(
            channels,
            out_dim,
            [patch_size / f for f in upsample_factors],
            roi_output_size,
            sampling_ratio,
            pos_embed_dim,
            box_scale,
        )

    @classmethod
    def from_config(cls, config) -> RegionEncoder:
        rc = dict(config.region_encoder_config)
        return cls(
            channels=config.mm_hidden_size,
            out_dim=config.hidden_size,
            patch_size=config.vision_config["patch_size"],
            **rc,
        )

    def forward(self, clip_hidden_states: tuple[torch.Tensor, ...], boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        """clip_hidden_states: all CLIP hidden states, each [B, 1 + g*g, C] (CLS first);
        boxes: per image [K_i, 4] normalized xyxy -> per image [K_i, out_dim]."""
        feats = []
        for layer, factor in zip(self.feature_layers, self.upsample_factors):
            h = clip_hidden_states[layer][:, 1:]
            b, n, c = h.shape
            g = int(round(n**0.5))
            grid = h.transpose(1, 2).reshape(b, c, g, g)
            up = F.interpolate(grid.float(), size=(g * factor, g * factor), mode="bilinear", align_corners=True)
            feats.append(up.to(h.dtype))
        return self.roi_align(self.mlvl_fuse(feats), boxes)
