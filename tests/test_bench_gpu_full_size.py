"""benchmarks/gpu_full_size.py on the tiny preset: FLOP formula, measurement functions, output files."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_full_size", REPO / "benchmarks" / "gpu_full_size.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_full_size"] = module
    spec.loader.exec_module(module)
    return module


def _numbers(obj):
    """Every int/float leaf of a JSON-like object (bools excluded)."""
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _numbers(value)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_llm_flop_formula_matches_torch_flop_counter(bench):
    """The formula behind MFU vs. torch's own count of one LoRA fwd+bwd of the tiny LLM (no recompute)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    model, tokenizer = bench.build_benchmark_model("tiny", torch.float32, torch.device("cpu"))
    bench.prepare_for_training(model, gradient_checkpointing=False)
    model.train()
    # Eager attention: FlopCounterMode has no formula for the CPU fused SDPA kernel (it would count 0).
    model.set_attn_implementation("eager")
    ids, labels = bench.long_conversation(tokenizer, model.config.vocab_size, text_tokens=150, num_seg=2)
    ids = ids[ids >= 0]  # the text-only LLM path: no image placeholder
    labels = labels[: len(ids)]
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids[None], labels=labels[None])
        out.loss.backward()
    formula = bench.llm_training_flops(model.config, len(ids), lora_r=8, num_seg=0)
    assert formula["text_hidden_fcs"] == 0
    counted = counter.get_total_flops()
    assert counted > 0
    assert formula["total"] == pytest.approx(counted, rel=0.02), (formula, counted)


def test_long_conversation_has_the_requested_length_and_seg_count(bench):
    model_config = bench.build_config("tiny")
    from legion.model.builders import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    seg = tokenizer.convert_tokens_to_ids("[SEG]")
    for target in (350, 700):  # the prompt + a minimal answer is ~300 tokens
        ids, labels = bench.long_conversation(tokenizer, model_config.vocab_size, target, num_seg=3)
        assert target <= len(ids) < target + 8
        assert int((ids == seg).sum()) == 3 and ids.shape == labels.shape
    # 7B vocabulary: special tokens moved to GLaMM's ids
    ids, _ = bench.long_conversation(tokenizer, 32007, 50, num_seg=2)
    assert int((ids == 32004).sum()) == 2


