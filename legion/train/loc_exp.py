"""Localization + explanation training (LEGION loc/exp stage): DeepSpeed + LoRA, resumable.

    legion train --config configs/tiny/train_loc_exp.yaml [key=value ...]
    deepspeed --num_gpus 8 --module legion.cli train --config configs/legion_7b/train_loc_exp.yaml
    torchrun --nproc_per_node 2 -m legion.cli train --config configs/tiny/train_loc_exp.yaml

One code path for 1 CPU process, several CPU processes (gloo) and N GPUs / nodes (nccl): plain
`python` sets the torch.distributed environment itself when no launcher did.

The config gives the GLOBAL batch; the recipe derives micro-batch x gradient accumulation from the
world size. Epochs are real passes over the training records (minus a held-out validation slice);
the LR schedule is sized from the steps actually run unless `schedule.total_steps` says otherwise
(the reference-faithful preset: max_steps 703, total_steps 2109; docs/reproduce.md §5).

Outputs in `output_dir`: config.yaml (resolved), ds_config.json, run_info.json, log.jsonl,
checkpoints/ (DeepSpeed tags + `latest`), and with `export.merged_model` a merged HF model
directory `final_model/` that `legion infer` loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from legion.config import ConfigError, add_config_arguments, load_config, save_resolved_config, to_dict
from legion.errors import DataError, require_path
from legion.utils.io import atomic_write_text
from legion.utils.run_info import RunRecord

if TYPE_CHECKING:
    from legion.train.checkpointing import CheckpointManager
    from legion.train.encoder_cache import CachedFrozenEncoders
    from legion.train.logging import TrainLogger

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------- schema
@dataclass
class ModelSection:
    path: str | None = field(
        default=None, metadata={"help": "checkpoint dir (GLaMM-GranD-Pretrained or legion make-tiny)"}
    )
    vision_tower: str | None = field(default=None, metadata={"help": "local CLIP dir (default: from config.json)"})
    sam_checkpoint: str | None = field(default=None, metadata={"help": "SAM weights for keys the checkpoint lacks"})
    dtype: str = field(
        default="bfloat16", metadata={"help": "bfloat16 | float32 (model dtype; bfloat16 also enables DeepSpeed bf16)"}
    )
    gradient_checkpointing: bool | str = field(
        default=True,
        metadata={
            "help": "true | false | auto (off when the measured peak memory of the micro-batch fits the GPU: "
            "legion/train/speed.py, docs/training.md)"
        },
    )
    compile_layers: bool = field(
        default=False,
        metadata={
            "help": "torch.compile each LLM decoder layer (fuses its norm, rotary, SiLU and LoRA element-wise ops); "
            "the first steps are slower while it compiles"
        },
    )
    sequence_bucket: int | None = field(
        default=None,
        metadata={
            "help": "pad each batch's expanded sequence to a multiple of this many positions (causal attention, no "
            "padding mask): compiled layers then see a few static shapes instead of one per length"
        },
    )


@dataclass
class LoraSection:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05


@dataclass
class TrainableSection:
    # reference rule (docs/model.md §10.1) minus the unused region encoder
    name_contains: list = field(default_factory=lambda: ["lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs"])


@dataclass
class LossSection:
    ce_weight: float = 1.0
    bce_weight: float = 0.4
    dice_weight: float = 0.2
    ce_chunk_size: int | None = field(
        default=2048,
        metadata={
            "help": "CE from the supervised positions' states only, this many rows of 32k logits at a time "
            "(legion.model.losses.chunked_causal_lm_loss); null = lm_head over every position, then the CE"
        },
    )


@dataclass
class DataSection:
    root: str | None = field(
        default=None, metadata={"help": "SynthScars-layout root (train/images, train/annotations)"}
    )
    split: str = "train"
    annotation_path: str | None = None
    sam_input_size: int = 512
    max_length: int = field(
        default=961,
        metadata={
            "help": "text tokens kept per sample before the image expands into its CLIP tokens: the reference's "
            "1536 - 575 = 961 (a sample that would lose a [SEG] is skipped and counted)"
        },
    )
    num_workers: int = 2
    val_size: int = field(default=200, metadata={"help": "records held out from train for validation (0 = none)"})
    max_unusable_fraction: float = field(
        default=0.05,
        metadata={
            "help": "stop (DataError) once the samples that fail to load (e.g. truncated images) exceed this fraction "
            "of the samples the run trains on; a step with no usable sample at all stops the run whatever this is"
        },
    )


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 100
    warmup_min_lr: float = 0.0
    module_lr: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "peak learning rate for the parameters whose name contains a key (the first key that matches, "
            "in order), e.g. {grounding_encoder.image_encoder: 1.0e-3}; the others use lr"
        },
    )
    fused: bool = field(
        default=True,
        metadata={
            "help": "torch's fused AdamW kernel (CPU and CUDA): the same update in one kernel instead of one per tensor"
        },
    )


@dataclass
class ScheduleSection:
    global_batch_size: int = field(default=16, metadata={"help": "samples per optimizer step, all ranks together"})
    micro_batch_size: int | str | None = field(
        default=None,
        metadata={"help": "per device (default: global/world); auto: from the GPU's memory (docs/training.md)"},
    )
    epochs: int = 1
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps (default: epochs)"})
    total_steps: int | None = field(default=None, metadata={"help": "LR schedule length (default: steps run)"})


@dataclass
class CheckpointSection:
    every_steps: int = 200
    keep_last: int = 2
    resume: str = field(default="auto", metadata={"help": "auto | none | <checkpoint tag>"})
    exclude_frozen: bool = False


@dataclass
class ValidationSection:
    every_steps: int = 100
    batch_size: int = 1


@dataclass
class LoggingSection:
    every_steps: int = 1
    tensorboard: bool = False
    wandb_project: str | None = None
    progress: bool = True


@dataclass
class DeepSpeedSection:
    config_file: str = field(
        default="configs/deepspeed/zero2_bf16.json",
        metadata={"help": "ZeRO settings; batch, optimizer, schedule are filled in here"},
    )


@dataclass
class CacheSection:
    enabled: bool = field(default=False, metadata={"help": "cache frozen CLIP/SAM outputs on disk"})
    dir: str | None = field(default=None, metadata={"help": "default: <output_dir>/encoder_cache"})


@dataclass
class ExportSection:
    merged_model: bool = field(default=True, metadata={"help": "write <output_dir>/final_model (LoRA merged)"})


@dataclass
class TrainConfig:
    output_dir: str = "runs/loc_exp"
    seed: int = 42
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    trainable: TrainableSection = field(default_factory=TrainableSection)
    loss: LossSection = field(default_factory=LossSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    encoder_cache: CacheSection = field(default_factory=CacheSection)
    export: ExportSection = field(default_factory=ExportSection)

    # accepted until the next release (legion.config)
    RENAMED: ClassVar[dict] = {"model.precision": ("model.dtype", {"bf16": "bfloat16", "fp32": "float32"})}


def check_train_config(cfg: TrainConfig) -> None:
    """Every setting that needs no model or data, checked before anything is loaded (ConfigError, exit 2):
    a zero or negative count, step interval or learning rate fails in a second, not after minutes of loading
    or as a ZeroDivisionError. The batch plan is checked against the world size by `plan_batches`."""
    import functools
    import math

    from legion.train.checkpointing import _is_tag_name

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def need(ok: bool, key: str, rule: str, value) -> None:
        if not ok:
            raise ConfigError(f"{key} must be {rule}, got {value!r}")

    def at_least(key: str, minimum, strict: bool = False, none_ok: bool = False) -> None:
        value = functools.reduce(getattr, key.split("."), cfg)
        if value is None and none_ok:
            return
        ok = number(value) and (value > minimum if strict else value >= minimum)
        need(ok, key, f"{'>' if strict else '>='} {minimum}" + (" or null" if none_ok else ""), value)

    need(cfg.model.dtype in ("bfloat16", "float32"), "model.dtype", "bfloat16 or float32", cfg.model.dtype)
    at_least("lora.r", 1)
    at_least("lora.alpha", 0, strict=True)
    need(number(cfg.lora.dropout) and 0 <= cfg.lora.dropout < 1, "lora.dropout", "in [0, 1)", cfg.lora.dropout)
    for key in ("loss.ce_weight", "loss.bce_weight", "loss.dice_weight", "data.num_workers", "data.val_size"):
        at_least(key, 0)
    at_least("data.sam_input_size", 1)
    at_least("data.max_length", 1, none_ok=True)
    fraction = cfg.data.max_unusable_fraction
    need(number(fraction) and 0 <= fraction <= 1, "data.max_unusable_fraction", "in [0, 1]", fraction)
    at_least("optim.lr", 0, strict=True)
    for key, value in cfg.optim.module_lr.items():
        need(number(value) and value > 0, f"optim.module_lr[{key!r}]", "> 0", value)
    betas = list(cfg.optim.betas)
    need(len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas), "optim.betas", "2 numbers in [0, 1)", betas)
    at_least("optim.eps", 0, strict=True)
    for key in ("optim.weight_decay", "optim.grad_clip", "optim.warmup_steps", "optim.warmup_min_lr"):
        at_least(key, 0)
    for key in ("schedule.global_batch_size", "schedule.epochs", "checkpoint.every_steps", "checkpoint.keep_last"):
        at_least(key, 1)
    for key in ("validation.every_steps", "validation.batch_size", "logging.every_steps"):
        at_least(key, 1)
    check_auto_settings(cfg)
    if cfg.schedule.micro_batch_size != "auto":
        at_least("schedule.micro_batch_size", 1, none_ok=True)
    for key in ("schedule.max_steps", "schedule.total_steps"):
        at_least(key, 1, none_ok=True)
    resume = str(cfg.checkpoint.resume)
    need(_is_tag_name(resume), "checkpoint.resume", "auto, none or a checkpoint tag (global_stepN)", resume)
    read_deepspeed_config(cfg)


# ------------------------------------------------------------------------------ distributed setup
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Launchers set RANK/WORLD_SIZE/...; plain python gets a 1-process group."""
    import deepspeed

    if "RANK" not in os.environ:  # no launcher: DeepSpeed would otherwise try MPI discovery
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


