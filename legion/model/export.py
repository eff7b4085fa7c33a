"""Write a LEGION model directory the Hugging Face way, and read it back from a folder or the Hub.

Every model this project writes (`legion make-tiny`, `legion merge step2`, training's
`final_model/`, `legion export`) goes through `export_model`, into a temporary folder next to the
target that is renamed into place when complete (`writing_model_dir`: a kill or a failed write
leaves the previous model whole under its name, never a folder that only looks complete):

    OUT/config.json                 model_type "legion" (transformers Auto classes, after `import legion`)
    OUT/model.safetensors           or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    OUT/generation_config.json      greedy, eos = </s>, max_new_tokens 512 (the reference's inference)
    OUT/tokenizer.model, added_tokens.json, special_tokens_map.json, tokenizer_config.json
    OUT/vision_tower/               the CLIP tower (no GLaMM/LEGION checkpoint carries it)
    OUT/README.md                   model card: YAML metadata + how to load it

dtype "bfloat16" (default) stores the released checkpoints' layout: the LLM, projector, region
encoder and CLIP in bf16, SAM and `text_hidden_fcs` in fp32 (about half of an fp32 export);
"float32" stores everything in fp32. Shards are at most 5 GB (`max_shard_bytes`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from legion.errors import InputNotFoundError, OptionError
from legion.utils.io import atomic_dir, atomic_path, atomic_write_text

WEIGHTS_NAME = "model.safetensors"  # the weights in one file
SAFETENSORS_INDEX = "model.safetensors.index.json"  # the shards' index, when sharded
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", as Hugging Face counts
EXPORT_DTYPES = ("bfloat16", "float32")
# Modules kept in fp32 in a bf16 export and when reproducing the reference in bf16
# (builders.apply_dtype_policy), as GLaMM/LEGION's checkpoints store them (docs/model.md §13.1).
FP32_MODULES = ("model.grounding_encoder", "model.text_hidden_fcs")
FP32_PREFIXES = tuple(m + "." for m in FP32_MODULES)
VISION_TOWER_DIRNAME = "vision_tower"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --- safetensors ----------------------------------------------------------------------------------
def save_safetensors(
    state: Mapping[str, torch.Tensor],
    out: str | os.PathLike,
    metadata: dict | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """Write `state` to `out`.

    `out` ending in `.safetensors`: one file (any size). Otherwise a directory with `model.safetensors`, or
    `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when larger than
    `max_shard_bytes`. Tensors are copied to contiguous private storage (safetensors refuses views
    that share memory); files appear atomically (legion.utils.io: temporary name, then renamed).
    """
    from safetensors.torch import save_file

    out = Path(out)
    meta = {"format": "pt", **{k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()}}
    keys = sorted(state)
    if out.suffix == ".safetensors":  # one file, whatever its size
        max_shard_bytes = float("inf")
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    if out.suffix == ".safetensors":
        out.parent.mkdir(parents=True, exist_ok=True)
        names = [out]
    else:
        out.mkdir(parents=True, exist_ok=True)
        n = len(shards)
        names = (
            [out / WEIGHTS_NAME] if n == 1 else [out / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
    for name, shard_keys in zip(names, shards):
        shard = {k: state[k].detach().to("cpu").contiguous().clone() for k in shard_keys}
        with atomic_path(name) as tmp:
            save_file(shard, str(tmp), metadata=meta)
    if len(names) > 1:
        index = {
            "metadata": {"total_size": sum(state[k].numel() * state[k].element_size() for k in keys)},
            "weight_map": {k: names[i].name for i, ks in enumerate(shards) for k in ks},
        }
        atomic_write_text(out / SAFETENSORS_INDEX, json.dumps(index, indent=2))
    return names


def parse_size(size: int | str) -> int:
    """Bytes of "5GB", "500MB", "10KB" (decimal, as Hugging Face counts) or an int."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)\s*", str(size).upper())
    if not match:
        raise OptionError(f"size {size!r}: expected e.g. 5GB, 500MB or a number of bytes")
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[match.group(2)]
    return int(float(match.group(1)) * factor)


def export_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of an export dtype name (EXPORT_DTYPES); OptionError for any other."""
    if dtype not in EXPORT_DTYPES:
        raise OptionError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def cast_for_export(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors in `dtype`, except SAM and text_hidden_fcs, which a bf16 export keeps fp32."""
    target = export_dtype(dtype)
    out = {}
    for key, tensor in state.items():
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if key.startswith(FP32_PREFIXES) else target)
        out[key] = tensor
    return out


# --- the model directory ---------------------------------------------------------------------------
REPLACEABLE_WITHOUT_CONFIG = {"run_info.json", "merge_report.json"}  # what a failed earlier write may have left


def check_model_output_dir(out_dir: str | os.PathLike) -> Path:
    """`out_dir` when a model directory may be written there: it does not exist, or it is a model directory
    (it has a config.json), or it holds nothing but run records. Any other folder or file is refused
    (OptionError) so that a mistyped output folder is never replaced. Recipes call it before loading."""
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OptionError(f"output folder {out} exists and is not a folder; choose another output folder")
        entries = {p.name for p in out.iterdir() if not p.name.startswith(".")}
        if entries - REPLACEABLE_WITHOUT_CONFIG and "config.json" not in entries:
            raise OptionError(
                f"output folder {out} exists and is not a model folder (no config.json): it is not replaced; "
                "choose another output folder"
            )
    return out


@contextlib.contextmanager
def writing_model_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Write a model directory atomically (legion.utils.io.atomic_dir): yields a temporary folder that
    becomes `out_dir` when the block succeeds; `check_model_output_dir` decides whether an existing
    `out_dir` may be replaced."""
    with atomic_dir(check_model_output_dir(out_dir)) as tmp:
        yield tmp


def export_model(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    save_vision_tower: bool = True,
    card: ModelCard | None = None,
) -> Path:
    """Write `model` (a LegionForCausalLM) and its tokenizer as a model directory (module docstring)."""
    import copy

    from transformers import GenerationConfig

    from legion.model.checkpoint_keys import VISION_TOWER_KEY

    target = export_dtype(dtype)  # before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if save_vision_tower:
        tower = copy.deepcopy(model.model.vision_tower.vision_tower).to(target)
        tower.save_pretrained(out / VISION_TOWER_DIRNAME, safe_serialization=True)
        _save_clip_image_processor(out / VISION_TOWER_DIRNAME, tower.config.image_size)
        config.mm_vision_tower = VISION_TOWER_DIRNAME
    state = {k: v.detach() for k, v in model.state_dict().items() if not VISION_TOWER_KEY.match(k)}
    state = cast_for_export(state, dtype)
    for stale in [*out.glob("model*.safetensors"), out / SAFETENSORS_INDEX]:
        stale.unlink(missing_ok=True)  # a previous export's shards must not outlive this one
    files = save_safetensors(state, out, max_shard_bytes=max_shard_bytes)
    config.architectures = ["LegionForCausalLM"]
    config.dtype = dtype
    config.use_cache = True
    config.save_pretrained(out)
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
        do_sample=False,
        num_beams=1,
        max_new_tokens=512,
    )
    generation.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    card = card or ModelCard()
    parameters = sum(t.numel() for t in state.values())
    atomic_write_text(out / "README.md", card.render(config, dtype, parameters, [f.name for f in files]))
    return out


def _save_clip_image_processor(path: Path, size: int) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(path)


class ModelCard:
    """The README.md of an exported model: Hub metadata (YAML front matter) and how to load it.

    base_model: the checkpoint it was trained from (a Hub id when known); datasets: training data;
    metrics: {name: value} we measured (0-100), with `metrics_source` saying where they come from.
    """

    def __init__(
        self,
        title: str = "LEGION (re-implementation)",
        base_model: str | None = None,
        datasets: Sequence[str] = (),
        metrics: Mapping[str, float] | None = None,
        metrics_source: str | None = None,
        notes: str = "",
    ):
        self.title, self.base_model, self.datasets = title, base_model, list(datasets)
        self.metrics, self.metrics_source, self.notes = dict(metrics or {}), metrics_source, notes

    def render(self, config, dtype: str, parameters: int, files: Sequence[str]) -> str:
        meta = ["---", "license: apache-2.0", "library_name: legion", "pipeline_tag: image-text-to-text"]
        meta += ["tags:", "  - legion", "  - synthetic-image-detection", "  - artifact-localization", "  - glamm"]
        if self.base_model:
            meta.append(f"base_model: {self.base_model}")
        if self.datasets:
            meta += ["datasets:", *[f"  - {d}" for d in self.datasets]]
        if self.metrics:
            meta += [
                "model-index:",
                f"  - name: {json.dumps(self.title)}",
                "    results:",
                "      - task: {type: image-segmentation, name: artifact localization and explanation}",
                "        metrics:",
                *[f"          - {{type: {k}, value: {float(v):.4g}}}" for k, v in self.metrics.items()],
            ]
        meta.append("---")
        measured = (
            "\n".join(f"| {k} | {float(v):.2f} |" for k, v in self.metrics.items())
            if self.metrics
            else "| (none measured for this export) | |"
        )
        body = f"""
# {self.title}

A LEGION model (arXiv 2503.15264: CLIP ViT-L/14-336 image encoder + LLaMA language model + SAM mask
decoder) as written by the `legion` package. It explains where an image looks synthetic: an answer
whose grounded phrases `<p> ... </p> [SEG]` each come with a mask.

- architecture: `LegionForCausalLM`, {config.num_hidden_layers} LLM layers, hidden size {config.hidden_size},
  vocabulary {config.vocab_size}; {parameters:,} parameters stored (CLIP in `vision_tower/`)
- weights: {", ".join(files)} ({dtype}; SAM and `text_hidden_fcs` in fp32 when bf16)
- tokenizer: LLaMA SentencePiece + LEGION's added tokens; load it with `legion` for the reference ids
  (transformers 4.28's whitespace rule around added tokens)

## Load it

```python
import legion
analyzer = legion.load("PATH_OR_HUB_ID")             # + detector="DIR" to gate real images
result = analyzer.analyze("photo.jpg")                # verdict, explanation, phrases, one mask per phrase
result.overlay().save("overlay.png")

