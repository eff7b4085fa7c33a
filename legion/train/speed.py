"""The training recipe's `auto` speed settings: gradient checkpointing and micro-batch from the GPU's memory.

`model.gradient_checkpointing: auto` and `schedule.micro_batch_size: auto` (configs/legion_7b) are resolved
once per run by `resolve_memory_plan`, before anything is built, from the GPU's total memory and the peak
memory per micro-batch MEASURED for LEGION-7B (docs/training.md has the table and the rule). The candidate
micro-batches are the divisors of the per-device batch under `micro_batch_size: auto`, else only the micro-batch
the config gives (checkpointing alone is auto: it is decided for that micro-batch). Of the candidates:

1. Without checkpointing (the fastest setting measured): the largest candidate m whose measured peak (m itself,
   or the next larger micro-batch measured: memory grows with m) is at most USABLE_SHARE of the GPU's memory.
2. Otherwise with checkpointing, the largest such m from the checkpointed measurements.
3. Nothing fits (or no CUDA): checkpointing on, the smallest candidate (micro-batch 1 under auto) on a GPU;
   on the CPU checkpointing off and the largest candidate (the whole per-device batch under auto: what the
   tiny recipe runs).

Micro-batches larger than the largest one measured are never chosen by `auto`: no number is extrapolated.
"""

from __future__ import annotations

from dataclasses import dataclass

# Peak torch.cuda.max_memory_allocated (GiB) of one LEGION-7B training step on one NVIDIA H200: DeepSpeed
# ZeRO-2 + LoRA r 8 on q/v + trainable lm_head / embed_tokens / mask decoder / text_hidden_fcs, bf16, 1,576-token
# samples (1,000 text tokens, the longest the recipe keeps is 1,536), SAM input 512 padded to 1024, 3 [SEG];
# benchmarks/results/gpu_full_size_cuda_legion_7b_train{,_no_gc,_no_gc_aligned,_no_gc_compiled}.json
# (2026-11-27; docs/benchmarks.md; no_gc_aligned for eager without checkpointing, the checkpointed compiled row
# from gpu_full_size_cuda_legion_7b_train_gc_compiled.log). key: (gradient checkpointing, compiled decoder layers).
MEASURED_PEAK_GIB: dict[tuple[bool, bool], dict[int, float]] = {
    (True, False): {1: 21.221, 2: 22.897, 4: 27.555, 8: 30.473, 16: 37.954},
    (True, True): {2: 23.142},
    (False, False): {4: 55.786, 8: 86.539},
    (False, True): {4: 48.567, 8: 71.954},
}
MEASURED_ON = "NVIDIA H200, torch 2.11.0+cu130, 2026-11-27 (benchmarks/results/gpu_full_size_cuda_legion_7b_train*)"
# Share of the GPU's total memory a measured peak may use: the rest is left to the CUDA context, the allocator's
# fragmentation and other batches (an 80 GB GPU, 79.6-80 GiB: 68 GiB -> micro-batch 4, not 8's 72.0 GiB).
USABLE_SHARE = 0.85


@dataclass
class MemoryPlan:
    gradient_checkpointing: bool
    micro_batch_size: int
    reason: str


def measured_bound(table: dict[int, float], micro_batch: int) -> float | None:
    """Peak memory bound for `micro_batch`: its measurement or that of the next larger one measured; None when
    `micro_batch` is larger than every measurement."""
    larger = [m for m in table if m >= micro_batch]
    return table[min(larger)] if larger else None


def divisors(per_device_batch: int) -> list[int]:
    """The micro-batches that split `per_device_batch` evenly: the candidates of `micro_batch_size: auto`."""
    return [m for m in range(per_device_batch, 0, -1) if per_device_batch % m == 0]


def resolve_memory_plan(
    micro_batches: list[int], gpu_memory_gib: float | None, compile_layers: bool, usable_share: float = USABLE_SHARE
) -> MemoryPlan:
    """The rule of the module docstring over the candidate `micro_batches` (`divisors` of the per-device batch,
    or the one micro-batch the config gives). gpu_memory_gib: the GPU's total memory (None: no CUDA)."""
    candidates = sorted(micro_batches, reverse=True)
    if gpu_memory_gib is None:
        return MemoryPlan(False, candidates[0], f"no CUDA: no checkpointing, micro-batch {candidates[0]}")
    budget = usable_share * gpu_memory_gib
    for checkpointing in (False, True):
        table = MEASURED_PEAK_GIB[(checkpointing, compile_layers and not checkpointing)]
        for m in candidates:
            bound = measured_bound(table, m)
            if bound is not None and bound <= budget:
                return MemoryPlan(
                    checkpointing,
                    m,
                    f"micro-batch {m} {'with' if checkpointing else 'without'} gradient checkpointing"
                    f"{', compiled layers' if compile_layers and not checkpointing else ''}: measured peak <= "
                    f"{bound} GiB <= {usable_share:.0%} of {gpu_memory_gib:.1f} GiB ({MEASURED_ON})",
                )
    return MemoryPlan(True, candidates[-1], f"no measured setting fits {usable_share:.0%} of {gpu_memory_gib:.1f} GiB")


def cuda_memory_gib(device) -> float | None:
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory / 1024**3
