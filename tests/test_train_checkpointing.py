"""CheckpointManager on a small DeepSpeed engine (ZeRO-2, CPU, gloo, one process)."""

import errno
import json
import os
import socket

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

from legion.train.checkpointing import CheckpointManager, CheckpointWriteError  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_env():
    for key, value in dict(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    ).items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo")
    yield


def _engine(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 1.0,
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0,
                "warmup_max_lr": 0.1,
                "warmup_num_steps": 2,
                "total_num_steps": 20,
                "warmup_type": "linear",
            },
        },
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _train(engine, steps):
    for _ in range(steps):
        x = torch.randn(4, 8)  # global RNG: resume must restore it
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()


def _weights(engine):
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_save_resume_matches_uninterrupted(tmp_path, dist_env):
    torch.manual_seed(123)
    ref = _engine()
    _train(ref, 7)
    expected = _weights(ref)

    torch.manual_seed(123)
    first = _engine()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    _train(first, 4)
    manager.save(first, 4, {"step": 4, "sampler": {"epoch": 0, "position": 16}})
    lr_at_save = first.get_lr()[0]
    _train(first, 2)  # progress after the checkpoint is lost, like a killed run

    torch.manual_seed(999)  # a fresh process has other RNG states; load must restore them
    resumed = _engine(seed=5)
    state = manager.load(resumed)
    assert state == {"step": 4, "sampler": {"epoch": 0, "position": 16}}
    assert resumed.global_steps == 4
    assert resumed.get_lr()[0] == lr_at_save < 0.1
    _train(resumed, 3)
    for key, value in expected.items():
        torch.testing.assert_close(_weights(resumed)[key], value, rtol=0, atol=0)


def test_latest_and_keep_last(tmp_path, dist_env):
    engine = _engine()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    for step in (1, 2, 3):
        _train(engine, 1)
        manager.save(engine, step, {"step": step})
    assert manager.complete_tags() == ["global_step2", "global_step3"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step3"
    assert json.loads((tmp_path / "ckpt" / "global_step3" / "trainer_state.json").read_text()) == {"step": 3}
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")]


def test_failed_write_keeps_previous_checkpoint(tmp_path, dist_env, monkeypatch):
    engine = _engine()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    _train(engine, 1)
    manager.save(engine, 1, {"step": 1})
    before = sorted(p.name for p in (tmp_path / "ckpt" / "global_step1").iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.checkpoint_engine, "save", disk_full)
    _train(engine, 1)
    with pytest.raises(CheckpointWriteError, match=r"global_step2.*disk full.*global_step1"):
        manager.save(engine, 2, {"step": 2})
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step1"
    assert manager.complete_tags() == ["global_step1"]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "global_step1").iterdir()) == before
    assert not (tmp_path / "ckpt" / "global_step2.tmp").exists()
    # ... and the intact checkpoint still loads
    monkeypatch.undo()
    assert manager.load(_engine()) == {"step": 1}


def test_dangling_latest_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("global_step7")
    with pytest.raises(FileNotFoundError, match="global_step7"):
        CheckpointManager(ckpt).latest_tag()