# ---------------------------------------------------------------------------------- batch sizes
def check_auto_settings(cfg: TrainConfig) -> None:
    """`model.gradient_checkpointing` and `schedule.micro_batch_size` may be `auto`, but no other string."""
    for name, value in (
        ("model.gradient_checkpointing", cfg.model.gradient_checkpointing),
        ("schedule.micro_batch_size", cfg.schedule.micro_batch_size),
    ):
        if isinstance(value, str) and value != "auto":
            raise ConfigError(f"{name} must be auto or a {'bool' if 'gradient' in name else 'number'}, got {value!r}")


def resolve_auto_settings(cfg: TrainConfig, world_size: int, device: torch.device) -> str | None:
    """Replace `model.gradient_checkpointing: auto` / `schedule.micro_batch_size: auto` in `cfg` by the values
    legion.train.speed.resolve_memory_plan picks for this GPU; returns its reason (None when nothing was auto)."""
    from legion.train.speed import cuda_memory_gib, divisors, resolve_memory_plan

    check_auto_settings(cfg)
    gc, micro = cfg.model.gradient_checkpointing, cfg.schedule.micro_batch_size
    if gc != "auto" and micro != "auto":
        return None
    per_device = plan_batches(cfg.schedule.global_batch_size, world_size).per_device
    # checkpointing alone is auto: decide it for the given micro-batch (null: the whole per-device batch)
    candidates = divisors(per_device) if micro == "auto" else [micro or per_device]
    chosen = resolve_memory_plan(candidates, cuda_memory_gib(device), cfg.model.compile_layers)
    if gc == "auto":
        cfg.model.gradient_checkpointing = chosen.gradient_checkpointing
    if micro == "auto":
        cfg.schedule.micro_batch_size = chosen.micro_batch_size
    return (
        f"gradient_checkpointing={cfg.model.gradient_checkpointing} micro_batch_size="
        f"{cfg.schedule.micro_batch_size} ({chosen.reason})"
    )


