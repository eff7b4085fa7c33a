"""LEGION-guided inpainting: inpaint the regions LEGION flags, re-analyse, repeat, keep the best.

    legion inpaint --config configs/legion_7b/inpaint.yaml --inputs images.json --output-dir runs/inpaint

For each case (an image and its prompt, from a mapping {image: prompt}):

    round 0   the original image                     -> LEGION analysis (union mask), score
    round i   dilate(union mask of round i-1)        -> inpainting pipeline(image_{i-1}, mask, prompt)
              -> restore the original size           -> LEGION analysis, score
    stop      after `max_iter` inpaintings, or when LEGION finds no artifact (nothing left to mask), or
              after `patience` rounds without a better score (0 = never, as the reference).

Paper settings (configs/legion_7b/inpaint.yaml): SDXL inpainting 0.1, strength 0.84, 25 steps,
guidance 8.0, seed 42, 5x5 kernel dilated 5 times, 3 iterations. Every image is scored against the
case's own prompt (the reference scored all images against one hard-coded caption).
The loop itself (analysis, scoring, best round, patience, stop reasons, per-round outputs) is
legion/controller/loop.py; this recipe supplies its next-image step and its rules.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from legion.cli_args import add_output_dir_argument
from legion.config import ConfigError, add_config_arguments, load_config_with_flags, save_resolved_config
from legion.controller.cases import AnalyzerConfig, Case, CaseWriter, load_analyzer, read_cases
from legion.controller.loop import LoopRules, NextImage, NextImageStep, Round, run_case, run_cases
from legion.controller.report import format_scores
from legion.controller.scoring import Scorer, ScorerConfig, build_scorer


@dataclass
class InpainterConfig:
    path: str = field(
        default="checkpoints/stable-diffusion-xl-1.0-inpainting-0.1",
        metadata={
            "help": "local diffusers inpainting pipeline directory ('tiny' = random tiny SD inpainting, smoke tests)"
        },
    )
    dtype: str = "float16"
    cpu_offload: bool = field(default=False, metadata={"help": "diffusers model CPU offload (GPUs with little memory)"})
    strength: float = 0.84
    steps: int = 25
    guidance: float = 8.0
    seed: int = 42
    size: int | None = field(
        default=1024,
        metadata={"help": "square working size for the pipeline (SDXL: 1024); null = original size rounded to /8"},
    )
    negative_prompt: str = ""
    paste_back: bool = field(
        default=False, metadata={"help": "keep the original pixels outside the dilated mask (the reference did not)"}
    )


@dataclass
class DilationConfig:
    kernel: int = field(default=5, metadata={"help": "square kernel side (reference 5)"})
    iterations: int = field(default=5, metadata={"help": "cv2.dilate iterations (reference 5)"})


@dataclass
class InpaintConfig:
    inputs: str | None = field(default=None, metadata={"help": ".json {image: prompt}, or .jsonl with image + prompt"})
    image_root: str | None = field(default=None, metadata={"help": "folder the image paths are relative to"})
    allow_absolute_paths: bool = False
    output_dir: str = "outputs/inpaint"
    device: str = "cuda"
    limit: int | None = None
    max_iter: int = field(default=3, metadata={"help": "inpainting rounds after the original"})
    patience: int = field(default=0, metadata={"help": "stop after this many rounds without a better score (0: never)"})
    min_improvement: float = 0.0
    legion: AnalyzerConfig = field(default_factory=AnalyzerConfig)
    inpainter: InpainterConfig = field(default_factory=InpainterConfig)
    dilation: DilationConfig = field(default_factory=DilationConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)

    RENAMED: ClassVar[dict] = {"out_dir": ("output_dir", None)}  # accepted until the next release


def check_dilation(kernel: int, iterations: int) -> None:
    """ConfigError (a ValueError) unless kernel >= 1 and iterations >= 0."""
    if kernel < 1 or iterations < 0:
        raise ConfigError(f"dilation needs kernel >= 1 and iterations >= 0, got {kernel}, {iterations}")


def dilate_mask(mask: np.ndarray, kernel: int = 5, iterations: int = 5) -> np.ndarray:
    """Grow a {0,1} mask [H, W] by a kernel x kernel square, `iterations` times -> uint8 {0,1} [H, W]."""
    import cv2

    check_dilation(kernel, iterations)
    mask = (mask > 0).astype(np.uint8)
    if iterations == 0 or kernel == 1:
        return mask
    return cv2.dilate(mask, np.ones((kernel, kernel), np.uint8), iterations=iterations)


def inpaint_image(pipe, image: np.ndarray, mask: np.ndarray, prompt: str, cfg: InpainterConfig) -> np.ndarray:
    """One inpainting call. image uint8 [H, W, 3], mask {0,1} [H, W] -> uint8 [H, W, 3] (original size)."""
    import torch
    from PIL import Image

    height, width = image.shape[:2]
    if cfg.size:
        work_w = work_h = cfg.size
    else:
        work_w, work_h = max(8, width // 8 * 8), max(8, height // 8 * 8)
    pil_image = Image.fromarray(image).resize((work_w, work_h), Image.BICUBIC)
    pil_mask = Image.fromarray((mask > 0).astype(np.uint8) * 255).resize((work_w, work_h), Image.NEAREST)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    kwargs = dict(
        prompt=prompt,
        image=pil_image,
        mask_image=pil_mask,
        height=work_h,
        width=work_w,
        strength=cfg.strength,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance,
        generator=generator,
    )
    if cfg.negative_prompt:
        kwargs["negative_prompt"] = cfg.negative_prompt
    result = pipe(**kwargs).images[0].convert("RGB")
    # restore the original size (the reference left SDXL's 1024 x 1024 output as it was)
    out = np.asarray(result.resize((width, height), Image.BICUBIC), dtype=np.uint8).copy()
    if cfg.paste_back:
        keep = mask == 0
        out[keep] = image[keep]
    return out


def inpaint_case(
    case: Case, image: np.ndarray, analyzer, pipe, scorer: Scorer, cfg: InpaintConfig, writer: CaseWriter
) -> dict:
    """Run the loop for one case and write its rounds; returns its summary.jsonl entry."""
    return run_case(case, inpainting_step(case, image, pipe, cfg), analyzer, scorer, writer, loop_rules(cfg))


def loop_rules(cfg: InpaintConfig) -> LoopRules:
    """`max_iter` inpaintings after the original; no mask left always stops (nothing to inpaint)."""
    if cfg.max_iter < 0:
        raise ConfigError(f"max_iter must be >= 0 (inpaintings after the original), got {cfg.max_iter}")
    return LoopRules(
        max_rounds=cfg.max_iter + 1,
        limit_reason="max_iter",
        patience=cfg.patience,
        min_improvement=cfg.min_improvement,
        stop_on_clean=True,
    )


def inpainting_step(case: Case, image: np.ndarray, pipe, cfg: InpaintConfig) -> NextImageStep:
    """Round 0: the original image. Round i: inpaint image i-1 inside the dilated union mask of round
    i-1's analysis, with the case's prompt."""

    def step(index: int, previous: Round | None) -> NextImage:
        if previous is None:
            return NextImage(image, case.prompt, {"inpainted_fraction": 0.0})
        mask = dilate_mask(previous.union, cfg.dilation.kernel, cfg.dilation.iterations)
        inpainted = inpaint_image(pipe, previous.image, mask, case.prompt, cfg.inpainter)
        return NextImage(inpainted, case.prompt, {"inpainted_fraction": float(mask.mean())}, inpaint_mask=mask)

    return step


def run_inpainting(
    cases: list[Case], analyzer, pipe, scorer: Scorer, cfg: InpaintConfig, out_dir: str | Path
) -> tuple[list[dict], dict]:
    """All cases -> (summaries, aggregate scores); writes summary.jsonl, scores.json, index.html."""
    from legion.data.images import read_image

    def one(case: Case, writer: CaseWriter) -> dict:
        return inpaint_case(case, read_image(case.image_path), analyzer, pipe, scorer, cfg, writer)

    return run_cases(cases, one, out_dir, scorer.name, "inpaint", "LEGION-guided inpainting")


def load_inpainter(cfg: InpainterConfig, device: str):
    from legion.controller.pipelines import build_tiny_pipeline, load_pipeline

    if cfg.path == "tiny":
        return build_tiny_pipeline("inpaint").to(device)
    return load_pipeline(cfg.path, "inpaint", device=device, dtype=cfg.dtype, cpu_offload=cfg.cpu_offload)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser, InpaintConfig, "YAML config (configs/legion_7b/inpaint.yaml, configs/tiny/inpaint.yaml)", "max_iter=2"
    )
    parser.add_argument("--inputs", help="input file (overrides `inputs`): .json {image: prompt} or .jsonl")
    parser.add_argument("--image-root", help="folder the input's image paths are relative to")
    add_output_dir_argument(parser, help="output folder (overrides `output_dir`)")
    parser.add_argument("--device", help="cpu / cuda / cuda:1 (overrides `device`)")


def config_from_args(args: argparse.Namespace) -> InpaintConfig:
    flags = dict(inputs=args.inputs, image_root=args.image_root, output_dir=args.output_dir, device=args.device)
    return load_config_with_flags(InpaintConfig, args, flags)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not cfg.inputs:
        raise ConfigError("no input: pass --inputs FILE ({image: prompt} JSON) or set `inputs` in the config")
    cases = read_cases(cfg.inputs, cfg.image_root, cfg.allow_absolute_paths, require_images=True, limit=cfg.limit)
    # the dilation and loop settings: a bad one stops here, before anything is written or loaded
    check_dilation(cfg.dilation.kernel, cfg.dilation.iterations)
    loop_rules(cfg)
    out_dir = Path(cfg.output_dir)
    save_resolved_config(cfg, out_dir)
    scorer = build_scorer(cfg.scorer, cfg.device)
    pipe = load_inpainter(cfg.inpainter, cfg.device)
    analyzer = load_analyzer(cfg.legion, cfg.device)
    _, aggregate = run_inpainting(cases, analyzer, pipe, scorer, cfg, out_dir)
    print(format_scores(aggregate))
    print(f"wrote {out_dir / 'summary.jsonl'}, {out_dir / 'scores.json'}, {out_dir / 'index.html'}")
    return 0
