"""Train the configuration `dptrain plan` recommends with the shipped law, and compare the held-out
loss it reaches with the law's prediction.

The run uses the sweep's data and training protocol (optimizer, schedule, evaluation: the law is
conditional on them) and the plan's model, batch size, steps and noise, via `--write-config`.
From the repository root:

    python benchmarks/scaling_validation.py --compute 1e12 --epsilon 8
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from dptrain.data import PackedDataset
from dptrain.data.demo import prepare_demo
from dptrain.model import parameter_counts
from dptrain.scaling.law import load_law
from dptrain.scaling.plan import SHIPPED_LAW, plan, write_training_config
from dptrain.scaling.sweep import load_spec
from dptrain.train.config import load_train_config
from dptrain.train.trainer import Trainer


def flat(prefix: str, section: dict) -> list[str]:
    return [f"{prefix}.{k}={v}" for k, v in section.items() if not isinstance(v, (dict, list))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compute", type=float, default=1e12)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--spec", default="scaling/sweep-cpu.yaml")
    ap.add_argument("--out", default="runs/validate")
    args = ap.parse_args()

    base = load_spec(args.spec).base
    d = base["data"]
    data = prepare_demo(d["path"], seq_len=d["demo_seq_len"], vocab_size=d["demo_vocab_size"])
    n = len(PackedDataset(data, "train"))
    law = load_law(SHIPPED_LAW)
    best = plan(law, args.compute, args.epsilon, args.delta, n, d["demo_seq_len"], top=1)[0]
    print(f"plan ({law.method}): M {best.params:.3g} -> {best.nearest_config}, B {best.batch_size}, "
          f"T {best.steps}, sigma {best.sigma:.4g} (sigma_bar {best.sigma_bar:.3g}), "
          f"predicted loss {best.loss:.4f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "train.yaml"
    write_training_config(config, best, args.epsilon, args.delta, d["demo_seq_len"], str(data))
    # the sweep's protocol; the plan decides model, batch, steps and noise
    overrides = [f"out_dir={out / 'run'}", "logging.wandb=disabled", "checkpoint.every=0",
                 "optimizer.betas=[" + ",".join(map(str, base["optimizer"]["betas"])) + "]"]
    overrides += [o for key in ("optimizer", "schedule", "runtime", "eval")
                  for o in flat(key, base.get(key, {}))]
    cfg = load_train_config(config, overrides)
    start = time.perf_counter()
    trainer = Trainer(cfg, config_dir=config.parent)
    trainer.fit()
    wall = time.perf_counter() - start

    tail = [loss for _, loss in trainer.eval_history[-3:]]
    achieved = sum(tail) / len(tail)  # the sweep's final loss: mean of the last 3 eval points
    m = parameter_counts(trainer.model_cfg)[law.params_key if law.params_key == "total" else "non_embedding"]
    sigma_bar = trainer.noise_multiplier / cfg.privacy.expected_batch_size
    print(f"trained {best.nearest_config} ({m:,} params), B {cfg.privacy.expected_batch_size}, "
          f"T {cfg.privacy.steps}, sigma {trainer.noise_multiplier:.6g}, "
          f"epsilon {trainer.ledger.epsilon(args.delta, cfg.privacy.accountant):.3g} in {wall:.0f} s")
    print(f"achieved held-out loss {achieved:.4f}")
    for method in ("parametric", "semiparametric"):
        other = load_law(SHIPPED_LAW, method)
        pred = float(other.predict(m, cfg.privacy.steps, sigma_bar))
        print(f"{method:15s} predicts {pred:.4f} for the trained config: "
              f"error {(pred - achieved) / achieved:+.2%}")
    print(f"plan's prediction at its own M {best.params:.3g}: {best.loss:.4f} "
          f"({(best.loss - achieved) / achieved:+.2%})")


if __name__ == "__main__":
    main()
