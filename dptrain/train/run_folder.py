"""The layout of a run folder, and the lock that keeps it to one run at a time.

    <out_dir>/train_config.yaml      the config (public)
    <out_dir>/metrics.jsonl          logged metrics (public)
    <out_dir>/privacy_report.json    the final report (public)
    <out_dir>/privacy_journal.jsonl  every released step, before it leaves (public)
    <out_dir>/checkpoints/step-*/    weights, config, ledger, report (public); train_state.pt (private, 0600)
    <out_dir>/private/               un-noised outputs of private data (0700; see dptrain.privacy.private_files)
    <out_dir>/.lock                  held by the run using the folder

Two runs on one folder would journal every step twice and overwrite each other's checkpoints:
the second is refused with one line.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dptrain.errors import UserError
from dptrain.privacy.journal import JOURNAL_FILE

TRAIN_CONFIG_FILE = "train_config.yaml"
LOCK_FILE = ".lock"


class RunFolder:
    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir)
        self._lock = None

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def journal(self) -> Path:
        return self.path / JOURNAL_FILE

    @property
    def config(self) -> Path:
        return self.path / TRAIN_CONFIG_FILE

    def create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"out_dir {self.path} is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create out_dir {self.path} ({err.strerror})") from None
        if not os.access(self.path, os.W_OK):
            raise UserError(f"out_dir {self.path} is not writable")

    def lock(self) -> None:
        """Take the folder for this process; UserError when another run holds it. The OS drops the
        lock when the process ends, however it ends, so a crashed run never blocks its resume."""
        self.create()
        handle = (self.path / LOCK_FILE).open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"another run is using out_dir {self.path}: wait for it to end, or use a "
                            "new out_dir") from None
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
