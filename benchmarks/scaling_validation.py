"""Train what `dptrain plan` recommends, and model sizes next to it at the same compute, and compare
the held-out losses they reach with the law's predictions.

The plan's configuration (the shipped model config nearest its M, its batch, steps and σ, written
by `--write-config`, σ recalibrated with the PLD accountant as there) is trained with the sweep's data
and protocol (optimizer, schedule, evaluation: the law is conditional on them), once per seed. Each comparison model is trained at the same batch
and compute (T = C / (6 M B S)), σ calibrated by the trainer to the same (ε, δ). A seed sets the
public initial weights; sampling and noise draw a fresh secret every run. From the repository root:

    python benchmarks/scaling_validation.py --law LAW.json --spec scaling/sweep-cpu-v3.yaml \
        --compute 4e12 --epsilon 8 --seeds 0 1
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from dptrain.data import PackedDataset
from dptrain.data.demo import prepare_demo
from dptrain.model import DecoderConfig, parameter_counts
from dptrain.scaling.law import load_law
from dptrain.scaling.noise import confirm_pld
from dptrain.scaling.plan import MODEL_CONFIG_DIR, SHIPPED_LAW, plan, replan_with_sigma, write_training_config
from dptrain.scaling.sweep import load_spec
from dptrain.train.config import load_train_config
from dptrain.train.trainer import Trainer


def flat(prefix: str, section: dict) -> list[str]:
    return [f"{prefix}.{k}={v}" for k, v in section.items() if not isinstance(v, (dict, list))]


def neighbours(config: str) -> list[str]:
    """The shipped ladder rungs just below and above `config` (by total parameters)."""
    sizes = {p.stem: parameter_counts(DecoderConfig.from_yaml(p))["total"]
             for p in MODEL_CONFIG_DIR.glob("ladder-*.yaml")}
    order = sorted(sizes, key=sizes.get)
    i = order.index(config)
    return [name for name in (order[i - 1] if i else None, order[i + 1] if i + 1 < len(order) else None) if name]


def train(config: Path, overrides: list[str]) -> tuple[Trainer, float]:
    cfg = load_train_config(config, overrides)
    start = time.perf_counter()
    trainer = Trainer(cfg, config_dir=config.parent)
    trainer.fit()
    return trainer, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compute", type=float, default=1e12)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=None, help="default: the sweep's delta")
    ap.add_argument("--law", default=str(SHIPPED_LAW))
    ap.add_argument("--method", default=None, help="law method (default: the file's default)")
    ap.add_argument("--spec", default="scaling/sweep-cpu-v3.yaml", help="sweep whose data and protocol to use")
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--min-params", type=float, default=None,
                    help="smallest model the planner considers (default: the law's smallest fitted model)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--compare", nargs="*", default=None,
                    help="model configs to train at the same compute (default: the rungs next to the plan's)")
    ap.add_argument("--out", default="runs/validate")
    args = ap.parse_args()

    base = load_spec(args.spec).base
    d = base["data"]
    data = (prepare_demo(d["path"], seq_len=d["demo_seq_len"], vocab_size=d["demo_vocab_size"])
            if d.get("source") == "demo" else Path(d["path"]))
    train_split = PackedDataset(data, "train")
    n, seq_len = len(train_split), train_split.seq_len
    delta = base["privacy"]["delta"] if args.delta is None else args.delta
    law = load_law(args.law, args.method)
    min_params = law.validity["M"][0] if args.min_params is None else args.min_params
    best = plan(law, args.compute, args.epsilon, delta, n, seq_len, top=1,
                max_steps=args.max_steps, min_params=min_params)[0]
    best = replan_with_sigma(law, best, confirm_pld(args.epsilon, delta, best.batch_size / n, best.steps),
                             seq_len, "pld")  # as `dptrain plan --write-config` does
    print(f"plan ({law.method}, {args.law}): C {args.compute:.3g}, eps {args.epsilon:g}, N {n}: M {best.params:.3g} "
          f"-> {best.nearest_config}, B {best.batch_size}, T {best.steps}, sigma {best.sigma:.4g} "
          f"(sigma_bar {best.sigma_bar:.3g}), predicted loss {best.loss:.4f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "train.yaml"
    write_training_config(config, best, args.epsilon, delta, seq_len, str(data))
    # the sweep's protocol; the plan decides model, batch, steps and noise
    protocol = ["logging.wandb=disabled", "checkpoint.every=0",
                "optimizer.betas=[" + ",".join(map(str, base["optimizer"]["betas"])) + "]"]
    protocol += [o for key in ("optimizer", "schedule", "runtime", "eval") for o in flat(key, base.get(key, {}))]
    seq_tokens = seq_len - 1  # tokens predicted per sequence, as the planner counts S
    runs, predictions = {}, {}
    for name in [best.nearest_config, *(neighbours(best.nearest_config) if args.compare is None else args.compare)]:
        m = parameter_counts(DecoderConfig.from_yaml(MODEL_CONFIG_DIR / f"{name}.yaml"))["total"]
        if name == best.nearest_config:
            steps, change = best.steps, []
        else:  # the same compute and batch: fewer steps for a larger model; σ for the same budget
            steps = max(1, round(args.compute / (6 * m * best.batch_size * seq_tokens)))
            change = [f"model={(MODEL_CONFIG_DIR / f'{name}.yaml').resolve()}", f"privacy.steps={steps}",
                      "privacy.noise_multiplier=null"]
        for seed in args.seeds:
            trainer, wall = train(config, [*protocol, *change, f"runtime.init_seed={seed}",
                                           f"out_dir={out / f'{name}-s{seed}'}"])
            tail = [loss for _, loss in trainer.eval_history[-3:]]
            achieved = sum(tail) / len(tail)  # the sweep's final loss: mean of the last 3 eval points
            sigma_bar = trainer.noise_multiplier / trainer.cfg.privacy.expected_batch_size
            predicted = float(law.predict(m, steps, sigma_bar, warn=False))
            runs.setdefault(name, []).append(achieved)
            predictions[name] = predicted
            print(f"{name:9s} M {m:>9,} B {best.batch_size} T {steps:5d} sigma {trainer.noise_multiplier:.4g} "
                  f"seed {seed}: achieved {achieved:.4f}, law {predicted:.4f} ({(predicted - achieved) / achieved:+.2%}), "
                  f"epsilon {trainer.ledger.epsilon(delta, trainer.cfg.privacy.accountant):.3g}, {wall:.0f} s",
                  flush=True)
    means = {name: statistics.mean(v) for name, v in runs.items()}
    planned = means[best.nearest_config]
    print("mean over seeds: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    print(f"planned run: law at the trained config {predictions[best.nearest_config]:.4f}, "
          f"plan's own figure at M {best.params:.3g}: {best.loss:.4f} ({(best.loss - planned) / planned:+.2%}); "
          f"beats " + ", ".join(f"{k} ({'yes' if planned < v else 'no'})" for k, v in means.items()
                                if k != best.nearest_config))


if __name__ == "__main__":
    main()
