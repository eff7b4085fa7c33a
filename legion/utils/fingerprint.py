"""A cheap content fingerprint of a model (or detector, or CLIP) folder: enough to tell two checkpoints
apart without hashing 16 GB.

    fingerprint_dir("checkpoints/legion_7b")  ->  "9f2c...": sha256 over every relevant file's
                                                  relative path, size and content sample

Relevant files: weights (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, ``.gguf``), JSON files (config,
weight index, tokenizer) and tokenizer models, in sub-folders too (``vision_tower/``); hidden files and
records of how the folder was made (``run_info.json``, ``merge_report.json``, ``README.md``) are left out,
so re-writing a card changes nothing. A file up to 2 MiB is hashed whole; a larger one by its first and
last MiB (a safetensors header and the first and last tensors in key order: in a LEGION export the
trained ``lm_head`` comes first and ``text_hidden_fcs`` last) plus its size. Two exports that differ only
in tensors in the middle of a large shard and have identical sizes would collide: this is a guard
against reusing results of another model, not a checksum.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SAMPLE_BYTES = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model")
IGNORED_NAMES = ("run_info.json", "merge_report.json", "README.md")


def _file_digest(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= 2 * SAMPLE_BYTES:
            digest.update(fh.read())
        else:
            digest.update(fh.read(SAMPLE_BYTES))
            fh.seek(size - SAMPLE_BYTES)
            digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()


def fingerprint_dir(path: str | os.PathLike) -> str | None:
    """sha256 hex of the folder's relevant files (module docstring); of the file itself when `path` is a
    file; None when it does not exist."""
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or name in IGNORED_NAMES or name.endswith(".run_info.json"):
                    continue
                if name.endswith(WEIGHT_SUFFIXES):
                    files.append(Path(dirpath) / name)
    else:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        rel = file.name if file == root else file.relative_to(root).as_posix()
        digest.update(os.fsencode(rel) + b"\0" + str(size).encode() + b"\0" + _file_digest(file, size).encode())
    return digest.hexdigest()
