"""LEGION-guided regeneration: generate, analyse, revise the prompt from the explanation, regenerate.

    legion regenerate --config configs/legion_7b/regenerate.yaml --prompts prompts.json --output-dir runs/regen

For each case (a prompt, optionally with a starting image):

    round 0   the starting image, or pipeline(prompt)            -> LEGION analysis, score
    round r   prompt_r = reviser(prompt_{r-1}, explanation_{r-1}) -> pipeline(prompt_r) -> analysis, score
    stop      after `max_rounds` images in all, or when LEGION finds no artifact (verdict real or
              no masked pixel; `stop_on_clean`), or after `patience` rounds without a better score.

Every image is scored against the case's ORIGINAL prompt (docs/metrics.md §7), and the best-scoring
image is kept (the original included). `max_rounds` counts images, so revision needs >= 2 (the
reference launcher passed 1 and never revised). The loop itself (analysis, scoring, best round,
patience, stop reasons, per-round outputs) is legion/controller/loop.py; this recipe supplies its
next-image step and its rules. Outputs: see legion/controller/cases.py and report.py.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from legion.cli_args import add_output_dir_argument
from legion.config import ConfigError, add_config_arguments, load_config_with_flags, save_resolved_config
from legion.controller.cases import AnalyzerConfig, Case, CaseWriter, load_analyzer, read_cases
from legion.controller.loop import LoopRules, NextImage, NextImageStep, Round, StopCase, run_case, run_cases
from legion.controller.prompt_reviser import PromptReviser, ReviserConfig, ReviserError, build_reviser
from legion.controller.report import format_scores
from legion.controller.scoring import Scorer, ScorerConfig, build_scorer


@dataclass
class GeneratorConfig:
    path: str = field(
        default="checkpoints/stable-diffusion-3-medium-diffusers",
        metadata={
            "help": "local diffusers text-to-image pipeline directory ('tiny' = random tiny SD, smoke tests only)"
        },
    )
    dtype: str = "float16"
    cpu_offload: bool = field(default=False, metadata={"help": "diffusers model CPU offload (GPUs with little memory)"})
    steps: int = 28
    guidance: float = 7.0
    height: int | None = None
    width: int | None = None
    seed: int = field(default=42, metadata={"help": "same seed every round: only the prompt changes"})
    negative_prompt: str = ""


@dataclass
class RegenerateConfig:
    inputs: str | None = field(default=None, metadata={"help": ".txt prompts, .json {image: prompt} or .jsonl"})
    image_root: str | None = field(
        default=None, metadata={"help": "folder of starting images (default: inputs' folder)"}
    )
    allow_absolute_paths: bool = False
    output_dir: str = "outputs/regenerate"
    device: str = "cuda"
    limit: int | None = field(default=None, metadata={"help": "first N cases only"})
    max_rounds: int = field(default=3, metadata={"help": "images per case, round 0 included (>= 2 to revise)"})
    patience: int = field(default=1, metadata={"help": "stop after this many rounds without a better score (0: never)"})
    min_improvement: float = field(default=0.0, metadata={"help": "a score must beat the best by more than this"})
    stop_on_clean: bool = field(default=True, metadata={"help": "stop when LEGION finds no artifact"})
    legion: AnalyzerConfig = field(default_factory=AnalyzerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    reviser: ReviserConfig = field(default_factory=ReviserConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)

    RENAMED: ClassVar[dict] = {"out_dir": ("output_dir", None)}  # accepted until the next release


def regenerate_case(
    case: Case,
    start_image,
    analyzer,
    pipe,
    reviser: PromptReviser,
    scorer: Scorer,
    cfg: RegenerateConfig,
    writer: CaseWriter,
) -> dict:
    """Run the loop for one case and write its rounds; returns its summary.jsonl entry."""
    step = regeneration_step(case, start_image, pipe, reviser, cfg.generator)
    return run_case(case, step, analyzer, scorer, writer, loop_rules(cfg))


def loop_rules(cfg: RegenerateConfig) -> LoopRules:
    """`max_rounds` counts images, round 0 included; LEGION finding nothing stops only with `stop_on_clean`."""
    return LoopRules(
        max_rounds=max(1, cfg.max_rounds),
        limit_reason="max_rounds",
        patience=cfg.patience,
        min_improvement=cfg.min_improvement,
        stop_on_clean=cfg.stop_on_clean,
    )


def regeneration_step(case: Case, start_image, pipe, reviser: PromptReviser, gen: GeneratorConfig) -> NextImageStep:
    """Round 0: the starting image, or pipeline(prompt). Round r: revise round r-1's prompt from its
    explanation and phrases, then pipeline(revised prompt) with the same seed."""
    from legion.controller.pipelines import generate

    def step(index: int, previous: Round | None) -> NextImage:
        prompt = case.prompt
        if previous is not None:
            record = previous.record
            try:
                prompt = reviser.revise(previous.prompt, record.explanation or "", record.phrases or [])
            except ReviserError as exc:  # e.g. the endpoint is down: keep what this case has, go on
                print(f"[regenerate] {case.case_id}: prompt revision failed, stopping this case: {exc}")
                raise StopCase("reviser_error") from exc
        if index == 0 and start_image is not None:
            return NextImage(start_image, prompt, {"generated": False})
        image = generate(
            pipe,
            prompt,
            seed=gen.seed,
            steps=gen.steps,
            guidance=gen.guidance,
            height=gen.height,
            width=gen.width,
            negative_prompt=gen.negative_prompt or None,
        )
        return NextImage(image, prompt, {"generated": True})

    return step


def run_regeneration(
    cases: list[Case],
    analyzer,
    pipe,
    reviser: PromptReviser,
    scorer: Scorer,
    cfg: RegenerateConfig,
    out_dir: str | Path,
) -> tuple[list[dict], dict]:
    """All cases -> (summaries, aggregate scores); writes summary.jsonl, scores.json, index.html."""
    from legion.data.images import read_image

    def one(case: Case, writer: CaseWriter) -> dict:
        start_image = read_image(case.image_path) if case.image_path else None
        return regenerate_case(case, start_image, analyzer, pipe, reviser, scorer, cfg, writer)

    return run_cases(cases, one, out_dir, scorer.name, "regenerate", "LEGION-guided regeneration")


def load_generator(cfg: GeneratorConfig, device: str):
    from legion.controller.pipelines import build_tiny_pipeline, load_pipeline

    if cfg.path == "tiny":
        return build_tiny_pipeline("text2img").to(device)
    return load_pipeline(cfg.path, "text2img", device=device, dtype=cfg.dtype, cpu_offload=cfg.cpu_offload)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        RegenerateConfig,
        "YAML config (configs/legion_7b/regenerate.yaml, configs/tiny/regenerate.yaml)",
        "max_rounds=4",
    )
    parser.add_argument("--prompts", help="input file (overrides `inputs`): .txt, .json {image: prompt} or .jsonl")
    parser.add_argument("--image-root", help="folder the input's image paths are relative to")
    add_output_dir_argument(parser, help="output folder (overrides `output_dir`)")
    parser.add_argument("--device", help="cpu / cuda / cuda:1 (overrides `device`)")


def config_from_args(args: argparse.Namespace) -> RegenerateConfig:
    flags = dict(inputs=args.prompts, image_root=args.image_root, output_dir=args.output_dir, device=args.device)
    return load_config_with_flags(RegenerateConfig, args, flags)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not cfg.inputs:
        raise ConfigError("no input: pass --prompts FILE or set `inputs` in the config")
    cases = read_cases(cfg.inputs, cfg.image_root, cfg.allow_absolute_paths, limit=cfg.limit)
    if cfg.max_rounds < 2:
        print(f"legion regenerate: warning: max_rounds={cfg.max_rounds}: no prompt revision will happen")
    loop_rules(cfg)  # the loop settings: a bad one stops here, before anything is written or loaded
    out_dir = Path(cfg.output_dir)
    save_resolved_config(cfg, out_dir)
    # The cheap checks first: a missing key or weight file fails before the big models load.
    reviser = build_reviser(cfg.reviser, cfg.device)
    scorer = build_scorer(cfg.scorer, cfg.device)
    pipe = load_generator(cfg.generator, cfg.device)
    analyzer = load_analyzer(cfg.legion, cfg.device)
    _, aggregate = run_regeneration(cases, analyzer, pipe, reviser, scorer, cfg, out_dir)
    print(format_scores(aggregate))
    print(f"wrote {out_dir / 'summary.jsonl'}, {out_dir / 'scores.json'}, {out_dir / 'index.html'}")
    return 0
