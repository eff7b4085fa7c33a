"""The loc/exp training recipe: configs, batch planning, DeepSpeed config, resume, encoder cache."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from legion.config import ConfigError, load_config
from legion.train.loc_exp import (
    BatchPlan,
    TrainConfig,
    build_deepspeed_config,
    build_optimizer,
    check_train_config,
    plan_batches,
    steps_per_epoch,
)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ fast checks
def test_paper_config_has_the_paper_settings():
    cfg = load_config(TrainConfig, REPO / "configs/legion_7b/train_loc_exp.yaml")
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-4, [0.9, 0.95], 0.0, 1.0)
    assert cfg.optim.warmup_steps == 100 and cfg.schedule.global_batch_size == 16
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.05)
    assert (cfg.loss.ce_weight, cfg.loss.bce_weight, cfg.loss.dice_weight) == (1.0, 0.4, 0.2)
    assert cfg.data.sam_input_size == 512 and cfg.data.max_length == 1536 - 575 == TrainConfig().data.max_length
    assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing == "auto"
    assert cfg.schedule.micro_batch_size == "auto" and cfg.model.compile_layers and cfg.model.sequence_bucket == 128
    assert cfg.loss.ce_chunk_size == 2048
    assert sorted(cfg.trainable.name_contains) == ["embed_tokens", "lm_head", "mask_decoder", "text_hidden_fcs"]
    check_train_config(cfg)  # `auto` is accepted before resolve_auto_settings replaces it

    ds = build_deepspeed_config(cfg, plan_batches(16, 8), schedule_total_steps=2109)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16,
        2,
        1,
    )
    assert ds["gradient_clipping"] == 1.0 and "optimizer" not in ds  # torch AdamW: nothing to compile
    assert ds["scheduler"] == {
        "type": "WarmupDecayLR",
        "params": {
            "total_num_steps": 2109,
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 1e-4,
            "warmup_num_steps": 100,
            "warmup_type": "linear",
        },
    }


def test_tiny_config_loads_and_rejects_typos():
    cfg = load_config(TrainConfig, REPO / "configs/tiny/train_loc_exp.yaml", ["optim.lr=3e-4"])
    assert cfg.optim.lr == 3e-4 and cfg.model.dtype == "float32"
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_config(TrainConfig, REPO / "configs/tiny/train_loc_exp.yaml", ["optim.lrr=3e-4"])


def test_module_lr_gives_each_module_its_peak_lr_through_the_schedule():
    """`optim.module_lr`: one AdamW group per key, and DeepSpeed's WarmupDecayLR warms each group up to
    its own peak, then decays it."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    model = torch.nn.ModuleDict(
        {"image_encoder": torch.nn.Linear(2, 2), "mask_decoder": torch.nn.Linear(2, 2), "layers": torch.nn.Linear(2, 2)}
    )
    cfg = load_config(
        TrainConfig,
        REPO / "configs/tiny/train_loc_exp.yaml",
        ["optim.lr=3e-3", "optim.warmup_steps=2", "optim.module_lr={image_encoder: 1.0e-3, mask_decoder: 2.0e-3}"],
    )
    optimizer = build_optimizer(model.named_parameters(), cfg.optim)
    groups = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    assert groups == [
        {id(p) for p in m.parameters()} for m in (model["layers"], model["image_encoder"], model["mask_decoder"])
    ]
    ds = build_deepspeed_config(cfg, plan_batches(8, 1), 10, optimizer)
    assert ds["scheduler"]["params"]["warmup_max_lr"] == [3e-3, 1e-3, 2e-3]
    schedule = WarmupDecayLR(optimizer, **ds["scheduler"]["params"])
    lrs = {}
    for _ in range(7):
        optimizer.step()
        schedule.step()
        lrs[schedule.last_batch_iteration] = [g["lr"] for g in optimizer.param_groups]
    assert lrs[1] == pytest.approx([1.5e-3, 0.5e-3, 1e-3])  # warming up
    assert lrs[2] == pytest.approx([3e-3, 1e-3, 2e-3])  # each group at its peak
    assert lrs[6] == pytest.approx([1.5e-3, 0.5e-3, 1e-3])  # half-way down (10 steps in all)

    model["mask_decoder"].requires_grad_(False)  # frozen: its key just has no group
    assert [g["name"] for g in build_optimizer(model.named_parameters(), cfg.optim).param_groups] == [
        "lr",
        "image_encoder",
    ]
    cfg.optim.module_lr = {"image_encoder": 1e-3, "image": 2e-3}  # a key shadowed by an earlier one: no group
    assert [g["name"] for g in build_optimizer(model.named_parameters(), cfg.optim).param_groups] == [
        "lr",
        "image_encoder",
    ]
    cfg.optim.module_lr = {"vision_tower": 1e-3}  # in no parameter name: a typo
    with pytest.raises(ConfigError, match="'vision_tower' is in no parameter name"):
        build_optimizer(model.named_parameters(), cfg.optim)


