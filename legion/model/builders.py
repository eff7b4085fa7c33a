"""Build LEGION models (`tiny`, `legion_7b` presets), write tiny checkpoints, load any checkpoint.

    build_config("tiny" | "legion_7b", vocab_size=None) -> LegionConfig
    build_model(preset_or_config, device="cpu" | "meta", dtype=torch.float32, seed=None) -> LegionForCausalLM
    make_tiny(out_dir, seed=0) -> Path        # complete checkpoint dir, loads like a released one
    load_model(path, ...) -> (model, tokenizer, LoadReport)

Checkpoint directories understood by `load_model` (docs/model.md §13):
  - ours: config.json (model_type legion), model.safetensors, tokenizer files, and the CLIP
    directory named by `mm_vision_tower` (relative paths are resolved against the checkpoint dir);
  - GLaMM / LEGION: config.json as they wrote it (model_type llava, LISAForCausalLM /
    GLaMMForCausalLM / LegionForCausalLM), pytorch_model-*.bin shards + index (loaded with
    `torch.load(weights_only=True)`) or safetensors, SentencePiece tokenizer.model + added_tokens.json.
    Their CLIP is not in the checkpoint: pass `vision_tower=` a local copy of the CLIP model.
  - SAM: an optional `sam_vit_h_4b8939.pth`-style file fills `model.grounding_encoder.*` (the
    checkpoint's own SAM weights take precedence, as in the reference).

`legion make-tiny --output-dir DIR [--seed S]` runs `make_tiny`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from legion.errors import InputNotFoundError, LegionError, MissingFileError
from legion.model import checkpoint_keys as ck
from legion.model import conversation as conv
from legion.model.configuration import CLIP_L14_336, REGION_ENCODER_GLAMM, SAM_VIT_H, LegionConfig
from legion.model.export import (
    DEFAULT_MAX_SHARD_BYTES,
    FP32_MODULES,
    SAFETENSORS_INDEX,
    VISION_TOWER_DIRNAME,
    WEIGHTS_NAME,
    ModelCard,
    export_model,
    writing_model_dir,
)
from legion.model.tokenizer import build_tiny_tokenizer, load_tokenizer, prompt_corpus
from legion.utils.io import atomic_path

__all__ = [
    "PRESETS",
    "build_config",
    "build_model",
    "make_tiny",
    "save_model",
    "load_model",
    "load_tokenizer",
    "LoadReport",
    "apply_dtype_policy",
    "FP32_MODULES",
]

# --- presets --------------------------------------------------------------------------------
# LLaMA-2 7B / Vicuna-7B v1.5 as in GLaMM-GranD-Pretrained's config.json (docs/model.md §5, §13.3).
_LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    rope_scaling=None,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.02,
    vocab_size=32007,
    use_cache=False,
    pretraining_tp=1,
)
_LEGION_7B = dict(
    **_LLAMA_7B,
    mm_vision_tower="openai/clip-vit-large-patch14-336",
    vision_config=dict(CLIP_L14_336),
    mm_hidden_size=1024,
    mm_projector_type="mlp2x_gelu",
    mm_vision_select_layer=-2,
    mm_vision_select_feature="patch",
    mm_use_im_start_end=True,
    with_region=True,
    num_level_reg_features=4,
    region_encoder_config=dict(REGION_ENCODER_GLAMM),
    sam_config=dict(SAM_VIT_H),
    out_dim=256,
    train_mask_decoder=True,
    bbox_token_idx=32002,
    seg_token_idx=32004,
)

# Tiny: same module tree, CPU-sized. CLIP 64 px / patch 8 -> 64 image tokens; SAM input 128 px / patch 8.
TINY_CLIP = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=64,
    patch_size=8,
    num_channels=3,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=64,
)
# SAM patch 8 (not 16): a 16x16 embedding grid at 128 px; measured on ToyScars it localizes better
# (teacher-forced val gIoU 0.39 vs 0.35 after 920 steps). Encoder width 64 / depth 4 rather than
# 32 / 2: held-out fg IoU 46.9 vs 44.3 (docs/training.md).
TINY_SAM = dict(
    image_size=128,
    patch_size=8,
    encoder_embed_dim=64,
    encoder_depth=4,
    encoder_num_heads=4,
    encoder_global_attn_indexes=[1, 3],
    window_size=4,
    prompt_embed_dim=32,
    mask_in_chans=4,
    decoder_depth=2,
    decoder_mlp_dim=128,
    decoder_num_heads=2,
)
# CLIP has 3 hidden states (embeddings + 2 layers): the 4 region levels read indices within them.
TINY_REGION = dict(
    num_levels=4,
    feature_layers=[1, 1, 2, 2],
    upsample_factors=[8, 4, 2, 1],
    roi_output_size=7,
    sampling_ratio=2,
    fuse_rounds=5,
    gn_groups=8,
    pos_embed_dim=32,
    box_scale=224.0,
)
_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    max_position_embeddings=2048,
    rope_scaling=None,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.02,
    use_cache=False,
    mm_vision_tower="vision_tower",
    vision_config=TINY_CLIP,
    mm_hidden_size=64,
    mm_projector_type="mlp2x_gelu",
    mm_vision_select_layer=-2,
    mm_vision_select_feature="patch",
    mm_use_im_start_end=True,
    with_region=True,
    num_level_reg_features=4,
    region_encoder_config=TINY_REGION,
    sam_config=TINY_SAM,
    out_dim=32,
    train_mask_decoder=True,
)
PRESETS: dict[str, dict] = {"tiny": _TINY, "legion_7b": _LEGION_7B}


def tiny_tokenizer_corpus() -> list[str]:
    """What the tiny vocabulary is trained on: LEGION's prompts and every caption ToyScars can emit,
    so tiny runs on ToyScars tokenize into whole words. Only text that ships with the package."""
    from legion.data.toy import caption_corpus

    return prompt_corpus() + list(caption_corpus())


def tiny_tokenizer():
    """The tokenizer of `make-tiny` checkpoints (a SentencePiece model in GLaMM's layout)."""
    return build_tiny_tokenizer(tiny_tokenizer_corpus())


@lru_cache(maxsize=1)
def _tiny_tokenizer_size() -> int:
    return len(tiny_tokenizer())


def build_config(preset: str, vocab_size: int | None = None) -> LegionConfig:
    """LegionConfig of a preset. `tiny` without vocab_size uses the size of `tiny_tokenizer()`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = copy.deepcopy(PRESETS[preset])
    if vocab_size is not None:
        fields["vocab_size"] = int(vocab_size)
    elif preset == "tiny":
        fields["vocab_size"] = _tiny_tokenizer_size()
    config = LegionConfig(**fields)
    config.architectures = ["LegionForCausalLM"]
    return config


def build_model(
    preset_or_config: str | LegionConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
):
    """A randomly initialized LegionForCausalLM (on `meta`: shapes only, built in seconds)."""
    from legion.model.legion import LegionForCausalLM

    config = build_config(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = LegionForCausalLM(config)
    return model.to(dtype)


def apply_dtype_policy(model: nn.Module, dtype: torch.dtype, keep_fp32_modules: bool = True) -> nn.Module:
    """Cast to `dtype`; with keep_fp32_modules SAM and text_hidden_fcs stay fp32 (as the reference)."""
    model.to(dtype)
    if keep_fp32_modules and dtype != torch.float32:
        for name in FP32_MODULES:
            model.get_submodule(name).to(torch.float32)
    return model


# --- saving ---------------------------------------------------------------------------------
def save_model(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    save_vision_tower: bool = True,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    card=None,
) -> Path:
    """Write a model directory the Hugging Face way (legion.model.export.export_model): config.json,
    sharded safetensors (GLaMM key names, no CLIP), generation_config.json, tokenizer files, the CLIP
    tower as `vision_tower/` (named by config.json's `mm_vision_tower`), a README.md model card.
    dtype "bfloat16" (default): the released checkpoints' layout (SAM + text_hidden_fcs fp32)."""
    return export_model(
        model,
        tokenizer,
        out_dir,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        save_vision_tower=save_vision_tower,
        card=card,
    )


TINY_SAM_CHECKPOINT = "sam_vit_tiny.pth"


def make_tiny(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete tiny checkpoint directory (random weights from `seed`); returns its path.

    Like a released model plus its side files: config.json, model.safetensors, tokenizer files,
    `vision_tower/` (the CLIP dir that config.json names) and `sam_vit_tiny.pth` (the grounding
    encoder alone, with sam_vit_h_4b8939.pth's key names, for recipes that take a SAM checkpoint).
    """
    tokenizer = tiny_tokenizer()
    config = build_config("tiny", vocab_size=len(tokenizer))
    config.seg_token_idx = conv.special_token_ids(tokenizer, expect_glamm_ids=False).seg
    model = build_model(config, seed=seed)
    card = ModelCard(
        title="LEGION tiny (random weights)",
        notes="Random weights from `legion make-tiny --seed "
        f"{seed}`: the full-size module tree at CPU size, for tests and the demo. Not a trained model.",
    )
    with writing_model_dir(out_dir) as folder:  # the whole folder appears at once
        save_model(model, tokenizer, folder, card=card)
        sam_state = {k: v.detach().clone() for k, v in model.model.grounding_encoder.state_dict().items()}
        with atomic_path(folder / TINY_SAM_CHECKPOINT) as tmp:
            torch.save(sam_state, tmp)
    return Path(out_dir)


# --- loading --------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What `load_model` found. Keys are in our (GLaMM) spelling after remapping."""

    checkpoint: str
    weight_files: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint key -> our key
    missing: list[str] = field(default_factory=list)  # model keys nobody provided (fatal if strict)
    benign_missing: list[str] = field(default_factory=list)  # e.g. region encoder: initialized randomly
    unexpected: list[str] = field(default_factory=list)  # provided keys the model does not have
    ignored: list[str] = field(default_factory=list)  # benign extras such as rotary inv_freq
    unused: list[str] = field(default_factory=list)  # extras of modules LEGION never runs
    from_sam_checkpoint: int = 0
    from_vision_tower: int = 0
    vision_tower: str | None = None
    seg_token_idx: int | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        lines = [
            f"loaded {self.checkpoint} ({len(self.weight_files)} weight file(s), {self.seconds:.1f}s)",
            f"  CLIP: {self.vision_tower} ({self.from_vision_tower} tensors); "
            f"SAM checkpoint tensors used: {self.from_sam_checkpoint}; [SEG] id {self.seg_token_idx}",
        ]
        if self.renamed:
            pairs = sorted({(_prefix(a), _prefix(b)) for a, b in self.renamed.items()})
            lines.append(f"  renamed {len(self.renamed)} key(s): " + ", ".join(f"{a}* -> {b}*" for a, b in pairs))
        for title, keys in (
            ("missing", self.missing),
            ("missing (benign, randomly initialized)", self.benign_missing),
            ("unexpected", self.unexpected),
            ("unused (modules LEGION never runs)", self.unused),
        ):
            if keys:
                lines.append(f"  {title}: {len(keys)}")
                lines += [f"    {k}" for k in keys[:20]] + (
                    [f"    ... {len(keys) - 20} more"] if len(keys) > 20 else []
                )
        if not (self.missing or self.unexpected or self.benign_missing or self.unused):
            lines.append("  all keys matched")
        return "\n".join(lines)


def _prefix(key: str, depth: int = 3) -> str:
    return ".".join(key.split(".")[:depth]) + "."


class CheckpointError(LegionError, ValueError):
    """A checkpoint that does not fit the model (shape mismatch, missing or unexpected keys)."""


def _read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:  # memory-mapped: a 10 GB shard is not copied into RAM before it is assigned
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def find_weight_files(path: Path) -> list[Path]:
    """Weight files of a checkpoint dir: sharded (index.json) or single, safetensors preferred."""
    for index_name in (SAFETENSORS_INDEX, "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise MissingFileError(f"{index} lists shard(s) not present: {missing}")
            return [path / f for f in files]
    for name in (WEIGHTS_NAME, "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise MissingFileError(
        f"no weights in {path} (looked for model.safetensors[.index.json], pytorch_model.bin[.index.json])"
    )


def resolve_vision_tower(name: str | None, checkpoint_dir: Path) -> Path:
    """The local CLIP directory: relative paths are tried against the checkpoint dir, then the cwd."""
    if not name:
        raise MissingFileError("config has no mm_vision_tower and no vision_tower= was given")
    candidates = [Path(name)] if Path(name).is_absolute() else [checkpoint_dir / name, Path(name)]
    for cand in candidates:
        if (cand / "config.json").is_file():
            return cand
    raise MissingFileError(
        f"CLIP vision tower {name!r} is not a local directory (tried {', '.join(str(c) for c in candidates)}). "
        "GLaMM/LEGION checkpoints do not contain CLIP weights: download the CLIP model (e.g. "
        "openai/clip-vit-large-patch14-336) once and pass its directory as vision_tower=... / --vision-tower."
    )


def _clip_state_and_config(clip_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All weights and the vision config of a CLIP dir (a CLIPVisionModel dir like ours, or a full
    CLIPModel dir like openai/clip-vit-large-patch14-336, whose vision keys start `vision_model.`)."""
    from transformers import CLIPVisionConfig

    vision_config = CLIPVisionConfig.from_pretrained(str(clip_dir), local_files_only=True)
    state = {}
    for f in find_weight_files(clip_dir):
        state.update(_read_state_dict_file(f))
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "num_channels",
        "hidden_act",
        "layer_norm_eps",
        "projection_dim",
    )
    return state, {k: getattr(vision_config, k) for k in keys}


def _load_vision_tower(tower: nn.Module, clip_state: dict[str, torch.Tensor], report: LoadReport) -> None:
    """Assign CLIP weights to the tower, whichever of the two key spellings the CLIP dir uses."""
    expected = tower.state_dict()
    matched = {}
    for key, tensor in clip_state.items():
        ours = key if key in expected else key.removeprefix("vision_model.")
        if ours in expected:  # text tower, projections etc. of a full CLIPModel are not needed
            matched[ours] = tensor
    mismatches = [
        f"{ck.CLIP_PREFIX}{k}: checkpoint {list(v.shape)} vs model {list(expected[k].shape)}"
        for k, v in matched.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatches:
        raise CheckpointError("shape mismatch: " + "; ".join(mismatches))
    report.missing += [ck.CLIP_PREFIX + k for k in expected if k not in matched]
    report.from_vision_tower = len(matched)
    tower.load_state_dict(matched, strict=False, assign=True)


def load_checkpoint_state(path: Path, report: LoadReport) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir, keys remapped to our spelling."""
    state: dict[str, torch.Tensor] = {}
    for f in find_weight_files(path):
        report.weight_files.append(f.name)
        for key, tensor in _read_state_dict_file(f).items():
            new = ck.remap_key(key)
            if new != key:
                report.renamed[key] = new
            if new in state:
                raise CheckpointError(f"two checkpoint keys map to {new!r} (one is {key!r})")
            state[new] = tensor
    return state


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    sam_checkpoint: str | os.PathLike | None = None,
    vision_tower: str | os.PathLike | None = None,
    keep_fp32_modules: bool = True,
    strict: bool = True,
    verbose: bool = True,
):
    """Load a checkpoint directory -> (model, tokenizer, LoadReport).

    dtype: compute dtype; with keep_fp32_modules SAM and text_hidden_fcs stay fp32 (reference
    policy), otherwise everything is cast. strict: missing or unexpected keys raise (after the
    report is printed); benign ones (rotary inv_freq; the unused region encoder) never do.
    A shape mismatch always raises, naming the key and both shapes.
    """
    from legion.model.legion import LegionForCausalLM

    start = time.time()
    path = Path(path)
    if not path.is_dir():
        raise InputNotFoundError(f"checkpoint directory not found: {path}")
    report = LoadReport(checkpoint=str(path))
    config = LegionConfig.from_dir(path)
    raw_config = json.loads((path / "config.json").read_text())

    tokenizer = load_tokenizer(path)
    ids = conv.special_token_ids(tokenizer)  # asserts GLaMM's ids (seg 32004) for a 32000-token base vocab
    config.seg_token_idx = report.seg_token_idx = ids.seg

    state = load_checkpoint_state(path, report)
    if "vocab_size" not in raw_config and "model.embed_tokens.weight" in state:
        config.vocab_size = int(state["model.embed_tokens.weight"].shape[0])  # GLaMM configs may omit it
    if config.vocab_size < len(tokenizer):
        raise CheckpointError(f"tokenizer has {len(tokenizer)} tokens but the model vocabulary is {config.vocab_size}")

    if sam_checkpoint is not None:
        sam_state = _read_state_dict_file(Path(sam_checkpoint))
        for key, tensor in sam_state.items():
            full = ck.SAM_PREFIX + key
            if full not in state:  # the checkpoint's own SAM weights win (reference behaviour)
                state[full] = tensor
                report.from_sam_checkpoint += 1

    clip_dir = resolve_vision_tower(str(vision_tower) if vision_tower else config.mm_vision_tower, path)
    clip_state, clip_config = _clip_state_and_config(clip_dir)
    config.vision_config = clip_config
    report.vision_tower = str(clip_dir)

    # Parameters on meta (no memory, no init), buffers real; loaded tensors are assigned in place.
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = LegionForCausalLM(config)
    expected = model.state_dict()  # without CLIP: its keys are never part of a checkpoint
    _check_keys(expected, state, report)
    _load_vision_tower(model.model.vision_tower.vision_tower, clip_state, report)
    report.seconds = time.time() - start
    if verbose:
        print(report)
    if strict and (report.missing or report.unexpected):
        hint = ""
        if any(ck.LORA_KEY.search(k) for k in report.unexpected):
            hint = "; the checkpoint holds unmerged LoRA factors: merge them first (`legion merge`)"
        raise CheckpointError(
            f"{path}: {len(report.missing)} missing and {len(report.unexpected)} unexpected "
            f"key(s), e.g. {(report.missing + report.unexpected)[:5]}{hint}"
        )
    loadable = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(loadable, strict=False, assign=True)
    _materialize_meta(model)
    model.config.seg_token_idx = ids.seg
    apply_dtype_policy(model, dtype, keep_fp32_modules)
    model.to(device)
    model.eval()
    report.seconds = time.time() - start
    return model, tokenizer, report


def _check_keys(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], report: LoadReport) -> None:
    mismatches = []
    for key, tensor in state.items():
        if key in expected:
            if tuple(tensor.shape) != tuple(expected[key].shape):
                mismatches.append(f"{key}: checkpoint {list(tensor.shape)} vs model {list(expected[key].shape)}")
        elif ck.is_benign_unexpected(key):
            report.ignored.append(key)
        elif ck.is_unused_unexpected(key):
            report.unused.append(key)
        else:
            report.unexpected.append(key)
    if mismatches:
        raise CheckpointError("shape mismatch: " + "; ".join(mismatches))
    for key in expected:
        if key not in state:
            (report.benign_missing if ck.is_benign_missing(key) else report.missing).append(key)


@torch.no_grad()
def _materialize_meta(model: nn.Module) -> None:
    """Give parameters nobody loaded real storage and a fresh init: the module's own
    `reset_parameters` where it has one, else the HF init (RMSNorm -> ones), else zeros (SAM's init
    of its position embeddings)."""
    for module in model.modules():
        meta = [n for n, p in module.named_parameters(recurse=False) if p.is_meta]
        if not meta:
            continue
        for name in meta:
            p = getattr(module, name)
            setattr(module, name, nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), requires_grad=p.requires_grad))
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            model._init_weights(module)


# --- CLI: legion make-tiny -------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from legion.cli_args import add_output_dir_argument

    add_output_dir_argument(
        parser,
        required=True,
        help="directory to write (created; an existing model folder is replaced, any other existing folder refused)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")


def run(args: argparse.Namespace) -> int:
    from legion.cli_args import check_output_dir_argument

    check_output_dir_argument(args.output_dir)
    path = make_tiny(Path(args.output_dir), seed=args.seed)
    n_params = sum(t.numel() for t in _read_state_dict_file(path / WEIGHTS_NAME).values())
    print(f"wrote tiny LEGION checkpoint to {path} ({n_params:,} saved parameters + CLIP in {VISION_TOWER_DIRNAME}/)")
    return 0
