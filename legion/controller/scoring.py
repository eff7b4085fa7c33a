"""Preference scores for the controller loops, behind one small interface.

    scorer = build_scorer(ScorerConfig(kind="hps_v2.1", checkpoint="checkpoints/HPS_v2.1_compressed.pt"))
    scores = scorer.score(images, prompts)          # list[float], one per (image, prompt) pair

Backends
- `hps_v2.1`: Human Preference Score v2.1 (paper Table 4). An open_clip ViT-H-14 whose weights are
  replaced by the `HPS_v2.1_compressed.pt` checkpoint; score = cosine(image, text) of the normalised
  embeddings, as `hpsv2.score(..., hps_version="v2.1")` returns it (the paper prints it x100).
  Needs the optional `open_clip_torch` package; no weights are downloaded (pretrained=None).
- `clip`: a CLIP-score-style scorer from a local transformers CLIP directory: cosine(image, text)
  of the projected embeddings (raw cosine, not the 2.5 * max(cos, 0) CLIPScore rescaling).
- `image_reward`: ImageReward from a local checkpoint + BLIP med_config (optional `image-reward`
  package; not exercised by the test-suite).

`growth_rates(pre, post)` gives both readings of the paper's "growth rate" (docs/metrics.md §7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from legion.config import ConfigError
from legion.errors import LegionError
from legion.model.preprocessing import CLIP_MEAN, CLIP_STD

SCORER_KINDS = ("hps_v2.1", "clip", "image_reward")


class ScorerLoadError(LegionError, RuntimeError):
    """Missing weights or a missing optional package for a scorer."""


@dataclass
class ScorerConfig:
    kind: str = field(default="hps_v2.1", metadata={"help": f"one of {SCORER_KINDS}"})
    checkpoint: str | None = field(default=None, metadata={"help": "HPS_v2.1_compressed.pt / ImageReward.pt"})
    clip_arch: str = field(default="ViT-H-14", metadata={"help": "open_clip architecture for hps_v2.1"})
    model_dir: str | None = field(
        default=None,
        metadata={"help": "transformers CLIP directory for kind=clip ('tiny' = random tiny CLIP, smoke tests only)"},
    )
    med_config: str | None = field(default=None, metadata={"help": "BLIP med_config.json for image_reward"})
    batch_size: int = 8


class Scorer:
    """score(images: list of uint8 RGB [H, W, 3], prompts: list[str]) -> list[float] (same length)."""

    name = "scorer"

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def __call__(self, image: np.ndarray, prompt: str) -> float:
        return self.score([image], [prompt])[0]


def _check_pairs(images: Sequence[np.ndarray], prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB images [H, W, 3], got {image.dtype} {image.shape}")


def clip_pixel_values(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """OpenAI-CLIP preprocessing: bicubic resize of the short side to `size`, centre crop, mean/std.

    images: uint8 [H, W, 3] each -> Float [B, 3, size, size]
    """
    from PIL import Image

    batch = []
    for image in images:
        pil = Image.fromarray(image)
        w, h = pil.size
        scale = size / min(w, h)
        pil = pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        left, top = (pil.size[0] - size) // 2, (pil.size[1] - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
        batch.append((x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])
    return torch.stack(batch)


class ClipScorer(Scorer):
    """Cosine similarity of a transformers CLIPModel's projected image and text embeddings."""

    name = "clip"

    def __init__(self, model, tokenizer, device: str = "cpu", batch_size: int = 8):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device, self.batch_size = device, batch_size
        self.image_size = model.config.vision_config.image_size
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "cpu", batch_size: int = 8) -> ClipScorer:
        """A local transformers CLIP directory (config.json, weights, tokenizer files)."""
        from transformers import AutoTokenizer, CLIPModel

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ScorerLoadError(f"no transformers CLIP model in {model_dir} (config.json missing)")
        model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        return cls(model, tokenizer, device, batch_size)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu") -> ClipScorer:
        """A random tiny CLIP (32 px, byte-level tokenizer): exercises the code path, scores mean nothing."""
        from transformers import CLIPConfig, CLIPModel

        from legion.controller.pipelines import build_tiny_clip_tokenizer, tiny_clip_text_config

        tokenizer = build_tiny_clip_tokenizer()
        torch.manual_seed(seed)
        config = CLIPConfig(
            text_config=tiny_clip_text_config(tokenizer),
            vision_config=dict(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
            projection_dim=16,
        )
        return cls(CLIPModel(config), tokenizer, device)

    def save(self, out_dir: str | Path) -> Path:
        self.model.save_pretrained(str(out_dir))
        self.tokenizer.save_pretrained(str(out_dir))
        return Path(out_dir)

    @torch.no_grad()
    def score(self, images, prompts):
        _check_pairs(images, prompts)
        out: list[float] = []
        for start in range(0, len(images), self.batch_size):
            chunk_images = images[start : start + self.batch_size]
            chunk_prompts = list(prompts[start : start + self.batch_size])
            pixels = clip_pixel_values(chunk_images, self.image_size).to(self.device, self.model.dtype)
            text = self.tokenizer(
                chunk_prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            image_emb = self.model.get_image_features(pixel_values=pixels)
            text_emb = self.model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
            image_emb = getattr(image_emb, "pooler_output", image_emb)
            text_emb = getattr(text_emb, "pooler_output", text_emb)
            cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
            out.extend(cos.tolist())
        return out


class HPSv21Scorer(Scorer):
    """HPS v2.1: open_clip `clip_arch` (ViT-H-14) with the HPS checkpoint's weights."""

    name = "hps_v2.1"

    def __init__(self, checkpoint: str | Path, clip_arch: str = "ViT-H-14", device: str = "cpu", batch_size: int = 8):
        checkpoint = Path(checkpoint) if checkpoint else None
        if checkpoint is None or not checkpoint.is_file():
            raise ScorerLoadError(
                f"HPS v2.1 checkpoint not found: {checkpoint}. Download HPS_v2.1_compressed.pt "
                "(xswu/HPSv2 on the Hugging Face hub) and pass scorer.checkpoint=PATH, or use scorer.kind=clip."
            )
        try:
            import open_clip
        except ImportError as exc:
            raise ScorerLoadError(
                "scorer.kind=hps_v2.1 needs the optional package open_clip_torch "
                "(pip install open_clip_torch); it is not part of requirements.txt"
            ) from exc
        # pretrained=None: architecture only; every weight comes from the HPS checkpoint below.
        model, _, preprocess = open_clip.create_model_and_transforms(clip_arch, pretrained=None, device=device)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches: a checkpoint of another architecture
            raise ScorerLoadError(f"{checkpoint} does not fit open_clip {clip_arch}: {exc}") from None
        if missing:
            raise ScorerLoadError(
                f"{checkpoint} does not fit open_clip {clip_arch}: {len(missing)} missing keys, e.g. {missing[:3]}"
            )
        if unexpected:
            print(f"[hps] ignoring {len(unexpected)} unexpected keys in {checkpoint}, e.g. {unexpected[:3]}")
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(clip_arch)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def score(self, images, prompts):
        from PIL import Image

        _check_pairs(images, prompts)
        out: list[float] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(Image.fromarray(im)) for im in chunk]).to(self.device)
            text = self.tokenizer(list(prompts[start : start + self.batch_size])).to(self.device)
            image_emb = self.model.encode_image(pixels, normalize=True)
            text_emb = self.model.encode_text(text, normalize=True)
            out.extend((image_emb * text_emb).sum(-1).float().tolist())
        return out


