"""Train what `dptrain plan` recommends, and models half and twice its size at the same compute, and
compare the held-out losses they reach with the law's predictions.

The plan (its batch, steps and σ, as `--write-config` writes them, σ recalibrated with the PLD
accountant as there) is trained at the planned model size itself: the script writes a decoder
config of that many parameters (the shape of `ladder-0`/`ladder-1`, two layers, hidden size chosen to
match), with the sweep's data and protocol (optimizer, schedule, evaluation: the law is conditional
on them), once per seed. The comparison models (0.5x and 2x by default) train at the same compute
and steps, their batch scaled inversely to their size, σ calibrated by the trainer to the same
(ε, δ). A seed sets the public initial weights; sampling and noise draw a fresh secret every run.
The learning rate is the law's (`fitted_on`: the sweep's one rate, or the best rate of the fitted
cell nearest the plan), and each run's loss is checked against the law's 90% interval. From the
repository root:

    python benchmarks/scaling_validation.py --law LAW.json --spec scaling/sweep-cpu-v3.yaml \
        --compute 2e12 --epsilon 8 --seeds 0 1
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from dptrain.data import PackedDataset
from dptrain.data.demo import prepare_demo
from dptrain.model import DecoderConfig, parameter_counts
from dptrain.scaling.law import load_law
from dptrain.scaling.plan import MODEL_CONFIG_DIR, SHIPPED_LAW, plan, with_pld_sigma, write_training_config
from dptrain.scaling.provenance import learning_rate_for
from dptrain.scaling.results import append_results
from dptrain.scaling.sweep import load_spec, result_row
from dptrain.train.config import load_train_config
from dptrain.train.trainer import Trainer

SHAPE = MODEL_CONFIG_DIR / "ladder-1.yaml"  # two layers, two query heads, one key-value head


def sized_model(params: float, vocab_size: int) -> tuple[DecoderConfig, int]:
    """The `SHAPE` decoder whose total parameter count is nearest `params` (hidden size a multiple of 4, MLP 4x)."""
    base = replace(DecoderConfig.from_yaml(SHAPE), vocab_size=vocab_size)

    def at(hidden: int) -> DecoderConfig:
        head = hidden // base.num_heads
        return replace(base, hidden_size=hidden, intermediate_size=4 * hidden, head_dim=head,
                       query_pre_attn_scalar=float(head))

    cfg = min((at(h) for h in range(8, 513, 4)),
              key=lambda c: abs(parameter_counts(c)["total"] / params - 1))
    return cfg, parameter_counts(cfg)["total"]


def flat(prefix: str, section: dict) -> list[str]:
    return [f"{prefix}.{k}={v}" for k, v in section.items() if not isinstance(v, (dict, list))]


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
    ap.add_argument("--max-batch", type=int, default=None,
                    help="largest batch the planner may pick (a law fitted at one batch does not know "
                         "what a larger one gains beyond its sigma_bar)")
    ap.add_argument("--min-params", type=float, default=None,
                    help="smallest model the planner considers (default: the law's smallest fitted model)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--sizes", type=float, nargs="*", default=[0.5, 2.0],
                    help="comparison model sizes, as multiples of the planned one (same compute)")
    ap.add_argument("--out", default="runs/validate")
    ap.add_argument("--results", default=None,
                    help="also append every run to this results CSV (as a sweep would), so a later "
                         "law can be fitted on it")
    args = ap.parse_args()

    base = load_spec(args.spec).base
    d = base["data"]
    data = (prepare_demo(d["path"], seq_len=d["demo_seq_len"], vocab_size=d["demo_vocab_size"])
            if d.get("source") == "demo" else Path(d["path"]))
    train_split = PackedDataset(data, "train")
    n, seq_len = len(train_split), train_split.seq_len
    delta = base["privacy"]["delta"] if args.delta is None else args.delta
    law = load_law(args.law, args.method)
    best = plan(law, args.compute, args.epsilon, delta, n, seq_len, top=1,
                max_steps=args.max_steps, max_batch=args.max_batch, min_params=args.min_params)[0]
    best = with_pld_sigma(law, best, args.epsilon, delta, n)  # as `dptrain plan --write-config` does
    print(f"plan ({law.method}, {args.law}): C {args.compute:.3g}, eps {args.epsilon:g}, N {n}: M {best.params:.3g} "
          f"(nearest shipped config {best.nearest_config}), B {best.batch_size}, T {best.steps}, sigma {best.sigma:.4g} "
          f"(sigma_bar {best.sigma_bar:.3g}), predicted loss {best.loss:.4f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "train.yaml"
    write_training_config(config, best, args.epsilon, delta, seq_len, str(data))
    # the sweep's protocol; the plan decides model, batch, steps and noise
    protocol = ["logging.wandb=disabled", "logging.progress=false", "logging.every=50", "checkpoint.every=0",
                "optimizer.betas=[" + ",".join(map(str, base["optimizer"]["betas"])) + "]"]
    protocol += [o for key in ("optimizer", "schedule", "runtime", "eval") for o in flat(key, base.get(key, {}))]
    lr = learning_rate_for(law.fitted_on, best.params, best.sigma_bar)
    if lr is not None:  # the law's rate for this plan (a sweep over rates: its nearest cell's best)
        protocol.append(f"optimizer.lr={lr}")
        print(f"learning rate {lr:g} ({law.fitted_on.get('lr_rule', 'the sweep')})")
    vocab_size = train_split.manifest["vocab_size"]
    runs, predictions, sizes, inside = {}, {}, {}, {}
    for factor in [1.0, *args.sizes]:
        model, m = sized_model(best.params * factor, vocab_size)
        name = "plan" if factor == 1.0 else f"{factor:g}x"
        model_file = out / f"model-{name}.yaml"
        model.to_yaml(model_file)
        # the same compute and steps: the batch scales inversely with the model; σ for the same budget
        batch = best.batch_size if factor == 1.0 else max(1, round(best.batch_size * best.params / m))
        change = [f"model={model_file.resolve()}"]
        if factor != 1.0:
            change += [f"privacy.expected_batch_size={batch}", "privacy.noise_multiplier=null"]
        for seed in args.seeds:
            trainer, wall = train(config, [*protocol, *change, f"runtime.init_seed={seed}",
                                           f"out_dir={out / f'{name}-s{seed}'}"])
            tail = [loss for _, loss in trainer.eval_history[-3:]]
            achieved = sum(tail) / len(tail)  # the sweep's final loss: mean of the last 3 eval points
            sigma_bar = trainer.noise_multiplier / batch
            predicted = float(law.predict(m, best.steps, sigma_bar, batch, warn=False))
            interval = law.interval(m, best.steps, sigma_bar, batch)
            runs.setdefault(name, []).append(achieved)
            if interval:
                inside.setdefault(name, []).append(interval[0] <= achieved <= interval[1])
            if args.results:
                append_results(args.results, [result_row(
                    trainer, f"{out.name}-{name}-s{seed}", f"validation-{name}", batch, best.steps,
                    trainer.noise_multiplier, sigma_bar, trainer.eval_history, wall)])
            predictions[name], sizes[name] = predicted, m
            print(f"{name:5s} M {m:>9,} B {batch:5d} T {best.steps:5d} sigma {trainer.noise_multiplier:.4g} "
                  f"seed {seed}: achieved {achieved:.4f}, law {predicted:.4f} ({(predicted - achieved) / achieved:+.2%}), "
                  f"epsilon {trainer.ledger.epsilon(delta, trainer.cfg.privacy.accountant):.4g}, {wall:.0f} s"
                  + (f"; 90% interval {interval[0]:.4f}..{interval[1]:.4f}: "
                     f"{'inside' if inside[name][-1] else 'OUTSIDE'}" if interval else ""), flush=True)
    means = {name: statistics.mean(v) for name, v in runs.items()}
    planned = means["plan"]
    print("mean over seeds: " + ", ".join(f"{k} (M {sizes[k]:,}) {v:.4f}" for k, v in means.items()))
    others = ", ".join(f"{k} ({'yes' if planned < v else 'no'})" for k, v in means.items() if k != "plan")
    print(f"planned run: law {predictions['plan']:.4f} at the trained size "
          f"({(predictions['plan'] - planned) / planned:+.2%} against the mean achieved), plan's own figure "
          f"{best.loss:.4f} at M {best.params:.4g}" + (f"; beats {others}" if others else ""))
    if inside.get("plan"):
        print(f"planned run inside the law's 90% interval in {sum(inside['plan'])} of {len(inside['plan'])} seeds; "
              f"within 3% of the law in {sum(abs(predictions['plan'] - a) / a <= 0.03 for a in runs['plan'])}")

if __name__ == "__main__":
    main()