@dataclass
class BatchPlan:
    world_size: int
    global_batch: int
    per_device: int
    micro_batch: int
    grad_accum: int


def plan_batches(global_batch: int, world_size: int, micro_batch: int | None = None) -> BatchPlan:
    """global = world x micro x accumulation; errors say which number to change."""
    if global_batch % world_size:
        raise ConfigError(
            f"schedule.global_batch_size={global_batch} is not divisible by the world size "
            f"{world_size}; use a multiple of {world_size}"
        )
    per_device = global_batch // world_size
    micro = micro_batch or per_device
    if per_device % micro:
        raise ConfigError(
            f"schedule.micro_batch_size={micro} does not divide the per-device batch {per_device} "
            f"(= global {global_batch} / {world_size} ranks)"
        )
    return BatchPlan(world_size, global_batch, per_device, micro, per_device // micro)


def steps_per_epoch(num_records: int, plan: BatchPlan) -> int:
    """Optimizer steps per pass; every rank runs the same number (the smallest share decides;
    at most global_batch - 1 records of an epoch are left out, a different set each epoch)."""
    return (num_records // plan.world_size) // plan.per_device


# ----------------------------------------------------------------------------- DeepSpeed config
def build_deepspeed_config(
    cfg: TrainConfig, plan: BatchPlan, schedule_total_steps: int, optimizer: torch.optim.Optimizer | None = None
) -> dict:
    """Our DeepSpeed JSON + batch sizes, clipping and the LR schedule (the peak lr of each of
    `optimizer`'s groups, e.g. from `optim.module_lr`; `optim.lr` when it has one group or none is given)."""
    ds = read_deepspeed_config(cfg)
    group_lrs = [group["lr"] for group in optimizer.param_groups] if optimizer else []
    peak_lr = group_lrs if len(group_lrs) > 1 else cfg.optim.lr  # DeepSpeed takes a list: one per group
    ds.update(
        {
            "train_batch_size": plan.global_batch,
            "train_micro_batch_size_per_gpu": plan.micro_batch,
            "gradient_accumulation_steps": plan.grad_accum,
            "gradient_clipping": cfg.optim.grad_clip,
            "steps_per_print": 10**9,  # our logger prints
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {
                    "total_num_steps": schedule_total_steps,
                    "warmup_min_lr": cfg.optim.warmup_min_lr,
                    "warmup_max_lr": peak_lr,
                    "warmup_num_steps": cfg.optim.warmup_steps,
                    "warmup_type": "linear",
                },
            },
        }
    )
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.model.dtype == "bfloat16"}
    ds.pop("fp16", None)
    ds.pop("optimizer", None)  # a torch AdamW is passed in (no DeepSpeed op to compile)
    return ds


def read_deepspeed_config(cfg: TrainConfig) -> dict:
    """The JSON object of `deepspeed.config_file` (relative paths: from the current folder, else the repository)."""
    path = Path(cfg.deepspeed.config_file)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(f"deepspeed.config_file not found: {cfg.deepspeed.config_file}")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"deepspeed.config_file {path}: not JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed.config_file {path}: expected a JSON object")
    return ds


# ------------------------------------------------------------------------------------ the model
def prepare_model(cfg: TrainConfig, device: torch.device):
    """Load, then set up for training (`setup_for_training`); returns (model, tokenizer, LoRA targets)."""
    from legion.model.builders import load_model

    if cfg.model.dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"model.dtype must be bfloat16 or float32, got {cfg.model.dtype!r}")
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model, tokenizer, _ = load_model(
        cfg.model.path,
        dtype=dtype,
        device="cpu",
        sam_checkpoint=cfg.model.sam_checkpoint,
        vision_tower=cfg.model.vision_tower,
        verbose=int(os.environ.get("RANK", 0)) == 0,
    )
    targets = setup_for_training(model, cfg)
    return model.to(device), tokenizer, targets


def setup_for_training(model, cfg: TrainConfig) -> list[str]:
    """Loss weights, LoRA injected in place, the trainable set, gradient checkpointing, compiled layers."""
    from peft import LoraConfig, inject_adapter_in_model

    from legion.model.legion import lora_target_module_names

    model.set_loss_weights(cfg.loss.ce_weight, cfg.loss.bce_weight, cfg.loss.dice_weight)
    if not isinstance(cfg.model.gradient_checkpointing, bool):
        raise ConfigError("model.gradient_checkpointing=auto is resolved by the recipe (resolve_auto_settings) first")
    model.ce_chunk_size = cfg.loss.ce_chunk_size or None
    model.sequence_bucket = cfg.model.sequence_bucket or None
    model.config.use_cache = False
    targets = lora_target_module_names(model)
    # In place (no PeftModel wrapper): state-dict keys stay ours plus `.base_layer.` / `.lora_A.default.`.
    inject_adapter_in_model(
        LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none", target_modules=targets
        ),
        model,
    )
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or any(key in name for key in cfg.trainable.name_contains)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.compile_layers:
        if cfg.model.gradient_checkpointing:
            warnings.warn(
                "model.compile_layers with gradient checkpointing is experimental: with torch 2.11 on a "
                "GPU, recompiling for a new batch shape failed inside inductor (docs/training.md)",
                stacklevel=2,
            )
        compile_decoder_layers(model)
    return targets


