"""Where training metrics go: a local JSONL file always, wandb when enabled.

Metrics computed on private batches (training loss, gradient norms, clipping rates) are released
without noise, so they fall outside the (ε, δ) guarantee: they are logged only with
`logging.private_metrics`, each key prefixed `private/` so nobody mistakes them for protected output.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from dptrain.train.config import LoggingConfig


class MetricsLog:
    def __init__(self, out_dir: Path, cfg: LoggingConfig, run_config: dict, resume_step: int = 0):
        self.path = out_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._file = self.path.open("a")
        self._wandb = None
        if cfg.wandb != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            import wandb

            self._wandb = wandb.init(project=cfg.project, name=cfg.run_name, mode=cfg.wandb,
                                     dir=str(out_dir), config=run_config, resume="allow")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint: those steps are about to be redone."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(row + "\n" for row in rows))

    def log(self, step: int, metrics: dict) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
