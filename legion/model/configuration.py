"""LegionConfig: one config for the LLM, the CLIP tower, the projector, SAM and the region encoder.

It is a `LlamaConfig` with LEGION's extra fields, and it reads the `config.json` that GLaMM and
LEGION wrote as-is (`model_type: llava`, `LISAForCausalLM` / `GLaMMForCausalLM` architectures,
both `mm_use_im_start_end` and GLaMM's `mm_use_image_start_end` spellings). Sub-module sizes that
GLaMM never wrote (CLIP, SAM, region encoder) default to the full-size LEGION values, so a GLaMM
config describes the 7B model exactly; tiny presets set them explicitly.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from legion.errors import MissingFileError

# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), vision part only.
CLIP_L14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    num_channels=3,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)

# SAM ViT-H (sam_vit_h_4b8939) as built by segment_anything's build_sam_vit_h.
SAM_VIT_H = dict(
    image_size=1024,
    patch_size=16,
    encoder_embed_dim=1280,
    encoder_depth=32,
    encoder_num_heads=16,
    encoder_global_attn_indexes=[7, 15, 23, 31],
    window_size=14,
    prompt_embed_dim=256,
    mask_in_chans=16,
    decoder_depth=2,
    decoder_mlp_dim=2048,
    decoder_num_heads=8,
)

# GLaMM's MLVLROIQueryModule (region encoder), kept for checkpoint compatibility only.
REGION_ENCODER_GLAMM = dict(
    num_levels=4,
    feature_layers=[14, 17, 20, 23],
    upsample_factors=[8, 4, 2, 1],
    roi_output_size=14,
    sampling_ratio=2,
    fuse_rounds=5,
    gn_groups=64,
    pos_embed_dim=256,
    box_scale=224.0,
)

# Fields of GLaMM/LEGION config.json that we read under another name.
_ALIASES = {
    "mm_use_image_start_end": "mm_use_im_start_end",
    "num_reg_features": "num_level_reg_features",
    "select_feature_type": "mm_vision_select_feature",
}


class LegionConfig(LlamaConfig):
    model_type = "legion"

    def __init__(
        self,
        mm_vision_tower: str | None = "openai/clip-vit-large-patch14-336",
        vision_config: dict | None = None,
        mm_vision_select_layer: int = -2,
        mm_vision_select_feature: str = "patch",
        mm_hidden_size: int = 1024,
        mm_projector_type: str = "mlp2x_gelu",
        mm_use_im_start_end: bool = True,
        with_region: bool = True,
        num_level_reg_features: int = 4,
        region_encoder_config: dict | None = None,
        sam_config: dict | None = None,
        out_dim: int = 256,
        train_mask_decoder: bool = True,
        bbox_token_idx: int = 32002,
        seg_token_idx: int | None = None,
        **kwargs: Any,
    ):
        self.mm_vision_tower = mm_vision_tower
        self.vision_config = dict(vision_config) if vision_config else dict(CLIP_L14_336)
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_vision_select_feature = mm_vision_select_feature
        self.mm_hidden_size = mm_hidden_size
        self.mm_projector_type = mm_projector_type
        self.mm_use_im_start_end = mm_use_im_start_end
        self.with_region = with_region
        self.num_level_reg_features = num_level_reg_features
        self.region_encoder_config = {**REGION_ENCODER_GLAMM, **(region_encoder_config or {})}
        self.sam_config = {**SAM_VIT_H, **(sam_config or {})}
        self.out_dim = out_dim
        self.train_mask_decoder = train_mask_decoder
        self.bbox_token_idx = bbox_token_idx
        self.seg_token_idx = seg_token_idx  # None: look it up from the tokenizer
        super().__init__(**kwargs)

    # --- derived sizes -------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """Embeddings that replace the single image placeholder (576 for CLIP-L/14 at 336 px)."""
        grid = self.vision_config["image_size"] // self.vision_config["patch_size"]
        return grid * grid + (1 if self.mm_vision_select_feature == "cls_patch" else 0)

    # --- GLaMM / LEGION config.json ------------------------------------------------
    @classmethod
    def from_glamm_dict(cls, data: dict) -> LegionConfig:
        """Build from a config.json written by GLaMM, LISA or LEGION (or by us)."""
        data = copy.deepcopy(data)
        for old, new in _ALIASES.items():
            if old in data and new not in data:
                data[new] = data[old]
        if "mm_vision_tower" not in data:
            data["mm_vision_tower"] = (
                data.get("vision_tower") or data.get("mm_vision_module") or data.get("vision_module")
            )
        data.pop("model_type", None)
        data.pop("transformers_version", None)
        data.setdefault("architectures", ["LegionForCausalLM"])
        return cls(**data)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> LegionConfig:
        """Read `<path>/config.json`, whatever its `model_type` (legion, llava)."""
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise MissingFileError(f"no config.json in {path}")
        with open(config_file) as fh:
            return cls.from_glamm_dict(json.load(fh))


def _register_with_transformers() -> None:
    # transformers' Auto classes may have loaded while this module was importing LlamaConfig: register now
    # (legion/model/auto.py; a no-op when they are not loaded yet, the import hook does it then).
    from legion.model.auto import sync

    sync(LegionConfig)


_register_with_transformers()
