"""Where a run keeps what must never be published, and with which file modes.

Everything a run writes is public (config, logs, metrics, report, checkpoint weights, exports)
except its private state: each checkpoint's `train_state.pt` (the run's secret, private
statistics) and the run folder's `private/` folder (outputs computed from private data without
noise: audit data, per-sequence memorization results). Both are readable by their owner only
(files 0600, folders 0700), and nothing that exports or shares a run copies them.
"""
from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR = "private"
FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(out_dir: str | Path) -> Path:
    """`<out_dir>/private`, made owner-only (and made so again if it already existed)."""
    folder = Path(out_dir) / PRIVATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, DIR_MODE)
    return folder


def make_private(path: str | Path) -> Path:
    """Make an existing file or folder (recursively) readable by its owner only."""
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, DIR_MODE)
            for name in files:
                os.chmod(Path(root) / name, FILE_MODE)
    else:
        os.chmod(path, FILE_MODE)
    return path
