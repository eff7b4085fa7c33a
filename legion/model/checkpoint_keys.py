"""Checkpoint key names: how GLaMM / LISA / LEGION / peft spell our state-dict keys (docs/model.md §13).

Our state dict uses GLaMM's key table (docs/model.md §13.2) unchanged, so a released checkpoint needs only
a few, explicit renames. Every rename is listed here; a key that no rule maps and the model does
not have is reported as unexpected, never dropped silently.
"""

from __future__ import annotations

import re

# Whole-prefix renames, applied in order, each at most once (older names -> ours).
PREFIX_RENAMES: list[tuple[str, str]] = [
    ("base_model.model.", ""),  # peft-wrapped model saved as a whole
    ("model.visual_model.", "model.grounding_encoder."),  # LISA's name for SAM
    ("visual_model.", "model.grounding_encoder."),
]

# Sub-string renames inside a key.
INFIX_RENAMES: list[tuple[str, str]] = [
    (".base_layer.", "."),  # peft >= 0.7 moves a LoRA-wrapped Linear's weight to `<name>.base_layer.weight`
]

# Keys a checkpoint may carry that have no parameter behind them: ignored quietly.
BENIGN_UNEXPECTED = [
    re.compile(r"(^|\.)rotary_emb\.inv_freq$"),  # transformers 4.28 saved LLaMA's rotary buffer
]

# Keys of modules LEGION never runs: reported as unused, not fatal. GranD-Pretrained was trained
# with a "spi_module" (its _name_or_path says so) whose keys may sit next to region_encoder's.
UNUSED_UNEXPECTED = [
    re.compile(r"^model\.spi_module\."),
]

# Keys that may be absent from a checkpoint without changing LEGION's outputs (reported, not fatal).
BENIGN_MISSING = [
    re.compile(r"^model\.region_encoder\."),  # GLaMM's region encoder: never used by LEGION
]

# Keys that are never in a checkpoint (CLIP is loaded from its own directory).
VISION_TOWER_KEY = re.compile(r"^model\.vision_tower\.")

# LoRA factors in an unmerged checkpoint: not loadable into the merged model.
LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B)\.")

SAM_PREFIX = "model.grounding_encoder."  # where sam_vit_h_4b8939.pth keys (image_encoder.*, ...) go
CLIP_PREFIX = "model.vision_tower.vision_tower."  # + CLIPVisionModel keys (vision_model.*)


def remap_key(key: str) -> str:
    """A checkpoint key in our (GLaMM) spelling."""
    for old, new in PREFIX_RENAMES:  # peft's prefix first, then the LISA-era module names
        if key.startswith(old):
            key = new + key[len(old) :]
    for old, new in INFIX_RENAMES:
        key = key.replace(old, new)
    return key


def is_benign_unexpected(key: str) -> bool:
    return any(p.search(key) for p in BENIGN_UNEXPECTED)


def is_unused_unexpected(key: str) -> bool:
    return any(p.search(key) for p in UNUSED_UNEXPECTED)


def is_benign_missing(key: str) -> bool:
    return any(p.search(key) for p in BENIGN_MISSING)
