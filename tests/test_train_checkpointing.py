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


# ------------------------------------------------------------------------ issue 20: items 4 and 7
def _saved(tmp_path, steps=(1, 2), keep_last=3):
    engine = _engine()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=keep_last)
    for step in steps:
        _train(engine, 1)
        manager.save(engine, step, {"step": step})
    return engine, manager, tmp_path / "ckpt"


def _listing(folder):
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))}


def test_a_complete_tmp_is_completed_not_deleted(tmp_path, dist_env):
    """Killed after every rank wrote `<tag>.tmp` but before the rename (or, re-saving a step, between moving the
    old tag aside and the rename): `latest` names a tag whose only copy is the complete `.tmp`. Resume starts
    by cleaning up; that must put the tag in place, not delete it."""
    _, manager, ckpt = _saved(tmp_path)
    os.rename(ckpt / "global_step2", ckpt / "global_step2.tmp")  # complete: trainer_state.json is inside
    (ckpt / ".latest.tmp-123-0badc0de").write_text("global_st")  # a torn atomic write of `latest`
    (ckpt / "global_step1.tmp").mkdir()  # a partial save, no trainer_state.json: removed
    manager.recover()  # what resume ran first
    assert manager.latest_tag() == "global_step2" and manager.complete_tags() == ["global_step1", "global_step2"]
    assert not [p.name for p in ckpt.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert manager.load(_engine()) == {"step": 2}


@pytest.mark.parametrize("latest", [b"\xff\xfe garbage", b"global_step9", b"", b"../../etc/passwd", None])
def test_latest_problems_resume_from_the_newest_complete_tag(tmp_path, dist_env, capsys, latest):
    """A garbage, dangling or deleted `latest`: resume from the newest complete checkpoint, overwrite nothing.
    (The error used to say: delete `latest`; doing so made `resume: auto` start again at step 0, overwrite
    global_step2 and prune global_step1.)"""
    _, manager, ckpt = _saved(tmp_path)
    before = _listing(ckpt)
    if latest is None:
        (ckpt / "latest").unlink()
    else:
        (ckpt / "latest").write_bytes(latest)
    manager.recover()
    assert manager.resume_tag() == "global_step2"
    err = capsys.readouterr().err
    assert "resuming from the newest complete checkpoint, global_step2" in err and "delete" not in err
    assert {k: v for k, v in _listing(ckpt).items() if k != "latest"} == {
        k: v for k, v in before.items() if k != "latest"
    }
    assert manager.load(_engine(), manager.resume_tag()) == {"step": 2}


def test_latest_problems_without_a_checkpoint_to_fall_back_on_are_refused(tmp_path, dist_env):
    from legion.config import ConfigError
    from legion.train.checkpointing import ResumeError

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("global_step5")
    with pytest.raises(ResumeError, match="names 'global_step5'.*Nothing was changed") as info:
        CheckpointManager(ckpt).resume_tag()
    assert "delete" not in str(info.value)
    (ckpt / "latest").unlink()
    (ckpt / "global_step3").mkdir()  # not ours (no trainer_state.json), no `latest`
    with pytest.raises(ResumeError, match="global_step3.*would overwrite them"):
        CheckpointManager(ckpt).resume_tag()
    # resume: none over existing checkpoints would overwrite and prune them: refused too
    _, manager, _ = _saved(tmp_path / "other")
    with pytest.raises(ConfigError, match="checkpoint.resume=none.*global_step1, global_step2"):
        manager.check_fresh_start()


def test_torch_write_error_during_a_checkpoint_is_a_checkpoint_write_error(tmp_path, dist_env, monkeypatch):
    """A full disk makes torch.save raise RuntimeError ("... file write failed"), not OSError."""
    engine, manager, ckpt = _saved(tmp_path, steps=(1,))
    before = _listing(ckpt)

    def full_disk(state_dict, path):  # writes part of the file, then fails as torch does on a full disk
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
            "file write failed"
        )

    monkeypatch.setattr(engine.checkpoint_engine, "save", full_disk)
    _train(engine, 1)
    with pytest.raises(CheckpointWriteError, match=r"'global_step2' .*\(disk full\?, [\d.]+ GiB free there\): "):
        manager.save(engine, 2, {"step": 2})
    assert _listing(ckpt) == before  # the partial global_step2.tmp is gone, latest and global_step1 untouched
    monkeypatch.undo()
    assert manager.load(_engine()) == {"step": 1}


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    import shutil
    import subprocess

    mount = tmp_path / "small_disk"
    mount.mkdir()
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_a_checkpoint_cleans_up_and_keeps_the_previous_one(small_tmpfs, dist_env):
    """The real thing: the checkpoint folder is on a 1 MiB tmpfs that fills up during the second save."""
    engine = _engine()
    manager = CheckpointManager(small_tmpfs / "ckpt", keep_last=3)
    _train(engine, 1)
    manager.save(engine, 1, {"step": 1})
    before = _listing(small_tmpfs / "ckpt")
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    (small_tmpfs / "filler").write_bytes(b"\0" * (free - 8 * 1024))  # 8 KiB left: less than one checkpoint
    _train(engine, 1)
    with pytest.raises(CheckpointWriteError, match=r"'global_step2' .*\(disk full\?"):
        manager.save(engine, 2, {"step": 2})
    assert _listing(small_tmpfs / "ckpt") == before
    (small_tmpfs / "filler").unlink()
    assert manager.load(_engine()) == {"step": 1}
