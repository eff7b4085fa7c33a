"""Real/fake detector: a 2-layer MLP on the frozen CLIP penultimate-layer CLS token (docs/model.md §14).

    image uint8 [H, W, 3] --clip_preprocess--> pixel_values [B, 3, S, S]
        --CLIPVisionModel (frozen)--> hidden_states[-2][:, 0, :]   features [B, d]   (no post-LayerNorm)
        --prediction_head: Linear(d, 2d) -> ReLU -> Linear(2d, 2)--> logits [B, 2]

LABEL MAPPING (reference `LegionForCls`): logit index **0 = fake, 1 = real**. So
`fake_probability = softmax(logits)[:, 0]` and argmax == 1 means "real". This is the opposite of
the `0_real` / `1_fake` folder names; the data side only ever hands us an explicit `is_fake` bool.

The LLM, SAM and LoRA never touch these logits (docs/model.md §14): the detector needs only the CLIP
tower. It can be built from a merged LEGION checkpoint directory (CLIP = its `mm_vision_tower`,
resolved relative to that directory when relative) or from a plain CLIP directory. Its own
checkpoint is a directory holding the head and a *reference* to the backbone, never a CLIP copy:

    <dir>/head.safetensors   prediction_head.{0,2}.{weight,bias} (reference key names), fp32
    <dir>/detector.json      backbone path (relative + absolute) and fingerprint, feature choice,
                             label mapping, preprocessing

    det = build_detector("checkpoints/legion_7b")            # fresh head (HF default init)
    det.save("runs/detector")                                # head + reference
    det = load_detector("runs/detector", device="cuda")
    p_fake = det.fake_probability(pixel_values)              # [B]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionModel
from transformers.utils import logging as hf_logging

from legion.errors import LegionError
from legion.model.preprocessing import CLIP_MEAN, CLIP_STD, clip_preprocess
from legion.utils.io import atomic_path, atomic_write_json

FAKE_INDEX = 0  # reference class index of "fake"
REAL_INDEX = 1  # reference class index of "real"
FORMAT_NAME = "legion-detector"
FORMAT_VERSION = 1
HEAD_FILE = "head.safetensors"
META_FILE = "detector.json"
HEAD_INIT_STD = 0.02  # HF default init (initializer_range) for a head that no checkpoint provides


class DetectorLoadError(LegionError, RuntimeError):
    """A detector checkpoint or backbone that cannot be used as asked."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How images become CLIP pixels: short side -> size (bicubic), centre crop, normalize."""

    size: int
    crop_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def signature(self) -> str:
        """A stable string for cache keys: changes whenever the pixels would change."""
        return f"clip_preprocess(size={self.size},crop={self.crop_size},mean={list(self.mean)},std={list(self.std)})"

    def to_dict(self) -> dict:
        return {"size": self.size, "crop_size": self.crop_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        return cls(int(d["size"]), int(d["crop_size"]), tuple(d["mean"]), tuple(d["std"]))


def build_prediction_head(hidden_size: int) -> nn.Sequential:
    """Linear(d, 2d) -> ReLU -> Linear(2d, 2); keys `0.*`, `2.*` as the reference `prediction_head`.

    Params: d*2d + 2d + 2d*2 + 2 (= 2,103,298 at d = 1024).
    """
    head = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, 2))
    init_prediction_head(head)
    return head


def init_prediction_head(
    head: nn.Sequential, std: float = HEAD_INIT_STD, generator: torch.Generator | None = None
) -> None:
    """Normal(0, std) weights and zero biases, like an HF model's `_init_weights`."""
    with torch.no_grad():
        for layer in head:
            if isinstance(layer, nn.Linear) and layer.weight.device.type != "meta":
                layer.weight.normal_(0.0, std, generator=generator)
                layer.bias.zero_()