def test_measurement_functions_on_tiny(bench, tmp_path):
    torch.set_num_threads(1)
    device = torch.device("cpu")
    model, tokenizer = bench.build_benchmark_model("tiny", torch.float32, device)
    result = {
        "device": bench.device_name(device),
        "device_type": "cpu",
        "torch": torch.__version__,
        "preset": "tiny",
        "dtype": "fp32",
        "command": "test",
        "started_utc": "now",
    }

    result["inference"] = infer = bench.bench_inference(
        model, tokenizer, device, new_tokens=6, batch_sizes=[1, 2], image_size=64
    )
    assert infer["new_tokens"] == 6 and [r["batch"] for r in infer["batched_with_cache"]] == [1, 2]
    assert not any(r["oom"] for r in infer["batched_with_cache"])

    bench.prepare_for_training(model)
    assert model.is_gradient_checkpointing
    trainer = bench.make_trainer(model, "torch", torch.float32, device)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lm_head" in n for n in trainable)
    assert not any("vision_tower" in n or "image_encoder" in n for n in trainable)

    result["encoder_cache"] = cache = bench.bench_encoder_cache(
        model, tokenizer, trainer, device, text_tokens=80, sam_input=128, image_size=64, num_seg=2, steps=1
    )
    assert cache["cache_hits"] == {"clip": 1, "sam": 1} and cache["cache_misses"] == {"clip": 1, "sam": 1}
    assert "forward" not in vars(model.model.vision_tower) and "sam_image_embeddings" not in vars(model)  # restored

    result["training"] = train = bench.bench_training(
        model,
        tokenizer,
        trainer,
        device,
        micro_batches=[1, 2],
        text_tokens=80,
        sam_input=128,
        image_size=64,
        num_seg=2,
        steps=1,
        warmup=0,
        peak_flops=1e12,
        lora_r=8,
    )
    assert [r["micro_batch"] for r in train["rows"]] == [1, 2]
    assert all(not r["oom"] and r["losses_finite"] and r["mfu"] is not None for r in train["rows"])
    assert train["llm_tokens"] > train["text_tokens"] + model.config.num_image_tokens - 2
    flops = train["flops_per_sample"]
    assert flops["total"] == flops["llm"]["total"] + sum(flops["encoders_forward"].values())
    assert all(v > 0 for v in flops["encoders_forward"].values())

    result["profile"] = prof = bench.profile_training_step(
        model, tokenizer, trainer, device, micro_batch=1, text_tokens=80, sam_input=128, image_size=64, num_seg=2
    )
    assert prof["clock"] == "self CPU time" and prof["busy_seconds"] > 0 and prof["top"]
    assert sum(g["seconds"] for g in prof["groups"].values()) == pytest.approx(
        prof["busy_seconds"], abs=1e-3
    )  # groups rounded to 0.1 ms
    assert prof["groups"]["matmul"]["seconds"] > 0  # the LLM's linear layers are found and grouped
    assert prof["top"] == sorted(prof["top"], key=lambda r: -r["seconds"])

    numbers = list(_numbers({k: result[k] for k in ("inference", "encoder_cache", "training")}))
    assert numbers and all(math.isfinite(x) for x in numbers)
    for section, keys in [
        (
            infer,
            [
                "seconds_per_image_cache",
                "seconds_per_image_no_cache",
                "speedup_cache_vs_no_cache",
                "cpu_seconds_per_image_cache",
            ],
        ),
        (cache, ["step_seconds_encoders_run", "step_seconds_cached", "speedup"]),
        *[(r, ["step_seconds", "samples_per_s", "peak_memory_gb", "achieved_tflops", "mfu"]) for r in train["rows"]],
        *[(r, ["seconds", "images_per_min", "peak_memory_gb"]) for r in infer["batched_with_cache"]],
    ]:
        for key in keys:
            assert section[key] > 0, (key, section[key])

    result["targets"] = targets = bench.check_targets(result)
    assert len(targets) == 3 and all(t["met"] is None for t in targets)  # tiny on CPU proves nothing about 7B
    bench.write_markdown(result, tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert result["device"] in text and "| 2 |" in text and "dry run" in text
    assert "Where a step's time goes" in text and "| matmul |" in text


def test_targets_judged_only_for_legion_7b_on_cuda(bench):
    result = {
        "device_type": "cuda",
        "preset": "legion_7b",
        "training": {
            "rows": [
                {"micro_batch": 1, "oom": False, "mfu": 0.41, "peak_memory_gb": 30.0},
                {"micro_batch": 2, "oom": True, "peak_memory_gb": 79.0},
            ]
        },
        "inference": {"speedup_cache_vs_no_cache": 12.5, "new_tokens": 512},
    }
    targets = bench.check_targets(result)
    assert [t["met"] for t in targets] == [False, True, True]
    result["inference"]["new_tokens"] = 64
    assert bench.check_targets(result)[2]["met"] is None
    # micro-batch 2 fits on a 141 GB H200 but would not on an 80 GB GPU
    result["training"]["rows"][1] = {"micro_batch": 2, "oom": False, "mfu": 0.4, "peak_memory_gb": 90.0}
    assert bench.check_targets(result)[0]["met"] is False
    result["training"]["rows"][1]["peak_memory_gb"] = 60.0
    assert bench.check_targets(result)[0]["met"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA defaults")
def test_cli_defaults_without_cuda(bench):
    args = bench.parse_args([])
    assert (args.preset, args.device, args.dtype, args.peak_flops) == ("tiny", "cpu", "fp32", None)
    assert args.train and args.infer and args.cache and args.micro_batches == [1, 2, 4]
    args = bench.parse_args(["--infer", "--micro-batches", "1,3"])
    assert args.infer and not args.train and args.micro_batches == [1, 3]
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--micro-batches", "0,2"])


@pytest.mark.slow  # ~20 s: a fresh interpreter + DeepSpeed start-up
def test_main_writes_json_and_markdown_with_deepspeed(tmp_path):
    # A subprocess: DeepSpeed's process group and the RANK/WORLD_SIZE variables it sets stay out of this session.
    import os
    import subprocess

    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "gpu_full_size.py"),
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--engine",
        "deepspeed",
        "--threads",
        "1",
        "--text-tokens",
        "80",
        "--new-tokens",
        "4",
        "--micro-batches",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--image-size",
        "64",
        "--infer-batches",
        "1",
        "--output-dir",
        str(tmp_path),
        "--tag",
        "t",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_full_size_t.json").read_text())
    assert result["training"]["engine"] == "deepspeed" and result["dtype"] == "fp32"
    assert set(result) >= {"device", "torch", "preset", "inference", "encoder_cache", "training", "targets"}
    assert all(math.isfinite(x) for x in _numbers(result["training"]["rows"]))
    assert result["device"] in (tmp_path / "gpu_full_size_t.md").read_text()
