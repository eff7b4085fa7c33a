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


def test_compare_inference_on_tiny(bench, tmp_path):
    """--compare's inference side: before and now in one process, each change alone, the dynamic decode with both
    attention settings, throughput and `legion infer` with and without loader workers; written after each."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    model, tokenizer = bench.build_benchmark_model("tiny", torch.float32, device)
    args = bench.parse_args(
        ["--compare", "--infer", "--new-tokens", "48", "--image-size", "64", "--compare-repeats", "1"]
        + ["--dynamic-tokens", "6", "--pipeline-images", "3", "--pipeline-workers", "0,1"]
    )
    result = {"device": "cpu", "device_type": "cpu", "torch": torch.__version__, "preset": "tiny", "dtype": "fp32"}
    result.update(command="test", started_utc="now", settings={})
    rec = bench.Recorder(result, tmp_path, "t")
    bench.compare_inference(model, tokenizer, device, args, rec)
    inf = json.loads((tmp_path / "gpu_full_size_t.json").read_text())["compare_inference"]
    for name in ("before", "now", "now_fused_projections", "now_but_sync_every_token", "now_but_torch_attention"):
        assert inf[name]["seconds"] > 0 and "error" not in inf[name], name
    assert inf["before"]["sync_every"] == 1 and inf["before"]["attention_backend"] == "torch"
    # fp32 on the CPU: the old and the new path, and the fused projections, give the same tokens
    assert inf["now_vs_before"]["tokens_equal"] == 1.0 and inf["fused_vs_now"]["tokens_equal"] == 1.0
    assert inf["dynamic_torch_attention"]["decoding"] == "dynamic" and inf["profile_dynamic_auto_attention"]["top"]
    assert {"now_batch_1", "now_batch_2", "before_batch_2"} <= set(inf)
    for workers in (0, 1):
        run = inf[f"legion_infer_workers_{workers}"]
        assert run["images"] == 3 and run["errors"] == 0 and run["masks_per_image"] == [3], run
    assert "--compare: inference" in (tmp_path / "gpu_full_size_t.md").read_text()
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # unfused again after the fused run


def test_scripted_answer_has_the_length_and_the_phrases(bench):
    from legion.model.builders import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    seg = tokenizer.convert_tokens_to_ids("[SEG]")
    for n in (40, 512):
        ids = bench.scripted_answer_ids(tokenizer, n)
        assert len(ids) == n and ids.count(seg) == 3
    with pytest.raises(ValueError, match="cannot hold"):
        bench.scripted_answer_ids(tokenizer, 10)


def test_recipe_defaults_flag_and_memory_bound(bench):
    recipe = bench.recipe_settings(torch.device("cpu"), 1)
    assert recipe["compile_layers"] and recipe["sequence_bucket"] == 128 and recipe["ce_chunk_size"] == 2048
    assert not recipe["gradient_checkpointing"] and recipe["micro_batch_size"] == 16  # no CUDA: the whole batch
    settings = {k: v for k, v in recipe.items() if k != "world_size"}
    assert bench.is_recipe_defaults(settings, recipe)
    assert not bench.is_recipe_defaults({**settings, "ce_chunk_size": None}, recipe)
    model, _ = bench.build_benchmark_model("tiny", torch.float32, torch.device("cpu"))
    limit = bench.decode_bandwidth_limit(model, 512, 100, 1, 4.8e12)
    assert limit["seconds"] > 0 and limit["weight_bytes"] > model.lm_head.weight.numel() * 4


@pytest.mark.slow  # ~60 s: both compare sides in a subprocess, DeepSpeed and a compiled tiny layer included
def test_main_compare_writes_both_sides_with_recipe_defaults(tmp_path):
    import os
    import subprocess

    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_full_size.py"), "--compare", "--threads", "1"]
    cmd += ["--new-tokens", "48", "--image-size", "64", "--compare-repeats", "1", "--dynamic-tokens", "4"]
    cmd += ["--compare-batches", "2", "--before-batches", "2", "--pipeline-images", "2", "--pipeline-workers", "1"]
    cmd += ["--text-tokens", "80", "--steps", "1", "--warmup", "1", "--output-dir", str(tmp_path), "--tag", "c"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_full_size_c.json").read_text())
    train = result["compare_training"]
    assert train["before_recipe"]["recipe_defaults"] is False
    defaults = [v for v in train.values() if isinstance(v, dict) and v.get("recipe_defaults")]
    assert len(defaults) == 1 and defaults[0]["settings"]["compile_layers"] and not defaults[0]["rows"][0]["oom"]
    assert any(v.get("recipe_defaults_8_gpus") for v in train.values() if isinstance(v, dict))
    assert "now" in result["compare_inference"]
    assert "--compare: training" in (tmp_path / "gpu_full_size_c.md").read_text()