def compile_decoder_layers(model) -> None:
    """torch.compile each LLM decoder layer in place (parameter names and state dict unchanged). With
    `model.sequence_bucket` the shapes are a few static ones: one compilation each, none dynamic."""
    static = model.sequence_bucket is not None
    if static:
        import torch._dynamo

        # every bucket x batch size x train/eval is its own compilation of the one layer code
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in model.model.layers:
        layer.compile(dynamic=False if static else None)


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], optim: OptimSection) -> list[dict]:
    """AdamW parameter groups [{"params", "lr", "name"}] of the trainable (requires_grad) parameters: the
    `lr` group first, then one per `optim.module_lr` key (a parameter joins the first key its name
    contains). A key that names no parameter at all is an error (a typo); one whose parameters are all
    frozen just has no group."""
    keys = list(optim.module_lr)
    buckets: dict[str | None, list[torch.nn.Parameter]] = {None: [], **{k: [] for k in keys}}
    seen: set[str] = set()
    for name, param in named_params:
        matching = [k for k in keys if k in name]
        seen.update(matching)
        if param.requires_grad:
            buckets[matching[0] if matching else None].append(param)
    missing = [k for k in keys if k not in seen]
    if missing:
        raise ConfigError(f"optim.module_lr key {missing[0]!r} is in no parameter name of the model")
    lrs = {None: optim.lr, **optim.module_lr}
    return [{"params": params, "lr": float(lrs[k]), "name": k or "lr"} for k, params in buckets.items() if params]


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], optim: OptimSection) -> torch.optim.AdamW:
    """torch AdamW over `param_groups` (DeepSpeed wraps it; no DeepSpeed Adam op to compile)."""
    return torch.optim.AdamW(
        param_groups(named_params, optim),
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=optim.fused or None,
    )


# ------------------------------------------------------------------------------------- the data
def build_datasets(cfg: TrainConfig, tokenizer, model_config):
    from legion.data.synthscars import SynthScarsDataset, find_annotation_file, load_annotations

    path = (
        Path(cfg.data.annotation_path)
        if cfg.data.annotation_path
        else find_annotation_file(cfg.data.root, cfg.data.split)
    )
    records, _ = load_annotations(path)
    # Held-out validation slice of train (never the test set): a seeded shuffle of the records.
    order = np.random.default_rng(cfg.seed).permutation(len(records))
    val_size = min(cfg.data.val_size, len(records) // 2)
    val_records = [records[i] for i in sorted(order[:val_size])]
    train_records = [records[i] for i in sorted(order[val_size:])]
    common = dict(
        tokenizer=tokenizer,
        clip_size=model_config.vision_config["image_size"],
        sam_input_size=cfg.data.sam_input_size,
        sam_pad_to=model_config.sam_config["image_size"],
        max_length=cfg.data.max_length,
    )
    train = SynthScarsDataset(cfg.data.root, cfg.data.split, records=train_records, **common)
    val = SynthScarsDataset(cfg.data.root, cfg.data.split, records=val_records, **common) if val_records else None
    return train, val, common


def make_loader(dataset, sampler, batch_size: int, num_workers: int, pad_id: int, seed: int):
    from legion.data.synthscars import collate

    # Own generator: creating a loader must not consume the global RNG (exact resume).
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=partial(collate, pad_id=pad_id),
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
        drop_last=False,
        pin_memory=torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu",
    )


# The model plans its sequence from these on the CPU and copies what it needs (no device reads in the step).
HOST_KEYS = ("input_ids", "attention_mask", "labels")


def to_device(batch: dict, device: torch.device) -> dict:
    moved = {}
    for key, value in batch.items():
        if key in HOST_KEYS:
            moved[key] = value
        elif torch.is_tensor(value):
            moved[key] = value.to(device, non_blocking=True)
        elif key == "gt_masks":
            moved[key] = [m.to(device, non_blocking=True) for m in value]
        else:
            moved[key] = value
    return moved


LOSS_KEYS = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "mask_loss")
LOSS_OUTPUTS = ("loss", "ce_loss", "bce_loss", "dice_loss", "mask_loss")  # the model output field of each key


def loss_terms(out) -> dict[str, float]:
    """One forward's loss terms as Python floats (a host sync per call; validation uses it)."""

    def val(x):
        return 0.0 if x is None else float(x.detach().float())

    return {key: val(getattr(out, name)) for key, name in zip(LOSS_KEYS, LOSS_OUTPUTS)}


class StepLosses:
    """One optimizer step's loss terms, kept on the device: every micro-batch adds its terms divided by the
    accumulation steps, as float64 like the Python floats this replaced, so the logged numbers are the same
    bit for bit; nothing reaches the host (no sync) until `mean_over_ranks`, when a log line is due."""

    def __init__(self, device: torch.device, grad_accum: int):
        self.grad_accum = grad_accum
        self.sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=device)
        # a device tensor, not a Python number: CUDA divides by a host scalar as a multiply by its reciprocal
        self._divisor = torch.tensor(float(grad_accum), dtype=torch.float64, device=device)

    def add(self, out) -> None:
        zero = self.sums.new_zeros(())
        terms = [getattr(out, name) for name in LOSS_OUTPUTS]
        self.sums += (
            torch.stack([zero if t is None else t.detach().reshape(()).double() for t in terms]) / self._divisor
        )

    def mean_over_ranks(self, world_size: int) -> dict[str, float]:
        """The step's loss terms averaged over ranks, as Python floats: the one host sync."""
        totals = self.sums.clone()
        torch.distributed.all_reduce(totals)
        return {key: value / world_size for key, value in zip(LOSS_KEYS, totals.tolist())}

    def reset(self) -> None:
        self.sums.zero_()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------ validation
