"""Turn a training run into a model directory that `legion infer` loads (docs/model.md §13.4).

    legion merge step1 CKPT_DIR [--tag TAG] --output-dir weights.safetensors
        DeepSpeed checkpoint (ZeRO stage 0, 1, 2 or 3) -> one fp32 state dict as safetensors.
        The tag defaults to the one named in CKPT_DIR/latest.
    legion merge step2 --base BASE_DIR --weights weights.safetensors --output-dir OUT_DIR [--lora-alpha 16]
        LoRA folded into the base weights (W <- W + alpha/r * B @ A) -> an HF-style directory with
        config, safetensors, tokenizer and the CLIP tower reference, loadable offline.

step2 accepts the reference's state dicts as well as ours: with or without the `base_model.model.`
prefix, peft-0.5 (`q_proj.weight`) and peft>=0.7 (`q_proj.base_layer.weight`) base-weight names,
`lora_A.default.weight` or `lora_A.weight` adapter names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from legion.errors import LegionError, require_path
from legion.model.export import DEFAULT_MAX_SHARD_BYTES, SAFETENSORS_INDEX, save_safetensors
from legion.utils.io import atomic_write_text
from legion.utils.run_info import recorded

# Keys never carried into a merged model: CLIP is loaded from its own folder (docs/model.md §13.2),
# and old checkpoints carry RoPE buffers that current transformers recompute.
DROP_KEY_PATTERNS = (re.compile(r"(^|\.)vision_tower\."), re.compile(r"rotary_emb\.inv_freq$"))


class MergeError(LegionError, RuntimeError):
    """A checkpoint or weights file that cannot be merged, with the reason."""


# ---------------------------------------------------------------------------------------------
# step 1: DeepSpeed checkpoint -> fp32 safetensors
# ---------------------------------------------------------------------------------------------
def resolve_tag(ckpt_dir: str | os.PathLike, tag: str | None = None) -> str:
    """The checkpoint tag: `tag` if given, else the content of `<ckpt_dir>/latest`."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise MergeError(f"checkpoint directory not found: {ckpt_dir}")
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
            raise MergeError(f"{ckpt_dir} has no 'latest' file; pass --tag (found: {', '.join(tags) or 'nothing'})")
        tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise MergeError(f"tag '{tag}' not found in {ckpt_dir}")
    return tag


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Make every `torch.load` inside the block use `weights_only=True`.

    DeepSpeed's consolidation code unpickles with `weights_only=False`; a checkpoint from elsewhere
    must never run code on load, and DeepSpeed's own files load fine in weights-only mode.
    """
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def _deepspeed_safe_globals() -> list:
    """The plain-data DeepSpeed classes its optimizer-state files pickle (loss scaler, stage enum,
    fragment address); allow-listed by name for weights-only loading, nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_model_states(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends
        raise MergeError(
            f"{path} does not load with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}); refusing to unpickle arbitrary objects"
        ) from None


def zero_stage_of(tag_dir: Path) -> int:
    """ZeRO stage recorded in the checkpoint's model-states file (0 when none is recorded)."""
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise MergeError(f"{tag_dir} holds no '*model_states.pt' file; is it a DeepSpeed checkpoint?")
    states = _load_model_states(files[0])
    zero = (states.get("ds_config") or {}).get("zero_optimization") or {}
    return int(zero.get("stage", 0))


def fp32_state_dict_from_deepspeed(
    ckpt_dir: str | os.PathLike, tag: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in fp32, info) of a DeepSpeed checkpoint, ZeRO stage 0 to 3.

    Stages 1-3 go through DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` (the fp32 master
    weights, frozen parameters included). Stage 0 has no partitioned optimizer files; its weights
    are the `module` entry of `mp_rank_00_model_states.pt`, in the training dtype (bf16 training
    stores bf16 there, so the fp32 copy carries only bf16 precision).
    """
    ckpt_dir = Path(ckpt_dir)
    tag = resolve_tag(ckpt_dir, tag)
    tag_dir = ckpt_dir / tag
    stage = zero_stage_of(tag_dir)
    info = {"checkpoint": str(ckpt_dir), "tag": tag, "zero_stage": stage}
    has_partitions = any(tag_dir.glob("*zero_pp_rank_*optim_states.pt"))
    if stage == 0 or not has_partitions:
        states = _load_model_states(tag_dir / "mp_rank_00_model_states.pt")
        module = states.get("module")
        if not isinstance(module, Mapping):
            raise MergeError(f"{tag_dir}/mp_rank_00_model_states.pt has no 'module' state dict")
        state = {k: v for k, v in module.items() if torch.is_tensor(v)}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with _weights_only_torch_load():
            state = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    # Frozen parameters have no fp32 master copy: DeepSpeed returns them in the training dtype.
    info["source_dtypes"] = sorted({str(t.dtype).replace("torch.", "") for t in state.values()})
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, info


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file, or a directory holding one file or an index of shards."""
    path = Path(path)
    if path.is_dir():
        index = path / SAFETENSORS_INDEX
        if index.is_file():
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise MergeError(f"no .safetensors files in {path}")
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise MergeError(
                f"{path}: expected a .safetensors file (run `legion merge step1` on a DeepSpeed checkpoint first)"
            )
        files = [path]
    else:
        raise MergeError(f"weights not found: {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                state[key] = fh.get_tensor(key)
    return state


def _step1_record_dir(ckpt_dir, out, *args, **kwargs) -> str:
    return str(Path(out).parent if Path(out).suffix == ".safetensors" else out)


def _step1_record_name(ckpt_dir, out, *args, **kwargs) -> str:
    # next to weights.safetensors as weights.run_info.json: the training run's own run_info.json is left alone
    return f"{Path(out).stem}.run_info.json" if Path(out).suffix == ".safetensors" else "run_info.json"


@recorded("merge step1", _step1_record_dir, file_name=_step1_record_name)
def step1(
    ckpt_dir: str | os.PathLike,
    out: str | os.PathLike,
    tag: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> tuple[list[Path], dict]:
    """DeepSpeed checkpoint -> fp32 safetensors. Returns (written files, info)."""
    state, info = fp32_state_dict_from_deepspeed(ckpt_dir, tag)
    info["num_tensors"] = len(state)
    info["num_parameters"] = int(sum(t.numel() for t in state.values()))
    files = save_safetensors(state, out, metadata=info, max_shard_bytes=max_shard_bytes)
    return files, info


# ---------------------------------------------------------------------------------------------
# step 2: LoRA merge
# ---------------------------------------------------------------------------------------------
_PEFT_PREFIX = "base_model.model."
_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass
class LoraMergeReport:
    merged_modules: list[str] = field(default_factory=list)
    rank: int | None = None
    scale: float | None = None
    dropped_keys: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"merged LoRA into {len(self.merged_modules)} modules (r={self.rank}, scale={self.scale}); "
            f"dropped {len(self.dropped_keys)} keys (vision tower / RoPE buffers)"
        )


def normalize_key(key: str) -> str:
    """Our module name for a training/peft state-dict key (LoRA keys keep their lora_A/B suffix)."""
    for prefix in ("module.", _PEFT_PREFIX):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key.replace(".base_layer.", ".")


def merge_lora_state_dict(
    state: Mapping[str, torch.Tensor],
    lora_alpha: float,
    lora_r: int | None = None,
    adapter: str | None = None,
    use_rslora: bool = False,
) -> tuple[dict[str, torch.Tensor], LoraMergeReport]:
    """Fold every LoRA pair of `state` into its base weight: W <- W + s * B @ A (in fp32).

    s = alpha / r (peft's default) or alpha / sqrt(r) with `use_rslora`. Returns the state dict
    without any LoRA keys, in our (un-prefixed) key names, and a report. Raises MergeError when an
    adapter has no base weight, A or B is missing, or the ranks disagree with `lora_r`.
    """
    report = LoraMergeReport()
    plain: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for raw_key, tensor in state.items():
        key = normalize_key(raw_key)
        if any(p.search(key) for p in DROP_KEY_PATTERNS):
            report.dropped_keys.append(raw_key)
            continue
        match = _LORA_RE.match(key)
        if match:
            name = match["adapter"] or "default"
            if name not in report.adapters:
                report.adapters.append(name)
            if adapter is not None and name != adapter:
                continue
            pairs.setdefault(match["module"], {})[match["which"]] = tensor
            continue
        if "lora_" in key:  # lora_embedding_A, lora_magnitude_vector (DoRA), ...: we cannot merge those faithfully
            raise MergeError(f"unsupported LoRA parameter '{raw_key}' (only Linear lora_A/lora_B are merged)")
        if key in plain:
            raise MergeError(f"two keys map to '{key}' (e.g. both q_proj.weight and q_proj.base_layer.weight)")
        plain[key] = tensor
    if adapter is None and len(report.adapters) > 1:
        raise MergeError(f"several LoRA adapters in the weights ({report.adapters}); choose one with --adapter")
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise MergeError(f"LoRA of '{module}' has only lora_{''.join(ab)}")
        a, b = ab["A"].float(), ab["B"].float()
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise MergeError(f"LoRA of '{module}': lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree")
        if lora_r is not None and rank != lora_r:
            raise MergeError(f"LoRA of '{module}' has rank {rank}, expected --lora-r {lora_r}")
        if report.rank is not None and rank != report.rank:
            raise MergeError(f"LoRA ranks differ between modules ({report.rank} vs {rank} at '{module}')")
        report.rank = rank
        weight_key = f"{module}.weight"
        if weight_key not in plain:
            raise MergeError(f"LoRA for '{module}' but no base weight '{weight_key}' in the weights")
        base = plain[weight_key]
        if base.shape != (b.shape[0], a.shape[1]):
            raise MergeError(f"'{weight_key}' {tuple(base.shape)} does not match B@A {(b.shape[0], a.shape[1])}")
        scale = lora_alpha / (rank**0.5 if use_rslora else rank)
        report.scale = scale
        plain[weight_key] = (base.float() + scale * (b @ a)).to(base.dtype)
        report.merged_modules.append(module)
    return plain, report


def step2(
    base_dir: str | os.PathLike,
    weights: str | os.PathLike,
    out_dir: str | os.PathLike,
    lora_alpha: float = 16.0,
    lora_r: int | None = None,
    adapter: str | None = None,
    use_rslora: bool = False,
    dtype: str = "bfloat16",
    vision_tower: str | None = None,
) -> dict:
    """Base model + trained weights (with LoRA) -> merged model directory. Returns a report dict.

    Loads the base with the builders (config, tokenizer, SAM, CLIP), replaces its weights by the
    merged trained ones (embedding rows resized to the trained vocabulary when it differs), and
    writes our checkpoint format (`builders.save_model`: config.json, model.safetensors, tokenizer,
    `vision_tower/` CLIP folder) so `load_model(out_dir)` works offline. Trained keys the base does
    not have are an error; base keys the weights lack keep their base values and are reported.
    dtype "bfloat16" (default): the released checkpoints' layout (SAM + text_hidden_fcs stay fp32);
    "float32": everything fp32 (twice the size).

    The directory is written into a temporary folder next to `out_dir` and renamed into place when complete
    (legion.model.export.writing_model_dir), run_info.json and merge_report.json included: a failed or killed
    merge leaves no folder that looks complete, and a failed re-merge leaves the previous model whole.
    """
    from legion.model.export import check_model_output_dir, writing_model_dir
    from legion.utils.run_info import RunRecord

    check_model_output_dir(out_dir)  # before minutes of loading
    with writing_model_dir(out_dir) as tmp, RunRecord(tmp, "merge step2") as record:
        report = _step2(
            base_dir, weights, Path(out_dir), tmp, lora_alpha, lora_r, adapter, use_rslora, dtype, vision_tower
        )
        record.update(report=report)
    return report


def _step2(
    base_dir, weights, out_dir: Path, folder: Path, lora_alpha, lora_r, adapter, use_rslora, dtype, vision_tower
):
    """step2's work, writing into `folder` (the temporary folder that becomes `out_dir`)."""
    from legion.model.builders import load_model, save_model
    from legion.model.export import ModelCard

    base_dir = Path(base_dir)
    state, lora = merge_lora_state_dict(load_safetensors(weights), lora_alpha, lora_r, adapter, use_rslora)
    model, tokenizer, _ = load_model(
        base_dir, dtype=torch.float32, device="cpu", vision_tower=vision_tower, verbose=False
    )
    embed = state.get("model.embed_tokens.weight")
    if embed is not None and embed.shape[0] != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(embed.shape[0])
    expected = model.state_dict()  # CLIP keys are never part of it
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise MergeError(f"{len(unexpected)} trained weights do not belong to the base model, e.g. {unexpected[:5]}")
    shapes = [
        f"{k}: weights {list(v.shape)} vs base {list(expected[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if shapes:
        raise MergeError("shape mismatch: " + "; ".join(shapes[:5]))
    missing = sorted(set(expected) - set(state))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)
    card = ModelCard(
        title=f"LEGION, merged from {base_dir.name}",
        base_model=_hub_id_of(base_dir),
        datasets=["khr0516/SynthScars"],
        notes=(f"LoRA (rank {lora.rank}, scale {lora.scale:g}) merged" if lora.rank else "Weights (no LoRA) loaded")
        + f" into `{base_dir}` by `legion merge step2`.",
    )
    save_model(model, tokenizer, folder, dtype=dtype, card=card)
    report = {
        "base": str(base_dir),
        "weights": str(weights),
        "out": str(out_dir),
        "merged_modules": len(lora.merged_modules),
        "lora_rank": lora.rank,
        "lora_scale": lora.scale,
        "dropped_keys": len(lora.dropped_keys),
        "dtype": dtype,
        "missing_keys_kept_from_base": missing,
    }
    atomic_write_text(folder / "merge_report.json", json.dumps(report, indent=2))
    return report


def _hub_id_of(base_dir: Path) -> str | None:
    """The Hub id of a known base checkpoint folder name (README layout), for the model card."""
    known = {
        "GLaMM-GranD-Pretrained": "MBZUAI/GLaMM-GranD-Pretrained",
        "GLaMM-GCG": "MBZUAI/GLaMM-GCG",
        "legion_LE": "khr0516/legion_LE",
    }
    return known.get(base_dir.name)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from legion.cli_args import add_output_dir_argument

    sub = parser.add_subparsers(dest="step", required=True, metavar="{step1,step2}")
    p1 = sub.add_parser("step1", help="DeepSpeed checkpoint (ZeRO 0-3) -> fp32 safetensors")
    p1.add_argument("ckpt_dir", help="DeepSpeed checkpoint directory (holds 'latest' and global_stepN/)")
    p1.add_argument("--tag", default=None, help="checkpoint tag (default: the content of CKPT_DIR/latest)")
    add_output_dir_argument(
        p1, required=True, metavar="PATH", help="output .safetensors file, or a directory (sharded if large)"
    )
    p1.add_argument(
        "--max-shard-gb",
        type=float,
        default=DEFAULT_MAX_SHARD_BYTES / 1024**3,
        help="shard size when --output-dir is a directory (default 5)",
    )
    p2 = sub.add_parser("step2", help="merge LoRA into the base model -> HF directory")
    p2.add_argument("--base", required=True, help="base model directory (e.g. GLaMM-GranD-Pretrained, or make-tiny)")
    p2.add_argument("--weights", required=True, help="step1 output (.safetensors file or directory)")
    add_output_dir_argument(p2, required=True, help="output model directory")
    p2.add_argument("--lora-r", type=int, default=None, help="expected LoRA rank (default: read from the weights)")
    p2.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (reference: 16; scale = alpha/r)")
    p2.add_argument("--use-rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    p2.add_argument("--adapter", default=None, help="adapter name when the weights hold several")
    p2.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="dtype of the saved model (default bfloat16: SAM and text_hidden_fcs stay fp32, as released checkpoints)",
    )
    p2.add_argument("--vision-tower", default=None, help="CLIP folder if the base has none")


def run(args: argparse.Namespace) -> int:
    if args.step == "step1":
        require_path(args.ckpt_dir, "CKPT_DIR", "dir")
        if args.tag:
            require_path(Path(args.ckpt_dir) / args.tag, "--tag", "dir")
        files, info = step1(args.ckpt_dir, args.output_dir, args.tag, int(args.max_shard_gb * 1024**3))
        print(
            f"ZeRO stage {info['zero_stage']}, tag {info['tag']}: {info['num_tensors']} tensors, "
            f"{info['num_parameters']:,} parameters (source {'/'.join(info['source_dtypes'])}) -> "
            + ", ".join(str(f) for f in files)
        )
    else:
        require_path(args.base, "--base", "dir")
        require_path(args.weights, "--weights")
        report = step2(
            args.base,
            args.weights,
            args.output_dir,
            args.lora_alpha,
            args.lora_r,
            args.adapter,
            args.use_rslora,
            args.dtype,
            args.vision_tower,
        )
        print(
            f"merged {report['merged_modules']} LoRA modules (r={report['lora_rank']}, "
            f"scale={report['lora_scale']}) -> {report['out']}"
        )
        if report["missing_keys_kept_from_base"]:
            print(
                f"note: {len(report['missing_keys_kept_from_base'])} base weights were not in the trained "
                f"weights and keep their base values, e.g. {report['missing_keys_kept_from_base'][:3]}"
            )
    return 0