def test_a_dict_override_replaces_the_files_dict():
    path = REPO / "configs/tiny/train_loc_exp.yaml"
    assert load_config(TrainConfig, path).optim.module_lr == {"grounding_encoder.image_encoder": 1e-3}
    assert load_config(TrainConfig, path, ["optim.module_lr={mask_decoder: 2.0e-3}"]).optim.module_lr == {
        "mask_decoder": 2e-3
    }
    assert load_config(TrainConfig, path, ["optim.module_lr={}"]).optim.module_lr == {}


@pytest.mark.parametrize(
    "world, micro, expected",
    [
        (1, None, BatchPlan(1, 16, 16, 16, 1)),
        (8, None, BatchPlan(8, 16, 2, 2, 1)),
        (2, 2, BatchPlan(2, 16, 8, 2, 4)),
        (16, None, BatchPlan(16, 16, 1, 1, 1)),
    ],
)
def test_plan_batches_keeps_the_global_batch(world, micro, expected):
    plan = plan_batches(16, world, micro)
    assert plan == expected
    assert plan.world_size * plan.micro_batch * plan.grad_accum == 16


def test_plan_batches_errors_name_the_fix():
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        plan_batches(16, 3)
    with pytest.raises(ConfigError, match="does not divide the per-device batch 8"):
        plan_batches(16, 2, 3)


def test_steps_per_epoch_is_equal_on_all_ranks():
    # 11,236 SynthScars records, global 16: 702 full steps on 1 or 8 ranks (shares of 1404/1405 records)
    assert steps_per_epoch(11236, plan_batches(16, 1)) == 702
    assert steps_per_epoch(11236, plan_batches(16, 8)) == 702
    assert steps_per_epoch(10, plan_batches(4, 2)) == 2


