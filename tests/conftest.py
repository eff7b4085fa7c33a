"""Shared test setup: offline, CPU DeepSpeed, repo-local caches. Fixtures live in fixtures_*.py."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread per process is faster than two competing ones (and tests that launch
# two DeepSpeed ranks get one core each). Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["tests.fixtures_model", "tests.fixtures_data", "tests.fixtures_controller"]
