"""Explain and segment artifacts in a folder of images (docs/model.md §11).

    legion infer --config configs/legion_7b/infer.yaml model_path=checkpoints/legion_7b \\
        image_dir=photos/ output_dir=runs/infer
    torchrun --nproc_per_node 8 -m legion infer --config ... (same keys: images are split by rank)

Per image: optional real/fake gate (detector) -> batched, KV-cached greedy generation -> one
mask per `[SEG]` (+ their union) -> `output_dir/predictions.jsonl` (docs/ARCHITECTURE.md), and on
request the reference layout `<out>/<image>/explanation.json` + `mask.png`, per-phrase PNGs and
an overlay. Runs are resumable: images with a complete record (and the requested files) are
skipped. The resolved config is saved as `output_dir/infer_config.yaml`, and what decides the records
(model, detector, generation and perturbation settings, image folder) as `infer_fingerprint.json`: a
rerun into the same folder with other settings is refused, naming the differences, unless
`overwrite=true` (those predictions are then replaced) or another `output_dir`.

In-process API (used by training for validation):

    analyzer = Analyzer.from_config(AnalyzerConfig(model_path="checkpoints/legion_7b", device="cuda"))
    records = analyzer.analyze([rgb_uint8_image, ...])          # list of prediction dicts
    summary = run_inference(cfg, analyzer=analyzer)              # a whole folder
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from legion.config import ConfigError, add_config_arguments, load_config, save_resolved_config
from legion.errors import UsageError, require_path
from legion.record import PredictionRecord
from legion.utils.devices import resolve_device, resolve_dtype
from legion.utils.io import append_jsonl, atomic_write_jsonl, atomic_write_png, atomic_write_text, read_jsonl
from legion.utils.run_info import RunRecord

PREDICTIONS = "predictions.jsonl"
RESOLVED_CONFIG = "infer_config.yaml"
SUMMARY = "infer_summary.json"
FINGERPRINT = "infer_fingerprint.json"
OVERLAY_COLORS = np.array(
    [
        [255, 64, 64],
        [64, 200, 64],
        [64, 128, 255],
        [255, 200, 0],
        [200, 64, 255],
        [0, 220, 220],
        [255, 128, 0],
        [160, 160, 160],
    ],
    dtype=np.float32,
)


DTYPE_POLICIES = ("reference", "fp32_grounding")


class InferError(UsageError, RuntimeError):
    """Bad inference input or setup (missing paths, missing optional package), with the reason (exit code 2)."""


# --- config -------------------------------------------------------------------------------------
@dataclass
class AnalyzerConfig:
    """How LEGION is loaded and run on images: `Analyzer.from_config`'s input. `legion infer` adds its
    run settings to these keys (`InferConfig`); the controller's `legion:` section is this class."""

    model_path: str = field(default="", metadata={"help": "merged model directory (legion merge step2 / make-tiny)"})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP folder if the model dir has none"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK)"})
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16"}
    )
    dtype_policy: str = field(
        default="reference",
        metadata={
            "help": "reference = the whole model in `dtype`, as the released code runs it (SAM and text_hidden_fcs "
            "included); fp32_grounding = SAM and text_hidden_fcs kept in fp32 (as the checkpoints store them)"
        },
    )
    quantization: str | None = field(default=None, metadata={"help": "8bit | 4bit (bitsandbytes) for 24 GB GPUs"})
    max_new_tokens: int = 512
    decoding: str = field(
        default="auto",
        metadata={
            "help": "auto | cuda_graph | static | dynamic: how the KV cache is decoded (auto: cuda_graph on CUDA "
            "unless quantized, dynamic elsewhere; docs/inference.md)"
        },
    )
    attention_backend: str = field(
        default="auto",
        metadata={
            "help": "attention kernels while generating: auto (flash, efficient or math; never cuDNN) | torch "
            "(torch's own choice) | a comma-separated list of flash, efficient, math, cudnn (docs/inference.md)"
        },
    )
    fused_projections: bool = field(
        default=False,
        metadata={"help": "one GEMM for q/k/v and one for gate/up per LLM layer (same values up to fp rounding)"},
    )
    sam_input_size: int | None = field(
        default=1024,
        metadata={"help": "SAM ResizeLongestSide S (reference inference: 1024); null = the SAM encoder size"},
    )
    detector_path: str | None = field(default=None, metadata={"help": "real/fake detector dir (legion cls-train)"})
    detector_backbone: str | None = field(default=None, metadata={"help": "CLIP/LEGION dir overriding the detector's"})
    gate_threshold: float = field(default=0.5, metadata={"help": "P(fake) below this -> verdict real, no analysis"})


