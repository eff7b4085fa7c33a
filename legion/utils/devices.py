"""Device and dtype names from configs (`auto`, `cpu`, `cuda:1`, `bf16`, ...) -> torch objects."""

from __future__ import annotations

import os

import torch

from legion.config import ConfigError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """`auto`: this rank's GPU (LOCAL_RANK under torchrun/deepspeed) when CUDA is available, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:  # e.g. "gpu": torch lists the device types it knows
        raise ConfigError(f"device {name!r}: {exc}") from None


def resolve_dtype(name: str | torch.dtype | None, device: torch.device, key: str = "dtype") -> torch.dtype:
    """`auto`/None: bf16 on GPU, fp32 on CPU (CPU bf16 is slow and needs AVX-512 for DeepSpeed's all-reduce)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"{key}: unknown dtype {name!r} (auto, float32, bfloat16, float16)")
    return DTYPES[name]
