"""Differentially private gradients: exact per-example clipping, noise, normalisation."""
from dptrain.dp.engine import DPEngine, EngineStats, clipped_grad_sum
from dptrain.dp.head import model_head_loss
from dptrain.dp.loss import IGNORE_INDEX, per_example_loss

__all__ = ["DPEngine", "EngineStats", "clipped_grad_sum", "model_head_loss", "per_example_loss", "IGNORE_INDEX"]