@dataclass
class InferConfig(AnalyzerConfig):
    """`legion infer`: the analyzer's keys plus what to run it on and what to write."""

    image_dir: str = field(default="", metadata={"help": "folder scanned recursively for images"})
    image_list: str | None = field(
        default=None,
        metadata={"help": "text file, one image path per line (relative to image_dir, else to the list's folder)"},
    )
    output_dir: str = field(default="", metadata={"help": "where predictions.jsonl and image outputs go"})
    batch_size: int = field(default=4, metadata={"help": "images per generation batch"})
    perturb: str | None = field(
        default=None, metadata={"help": "robustness perturbation, e.g. jpeg:50, noise:5, blur:5"}
    )
    perturb_seed: int = 0
    save_reference_layout: bool = field(
        default=False,
        metadata={"help": "also write <out>/<image>/explanation.json + mask.png (0/255) like the reference"},
    )
    save_phrase_masks: bool = field(default=False, metadata={"help": "also write <out>/<image>/mask_<i>.png"})
    save_overlay: bool = field(default=False, metadata={"help": "also write <out>/<image>/overlay.png"})
    num_workers: int = field(
        default=2,
        metadata={
            "help": "processes that read, perturb and preprocess the next batches while the model runs (0 = none: "
            "everything in order in the main process); with workers the outputs are written on a background thread"
        },
    )
    resume: bool = field(default=True, metadata={"help": "skip images that already have a complete record"})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "replace predictions in output_dir that were made with other settings (model, detector, "
            "generation, perturbation, images); default: refuse and name the differences"
        },
    )
    max_images: int | None = field(default=None, metadata={"help": "process at most this many images (smoke tests)"})
    progress: bool = True


def check_analyzer_config(cfg: AnalyzerConfig) -> None:
    """Setting checks that need no model (so a typo fails before minutes of loading)."""
    from legion.model.quantization import QUANTIZATION_MODES

    if cfg.dtype_policy not in DTYPE_POLICIES:
        raise ConfigError(f"dtype_policy must be one of {', '.join(DTYPE_POLICIES)}, got {cfg.dtype_policy!r}")
    _check_decoding(cfg.decoding)
    _check_attention_backend(cfg.attention_backend)
    if cfg.quantization is not None and cfg.quantization not in QUANTIZATION_MODES:
        raise ConfigError(f"quantization: {cfg.quantization!r} is not one of 8bit, 4bit (or null)")
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if cfg.sam_input_size is not None and cfg.sam_input_size < 1:
        raise ConfigError(f"sam_input_size must be >= 1 or null, got {cfg.sam_input_size}")
    if not 0.0 <= cfg.gate_threshold <= 1.0:
        raise ConfigError(f"gate_threshold must be in [0, 1], got {cfg.gate_threshold}")
    if not cfg.model_path:
        raise InferError("give model_path=MODEL_DIR")
    require_path(cfg.model_path, "model_path", "dir")
    if cfg.detector_path:
        require_path(cfg.detector_path, "detector_path", "dir")


def _check_decoding(setting: str) -> None:
    from legion.model.legion import DECODING_MODES

    if setting not in DECODING_MODES:
        raise ConfigError(f"decoding must be one of {', '.join(DECODING_MODES)}, got {setting!r}")


def _check_attention_backend(setting: str) -> None:
    from legion.model.static_decoding import attention_kernels

    try:
        attention_kernels(setting)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# --- masks -> output helpers ------------------------------------------------------------------
def _empty_rle(height: int, width: int) -> dict:
    from legion.utils.rle import mask_to_rle

    return mask_to_rle(np.zeros((height, width), dtype=np.uint8))


# --- preprocessing -------------------------------------------------------------------------------
@dataclass
class PreparedImages:
    """A batch preprocessed for `Analyzer.explain`: CLIP pixels [N, 3, S, S], SAM pixels [N, 3, P, P] (fp32, CPU)
    and the sizes after SAM's ResizeLongestSide, one (h, w) per image."""

    clip: torch.Tensor
    sam: torch.Tensor
    sam_sizes: list[tuple[int, int]]

    def select(self, indices: Sequence[int]) -> PreparedImages:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return PreparedImages(self.clip[index], self.sam[index], [self.sam_sizes[i] for i in indices])

    def pin_memory(self) -> PreparedImages:
        """Page-locked copies (DataLoader(pin_memory=True) calls this): the copies to the GPU run asynchronously."""
        return PreparedImages(self.clip.pin_memory(), self.sam.pin_memory(), self.sam_sizes)


@dataclass(frozen=True)
class Preprocessor:
    """RGB uint8 images -> PreparedImages (legion.model.preprocessing); picklable, for DataLoader workers."""

    clip_size: int
    sam_input_size: int
    sam_pad_to: int

    def __call__(self, images: Sequence[np.ndarray]) -> PreparedImages:
        from legion.model.preprocessing import clip_preprocess, sam_preprocess

        clip = torch.stack([clip_preprocess(im, self.clip_size) for im in images])
        sam = [sam_preprocess(im, self.sam_input_size, self.sam_pad_to) for im in images]
        return PreparedImages(clip, torch.stack([t for t, _ in sam]), [tuple(size) for _, size in sam])