class ImageRewardScorer(Scorer):
    """ImageReward (optional `image-reward` package) from local files only."""

    name = "image_reward"

    def __init__(self, checkpoint: str | Path, med_config: str | Path, device: str = "cpu"):
        for label, path in (("checkpoint", checkpoint), ("med_config", med_config)):
            if not path or not Path(path).is_file():
                raise ScorerLoadError(f"image_reward needs a local {label} file; got {path}")
        try:
            import ImageReward
        except ImportError as exc:
            raise ScorerLoadError("scorer.kind=image_reward needs the optional package image-reward") from exc
        self.model = ImageReward.load(str(checkpoint), device=device, med_config=str(med_config))

    @torch.no_grad()
    def score(self, images, prompts):
        from PIL import Image

        _check_pairs(images, prompts)
        return [float(self.model.score(p, [Image.fromarray(im)])) for im, p in zip(images, prompts)]


def build_scorer(cfg: ScorerConfig, device: str = "cpu") -> Scorer:
    if cfg.kind == "hps_v2.1":
        return HPSv21Scorer(cfg.checkpoint, cfg.clip_arch, device, cfg.batch_size)
    if cfg.kind == "clip":
        if not cfg.model_dir:
            raise ScorerLoadError("scorer.kind=clip needs scorer.model_dir (a local transformers CLIP directory)")
        if cfg.model_dir == "tiny":
            return ClipScorer.tiny(device=device)
        return ClipScorer.from_dir(cfg.model_dir, device, cfg.batch_size)
    if cfg.kind == "image_reward":
        return ImageRewardScorer(cfg.checkpoint, cfg.med_config, device)
    raise ConfigError(f"unknown scorer kind '{cfg.kind}'; choose one of {SCORER_KINDS}")


def growth_rates(pre: Sequence[float], post: Sequence[float]) -> dict:
    """Both readings of the paper's growth rate (docs/metrics.md §7), as fractions (0.0698 = 6.98 %).

    mean_of_ratios = mean_i (post_i - pre_i) / |pre_i|   (probably the paper's; pairs with pre_i = 0 skipped)
    ratio_of_means = (mean(post) - mean(pre)) / |mean(pre)|
    """
    if len(pre) != len(post):
        raise ValueError(f"{len(pre)} pre scores but {len(post)} post scores")
    n = len(pre)
    if n == 0:
        return {"n": 0, "pre_mean": None, "post_mean": None, "mean_of_ratios": None, "ratio_of_means": None}
    pre_mean, post_mean = float(np.mean(pre)), float(np.mean(post))
    ratios = [(b - a) / abs(a) for a, b in zip(pre, post) if a != 0]
    return {
        "n": n,
        "pre_mean": pre_mean,
        "post_mean": post_mean,
        "mean_of_ratios": float(np.mean(ratios)) if ratios else None,
        "ratio_of_means": (post_mean - pre_mean) / abs(pre_mean) if pre_mean != 0 else None,
        "n_skipped_zero_pre": n - len(ratios),
    }