def backbone_fingerprint(vision_tower: CLIPVisionModel) -> str:
    """A short hash of the CLIP geometry and its embedding weights, to catch a mismatched backbone.

    Weights are hashed in bf16 so the same CLIP loaded in fp32 or bf16 gives the same fingerprint.
    """
    cfg = vision_tower.config
    h = hashlib.sha256()
    h.update(json.dumps([cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size, cfg.patch_size]).encode())
    for name, tensor in vision_tower.state_dict().items():
        if name.endswith(("embeddings.patch_embedding.weight", "embeddings.class_embedding")):
            h.update(name.rsplit("embeddings.", 1)[1].encode())
            h.update(tensor.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


class RealFakeDetector(nn.Module):
    """Frozen CLIP vision tower + trainable `prediction_head`.

    Args:
        vision_tower: a `transformers.CLIPVisionModel` (frozen here; kept in eval mode).
        preprocess_spec: how to turn images into its pixel input (default: its config's image size).
        feature_layer: index into `hidden_states` (-2 = penultimate layer, the paper's choice).
        backbone_source: where the tower came from (a LEGION dir or a CLIP dir), for the checkpoint.
        clip_dir: the CLIP directory actually loaded (what `load_detector` reopens).
    """

    def __init__(
        self,
        vision_tower: CLIPVisionModel,
        preprocess_spec: PreprocessSpec | None = None,
        feature_layer: int = -2,
        backbone_source: str | None = None,
        clip_dir: str | None = None,
    ):
        super().__init__()
        self.vision_tower = vision_tower
        self.vision_tower.requires_grad_(False)
        self.vision_tower.eval()
        hidden = vision_tower.config.hidden_size
        self.prediction_head = build_prediction_head(hidden)
        size = vision_tower.config.image_size
        self.preprocess_spec = preprocess_spec or PreprocessSpec(size, size)
        self.feature_layer = feature_layer
        self.backbone_source = backbone_source
        self.clip_dir = clip_dir

    # --- sizes and modes -------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.vision_tower.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.prediction_head[0].weight.device

    def train(self, mode: bool = True) -> RealFakeDetector:
        """Only the head changes mode; the frozen tower always runs in eval mode."""
        super().train(mode)
        self.vision_tower.eval()
        return self

    # --- images -> pixels ----------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] RGB -> float32 [3, crop, crop] (docs/model.md §4.2)."""
        s = self.preprocess_spec
        return clip_preprocess(image, s.size, mean=s.mean, std=s.std, crop_size=s.crop_size)

    # --- forward pieces -------------------------------------------------------------
    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> CLS token of hidden_states[feature_layer], float32 [B, d].

        `hidden_states[-2]` is the penultimate layer's output; CLIP's post-LayerNorm is applied to
        none of the hidden states, so none is applied here either.
        """
        dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values=pixel_values.to(self.device, dtype), output_hidden_states=True)
        return out.hidden_states[self.feature_layer][:, 0, :].float()

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, d] -> logits [B, 2]; index 0 = fake, 1 = real (reference mapping)."""
        return self.prediction_head(features.to(self.device, self.prediction_head[0].weight.dtype))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> logits [B, 2] (index 0 = fake, 1 = real)."""
        return self.head_logits(self.features(pixel_values))

    @staticmethod
    def fake_probability_from_logits(logits: torch.Tensor) -> torch.Tensor:
        """logits [B, 2] -> P(fake) [B] = softmax[:, 0] (index 0 = fake in the reference mapping)."""
        return torch.softmax(logits.float(), dim=-1)[:, FAKE_INDEX]

    @torch.no_grad()
    def fake_probability(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> P(fake) float32 [B]."""
        return self.fake_probability_from_logits(self(pixel_values))

    @torch.no_grad()
    def fake_probability_images(self, images: Sequence[np.ndarray], batch_size: int = 64) -> list[float]:
        """RGB uint8 images -> P(fake) per image (preprocessing included)."""
        probs: list[float] = []
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([self.preprocess(im) for im in images[start : start + batch_size]])
            probs.extend(self.fake_probability(pixels).cpu().tolist())
        return probs

    # --- checkpoint ---------------------------------------------------------------------
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """`prediction_head.{0,2}.{weight,bias}` as fp32 CPU tensors (the reference's key names)."""
        return {
            f"prediction_head.{k}": v.detach().float().cpu().contiguous()
            for k, v in self.prediction_head.state_dict().items()
        }

    def load_head_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "prediction_head."
        head_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        extra = sorted(k for k in state if not k.startswith(prefix))
        if extra:
            raise DetectorLoadError(f"unexpected keys in the detector head: {extra}")
        try:
            self.prediction_head.load_state_dict(head_state, strict=True)
        except RuntimeError as exc:
            raise DetectorLoadError(f"detector head does not fit a d={self.hidden_size} backbone: {exc}") from None

    def metadata(self, out_dir: str | os.PathLike) -> dict:
        clip_abs = str(Path(self.clip_dir).resolve()) if self.clip_dir else None
        clip_rel = os.path.relpath(clip_abs, Path(out_dir).resolve()) if clip_abs else None
        cfg = self.vision_tower.config
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "backbone": {
                "source": str(Path(self.backbone_source).resolve()) if self.backbone_source else None,
                "clip_dir": clip_rel,  # relative to this checkpoint directory
                "clip_dir_absolute": clip_abs,  # fallback when the two were moved apart
                "fingerprint": backbone_fingerprint(self.vision_tower),
                "hidden_size": cfg.hidden_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "image_size": cfg.image_size,
                "patch_size": cfg.patch_size,
            },
            "feature": {"hidden_states_index": self.feature_layer, "token": "cls", "post_layernorm": False},
            "head": {"keys": "prediction_head.{0,2}", "sizes": [cfg.hidden_size, 2 * cfg.hidden_size, 2]},
            "labels": {
                "0": "fake",
                "1": "real",
                "note": "reference LegionForCls mapping (opposite of 0_real/1_fake folders); "
                "fake_probability = softmax(logits)[:, 0]",
            },
            "preprocess": self.preprocess_spec.to_dict(),
        }

    def save(self, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write head.safetensors + detector.json (no CLIP weights). Returns the directory."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = self.metadata(out)
        if extra:
            meta["training"] = extra
        with atomic_path(out / HEAD_FILE) as tmp:
            save_file(self.head_state_dict(), str(tmp), metadata={"format": FORMAT_NAME})
        atomic_write_json(out / META_FILE, meta)
        return out


# --- building and loading ------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def is_clip_dir(path: str | os.PathLike) -> bool:
    """A HF CLIP directory (full CLIPModel or CLIPVisionModel)."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and _read_json(cfg).get("model_type") in ("clip", "clip_vision_model")


def resolve_clip_dir(source: str | os.PathLike, vision_tower: str | os.PathLike | None = None) -> Path:
    """The local CLIP directory for `source` (a LEGION checkpoint dir or a CLIP dir).

    For a LEGION dir, CLIP is its config's `mm_vision_tower`, taken relative to the checkpoint
    directory when relative (a hub name such as `openai/clip-vit-large-patch14-336` must exist
    locally under that name: nothing is downloaded). `vision_tower` overrides it.
    """
    source = Path(source)
    if vision_tower is not None:
        tower = Path(vision_tower)
        if not is_clip_dir(tower):
            raise DetectorLoadError(f"vision_tower {tower} is not a CLIP directory (config.json model_type clip*)")
        return tower
    if not (source / "config.json").is_file():
        raise DetectorLoadError(f"{source}: no config.json (expected a LEGION checkpoint dir or a CLIP dir)")
    if is_clip_dir(source):
        return source
    from legion.model.builders import resolve_vision_tower
    from legion.model.configuration import LegionConfig

    name = LegionConfig.from_dir(source).mm_vision_tower
    try:
        tower = resolve_vision_tower(name, source)  # relative to the checkpoint dir, then the cwd
    except FileNotFoundError as exc:
        raise DetectorLoadError(f"{source}: {exc}") from None
    if not is_clip_dir(tower):
        raise DetectorLoadError(f"{source}: mm_vision_tower {tower} is not a CLIP directory")
    return tower


def preprocess_spec_for(clip_dir: str | os.PathLike, image_size: int) -> PreprocessSpec:
    """From the CLIP dir's preprocessor_config.json when present, else resize = crop = image_size."""
    proc = Path(clip_dir) / "preprocessor_config.json"
    if not proc.is_file():
        return PreprocessSpec(image_size, image_size)
    d = _read_json(proc)
    size = d.get("size", image_size)
    size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
    crop = d.get("crop_size", size)
    crop = crop.get("height", size) if isinstance(crop, dict) else crop
    return PreprocessSpec(
        int(size), int(crop), tuple(d.get("image_mean", CLIP_MEAN)), tuple(d.get("image_std", CLIP_STD))
    )


def load_clip_vision(
    clip_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CLIPVisionModel:
    """CLIPVisionModel from a local dir; missing vision weights are an error, not a random init."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full CLIPModel dir lists every text-tower key as unexpected
    try:
        model, info = CLIPVisionModel.from_pretrained(
            str(clip_dir), dtype=dtype, output_loading_info=True, local_files_only=True
        )
    except OSError as exc:  # no weight file, unreadable config: say which folder, not a transformers trace
        raise DetectorLoadError(f"{clip_dir}: not a loadable CLIP directory ({exc})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise DetectorLoadError(f"{clip_dir}: CLIP vision weights missing: {sorted(missing)[:5]} ...")
    return model.to(device).eval()


def build_detector(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vision_tower: str | os.PathLike | None = None,
    seed: int | None = None,
) -> RealFakeDetector:
    """A detector with a freshly initialised head on the CLIP of `source` (LEGION dir or CLIP dir).

    The tower runs in `dtype` (bf16 on a GPU is fine); the head is always fp32.
    """
    clip_dir = resolve_clip_dir(source, vision_tower)
    tower = load_clip_vision(clip_dir, dtype, device)
    if seed is not None:
        torch.manual_seed(seed)
    det = RealFakeDetector(
        tower,
        preprocess_spec_for(clip_dir, tower.config.image_size),
        backbone_source=str(source),
        clip_dir=str(clip_dir),
    )
    return det.to(device)


def read_detector_metadata(path: str | os.PathLike) -> dict:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise DetectorLoadError(f"{path}: not a detector checkpoint (no {META_FILE})")
    meta = _read_json(meta_file)
    if meta.get("format") != FORMAT_NAME or int(meta.get("version", 0)) > FORMAT_VERSION:
        raise DetectorLoadError(f"{meta_file}: format {meta.get('format')!r} v{meta.get('version')} not supported")
    return meta


def load_detector(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backbone: str | os.PathLike | None = None,
    check_backbone: bool = True,
) -> RealFakeDetector:
    """Load a detector saved by `RealFakeDetector.save`: reopen its CLIP, load the head.

    The CLIP dir is found relative to `path` first, then at its absolute path; `backbone` (a
    LEGION or CLIP dir) overrides both. A backbone whose fingerprint differs from the one the head
    was trained on raises, unless `check_backbone=False`.
    """
    path = Path(path)
    meta = read_detector_metadata(path)
    head_file = path / HEAD_FILE
    if not head_file.is_file():
        raise DetectorLoadError(f"{path}: missing {HEAD_FILE}")
    info = meta["backbone"]
    if backbone is not None:
        clip_dir = resolve_clip_dir(backbone)
    else:
        candidates = [path / info["clip_dir"]] if info.get("clip_dir") else []
        if info.get("clip_dir_absolute"):
            candidates.append(Path(info["clip_dir_absolute"]))
        clip_dir = next((c for c in candidates if is_clip_dir(c)), None)
        if clip_dir is None:
            raise DetectorLoadError(
                f"{path}: its CLIP backbone is not found at {[str(c) for c in candidates]}; "
                "pass backbone=<LEGION or CLIP dir>"
            )
    tower = load_clip_vision(clip_dir, dtype, device)
    if check_backbone and info.get("fingerprint") and backbone_fingerprint(tower) != info["fingerprint"]:
        raise DetectorLoadError(
            f"{path}: backbone {clip_dir} is not the CLIP this head was trained on "
            f"(fingerprint {backbone_fingerprint(tower)} != {info['fingerprint']})"
        )
    det = RealFakeDetector(
        tower,
        PreprocessSpec.from_dict(meta["preprocess"]),
        feature_layer=int(meta["feature"]["hidden_states_index"]),
        backbone_source=info.get("source"),
        clip_dir=str(clip_dir),
    )
    det.load_head_state_dict(load_file(str(head_file)))
    return det.to(device).eval()