# --- the analyzer ---------------------------------------------------------------------------------
class Analyzer:
    """A loaded LEGION model (+ optional detector) that turns RGB images into prediction records.

    model: LegionForCausalLM (eval); tokenizer: its tokenizer; detector: RealFakeDetector or None.
    sam_input_size: SAM's ResizeLongestSide S (None: the SAM encoder's input size; must not exceed it).
    """

    def __init__(
        self,
        model,
        tokenizer,
        detector=None,
        sam_input_size: int | None = 1024,
        max_new_tokens: int = 512,
        gate_threshold: float = 0.5,
        question: str | None = None,
        decoding: str = "auto",
        attention_backend: str = "auto",
    ):
        from legion.model import conversation as conv

        _check_decoding(decoding)
        _check_attention_backend(attention_backend)
        self.decoding = decoding
        self.attention_backend = attention_backend

        self.model, self.tokenizer, self.detector = model, tokenizer, detector
        self.sam_pad_to = int(model.config.sam_config["image_size"])
        self.sam_input_size = int(sam_input_size) if sam_input_size else self.sam_pad_to
        if self.sam_input_size > self.sam_pad_to:
            raise ConfigError(
                f"sam_input_size {self.sam_input_size} exceeds the SAM encoder input "
                f"{self.sam_pad_to} of this model (use <= {self.sam_pad_to} or null)"
            )
        self.clip_size = int(model.config.vision_config["image_size"])
        self.max_new_tokens = int(max_new_tokens)
        self.gate_threshold = float(gate_threshold)
        self.prompt_ids = conv.encode_prompt(
            tokenizer, question or conv.GCG_QUESTION, use_im_start_end=bool(model.config.mm_use_im_start_end)
        )
        self.seg_id = conv.special_token_ids(tokenizer, expect_glamm_ids=False).seg
        if model.config.seg_token_idx is not None and int(model.config.seg_token_idx) != self.seg_id:
            raise ConfigError(f"model seg_token_idx {model.config.seg_token_idx} != tokenizer [SEG] id {self.seg_id}")

    @classmethod
    def from_config(cls, cfg: AnalyzerConfig) -> Analyzer:
        """Load the model (and the detector, when `detector_path` is set) as `cfg` says: the one way to
        build an Analyzer from files. Settings are checked before anything is loaded.

        dtype_policy "reference" casts the whole model to `dtype` (the released code's inference);
        "fp32_grounding" keeps SAM and text_hidden_fcs in fp32 (docs/inference.md has the measured difference).
        """
        from legion.model.builders import load_model
        from legion.model.quantization import quantize_language_model

        check_analyzer_config(cfg)
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        model, tokenizer, _ = load_model(
            cfg.model_path,
            dtype=dtype,
            device="cpu",
            vision_tower=cfg.vision_tower,
            keep_fp32_modules=cfg.dtype_policy == "fp32_grounding",
            verbose=False,
        )
        decoding = cfg.decoding
        if cfg.quantization:
            quantize_language_model(model, cfg.quantization, dtype)
            if decoding == "auto":  # bitsandbytes kernels under CUDA-graph capture are not verified
                decoding = "dynamic"
        if cfg.fused_projections:
            from legion.model.fused_projections import fuse_projections

            fuse_projections(model.model)  # plain nn.Linear only: quantized layers are left as they are
        model.to(device).eval()
        detector = None
        if cfg.detector_path:
            from legion.model.detector import load_detector

            detector = load_detector(cfg.detector_path, device=device, backbone=cfg.detector_backbone)
        return cls(
            model,
            tokenizer,
            detector,
            cfg.sam_input_size,
            cfg.max_new_tokens,
            cfg.gate_threshold,
            decoding=decoding,
            attention_backend=cfg.attention_backend,
        )

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # -- pieces ----------------------------------------------------------------------------------
    def fake_probabilities(self, images: Sequence[np.ndarray]) -> list[float | None]:
        if self.detector is None:
            return [None] * len(images)
        return [float(p) for p in self.detector.fake_probability_images(list(images))]

    @property
    def preprocessor(self) -> Preprocessor:
        """The CPU preprocessing of `explain` as a picklable callable (what `legion infer`'s loader workers run)."""
        return Preprocessor(self.clip_size, self.sam_input_size, self.sam_pad_to)

    @torch.no_grad()
    def explain(self, images: Sequence[np.ndarray], prepared: PreparedImages | None = None) -> list[PredictionRecord]:
        """Generation + masks for a batch of RGB uint8 images (no gate). One record each.
        `prepared`: `self.preprocessor(images)` when it was already computed (e.g. by a loader worker)."""
        from legion.model import conversation as conv
        from legion.utils.rle import mask_to_rle

        start = time.perf_counter()
        if prepared is None:
            prepared = self.preprocessor(images)
        clip = prepared.clip.to(self.device, non_blocking=True)
        sam_pixels = prepared.sam.to(self.device, non_blocking=True)
        ids = self.prompt_ids[None].repeat(len(images), 1).to(self.device)
        results = self.model.generate_grounded(
            ids,
            torch.ones_like(ids),
            clip,
            sam_pixels,
            prepared.sam_sizes,
            [im.shape[:2] for im in images],
            max_new_tokens=self.max_new_tokens,
            use_cache=True,
            decoding=self.decoding,
            attention_backend=self.attention_backend,
        )
        seconds = (time.perf_counter() - start) / len(images)
        records = []
        for image, res in zip(images, results):
            height, width = image.shape[:2]
            text = self.tokenizer.decode(res.token_ids, skip_special_tokens=False)
            explanation, phrases = conv.parse_answer(text)
            masks = (res.mask_logits > 0).cpu().numpy().astype(np.uint8)  # [N, H, W]
            num_seg = sum(1 for t in res.token_ids if t == self.seg_id)
            record = PredictionRecord(
                width=width,
                height=height,
                verdict="fake",
                explanation=explanation,
                phrases=phrases,
                masks=[mask_to_rle(m) for m in masks],
                union_mask=mask_to_rle(masks.any(0) if len(masks) else np.zeros((height, width), np.uint8)),
                no_seg=num_seg == 0,
                raw_text=text,
                sam_input_size=self.sam_input_size,
                seconds=round(seconds, 4),
                num_seg=num_seg,
                truncated=not res.finished,
            )
            if not (len(phrases) == num_seg == len(masks)):
                # Pairing is by order; a mismatch (e.g. a phrase without [SEG]) is reported, not hidden.
                record.mismatch = f"{len(phrases)} phrases, {num_seg} [SEG], {len(masks)} masks"
            records.append(record)
        return records

    def analyze(self, images: Sequence[np.ndarray], prepared: PreparedImages | None = None) -> list[PredictionRecord]:
        """RGB uint8 images [H, W, 3] -> prediction records (legion.record, `image` left None).

        With a detector, images with P(fake) < gate_threshold get verdict "real" and no analysis.
        A batch that fails as a whole is retried image by image; an image that fails gets an
        `error` record. `prepared`: `self.preprocessor(images)`, when already computed (the same records).
        """
        start = time.perf_counter()
        records: list[PredictionRecord | None] = [None] * len(images)
        probs = self.fake_probabilities(images)
        todo = []
        for i, (image, prob) in enumerate(zip(images, probs)):
            if prob is not None and prob < self.gate_threshold:
                h, w = image.shape[:2]
                records[i] = PredictionRecord(
                    width=w,
                    height=h,
                    verdict="real",
                    fake_prob=prob,
                    union_mask=_empty_rle(h, w),
                    sam_input_size=self.sam_input_size,
                )
            else:
                todo.append(i)
        if todo:
            try:
                explained = self.explain([images[i] for i in todo], prepared and prepared.select(todo))
            except (RuntimeError, ValueError) as exc:
                if len(todo) == 1:
                    h, w = images[todo[0]].shape[:2]
                    explained = [PredictionRecord.failed(f"{type(exc).__name__}: {exc}", w, h, self.sam_input_size)]
                else:
                    explained = [self.analyze([images[i]], prepared and prepared.select([i]))[0] for i in todo]
            for i, record in zip(todo, explained):
                record.fake_prob = probs[i]
                records[i] = record
        gate_seconds = (time.perf_counter() - start) / max(len(images), 1)
        for record in records:
            if record.seconds is None:
                record.seconds = round(gate_seconds, 4)
        return records