def _fake_outputs(dtype, count, seed):
    """Model outputs with random loss terms (one term missing, as without masks)."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(seed)

    def term():
        return (torch.rand((), generator=gen) * 10).to(dtype)

    return [
        SimpleNamespace(loss=term(), ce_loss=term(), bce_loss=term(), dice_loss=term(), mask_loss=None)
        for _ in range(count)
    ]


@pytest.mark.parametrize(
    "dtype, grad_accum, world", [(torch.float32, 1, 1), (torch.float32, 3, 2), (torch.bfloat16, 7, 1)]
)
def test_step_losses_stay_on_the_device_and_match_the_python_float_sums(monkeypatch, dtype, grad_accum, world):
    """A micro-batch's loss terms are added on the device, with no conversion to Python numbers (a host sync
    on a GPU); when a log line is due, the values equal the previous implementation's Python-float sums
    (term / accumulation, float64, in micro-batch order) bit for bit."""
    from legion.train.loc_exp import LOSS_KEYS, StepLosses, loss_terms

    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(world))  # `world` identical ranks
    losses = StepLosses(torch.device("cpu"), grad_accum)
    for step in range(2):
        outs = _fake_outputs(dtype, grad_accum, seed=step)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__"):
                m.setattr(torch.Tensor, name, lambda *a, _name=name: pytest.fail(f"Tensor.{_name}: a host sync"))
            for out in outs:
                losses.add(out)
        previous = {k: 0.0 for k in LOSS_KEYS}
        for out in outs:
            for k, v in loss_terms(out).items():
                previous[k] += v / grad_accum
        expected = {k: v * world / world for k, v in previous.items()}
        assert losses.mean_over_ranks(world) == expected
        losses.reset()


def test_cli_help_lists_config_keys():
    out = subprocess.run(
        [sys.executable, "-m", "legion.cli", "train", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0
    assert "schedule.global_batch_size" in out.stdout and "checkpoint.resume" in out.stdout


# ------------------------------------------------------------------------------- real training runs
def _overrides(model_dir, data_dir, out_dir, **extra):
    values = {
        "model.path": model_dir,
        "data.root": data_dir,
        "output_dir": out_dir,
        "data.val_size": 2,
        "data.num_workers": 0,
        "schedule.global_batch_size": 4,
        "schedule.micro_batch_size": 2,
        "schedule.max_steps": 3,
        "optim.warmup_steps": 2,
        "checkpoint.every_steps": 1,
        "checkpoint.keep_last": 2,
        "validation.every_steps": 100,
        "logging.progress": "false",
        "export.merged_model": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the recipe sets up its own single-process group
    return env


def _train_cmd(overrides):
    return [
        sys.executable,
        "-m",
        "legion.cli",
        "train",
        "--config",
        str(REPO / "configs/tiny/train_loc_exp.yaml"),
        *overrides,
    ]


def _final_weights(out_dir):
    from legion.merge import fp32_state_dict_from_deepspeed

    state, _ = fp32_state_dict_from_deepspeed(Path(out_dir) / "checkpoints")
    return state


def _events(out_dir, kind):
    path = Path(out_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == kind]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, toy_data_dir, tmp_path):
    """SIGKILL after the first checkpoint, `resume: auto`: same final weights as an uninterrupted run.

    10 training images, global batch 4 (micro 2 x accumulation 2): 2 steps per epoch, 3 steps, so
    the resumed run continues mid-epoch and crosses into the next epoch's shuffle."""
    reference = tmp_path / "uninterrupted"
    subprocess.run(
        _train_cmd(_overrides(tiny_model_dir, toy_data_dir, reference)),
        env=_env(),
        check=True,
        cwd=REPO,
        timeout=900,
        stdout=subprocess.DEVNULL,
    )

    killed = tmp_path / "killed"
    cmd = _train_cmd(_overrides(tiny_model_dir, toy_data_dir, killed))
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not _events(killed, "checkpoint") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = [e["step"] for e in _events(killed, "checkpoint")]
    assert saved and saved[-1] < 3, f"the run was not killed mid-way (checkpoints at {saved})"

    subprocess.run(cmd, env=_env(), check=True, cwd=REPO, timeout=900, stdout=subprocess.DEVNULL)
    starts = _events(killed, "start")
    assert starts[-1]["resumed"] is True and starts[-1]["step"] == saved[-1]
    # the resumed run logs the same lr and loss for the steps after the checkpoint
    ref_steps = {e["step"]: e for e in _events(reference, "train")}
    for e in _events(killed, "train")[-(3 - saved[-1]) :]:
        assert e["lr"] == ref_steps[e["step"]]["lr"]
        assert e["loss"] == pytest.approx(ref_steps[e["step"]]["loss"], rel=1e-6)
    expected, got = _final_weights(reference), _final_weights(killed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)