@torch.no_grad()
def validate(engine, loader, device, cached) -> dict[str, float]:
    """Loss in eval mode + teacher-forced mask gIoU (mean per-mask IoU) and cIoU (sum I / sum U)."""
    from legion.eval.localization import lisa_mask_iou

    engine.eval()
    sums = np.zeros(len(LOSS_KEYS))
    batches, iou_sum, masks, inter_total, union_total = 0, 0.0, 0, 0.0, 0.0
    for batch in loader:
        if batch is None:
            continue
        with cached.for_images(batch["image_paths"]) if cached else contextlib.nullcontext():
            out = engine(**to_device(batch, device))
        sums += np.array(list(loss_terms(out).values()))  # in LOSS_KEYS order
        batches += 1
        for pred, gt in zip(out.pred_masks, batch["gt_masks"]):
            pred_bin = (pred.float() > 0).cpu()
            gt_bin = gt > 0.5
            inter = (pred_bin & gt_bin).flatten(1).sum(1).double().numpy()
            union = (pred_bin | gt_bin).flatten(1).sum(1).double().numpy()
            iou_sum += float(lisa_mask_iou(inter, union).sum())
            masks += len(inter)
            inter_total, union_total = inter_total + inter.sum(), union_total + union.sum()
    engine.train()
    totals = all_reduce_sum([*sums, batches, iou_sum, masks, inter_total, union_total], device)
    n_batches, iou_sum, masks, inter_total, union_total = totals[len(LOSS_KEYS) :]
    result = {f"val_{k}": v / max(n_batches, 1) for k, v in zip(LOSS_KEYS, totals[: len(LOSS_KEYS)])}
    result.update(val_giou=iou_sum / max(masks, 1), val_ciou=inter_total / max(union_total, 1.0), val_masks=int(masks))
    return result


# ---------------------------------------------------------------------------------- the recipe
# `train` builds everything in order and hands it to `fit`; each stage below is a small named function,
# in the order `train` and `fit` call them.
@dataclass
class TrainingPosition:
    """Where training stands: optimizer steps done, the current epoch, and how many of its records this
    rank has consumed. Saved in every checkpoint's trainer_state.json, read back on resume."""

    step: int = 0
    epoch: int = 0
    position: int = 0

    def trainer_state(self, plan: BatchPlan) -> dict:
        return {
            "step": self.step,
            "sampler": {"epoch": self.epoch, "position": self.position},
            "plan": [plan.world_size, plan.micro_batch, plan.grad_accum],
            "samples_seen": self.step * plan.global_batch,
        }


@dataclass
class StepPlan:
    per_epoch: int  # optimizer steps per pass over the training records
    total: int  # steps this run trains to
    lr_schedule: int  # length of the LR schedule


@dataclass
class EpochBatches:
    """The training records in micro-batches: one loader per epoch, starting at this rank's position in it."""

    dataset: Any
    sampler: Any
    micro_batch: int
    num_workers: int
    pad_id: int
    seed: int

    def loader(self, epoch: int, position: int):
        self.sampler.set_epoch(epoch, position)  # the epoch's shuffle is a function of (seed, epoch)
        return make_loader(
            self.dataset, self.sampler, self.micro_batch, self.num_workers, self.pad_id, self.seed * 1000 + epoch
        )


def train(cfg: TrainConfig) -> dict:
    """The loc/exp recipe: build (distributed setup, seeds, batch plan, model, data, optimizer, DeepSpeed
    engine, checkpoints + resume, encoder cache, logger, loaders), `fit`, export. Returns the summary.
    `output_dir/run_info.json` records the run (code version, packages, machine, batch plan, summary).
    SIGTERM / SIGUSR1 stop it at the next optimizer step with a checkpoint (TrainingPreempted, exit code 75:
    legion.train.preemption)."""
    from legion.train.preemption import StopSignals

    check_train_config(cfg)
    rank, world_size, device = setup_distributed()
    with RunRecord(cfg.output_dir, "train", write=rank == 0) as record, StopSignals() as signals:
        return _train(cfg, rank, world_size, device, record, signals)