# --- image listing ------------------------------------------------------------------------------
@dataclass
class ImageListing:
    items: list[tuple[str, Path]]  # (key = path relative to image_dir / as listed, absolute path)
    skipped_non_images: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def list_images(image_dir: str | None, image_list: str | None = None) -> ImageListing:
    """Images of a folder (recursive, by extension, sorted) or of a list file (in its order).

    Files that are not images by extension are skipped and counted; listed paths that do not
    exist are kept (they become `error` records, so nothing vanishes silently).
    """
    from legion.data.images import is_image_file

    listing = ImageListing(items=[])

    def skip(name: str) -> None:
        listing.skipped_non_images += 1
        if len(listing.skipped_examples) < 5:
            listing.skipped_examples.append(name)

    if image_list:
        list_file = Path(image_list)
        if not list_file.is_file():
            raise InferError(f"image_list not found: {list_file}")
        root = Path(image_dir) if image_dir else list_file.parent
        seen = set()
        for line in list_file.read_text().splitlines():
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if not is_image_file(entry):
                skip(entry)
                continue
            if entry in seen:
                continue
            seen.add(entry)
            path = Path(entry) if Path(entry).is_absolute() else root / entry
            listing.items.append((entry, path))
        return listing
    if not image_dir:
        raise InferError("give image_dir=FOLDER or image_list=FILE")
    root = Path(image_dir)
    if not root.is_dir():
        raise InferError(f"image_dir is not a directory: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if name.startswith("."):
                continue
            if is_image_file(name):
                found.append(rel)
            else:
                skip(rel)
    listing.items = [(rel, root / rel) for rel in sorted(found)]
    return listing


def output_subdir(output_dir: Path, key: str) -> Path:
    """`<out>/<image path as listed>/` (the reference's layout) — never outside `output_dir`."""
    parts = Path(key).parts
    if Path(key).is_absolute() or ".." in parts or not parts:
        digest = hashlib.sha1(os.fsencode(key)).hexdigest()[:8]  # a name of any bytes (os.fsdecode'd)
        return output_dir / f"{digest}_{Path(key).name}"
    return output_dir.joinpath(*parts)


# --- writers ----------------------------------------------------------------------------------------
def overlay_image(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 [H, W, 3] with each mask tinted in its own colour (phrase order) -> uint8 [H, W, 3]."""
    out = image.astype(np.float32)
    for i, mask in enumerate(masks):
        sel = mask.astype(bool)
        out[sel] = (1 - alpha) * out[sel] + alpha * OVERLAY_COLORS[i % len(OVERLAY_COLORS)]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def expected_files(cfg: InferConfig, output_dir: Path, key: str, record: PredictionRecord) -> list[Path]:
    """Files the config asks for, for one image (empty when none or on error)."""
    if record.verdict == "error":
        return []
    sub = output_subdir(output_dir, key)
    files = []
    if cfg.save_reference_layout:
        files += [sub / "explanation.json", sub / "mask.png"]
    if cfg.save_phrase_masks:
        files += [sub / f"mask_{i}.png" for i in range(len(record.masks))]
    if cfg.save_overlay:
        files.append(sub / "overlay.png")
    return files


def write_image_files(
    cfg: InferConfig,
    output_dir: Path,
    key: str,
    record: PredictionRecord,
    image: np.ndarray | None,
    image_dir: str | None,
) -> None:
    """Reference layout / per-phrase PNGs / overlay for one record (atomic writes)."""
    from legion.utils.rle import rle_to_mask

    if record.verdict == "error" or not (cfg.save_reference_layout or cfg.save_phrase_masks or cfg.save_overlay):
        return
    sub = output_subdir(output_dir, key)
    masks = [rle_to_mask(r) for r in record.masks]
    union = rle_to_mask(record.union_mask)
    if cfg.save_reference_layout:
        name = f"{image_dir.rstrip('/')}/{key}" if image_dir and not Path(key).is_absolute() else key
        atomic_write_text(sub / "explanation.json", json.dumps({name: record.explanation}, indent=4))
        atomic_write_png(sub / "mask.png", union * 255, "L")
    if cfg.save_phrase_masks:
        for i, mask in enumerate(masks):
            atomic_write_png(sub / f"mask_{i}.png", mask * 255, "L")
    if cfg.save_overlay and image is not None:
        atomic_write_png(sub / "overlay.png", overlay_image(image, masks), "RGB")


def read_records(path: Path) -> list[dict]:
    """Records (with an "image" field) of predictions.jsonl or a part file; [] when it does not exist.
    Lines a crash tore (part files grow by `append_jsonl`) are skipped with a warning."""
    return read_jsonl(path, require=("image",), skip_invalid=True) if path.is_file() else []


def part_path(output_dir: Path, rank: int, world: int) -> Path:
    return output_dir / f"predictions.part{rank:03d}-of-{world:03d}.jsonl"


def merge_parts(output_dir: Path, order: Sequence[str]) -> int:
    """predictions.jsonl <- previous predictions.jsonl + every part file (last record per image
    wins), in listing order (records of images no longer listed go last). Atomic; parts removed."""
    parts = sorted(output_dir.glob("predictions.part*-of-*.jsonl"))
    latest: dict[str, dict] = {}
    for source in [output_dir / PREDICTIONS, *parts]:
        for record in read_records(source):
            latest[record["image"]] = record
    position = {key: i for i, key in enumerate(order)}
    keys = sorted(latest, key=lambda k: (position.get(k, len(position)), k))
    atomic_write_jsonl(output_dir / PREDICTIONS, [latest[k] for k in keys], ensure_ascii=False)
    for part in parts:
        part.unlink()
    return len(keys)


# --- distributed -------------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _init_distributed(world: int) -> bool:
    """A gloo group for the final barrier only (long timeout: shards may finish hours apart)."""
    import torch.distributed as dist

    if world <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return True


def _barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()


# --- settings of an output folder ------------------------------------------------------------------------
def settings_fingerprint(cfg: InferConfig) -> dict:
    """What decides the records, by InferConfig key: the model, CLIP, detector and detector backbone by the
    content of their folders (legion.utils.fingerprint: config, weight sizes and samples), the dtype as
    resolved, the generation settings, the perturbation as applied, and the image folder. Run-only keys
    (batch_size, decoding, device, progress, max_images, resume, the optional files) are not in it. With an
    Analyzer passed in (the Python API) the model is what `model_path` names; an empty `model_path` records
    none, so runs of different in-memory models into one folder are not told apart."""
    from legion.data.perturb import parse_perturbation
    from legion.utils.fingerprint import fingerprint_dir

    def folder(path: str | None) -> dict | None:
        return {"path": str(path), "content": fingerprint_dir(path)} if path else None

    try:
        perturbation = parse_perturbation(cfg.perturb, seed=cfg.perturb_seed).describe()
    except ValueError as exc:
        raise ConfigError(f"perturb: {exc}") from None
    root = cfg.image_dir or (str(Path(cfg.image_list).parent) if cfg.image_list else "")
    return {
        "model_path": folder(cfg.model_path),
        "vision_tower": folder(cfg.vision_tower),
        "dtype": str(resolve_dtype(cfg.dtype, resolve_device(cfg.device))).replace("torch.", ""),
        "dtype_policy": cfg.dtype_policy,
        "quantization": cfg.quantization,
        "max_new_tokens": cfg.max_new_tokens,
        "sam_input_size": cfg.sam_input_size,
        "detector_path": folder(cfg.detector_path),
        "detector_backbone": folder(cfg.detector_backbone),
        "gate_threshold": cfg.gate_threshold if cfg.detector_path else None,
        "perturb": perturbation,
        "image_dir": os.path.abspath(root) if root else None,
    }


def _same_setting(old, new) -> bool:
    if isinstance(old, dict) and isinstance(new, dict) and "content" in old and "content" in new:
        if old["content"] is not None and new["content"] is not None:
            return old["content"] == new["content"]  # the same model moved elsewhere is the same model
    return old == new


def _show_setting(value) -> str:
    if isinstance(value, dict) and "content" in value:
        content = value["content"]
        return f"{value['path']} (content {content[:12] if content else 'missing'})"
    if isinstance(value, dict) and "kind" in value:
        from legion.eval.report import perturbation_label

        return perturbation_label(value) + (f" (seed {value['seed']})" if "seed" in value else "")
    return "null" if value is None else str(value)


def _has_records(output_dir: Path) -> bool:
    return (output_dir / PREDICTIONS).is_file() or any(output_dir.glob("predictions.part*-of-*.jsonl"))


def check_output_dir(cfg: InferConfig, settings: dict) -> bool:
    """Refuse (InferError, before anything is written) an output folder whose predictions were made with
    other settings, or by a version that did not record them, unless `overwrite`. Returns True when its
    predictions are to be replaced (overwrite), False when they match or there are none."""
    output_dir = Path(cfg.output_dir)
    if not _has_records(output_dir):
        return False
    path = output_dir / FINGERPRINT
    try:
        previous = json.loads(path.read_text(encoding="utf-8")).get("settings") if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        previous = None
    if isinstance(previous, dict):
        differences = [
            f"{key}: {_show_setting(previous.get(key))} -> {_show_setting(value)}"
            for key, value in settings.items()
            if not _same_setting(previous.get(key), value)
        ]
        if not differences:
            return False
        problem = f"holds predictions made with other settings: {'; '.join(differences)}"
    else:
        problem = (
            f"holds predictions without a readable {FINGERPRINT} (another version of legion?): "
            "their settings are unknown"
        )
    if cfg.overwrite:
        return True
    raise InferError(
        f"output_dir {output_dir} {problem}. Write to another output_dir, or pass overwrite=true to replace them"
    )


def _start_output_dir(output_dir: Path, settings: dict, replace: bool) -> None:
    """Remove the predictions to be replaced (overwrite), then record this run's settings."""
    if replace:
        for stale in [output_dir / PREDICTIONS, output_dir / SUMMARY, *output_dir.glob("predictions.part*-of-*.jsonl")]:
            stale.unlink(missing_ok=True)
    atomic_write_text(output_dir / FINGERPRINT, json.dumps({"settings": settings}, indent=2) + "\n")


# --- the recipe ---------------------------------------------------------------------------------------
def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_batch(batch: list, perturbation, preprocessor: Preprocessor | None) -> tuple:
    """Read, perturb and (with a preprocessor) preprocess one batch of (key, path) items ->
    (batch, images, keys, {key: error message}, PreparedImages or None). A batch whose preprocessing fails is
    returned unprepared: `Analyzer.analyze` then preprocesses it itself and reports the failure per image."""
    from legion.data.images import ImageReadError, read_image

    loaded, keys, errors = [], [], {}
    for key, path in batch:
        try:
            image = read_image(path)
            loaded.append(perturbation(image, key=key))
            keys.append(key)
        except (ImageReadError, OSError) as exc:
            errors[key] = str(exc)
    prepared = None
    if preprocessor is not None and loaded:
        try:
            prepared = preprocessor(loaded)
        except (RuntimeError, ValueError):
            prepared = None
    return batch, loaded, keys, errors, prepared


class _BatchDataset(torch.utils.data.Dataset):
    """`load_batch` per batch, for DataLoader workers (images travel as tensors, through shared memory)."""

    def __init__(self, batches: list, perturbation, preprocessor: Preprocessor):
        self.batches, self.perturbation, self.preprocessor = batches, perturbation, preprocessor

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple:
        batch, loaded, keys, errors, prepared = load_batch(self.batches[index], self.perturbation, self.preprocessor)
        # torch.from_numpy wants a writable, contiguous array (Pillow's decoded images are read-only)
        images = [torch.from_numpy(np.require(im, requirements=["C", "W"])) for im in loaded]
        return batch, images, keys, errors, prepared


def _as_is(item):
    return item


def load_batches(todo: list, batch_size: int, perturbation, analyzer: Analyzer, num_workers: int) -> Iterable[tuple]:
    """`load_batch` over `todo` in chunks of `batch_size`, in order: inline (num_workers 0: read and perturbed in
    this process, preprocessed by the analyzer as before) or by `num_workers` DataLoader processes that keep two
    batches each ready while the model runs (pinned memory on CUDA, for asynchronous copies)."""
    chunks = list(_chunks(todo, batch_size))
    if num_workers == 0:
        for chunk in chunks:
            yield load_batch(chunk, perturbation, None)
        return
    loader = torch.utils.data.DataLoader(
        _BatchDataset(chunks, perturbation, analyzer.preprocessor),
        batch_size=None,
        num_workers=min(num_workers, max(len(chunks), 1)),
        collate_fn=_as_is,
        pin_memory=analyzer.device.type == "cuda",
        prefetch_factor=2,
    )
    for batch, images, keys, errors, prepared in loader:
        yield batch, [im.numpy() for im in images], keys, errors, prepared


class OrderedWriter:
    """Runs write jobs in the order they are submitted: inline, or (background) on one thread so that writing a
    batch's outputs overlaps the next batch's analysis; at most one job waits, and its error is raised by the
    next `submit` or by `close`."""

    def __init__(self, background: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="legion-infer-writer") if background else None
        self.pending = None

    def submit(self, fn, *args) -> None:
        if self.pool is None:
            fn(*args)
            return
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown()


def run_inference(
    cfg: InferConfig, analyzer: Analyzer | None = None, rank: int | None = None, world_size: int | None = None
) -> dict:
    """Analyze every image of `cfg` and write the outputs (and `output_dir/run_info.json`). Returns a summary
    dict; see `_run_inference`."""
    # Settings first: a typo fails in a second, before run_info.json (and the output folder) is written.
    if not cfg.output_dir:
        raise InferError("give output_dir=FOLDER")
    if analyzer is None:
        check_analyzer_config(cfg)
    if cfg.batch_size < 1:
        raise ConfigError("batch_size must be >= 1")
    if cfg.max_images is not None and cfg.max_images < 0:
        raise ConfigError(f"max_images must be >= 0 or null, got {cfg.max_images}")
    if cfg.num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {cfg.num_workers}")
    # The folder's predictions must match these settings (perturb is checked here too).
    settings = settings_fingerprint(cfg)
    explicit = rank is not None and world_size is not None
    shard_rank, world = (rank, world_size) if explicit else _dist_info()
    if not 0 <= shard_rank < world:
        raise ConfigError(f"rank {shard_rank} is outside world size {world}")
    listing = list_images(cfg.image_dir or None, cfg.image_list)
    replace = check_output_dir(cfg, settings)
    writer = (rank if rank is not None else _dist_info()[0]) == 0
    with RunRecord(cfg.output_dir, "infer", write=writer) as record:
        summary = _run_inference(cfg, analyzer, listing, shard_rank, world, explicit, settings, replace)
        record.update(summary=summary)
    return summary


def _run_inference(
    cfg: InferConfig,
    analyzer: Analyzer | None,
    listing: ImageListing,
    rank: int,
    world: int,
    explicit: bool,
    settings: dict,
    replace: bool,
) -> dict:
    """Analyze the images of `listing` as `cfg` says and write the outputs. Returns a summary dict.

    Under torchrun (WORLD_SIZE > 1) rank r takes images r, r + N, r + 2N, ... of the full sorted
    listing (not of the remaining ones, so every rank agrees while others write), appends its
    records to its own part file, and rank 0 merges the parts into predictions.jsonl after a
    barrier: no image is lost or processed twice, also when resuming. Passing `rank` and
    `world_size` explicitly (`explicit`) shards without a process group (the caller runs rank 0 last).
    """
    from legion.data.perturb import parse_perturbation

    perturbation = parse_perturbation(cfg.perturb, seed=cfg.perturb_seed)  # checked by settings_fingerprint
    output_dir = Path(cfg.output_dir)
    items = listing.items[: cfg.max_images] if cfg.max_images is not None else listing.items
    order = [key for key, _ in items]
    mine = items[rank::world]

    own_group = False if explicit else _init_distributed(world)
    if rank == 0 or explicit:  # explicit ranks run one after the other: the first one prepares the folder
        output_dir.mkdir(parents=True, exist_ok=True)
        # check_output_dir let through only folders without records, with records of these settings, or
        # (overwrite) records to replace: the settings are recorded in the first and the last case
        if replace or not _has_records(output_dir):
            _start_output_dir(output_dir, settings, replace)
        save_resolved_config(cfg, output_dir, RESOLVED_CONFIG)
    if not explicit:
        _barrier(world)  # no rank reads old records before rank 0 has removed those it replaces
    if analyzer is None:
        analyzer = Analyzer.from_config(cfg)

    done: dict[str, PredictionRecord] = {}
    if cfg.resume:
        for source in [output_dir / PREDICTIONS, *sorted(output_dir.glob("predictions.part*-of-*.jsonl"))]:
            for record in read_records(source):
                done[record["image"]] = PredictionRecord.from_json(record)

    def complete(key: str) -> bool:
        record = done.get(key)
        if record is None or record.verdict == "error":  # errors are retried on resume
            return False
        return all(p.is_file() for p in expected_files(cfg, output_dir, key, record))

    todo = [(key, path) for key, path in mine if not complete(key)]
    part = part_path(output_dir, rank, world)
    counts = {
        "images": len(items),
        "this_rank": len(mine),
        "resumed": len(mine) - len(todo),
        "fake": 0,
        "real": 0,
        "error": 0,
        "no_seg": 0,
        "mismatch": 0,
    }
    from tqdm import tqdm

    bar = tqdm(
        total=len(todo),
        desc=f"infer[{rank}/{world}]" if world > 1 else "infer",
        unit="img",
        disable=not cfg.progress,
        position=rank if world > 1 else None,
    )

    def write_batch(batch, records: dict, images: dict) -> None:
        for key, _ in batch:
            record = records[key]
            record.image = key
            try:
                write_image_files(cfg, output_dir, key, record, images.get(key), cfg.image_dir or None)
            except OSError as exc:
                record.verdict, record.error = "error", f"could not write outputs: {exc}"
            append_jsonl(part, record.to_json())
            counts[record.verdict] += 1
            counts["no_seg"] += bool(record.no_seg)
            counts["mismatch"] += bool(record.mismatch)
            bar.update(1)

    batches = load_batches(todo, cfg.batch_size, perturbation, analyzer, cfg.num_workers)
    writer = OrderedWriter(background=cfg.num_workers > 0)
    try:
        for batch, loaded, keys, errors, prepared in batches:
            records = {
                key: PredictionRecord.failed(f"unreadable image: {error}", sam_input_size=analyzer.sam_input_size)
                for key, error in errors.items()
            }
            if loaded:
                for key, record in zip(keys, analyzer.analyze(loaded, prepared)):
                    records[key] = record
            writer.submit(write_batch, batch, records, dict(zip(keys, loaded)))
    finally:
        try:
            writer.close()
        finally:
            bar.close()
    if not explicit:
        _barrier(world)
    summary = {
        **counts,
        "skipped_non_images": listing.skipped_non_images,
        "world_size": world,
        "output_dir": str(output_dir),
        "sam_input_size": analyzer.sam_input_size,
        "perturbation": perturbation.describe(),
    }
    if rank == 0:
        summary["records"] = merge_parts(output_dir, order)
        atomic_write_text(output_dir / SUMMARY, json.dumps(summary, indent=2))
    if own_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return summary


# --- CLI ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        InferConfig,
        "YAML config (configs/legion_7b/infer.yaml, configs/tiny/infer.yaml)",
        "model_path=... image_dir=... output_dir=... batch_size=8",
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(InferConfig, args.config, args.overrides)
    summary = run_inference(cfg)
    if summary.get("records") is not None:
        print(
            f"{summary['images']} images ({summary['resumed']} already done on this rank): {summary['fake']} fake, "
            f"{summary['real']} real, {summary['error']} errors, {summary['no_seg']} without [SEG], "
            f"{summary['mismatch']} phrase/mask mismatches; {summary['skipped_non_images']} non-image files "
            f"skipped -> {Path(summary['output_dir']) / PREDICTIONS}"
        )
    return 0
