"""8-bit / 4-bit loading of LEGION's language model with bitsandbytes (24 GB GPUs; docs/inference.md).

Only the LLaMA decoder's `nn.Linear` layers are swapped; CLIP, SAM, the projector, `text_hidden_fcs`,
the embeddings and `lm_head` keep their dtype, so masks are computed the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from legion.config import ConfigError
from legion.errors import MissingDependencyError

QUANTIZATION_MODES = ("8bit", "4bit")


def quantize_language_model(model: nn.Module, mode: str, compute_dtype: torch.dtype) -> int:
    """Swap the LLaMA decoder's nn.Linear layers for bitsandbytes 8-bit / 4-bit (nf4) layers.

    Only `model.model.layers` is quantized (6.5 B of the 8 B parameters); CLIP, SAM, the projector,
    `text_hidden_fcs`, embeddings and `lm_head` keep `compute_dtype`/fp32, so masks are unchanged in
    kind. The weights are quantized when the model moves to its device (CUDA; bitsandbytes' CPU
    backend also works, for memory rather than speed). Returns the number of layers replaced.
    Raises MissingDependencyError when bitsandbytes is not installed.
    """
    if mode not in QUANTIZATION_MODES:
        raise ConfigError(f"quantization: {mode!r} is not one of 8bit, 4bit (or null)")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise MissingDependencyError(
            f"quantization={mode} needs bitsandbytes, which is not installed: "
            "`pip install bitsandbytes` (CUDA GPU; see docs/inference.md)"
        ) from None
    replaced = 0
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            weight = child.weight.data.to(compute_dtype)
            bias = child.bias is not None
            if mode == "8bit":
                new = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=bias, has_fp16_weights=False, threshold=6.0
                )
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=bias, compute_dtype=compute_dtype, quant_type="nf4"
                )
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if bias:
                new.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, new)
            replaced += 1
    return replaced