def _train(cfg: TrainConfig, rank: int, world_size: int, device: torch.device, record: RunRecord, signals=None) -> dict:
    import deepspeed

    from legion.data.synthscars import EpochSampler
    from legion.train.checkpointing import CheckpointManager

    seed_everything(cfg.seed + rank)  # LoRA dropout differs per rank, reproducibly
    out_dir = Path(cfg.output_dir)
    memory_plan = resolve_auto_settings(cfg, world_size, device)  # before config.yaml is written: it records the result
    plan = plan_batches(cfg.schedule.global_batch_size, world_size, cfg.schedule.micro_batch_size)
    ckpt = CheckpointManager(
        out_dir / "checkpoints",
        keep_last=cfg.checkpoint.keep_last,
        exclude_frozen_parameters=cfg.checkpoint.exclude_frozen,
    )
    start_tag = plan_resume(cfg, ckpt, plan)  # before loading: a checkpoint problem fails in a second

    model, tokenizer, lora_targets = prepare_model(cfg, device)
    train_set, val_set, preprocessing = build_datasets(cfg, tokenizer, model.config)
    steps = plan_steps(cfg, len(train_set), plan)
    optimizer = build_optimizer(model.named_parameters(), cfg.optim)
    ds_config = build_deepspeed_config(cfg, plan, steps.lr_schedule, optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    run_info = describe_run(model, lora_targets, plan, steps, device, train_set, val_set, preprocessing)
    if memory_plan is not None:
        run_info["memory_plan"] = memory_plan
    record.update(training=run_info)
    if rank == 0:
        write_run_files(cfg, out_dir, ds_config)

    at = resume(cfg, ckpt, engine, plan, start_tag)
    cached = build_encoder_cache(cfg, engine, preprocessing, out_dir)
    log = start_logger(cfg, out_dir, rank, run_info, at)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampler = EpochSampler(len(train_set), seed=cfg.seed, rank=rank, world_size=world_size)
    batches = EpochBatches(train_set, sampler, plan.micro_batch, cfg.data.num_workers, pad_id, cfg.seed)
    val_loader = build_val_loader(cfg, val_set, rank, world_size, pad_id)

    fit(
        cfg,
        engine,
        optimizer,
        at,
        plan=plan,
        steps=steps,
        device=device,
        batches=batches,
        val_loader=val_loader,
        cached=cached,
        ckpt=ckpt,
        log=log,
        guard=StepGuard(
            device,
            world_size,
            (steps.total - at.step) * plan.global_batch,
            cfg.data.max_unusable_fraction,
            signals,
            f"legion data check --root {cfg.data.root} --split {cfg.data.split}",
        ),
    )

    summary = {
        "steps": at.step,
        "epochs_started": at.epoch + 1,
        "checkpoint": str(ckpt.ckpt_dir / f"global_step{at.step}"),
    }
    if cached is not None:
        summary["encoder_cache"] = {"hits": dict(cached.cache.hits), "misses": dict(cached.cache.misses)}
    if cfg.export.merged_model and rank == 0:
        summary["final_model"] = str(export_merged_model(cfg, ckpt.ckpt_dir, out_dir))
    torch.distributed.barrier()
    log.event("end", at.step, summary)
    log.close()
    record.update(summary=summary)
    return summary


def fit(
    cfg: TrainConfig,
    engine,
    optimizer: torch.optim.Optimizer,
    at: TrainingPosition,
    *,
    plan: BatchPlan,
    steps: StepPlan,
    device: torch.device,
    batches: EpochBatches,
    val_loader,
    cached: CachedFrozenEncoders | None,
    ckpt: CheckpointManager,
    log: TrainLogger,
    guard: StepGuard,
) -> None:
    """Train from `at` to `steps.total` (advancing `at`): micro-batches epoch after epoch; after each optimizer
    step log, validate and save a checkpoint when due; at the end validate and save unless that step just did.
    Before each update `guard` checks the step's samples (DataError when none loaded) and whether a stop signal
    arrived; after a signal the step is saved and TrainingPreempted raised."""
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    epoch_records = steps.per_epoch * plan.per_device  # this rank's records per epoch
    losses = StepLosses(device, plan.grad_accum)
    engine.train()
    last_saved = at.step if at.step else -1
    step_start = time.time()
    while at.step < steps.total:
        if at.position >= epoch_records:  # this epoch's steps are done
            at.epoch, at.position = at.epoch + 1, 0
        for batch in batches.loader(at.epoch, at.position):
            forward_backward(engine, batch, device, cached, trainable, losses)
            guard.add(batch, plan.micro_batch)
            lrs = engine.get_lr()
            boundary = engine.is_gradient_accumulation_boundary()
            stop = guard.end_step(at.step + 1) if boundary else False  # before the update
            engine.step()
            if not boundary:
                continue
            at.step += 1
            at.position += plan.per_device
            if at.step % cfg.logging.every_steps == 0 or at.step == steps.total:
                log_step(log, at, losses, lrs, optimizer, plan, step_start)
            losses.reset()
            step_start = time.time()
            if at.step % cfg.validation.every_steps == 0 and not stop:
                run_validation(engine, val_loader, device, cached, log, at.step)
            if at.step % cfg.checkpoint.every_steps == 0 or at.step == steps.total or stop:
                ckpt.save(engine, at.step, at.trainer_state(plan))
                last_saved = at.step
                log.event("checkpoint", at.step, {"tag": f"global_step{at.step}"})
            if stop:
                raise guard.preempted(at.step, steps.total, log)
            if at.step >= steps.total or at.position >= epoch_records:
                break
    if at.step % cfg.validation.every_steps != 0:
        run_validation(engine, val_loader, device, cached, log, at.step)
    if last_saved != at.step:
        ckpt.save(engine, at.step, at.trainer_state(plan))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plan_steps(cfg: TrainConfig, num_records: int, plan: BatchPlan) -> StepPlan:
    """Steps per epoch, steps to run (`schedule.max_steps` or the epochs) and the LR schedule's length."""
    per_epoch = steps_per_epoch(num_records, plan)
    if per_epoch == 0:
        raise ConfigError(
            f"{num_records} training samples are fewer than one global batch "
            f"({plan.global_batch} = {plan.world_size} ranks x {plan.per_device}); lower "
            "schedule.global_batch_size or add data"
        )
    total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * per_epoch
    return StepPlan(per_epoch, total_steps, cfg.schedule.total_steps or total_steps)


def describe_run(
    model, lora_targets, plan: BatchPlan, steps: StepPlan, device, train_set, val_set, preprocessing
) -> dict:
    """run_info.json and the `start` event's fields."""
    return {
        "world_size": plan.world_size,
        "device": str(device),
        "micro_batch": plan.micro_batch,
        "grad_accum": plan.grad_accum,
        "global_batch": plan.global_batch,
        "train_samples": len(train_set),
        "val_samples": len(val_set) if val_set else 0,
        "steps_per_epoch": steps.per_epoch,
        "total_steps": steps.total,
        "schedule_total_steps": steps.lr_schedule,
        "lora_modules": len(lora_targets),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "dataset_report": dict(train_set.report),
        "preprocessing": preprocessing_info(preprocessing),
    }


def write_run_files(cfg: TrainConfig, out_dir: Path, ds_config: dict) -> None:
    """config.yaml (resolved) and ds_config.json; rank 0 only (run_info.json is the RunRecord's)."""
    save_resolved_config(cfg, out_dir)
    atomic_write_text(out_dir / "ds_config.json", json.dumps(ds_config, indent=2))


def plan_resume(cfg: TrainConfig, ckpt: CheckpointManager, plan: BatchPlan) -> str | None:
    """Before the model is loaded: finish or undo a save that a killed run left (`CheckpointManager.recover`),
    then choose the tag to continue from (`checkpoint.resume`: auto = the one `latest` names, else the newest
    complete tag; a tag; none = from step 0, refused over existing checkpoints) and check that it was written
    with this (world, micro, accumulation) plan. None: start at step 0."""
    from legion.train.checkpointing import TRAINER_STATE_FILE

    ckpt.recover()
    resume = cfg.checkpoint.resume
    if resume == "none":
        ckpt.check_fresh_start()
        return None
    tag = ckpt.resume_tag() if resume == "auto" else resume
    if tag is None:
        return None
    state_file = ckpt.ckpt_dir / tag / TRAINER_STATE_FILE
    if not (ckpt.ckpt_dir / tag).is_dir():
        found = ", ".join(ckpt.complete_tags()) or "none"
        raise ConfigError(f"checkpoint.resume={tag}: no such checkpoint in {ckpt.ckpt_dir} (found: {found})")
    if state_file.is_file():
        try:
            _check_plan(json.loads(state_file.read_text(encoding="utf-8")), plan)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass  # the load reports an unreadable checkpoint
    return tag


def _check_plan(state: dict, plan: BatchPlan) -> None:
    if state.get("plan") and state["plan"] != [plan.world_size, plan.micro_batch, plan.grad_accum]:
        raise ConfigError(
            f"checkpoint was written with (world, micro, accum) = {state['plan']}; this run has "
            f"{[plan.world_size, plan.micro_batch, plan.grad_accum]}: the data position cannot be "
            "continued exactly"
        )


def resume(cfg: TrainConfig, ckpt: CheckpointManager, engine, plan: BatchPlan, tag: str | None) -> TrainingPosition:
    """Load `tag` (from `plan_resume`) into the engine: weights, optimizer, LR schedule, RNG states. Returns where
    that run stopped (step 0 when `tag` is None)."""
    if tag is None:
        return TrainingPosition()
    state = ckpt.load(engine, tag)
    _check_plan(state, plan)
    return TrainingPosition(state["step"], state["sampler"]["epoch"], state["sampler"]["position"])


def build_encoder_cache(cfg: TrainConfig, engine, preprocessing: dict, out_dir: Path) -> CachedFrozenEncoders | None:
    """With `encoder_cache.enabled`: the frozen CLIP/SAM outputs served from disk (computed on first use)."""
    from legion.train.encoder_cache import CachedFrozenEncoders, FrozenEncoderCache, encoder_fingerprint

    if not cfg.encoder_cache.enabled:
        return None
    trainable_encoders = [
        n
        for n, p in engine.module.named_parameters()
        if p.requires_grad and ("grounding_encoder.image_encoder" in n or "vision_tower" in n)
    ]
    if trainable_encoders:
        raise ConfigError(
            f"encoder_cache.enabled needs frozen encoders, but {trainable_encoders[0]} is "
            "trainable (trainable.name_contains)"
        )
    fingerprint = encoder_fingerprint(engine.module, preprocessing_info(preprocessing))
    cache = FrozenEncoderCache(cfg.encoder_cache.dir or out_dir / "encoder_cache", fingerprint)
    return CachedFrozenEncoders(engine.module, cache)


def start_logger(cfg: TrainConfig, out_dir: Path, rank: int, run_info: dict, at: TrainingPosition) -> TrainLogger:
    """log.jsonl (+ bar, TensorBoard, wandb) with its `start` event, and the run's one-line description."""
    from legion.train.logging import TrainLogger

    log = TrainLogger(
        out_dir,
        rank,
        run_info["total_steps"],
        initial_step=at.step,
        tensorboard=cfg.logging.tensorboard,
        wandb_project=cfg.logging.wandb_project,
        run_name=out_dir.name,
        config=to_dict(cfg),
        progress=cfg.logging.progress,
    )
    log.event("start", at.step, {**run_info, "resumed": at.step > 0})
    log.print(
        f"training {run_info['total_steps']} steps ({run_info['steps_per_epoch']}/epoch) x global batch "
        f"{run_info['global_batch']} = {run_info['world_size']} ranks x micro {run_info['micro_batch']} x accum "
        f"{run_info['grad_accum']}; {run_info['trainable_params']:,} trainable params"
        + (f"; resumed at step {at.step}" if at.step else "")
    )
    return log


def build_val_loader(cfg: TrainConfig, val_set, rank: int, world_size: int, pad_id: int):
    """The held-out slice in order, a disjoint share per rank; None without one."""
    from legion.data.synthscars import EpochSampler

    if val_set is None:
        return None
    sampler = EpochSampler(len(val_set), seed=cfg.seed, rank=rank, world_size=world_size, shuffle=False)
    return make_loader(val_set, sampler, cfg.validation.batch_size, cfg.data.num_workers, pad_id, 0)


class StepGuard:
    """Checked at every optimizer step, before the update: how many of the step's samples loaded and how many
    did not (unreadable images: the dataset returns a SkippedSample, a micro-batch of them is None), summed
    over ranks, and whether a stop signal (SIGTERM / SIGUSR1, legion.train.preemption) arrived on any rank.
    One all-reduce of three numbers per optimizer step (none on one process); every rank gets the same answer,
    so all stop at the same step.

    A step in which no sample at all could be loaded stops the run (DataError; the update is not applied): its
    loss would be 0 and the run would "succeed" on unreadable data. So does a run whose unusable samples exceed
    `max_unusable_fraction` of the `run_samples` it trains on."""

    def __init__(self, device, world_size: int, run_samples: int, max_unusable_fraction: float, signals=None, hint=""):
        self.device, self.world_size = device, world_size
        self.run_samples, self.max_fraction = run_samples, max_unusable_fraction
        self.signals, self.hint = signals, hint
        self.usable = self.unusable = 0  # this step, this rank
        self.total_unusable = self.total_seen = 0  # this run so far, all ranks
        self.examples: list[str] = []  # unusable records named by partly usable micro-batches (this rank)

    def add(self, batch, micro_batch: int) -> None:
        if batch is None:
            self.unusable += micro_batch
            return
        self.usable += len(batch["input_ids"])
        skipped = batch.get("skipped") or []
        self.unusable += len(skipped)
        self.examples += [f"record {record_id}: {reason}" for record_id, reason in skipped[: 3 - len(self.examples)]]

    def end_step(self, step: int) -> bool:
        """The step's verdict (all ranks): True when a stop signal arrived. Raises DataError on unusable data."""
        signal = self.signals.received if self.signals is not None else 0
        values = [self.usable, self.unusable, 1 if signal else 0]
        if self.world_size > 1:
            totals = torch.tensor(values, dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(totals)
            values = totals.tolist()
        usable, unusable, stop = values
        self.usable = self.unusable = 0
        self.total_unusable += unusable
        self.total_seen += usable + unusable
        examples = f" (e.g. {'; '.join(self.examples)})" if self.examples else ""
        check = f"; `{self.hint}` lists every unreadable record and file" if self.hint else ""
        if usable == 0:
            raise DataError(
                f"step {step}: none of its {unusable} samples could be loaded{examples}: the training images are "
                f"unreadable (see the warnings above){check}"
            )
        if self.total_unusable > self.max_fraction * self.run_samples:
            raise DataError(
                f"step {step}: {self.total_unusable} of the {self.total_seen} samples read so far could not be "
                f"loaded{examples}, more than data.max_unusable_fraction={self.max_fraction} of the "
                f"{self.run_samples} samples this run trains on{check}"
            )
        return bool(stop)

    def preempted(self, step: int, total: int, log) -> Exception:
        """The exception that ends a run stopped by a signal, after its checkpoint was saved."""
        from legion.train.preemption import PREEMPTED_EXIT_CODE, StopSignals, TrainingPreempted

        received = self.signals.received if self.signals is not None else 0
        name = StopSignals.name(received) if received else "another rank's signal"
        log.event("preempted", step, {"signal": name, "exit_code": PREEMPTED_EXIT_CODE})
        log.close()
        return TrainingPreempted(
            f"{name} received: stopped at step {step} of {total} with checkpoint global_step{step}; run the same "
            f"command again to resume from it (exit code {PREEMPTED_EXIT_CODE})"
        )


def forward_backward(engine, batch, device, cached, trainable: list, losses: StepLosses) -> None:
    """One micro-batch: forward (frozen encoders from the cache when there is one), backward, losses kept on the
    device. A batch whose images all failed to load (None) backpropagates a zero so that ranks stay in step."""
    if batch is None:
        loss = sum(p.sum() * 0.0 for p in trainable)
        engine.backward(loss)
        return
    with cached.for_images(batch["image_paths"]) if cached else contextlib.nullcontext():
        out = engine(**to_device(batch, device))
    engine.backward(out.loss)
    losses.add(out)


def log_step(
    log: TrainLogger,
    at: TrainingPosition,
    losses: StepLosses,
    lrs: list[float],
    optimizer: torch.optim.Optimizer,
    plan: BatchPlan,
    step_start: float,
) -> None:
    """One `train` line: the step's losses averaged over ranks, the lr of each parameter group, speed."""
    values = losses.mean_over_ranks(plan.world_size)
    seconds = time.time() - step_start
    log.train_step(
        at.step,
        {
            **values,
            "lr": lrs[0],
            **{f"lr/{g['name']}": v for g, v in zip(optimizer.param_groups[1:], lrs[1:])},
            "epoch": at.epoch,
            "samples_per_s": plan.global_batch / max(seconds, 1e-9),
            "step_seconds": seconds,
        },
    )


def run_validation(engine, val_loader, device, cached, log: TrainLogger, step: int) -> None:
    """`validate` on the held-out slice (if any), logged and printed."""
    if val_loader is not None:
        metrics = validate(engine, val_loader, device, cached)
        log.event("validation", step, metrics)
        log.print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


def preprocessing_info(common: dict) -> dict:
    return {k: v for k, v in common.items() if k != "tokenizer"}


def export_merged_model(cfg: TrainConfig, ckpt_dir: Path, out_dir: Path) -> Path:
    """Latest checkpoint -> fp32 weights -> LoRA merged into the base -> `final_model/` (legion.merge)."""
    from legion.merge import step1, step2

    weights = out_dir / "final_weights.safetensors"
    step1(ckpt_dir, weights)
    target = out_dir / "final_model"
    step2(
        cfg.model.path,
        weights,
        target,
        lora_alpha=cfg.lora.alpha,
        lora_r=cfg.lora.r,
        vision_tower=cfg.model.vision_tower,
    )
    return target


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser, TrainConfig, "YAML config, e.g. configs/tiny/train_loc_exp.yaml", "optim.lr=3e-4", config_required=True
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args.config, args.overrides)
    check_train_config(cfg)
    for name in ("model.path", "data.root"):
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is None:
            raise ConfigError(f"{name} is required (set it in the YAML or pass {name}=...)")
        require_path(value, name, "dir")
    if cfg.data.annotation_path:
        require_path(cfg.data.annotation_path, "data.annotation_path", "file")
    summary = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary, indent=2))
    return 0
