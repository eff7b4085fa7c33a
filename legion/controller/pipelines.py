"""Diffusers pipelines for the controller: load a local pipeline directory once, or build a tiny
random one in-process (tests, demos; no downloads).

    pipe = load_pipeline("checkpoints/sd3-medium", task="text2img", device="cuda", dtype="float16")
    pipe = build_tiny_pipeline("inpaint", seed=0)        # StableDiffusionInpaintPipeline, 32 px

`text2img` accepts any pipeline that `AutoPipelineForText2Image` knows (SD 1.x/2.x, SDXL, SD3, ...);
`inpaint` any that `AutoPipelineForInpainting` knows (e.g. SDXL inpainting 0.1 in the paper config).
Both calls are made with `local_files_only=True`: nothing is fetched from a hub.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from legion.config import ConfigError
from legion.errors import LegionError

TASKS = ("text2img", "inpaint")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PipelineLoadError(LegionError, RuntimeError):
    """A pipeline directory that is missing or that diffusers cannot load."""


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_pipeline(
    path: str | Path, task: str, device: str = "cpu", dtype: str | torch.dtype = "float32", cpu_offload: bool = False
):
    """Load a local diffusers pipeline directory (with `model_index.json`) for `task`.

    cpu_offload: keep the pipeline's models on the CPU and move each to the GPU only while it runs
    (diffusers' model offload: slower, but SD3/SDXL then fit beside LEGION on a 24 GB card).
    """
    from diffusers import AutoPipelineForInpainting, AutoPipelineForText2Image

    if task not in TASKS:
        raise ValueError(f"unknown pipeline task '{task}'; choose one of {TASKS}")
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise PipelineLoadError(
            f"{path} is not a diffusers pipeline directory (no model_index.json). Download the "
            "pipeline (e.g. stabilityai/stable-diffusion-3-medium-diffusers or "
            "diffusers/stable-diffusion-xl-1.0-inpainting-0.1) to a local folder and pass that folder."
        )
    auto = AutoPipelineForText2Image if task == "text2img" else AutoPipelineForInpainting
    kwargs = {"local_files_only": True, "torch_dtype": resolve_dtype(dtype)}
    try:
        pipe = auto.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # diffusers raises many types; the user needs the path and the reason
        raise PipelineLoadError(f"cannot load a {task} pipeline from {path}: {exc}") from exc
    if getattr(pipe, "safety_checker", None) is not None:
        # The SD safety checker blacks out images; the controller scores images, it does not filter them.
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    if cpu_offload:
        if not str(device).startswith("cuda"):
            raise PipelineLoadError(f"cpu_offload needs a CUDA device, got {device}")
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


# ---------------------------------------------------------------- tiny random pipelines (tests)


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP convention)."""
    printable = (
        set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    )
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def tiny_clip_text_config(tokenizer) -> dict:
    """The tiny CLIP text tower shared by the tiny pipelines and the tiny CLIP scorer (for `tokenizer`,
    from build_tiny_clip_tokenizer)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def build_tiny_clip_tokenizer(max_length: int = 77):
    """A CLIPTokenizer with a byte-level vocabulary and no merges (every byte is a token).

    514 tokens: <|startoftext|>=0, <|endoftext|>=1 (also pad), then bytes and bytes + "</w>".
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = _byte_level_alphabet()
    for suffix in ("", "</w>"):
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_tiny_pipeline(task: str, seed: int = 0, sample_size: int = 32):
    """A StableDiffusion(Inpaint)Pipeline with random tiny UNet / VAE / CLIP text encoder.

    Images are `sample_size` px (latents sample_size / 2: the tiny VAE downsamples once).
    Building takes well under a second on CPU; a 2-step 32 px call about a second.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    if task not in TASKS:
        raise ValueError(f"unknown pipeline task '{task}'; choose one of {TASKS}")
    tokenizer = build_tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(tokenizer), projection_dim=32))
    # inpainting UNets see [noisy latents (4), mask (1), masked-image latents (4)] = 9 channels
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2,
        in_channels=9 if task == "inpaint" else 4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=sample_size,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    cls = StableDiffusionInpaintPipeline if task == "inpaint" else StableDiffusionPipeline
    pipe = cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(task: str, out_dir: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny random pipeline directory loadable by `load_pipeline` (CLI tests, demos)."""
    out_dir = Path(out_dir)
    build_tiny_pipeline(task, seed=seed, sample_size=sample_size).save_pretrained(str(out_dir))
    return out_dir


# ---------------------------------------------------------------- calling pipelines


def _to_uint8(image) -> np.ndarray:
    """PIL image or float array in [0, 1] -> uint8 RGB [H, W, 3]."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return array


def generate(
    pipe,
    prompt: str,
    seed: int,
    steps: int,
    guidance: float,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
) -> np.ndarray:
    """Text-to-image: one uint8 RGB image [H, W, 3] (H, W = the pipeline default unless given)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kwargs = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator)
    if height:
        kwargs["height"] = height
    if width:
        kwargs["width"] = width
    if negative_prompt:
        kwargs["negative_prompt"] = negative_prompt
    return _to_uint8(pipe(**kwargs).images[0])
