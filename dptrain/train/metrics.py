"""Where training metrics go: a local JSONL file always, wandb when enabled.

Metrics computed on private batches (training loss, gradient norms, clipping rates) are released
without noise, so they fall outside the (ε, δ) guarantee: they are logged only with
`logging.private_metrics`, each key prefixed `private/` so nobody mistakes them for protected output.
So is a step's wall time (and tokens/s, MFU): it grows with the number of micro-batches, that is
with the realised, private batch size (r = 0.84 measured on the 2-core CPU machine).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from dptrain.model import training_flops_per_token
from dptrain.train.config import LoggingConfig


class MetricsLog:
    def __init__(self, out_dir: Path, cfg: LoggingConfig, run_config: dict, resume_step: int = 0):
        self.path = out_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._file = self.path.open("a")
        self._wandb = None
        if cfg.wandb != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            import wandb

            # quiet: no 20-line summary at the end; console off: the run's terminal output is not
            # copied into the (synced) wandb run
            self._wandb = wandb.init(project=cfg.project, name=cfg.run_name, mode=cfg.wandb,
                                     dir=str(out_dir), config=run_config, resume="allow",
                                     settings=wandb.Settings(quiet=True, console="off"))

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


class NoLog:
    """Ranks other than 0 log nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def private_metrics(result, clip: float) -> dict:
    """Un-noised statistics of the private batch: outside the guarantee (logging.private_metrics)."""
    return {
        "private/batch_size": result.batch_size,
        "private/clipped_fraction": float((result.norms > clip).float().mean()) if len(result.norms) else 0.0,
        "private/grad_norm_median": float(result.norms.median()) if len(result.norms) else 0.0,
        "private/train_loss": float(result.losses.mean()) if len(result.losses) else None,
    }


def timing_metrics(seconds: float, model_cfg, seq_len: int, expected_rows: int, device: torch.device) -> dict:
    """Step time, throughput of the expected batch and MFU: private, since the time is the drawn batch's."""
    tokens_per_second = expected_rows * (seq_len - 1) / seconds
    out = {"private/step_seconds": seconds, "private/expected_tokens_per_second": tokens_per_second}
    if device.type == "cuda":
        out["private/mfu"] = mfu(tokens_per_second * training_flops_per_token(model_cfg, seq_len - 1), device)
    return out


# Dense bf16 peak of common accelerators, for the MFU figure.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def mfu(flops_per_second: float, device: torch.device) -> float:
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), math.nan)
    return flops_per_second / peak
