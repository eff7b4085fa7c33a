"""The top-level scripts never `cd`: they find the repository from their own path and leave relative
paths to the user's current directory."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_loc_exp.sh", "merge_step1.sh", "merge_step2.sh", "infer_loc_exp.sh", "train_cls.sh", "eval_cls.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_share_one_preamble(name):
    text = (REPO / name).read_text()
    assert not re.search(r"^\s*cd\b", text, re.MULTILINE)
    assert 'REPO="$(cd "$(dirname "$0")" && pwd)"' in text
    venv = '"$REPO/.venv/bin/python"'
    assert f'PYTHON="${{PYTHON:-$( [ -x {venv} ] && echo {venv} || echo python )}}"' in text
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert all("$REPO/configs/" in line for line in code if "configs/" in line)


def test_a_script_run_from_elsewhere_resolves_paths_from_there(tmp_path):
    (tmp_path / "ckpt").mkdir()  # relative to the cwd below, not to the repository
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "merge_step1.sh"), "ckpt", "w.safetensors"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == "legion merge step1: error: ckpt has no 'latest' file; pass --tag (found: nothing)\n"


def test_download_script_dry_run_names_the_documented_layout(tmp_path):
    env = {**os.environ, "DRY_RUN": "1"}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts/download_weights.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    commands = proc.stdout.splitlines()
    expected = [
        ("MBZUAI/GLaMM-GranD-Pretrained", "checkpoints/GLaMM-GranD-Pretrained"),
        ("openai/clip-vit-large-patch14-336", "checkpoints/clip-vit-large-patch14-336"),
        ("khr0516/legion_LE", "checkpoints/legion_LE"),
        ("khr0516/SynthScars", "data/SynthScars"),
    ]
    for (repo_id, folder), line in zip(expected, commands):
        assert f"download {repo_id} " in line and line.endswith(f"--local-dir {REPO / folder}")
    assert "--repo-type dataset" in commands[3]
    readme = (REPO / "README.md").read_text()
    assert all(folder in readme for _, folder in expected)  # the README's cluster section names the same places
    bad = subprocess.run(
        ["bash", str(REPO / "scripts/download_weights.sh"), "weights"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown item" in bad.stderr