import transformers                                    # or the plain model, after `import legion`
model = transformers.AutoModelForCausalLM.from_pretrained("PATH_OR_HUB_ID")
```

Command line: `legion infer model_path=PATH image_dir=IMAGES output_dir=OUT`.

## Measured

| metric | value |
|---|---|
{measured}

{("Source: " + self.metrics_source) if self.metrics_source else ""}
{self.notes}

## Licence and citation

Apache-2.0. Cite LEGION: Kang, Wen et al., "LEGION: Learning to Ground and Explain for Synthetic Image
Detection", ICCV 2025 (arXiv 2503.15264).
"""
        return "\n".join(meta) + "\n" + body.lstrip("\n")


# --- local folder or Hub id ------------------------------------------------------------------------
def resolve_model_source(name_or_path: str | os.PathLike, what: str = "model") -> Path:
    """A local model directory for `name_or_path`: the folder itself, else `checkpoints/<name>`, else a
    Hugging Face Hub id (`org/name`) downloaded into the HF cache when the usual environment allows it
    (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` unset). Offline, or for an unknown name, a clear error."""
    text = str(name_or_path)
    candidates = [Path(text)] if Path(text).is_absolute() else [Path(text), Path("checkpoints") / text]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = "" if len(candidates) == 1 else f" (also tried checkpoints/{text})"
    if not HUB_ID.match(text):
        raise InputNotFoundError(
            f"{what} {text!r}: no such folder{tried}; a Hugging Face Hub id looks like org/name "
            "(e.g. khr0516/legion_LE)"
        )
    if _offline():
        raise InputNotFoundError(
            f"{what} {text!r}: no such folder{tried}; as a Hub id it needs the network, "
            "but HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set: download it first, e.g. "
            f"`hf download {text} --local-dir checkpoints/{text.split('/')[-1]}` (scripts/download_weights.sh)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text))
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise InputNotFoundError(
            f"{what} {text!r}: could not get it from the Hub ({type(exc).__name__}: {exc})"
        ) from None


def _offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(k, "").strip().lower() in truthy for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# --- `legion export` --------------------------------------------------------------------------------
def metrics_for_card(paths: Sequence[str | os.PathLike]) -> dict[str, float]:
    """{"<dataset> <metric>": value} from `legion eval` metrics.json files (overall numbers, 0-100)."""
    wanted = ("miou", "f1", "fg_iou", "rouge_l", "css", "mean_accuracy")
    out: dict[str, float] = {}
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        overall = data.get("overall") or data
        prefix = str(data.get("dataset") or Path(path).parent.name)
        for key in wanted:
            if isinstance(overall.get(key), (int, float)):
                out[f"{prefix} {key}"] = float(overall[key])
    return out


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload a model directory to the Hub (`huggingface_hub`; token from `hf auth login` / HF_TOKEN)."""
    from legion.errors import UsageError

    if _offline():
        raise UsageError("--push-to-hub needs the network, but HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set")
    if not HUB_ID.match(repo_id):
        raise OptionError(f"--push-to-hub {repo_id!r}: a Hub repository id looks like user/name")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload LEGION model (legion export)",
    )
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="model directory, checkpoints/<name>, or a Hub id (org/name)")
    from legion.cli_args import add_output_dir_argument

    add_output_dir_argument(
        parser,
        help="where to write the exported model (default: a temporary folder, when only pushing)",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=list(EXPORT_DTYPES),
        help="bfloat16 (default; SAM and text_hidden_fcs stay fp32, as released checkpoints) or float32",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument(
        "--vision-tower",
        default=None,
        help="local CLIP folder when the model has none (GLaMM/LEGION releases name it by Hub id)",
    )
    parser.add_argument("--base-model", default=None, help="Hub id of the model it was trained from (model card)")
    parser.add_argument(
        "--metrics", nargs="*", default=[], help="metrics.json files of `legion eval` to list in the model card"
    )
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository private")


def run(args) -> int:
    import tempfile

    from legion.model.builders import load_model

    if not args.output_dir and not args.push_to_hub:
        raise OptionError("give --output-dir DIR and/or --push-to-hub REPO")
    if args.output_dir:
        check_model_output_dir(args.output_dir)
    max_shard_bytes = parse_size(args.max_shard_size)
    source = resolve_model_source(args.model)
    for path in args.metrics:
        if not Path(path).is_file():
            raise InputNotFoundError(f"--metrics {path}: no such file")
    model, tokenizer, _ = load_model(source, dtype=torch.float32, vision_tower=args.vision_tower, verbose=False)
    card = ModelCard(
        title=f"LEGION ({Path(str(args.model)).name})",
        base_model=args.base_model,
        datasets=["khr0516/SynthScars"],
        metrics=metrics_for_card(args.metrics),
        metrics_source=", ".join(str(p) for p in args.metrics) or None,
    )
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.output_dir or scratch)
        with writing_model_dir(out) if args.output_dir else contextlib.nullcontext(out) as folder:
            export_model(model, tokenizer, folder, dtype=args.dtype, max_shard_bytes=max_shard_bytes, card=card)
        files = sorted(p.name for p in out.iterdir())
        print(f"exported {source} -> {out} ({args.dtype}): {', '.join(files)}")
        if args.push_to_hub:
            print(f"pushed to {push_to_hub(out, args.push_to_hub, args.private)}")
    return 0