@pytest.mark.slow
def test_encoder_cache_gives_identical_training(tiny_model_dir, toy_data_dir, tmp_path):
    """Two epochs with and without the frozen-encoder cache: same weights; epoch 2 never runs the encoders."""
    from legion.train.loc_exp import train

    runs = {}
    for enabled in (False, True):
        out = tmp_path / f"cache_{enabled}"
        cfg = load_config(
            TrainConfig,
            REPO / "configs/tiny/train_loc_exp.yaml",
            _overrides(
                tiny_model_dir,
                toy_data_dir,
                out,
                **{
                    "encoder_cache.enabled": enabled,
                    "schedule.max_steps": "null",
                    "schedule.epochs": 2,
                    "schedule.global_batch_size": 10,
                    "schedule.micro_batch_size": 5,
                    "checkpoint.every_steps": 100,
                    # the cache needs frozen encoders (the tiny config trains its random SAM encoder)
                    "trainable.name_contains": "[lm_head,embed_tokens,mask_decoder,text_hidden_fcs,"
                    "model.layers.,model.norm.]",
                },
            ),
        )
        runs[enabled] = train(cfg), _final_weights(out)
    summary, cached_weights = runs[True]
    _, plain_weights = runs[False]
    # 10 training images, one step of 10 per epoch, + 2 validation images at the end:
    # every image is encoded once, epoch 2 only reads the cache
    assert summary["steps"] == 2
    assert summary["encoder_cache"]["misses"] == {"clip": 12, "sam": 12}
    assert summary["encoder_cache"]["hits"] == {"clip": 10, "sam": 10}
    for key in plain_weights:
        torch.testing.assert_close(cached_weights[key], plain_weights[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow  # ~40 s: inductor compiles the tiny decoder layer on the CPU
def test_compiled_layers_give_the_same_loss_and_gradients(tiny_model_dir, toy_data_dir):
    from legion.data.synthscars import collate
    from legion.train.loc_exp import build_datasets, prepare_model

    results = {}
    for compiled in (False, True):
        cfg = load_config(
            TrainConfig,
            REPO / "configs/tiny/train_loc_exp.yaml",
            [
                f"model.path={tiny_model_dir}",
                f"data.root={toy_data_dir}",
                "data.val_size=0",
                "lora.dropout=0",
                f"model.compile_layers={str(compiled).lower()}",
            ],
        )
        torch.manual_seed(0)  # LoRA A is initialised from the global RNG
        model, tokenizer, _ = prepare_model(cfg, torch.device("cpu"))
        train_set, _, _ = build_datasets(cfg, tokenizer, model.config)
        batch = collate([train_set[i] for i in range(2)], pad_id=tokenizer.pad_token_id or 0)
        model.train()
        out = model(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "model.layers." in n and p.grad is not None}
        results[compiled] = float(out.loss), grads
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results[False], results[True]
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager_grads.keys() == compiled_grads.keys() and any("lora_A" in n for n in eager_grads)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.slow
def test_train_converts_losses_to_host_only_when_a_log_line_is_due(tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    """logging.every_steps=2 on a 3-step run (micro 2 x accumulation 2): the loss terms reach the host at
    steps 2 and 3 only, never per micro-batch, and the logged values equal the previous implementation's
    (each micro-batch's terms as Python floats, / accumulation, summed)."""
    from legion.train import loc_exp

    host_terms = loc_exp.loss_terms
    micro_terms, logged, loop_conversions = [], [], []
    add, mean_over_ranks = loc_exp.StepLosses.add, loc_exp.StepLosses.mean_over_ranks

    def recording_add(self, out):
        micro_terms.append(host_terms(out))  # the previous per-micro-batch conversion, for the comparison only
        add(self, out)

    def recording_mean(self, world_size):
        values = mean_over_ranks(self, world_size)
        previous = {k: 0.0 for k in loc_exp.LOSS_KEYS}
        for terms in micro_terms[-self.grad_accum :]:  # this step's micro-batches
            for k, v in terms.items():
                previous[k] += v / self.grad_accum
        logged.append((values, {k: v / world_size for k, v in previous.items()}))
        return values

    monkeypatch.setattr(loc_exp.StepLosses, "add", recording_add)
    monkeypatch.setattr(loc_exp.StepLosses, "mean_over_ranks", recording_mean)
    monkeypatch.setattr(loc_exp, "loss_terms", lambda out: loop_conversions.append(1) or host_terms(out))
    out_dir = tmp_path / "run"
    cfg = load_config(
        TrainConfig,
        REPO / "configs/tiny/train_loc_exp.yaml",
        _overrides(tiny_model_dir, toy_data_dir, out_dir, **{"logging.every_steps": 2, "data.val_size": 0}),
    )
    assert loc_exp.train(cfg)["steps"] == 3
    assert len(micro_terms) == 6 and not loop_conversions  # no validation: nothing else converts losses
    train_events = _events(out_dir, "train")
    assert [e["step"] for e in train_events] == [2, 3] and len(logged) == 2
    for event, (values, previous) in zip(train_events, logged):
        assert values == previous
        assert {k: event[k] for k in loc_exp.LOSS_KEYS} == previous
