"""Parameter counts and state-dict keys of a preset or a checkpoint directory (no weights needed).

    legion inspect legion_7b            # per-module counts, trainable/frozen under the default training rule
    legion inspect tiny --keys          # every checkpoint key and shape: "key<TAB>[d0, d1, ...]"
    legion inspect path/to/checkpoint   # sizes from its config.json (ours, GLaMM's or LEGION's)
    legion inspect path/to/checkpoint --keys --stored   # keys actually stored in its weight files,
                                                        # renamed to ours (diff against a preset's)

The model is built on the meta device from the config only, so the 7B model is listed in seconds.
CLIP keys are not listed with --keys: no LEGION/GLaMM checkpoint contains them (docs/model.md §4.1).

Default training rule (docs/model.md §10.1): trainable = LoRA (r=8) on the LLM's q_proj/v_proj,
embed_tokens, lm_head, SAM mask decoder, text_hidden_fcs. Frozen = CLIP, mm_projector, SAM image
and prompt encoders, the LLM's own weights, and the region encoder (the reference marks it
trainable but it never receives a gradient; we leave it out of the optimizer).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from legion.errors import OptionError

# Top-level modules in the order of docs/model.md §0.
TOP_LEVEL_MODULES = (
    "model.embed_tokens",
    "model.layers",
    "model.norm",
    "lm_head",
    "model.vision_tower",
    "model.mm_projector",
    "model.region_encoder",
    "model.grounding_encoder.image_encoder",
    "model.grounding_encoder.prompt_encoder",
    "model.grounding_encoder.mask_decoder",
    "model.text_hidden_fcs",
)
DEFAULT_TRAINABLE_MODULES = (
    "model.embed_tokens",
    "lm_head",
    "model.grounding_encoder.mask_decoder",
    "model.text_hidden_fcs",
)


def build_meta_model(preset_or_dir: str):
    """LegionForCausalLM on the meta device from a preset name or a checkpoint dir's config.json."""
    from legion.model.builders import PRESETS, build_config, build_model
    from legion.model.configuration import LegionConfig

    if preset_or_dir in PRESETS:
        config = build_config(preset_or_dir)
    elif Path(preset_or_dir).is_dir():
        config = LegionConfig.from_dir(preset_or_dir)
    else:
        raise OptionError(f"{preset_or_dir!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")
    return build_model(config, device="meta")


def lora_parameter_count(model: nn.Module, rank: int) -> tuple[int, int]:
    """(number of LoRA targets, their A+B parameters) under the reference target rule."""
    from legion.model.legion import lora_target_module_names

    names = lora_target_module_names(model)
    total = 0
    for name in names:
        linear = model.get_submodule(name)
        total += rank * (linear.in_features + linear.out_features)
    return len(names), total


def parameter_table(model: nn.Module, lora_rank: int = 8) -> list[tuple[str, int, int, int]]:
    """Rows (module, params, trainable, frozen) under the default training rule, then LoRA and total."""
    rows = []
    for name in TOP_LEVEL_MODULES:
        count = sum(p.numel() for p in model.get_submodule(name).parameters())
        trainable = count if name in DEFAULT_TRAINABLE_MODULES else 0
        rows.append((name, count, trainable, count - trainable))
    covered = sum(r[1] for r in rows)
    everything = sum(p.numel() for p in model.parameters())
    if covered != everything:  # a module added to the model but not to this table must not vanish
        rows.append(("(other)", everything - covered, 0, everything - covered))
    n_targets, lora = lora_parameter_count(model, lora_rank)
    if lora_rank > 0:
        rows.append((f"LoRA r={lora_rank} ({n_targets} q_proj/v_proj)", lora, lora, 0))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows)))
    return rows


def format_table(rows: list[tuple[str, int, int, int]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'module':<{width}}  {'params':>15}  {'trainable':>15}  {'frozen':>15}"]
    for name, count, trainable, frozen in rows:
        lines.append(f"{name:<{width}}  {count:>15,}  {trainable:>15,}  {frozen:>15,}")
    return "\n".join(lines)


def key_lines(model: nn.Module) -> list[str]:
    """`key<TAB>[d0, d1, ...]` for every state-dict key (CLIP excluded, as in every checkpoint)."""
    return [f"{key}\t[{', '.join(str(d) for d in tensor.shape)}]" for key, tensor in model.state_dict().items()]


def stored_key_lines(checkpoint_dir: str | Path) -> list[str]:
    """`key<TAB>[shape]` of the tensors in a checkpoint's weight files, keys in our spelling (remapped)."""
    import torch

    from legion.model.builders import find_weight_files
    from legion.model.checkpoint_keys import remap_key

    lines = []
    for f in find_weight_files(Path(checkpoint_dir)):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), "pt") as fh:
                shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
        else:
            try:  # memory-mapped: only the pickled metadata of a 10 GB shard is read
                state = torch.load(str(f), map_location="meta", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format
                state = torch.load(str(f), map_location="meta", weights_only=True)
            shapes = {k: list(v.shape) for k, v in state.items()}
        lines += [f"{remap_key(k)}\t[{', '.join(str(d) for d in shape)}]" for k, shape in shapes.items()]
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", metavar="PRESET_OR_DIR", help="a preset (tiny, legion_7b) or a checkpoint directory with config.json"
    )
    parser.add_argument(
        "--keys", action="store_true", help="print every state-dict key and shape, one per line: key<TAB>[d0, d1, ...]"
    )
    parser.add_argument(
        "--stored",
        action="store_true",
        help="with --keys and a directory: list the tensors stored in its weight files "
        "(renamed to our key names) instead of those its config.json implies",
    )
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank for the trainable count (default 8)")


def run(args: argparse.Namespace) -> int:
    if args.stored:
        if not (args.keys and Path(args.target).is_dir()):
            raise OptionError("--stored needs --keys and a checkpoint directory")
        print("\n".join(stored_key_lines(args.target)))
        return 0
    model = build_meta_model(args.target)
    if args.keys:
        print("\n".join(key_lines(model)))
        return 0
    cfg = model.config
    print(
        f"{args.target}: LLaMA {cfg.num_hidden_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}; "
        f"CLIP {cfg.vision_config['image_size']} px / patch {cfg.vision_config['patch_size']} "
        f"({cfg.num_image_tokens} image tokens); SAM input {cfg.sam_config['image_size']} px"
    )
    print(format_table(parameter_table(model, args.lora_r)))
    return 0
