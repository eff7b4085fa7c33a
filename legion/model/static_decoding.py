"""KV-cached decoders for generate_grounded: DynamicDecoder (a growing cache) and StaticDecoder (a
preallocated one, its step optionally replayed from a CUDA graph). Both have the same two calls:

    prefill(inputs_embeds [B, P, D], attention_mask [B, P], position_ids [B, P]) -> last states [B, D]
    step(embeds [B, 1, D], positions [B, 1]) -> last states [B, D]      (once per generated token)

With a growing DynamicCache every decode step of a 7B LLaMA launches about a thousand small
kernels from Python; on a GPU the step then costs the time to launch them, not the time to run
them (the weights are read in ~3 ms on an H200). A StaticCache keeps every tensor of a step at a
fixed address and shape, so the step can be captured once as a CUDA graph and replayed.

The static attention mask is a boolean [B, 1, 1, max_length] buffer (True = attend): left padding stays
False, each new position turns True as it is written. transformers returns a 4-D mask as it is,
so nothing in the captured step reads a value back to the host.

`generation_attention(setting)` chooses the scaled-dot-product-attention kernels generation may use
(ATTENTION_BACKENDS). "auto" leaves out cuDNN's: cuDNN attention builds an execution plan per new
shape, and the growing DynamicCache gives every decode step a new key length (docs/inference.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, StaticCache

# generate_grounded(attention_backend=...): "auto" = flash, efficient or math (never cuDNN); "torch" = torch's own
# choice among all kernels (the behaviour before the setting existed); or a comma-separated list of kernel names.
SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
ATTENTION_BACKENDS = ("auto", "torch", *SDPA_KERNELS)
AUTO_ATTENTION_KERNELS = ("flash", "efficient", "math")


def attention_kernels(setting: str) -> list[str] | None:
    """The SDPA kernel names `setting` allows (None: no restriction). Raises ValueError for an unknown name."""
    names = [n.strip() for n in str(setting).split(",") if n.strip()]
    if names == ["torch"]:
        return None
    if names == ["auto"]:
        return list(AUTO_ATTENTION_KERNELS)
    bad = [n for n in names if n not in SDPA_KERNELS]
    if not names or bad:
        raise ValueError(
            f"attention_backend must be auto, torch or a comma-separated list of {', '.join(SDPA_KERNELS)}; "
            f"got {setting!r}"
        )
    return names


@contextlib.contextmanager
def generation_attention(setting: str) -> Iterator[None]:
    """Restrict torch's scaled-dot-product attention to the kernels `setting` names while generating."""
    names = attention_kernels(setting)
    if names is None:
        yield
        return
    with sdpa_kernel([SDPA_KERNELS[n] for n in names]):
        yield


class _CachedDecoder:
    """The decoder run with `self.cache`, returning the last position's hidden state [B, D]."""

    decoder: torch.nn.Module
    cache: object

    def _forward(self, inputs_embeds, attention_mask, position_ids) -> torch.Tensor:
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=self.cache,
            use_cache=True,
        )
        return out.last_hidden_state[:, -1]


class DynamicDecoder(_CachedDecoder):
    """Decode steps over a DynamicCache that grows by one position per step.

    Without padding in the prompt no mask is passed at all: transformers would build none either (it
    drops an all-ones mask), but only after reading the mask back to the host at every step. With
    padding, the prompt gets its 2-D mask [B, P] as before and each step the boolean [B, 1, 1, T]
    mask transformers would build from the grown 2-D mask (same values, no host read)."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.cache = DynamicCache(config=decoder.config)
        self.mask: torch.Tensor | None = None  # [B, T] (None: no padding)

    @torch.no_grad()
    def prefill(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Run the prompt [B, P, D] (left-padded: attention_mask [B, P]) -> final-layer last states [B, D]."""
        padded = not bool(attention_mask.bool().all())  # one host read per generation
        self.mask = attention_mask.bool() if padded else None
        return self._forward(inputs_embeds, attention_mask if padded else None, position_ids)

    @torch.no_grad()
    def step(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new token per sample: embeds [B, 1, D], positions [B, 1] -> final-layer states [B, D]."""
        if self.mask is None:
            return self._forward(embeds, None, positions)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        return self._forward(embeds, self.mask[:, None, None, :], positions)


class StaticDecoder(_CachedDecoder):
    """Greedy-decoding steps of a LLaMA decoder (`LlamaModel`) over a StaticCache of `max_length` positions.

    use_graph: capture the step as a CUDA graph at the second step (the first runs eagerly and warms
    up cuBLAS) and replay it afterwards. Ignored off CUDA, where every step runs eagerly over the
    same static cache (the code path the CPU tests check against the DynamicCache one).
    """

    def __init__(self, decoder, batch_size: int, max_length: int, use_graph: bool = True):
        weight = decoder.embed_tokens.weight
        self.decoder = decoder
        self.max_length = max_length
        self.cache = StaticCache(config=decoder.config, max_cache_len=max_length)
        self.mask = torch.zeros(batch_size, 1, 1, max_length, dtype=torch.bool, device=weight.device)
        self.embeds = torch.zeros(batch_size, 1, decoder.config.hidden_size, dtype=weight.dtype, device=weight.device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=weight.device)
        self.use_graph = use_graph and weight.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_states: torch.Tensor | None = None  # the captured step's output buffer [B, D]
        self.length = 0  # positions written so far
        self.steps = 0

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the cache for another generation of the same shape; buffers, cache tensors and the captured graph
        keep their addresses, so a graph captured in an earlier generation is replayed from the first step."""
        self.cache.reset()
        self.mask.zero_()
        self.length = 0

    @torch.no_grad()
    def prefill(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Run the prompt [B, P, D] (left-padded: attention_mask [B, P]) -> final-layer last states [B, D]."""
        batch, length = attention_mask.shape
        if length >= self.max_length:
            raise ValueError(f"prompt of {length} positions does not fit a cache of {self.max_length}")
        keep = attention_mask.bool()
        device = keep.device
        mask = torch.zeros(batch, 1, length, self.max_length, dtype=torch.bool, device=device)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask[:, 0, :, :length] = causal & keep[:, None, :]
        # A padding query attends to itself: a row with nothing to attend to would give NaN, and NaN
        # states become NaN keys that poison real rows through 0 * NaN.
        diagonal = torch.arange(length, device=device)
        mask[:, 0, diagonal, diagonal] = True
        states = self._forward(inputs_embeds, mask, position_ids)
        self.mask[:, 0, 0, :length] = keep
        self.length = length
        return states

    @torch.no_grad()
    def step(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new token per sample: embeds [B, 1, D], positions [B, 1] -> final-layer states [B, D].

        The returned tensor is reused by the next step when a graph replays: clone what you keep.
        """
        if self.length >= self.max_length:
            raise RuntimeError(f"the static cache is full ({self.max_length} positions)")
        self.mask[:, 0, 0, self.length] = True
        self.embeds.copy_(embeds)
        self.positions.copy_(positions)
        if not self.use_graph or self.steps == 0:
            states = self._forward(self.embeds, self.mask, self.positions)
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            states = self.graph_states
        self.length += 1
        self.steps += 1
        return states

    def _capture(self) -> None:
        """Record the step as a CUDA graph. The side-stream warm-up that torch asks for runs the step
        for real (it writes the KV entries of the current position), so the cache lengths it advanced
        are put back before capturing; the first replay then writes the same position again."""
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(self.embeds, self.mask, self.positions)
        torch.cuda.current_stream().wait_stream(side)
        for layer, length in zip(self.cache.layers, lengths):
            layer.cumulative_length.copy_(length)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_states = self._forward(self.embeds, self.mask, self.positions)
