"""DP-SGD against BandMF and BLT at the same (ε, δ): held-out loss, step time and memory, on the demo.

Every cell trains the demo's model on the demo's data (configs/demo.yaml, or --config) with the
mechanism, ε, learning rate and seed of the cell, then evaluates the held-out loss. The learning
rate is picked per mechanism and ε on the first seed (`--lrs`), since correlated noise changes the
per-step noise Adam normalises by; the other seeds reuse it. Each cell appends one JSON line to
--out (cells already there are skipped, so the script resumes), then a table is printed.

    python benchmarks/correlated_noise.py --out runs/bench-noise.jsonl --data runs/bench-noise-data \\
        [--epsilons 8 2] [--seeds 0 1 2] [--lrs 3e-3 8e-3] [--mechanisms dpsgd bandmf blt blt0] [--optimizer sgd]
    python benchmarks/correlated_noise.py --overhead --mechanisms bandmf blt blt0 [--steps 10]  # step times

This is a benchmark, not a private run: it times steps, and seeds the randomness.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from dptrain import configio  # noqa: E402
from dptrain.train.config import TrainConfig  # noqa: E402
from dptrain.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cell_config(base: dict, config_dir: Path, out_dir: Path, data: str | None, mechanism: str, epsilon: float,
                lr: float, seed: int, steps: int | None, optimizer: str = "adamw") -> TrainConfig:
    raw = json.loads(json.dumps(base))
    raw["model"] = str((config_dir / raw["model"]).resolve()) if not Path(raw["model"]).is_absolute() else raw["model"]
    raw["out_dir"] = str(out_dir)
    raw["data"]["path"] = str(Path(data or ROOT / raw["data"]["path"]).resolve())
    raw["privacy"].update(target_epsilon=epsilon, mechanism=mechanism)
    if mechanism == "blt0":  # BLT with no buffer: its noise regenerated from the keyed streams
        raw["privacy"].update(mechanism="blt", buffers=0)
    if steps:
        raw["privacy"]["steps"] = steps
    raw["optimizer"].update(lr=lr, name=optimizer)
    raw["runtime"].update(seed=seed, threads=1)
    raw["eval"]["every"] = 0
    raw["logging"] = {"wandb": "disabled", "progress": False}
    raw["checkpoint"] = {"every": 0, "keep_last": 1}
    raw.pop("export", None)
    return configio.from_dict(TrainConfig, raw)


def run_cell(cfg: TrainConfig, config_dir: Path) -> dict:
    trainer = Trainer(cfg, config_dir)
    params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    seconds = []
    while trainer.step < cfg.privacy.steps:
        start = time.perf_counter()
        trainer.train_step()
        seconds.append(time.perf_counter() - start)
    loss = trainer.evaluate()
    m = trainer.mechanism
    out = {"loss": loss, "sigma": m.noise_multiplier, "bands": m.bands, "epsilon": trainer.planned_epsilon,
           "median_step_seconds": statistics.median(seconds),
           "noise_buffer_bytes": trainer.noise.buffer_bytes(), "param_bytes": params}
    trainer.close()
    return out


def overhead(base: dict, config_dir: Path, data: str | None, epsilon: float, rounds: int, steps: int,
             mechanisms=("dpsgd", "bandmf", "blt", "blt0")) -> None:
    """Step time of the correlated mechanisms against DP-SGD in this process: every trainer built on the same
    config, timed in alternating blocks of `steps` steps, the order rotated every round (so load
    drifts and the place in the round hit them alike)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for mechanism in mechanisms:
            cfg = cell_config(base, config_dir, Path(tmp) / mechanism, data, mechanism, epsilon, 3e-3, 0, None)
            trainers[mechanism] = Trainer(cfg, config_dir)
        times = {m: [] for m in trainers}
        sequences = {m: 0 for m in trainers}
        names = list(trainers)
        for r in range(rounds):
            for mechanism in names[r % len(names):] + names[:r % len(names)]:  # each takes each place in turn
                trainer = trainers[mechanism]
                for _ in range(steps):
                    start = time.perf_counter()
                    trainer.train_step()
                    times[mechanism].append(time.perf_counter() - start)
                    sequences[mechanism] += trainer.batch_sizes[-1]
        # per sequence: a step's time follows its micro-batch count, so a median or mean per step
        # would mostly compare how many Poisson draws crossed a micro-batch boundary
        per = {m: sum(t) / sequences[m] for m, t in times.items()}
        print(f"{torch.get_num_threads()} thread(s), {rounds} x {steps} steps each, ε {epsilon:g}")
        for mechanism, trainer in trainers.items():
            params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
            print(f"{mechanism:7} ({trainer.mechanism.bands} bands/parts): {1e3 * per[mechanism]:.1f} ms per "
                  f"sequence ({sequences[mechanism]} sequences), ratio to dpsgd {per[mechanism] / per['dpsgd']:.3f}; "
                  "noise buffers "
                  f"{trainer.noise.buffer_bytes() / 2**20:.1f} MiB = {trainer.noise.buffer_bytes() / params:.1f} x "
                  f"the float32 weights ({params / 2**20:.1f} MiB)")
        for trainer in trainers.values():
            trainer.close()


def markdown(files: list[str]) -> None:
    """The cells of result files (of one configuration) as the tables in docs/privacy.md: one row per
    (ε, mechanism, lr)."""
    cells: dict[tuple, list[dict]] = {}
    order = {"dpsgd": 0, "bandmf": 1, "blt": 2, "blt0": 3}
    for line in (line for f in files for line in Path(f).read_text().splitlines()):
        row = json.loads(line)
        key = (-row["target_epsilon"], order.get(row["mechanism"], 9), row["mechanism"], row["lr"], row["steps"])
        cells.setdefault(key, []).append(row)
    print("| ε | mechanism | bands | σ | lr | held-out loss, seed 0 / 1 / 2 | mean |\n|---|---|---|---|---|---|---|")
    for (neg_eps, _, mechanism, lr, _), rows in sorted(cells.items()):
        rows.sort(key=lambda r: r["seed"])
        bands = f"{rows[0]['bands']} parts" if mechanism.startswith("blt") else rows[0]["bands"]
        losses = [r["loss"] for r in rows]
        print(f"| {-neg_eps:g} | {mechanism} | {bands} | {rows[0]['sigma']:.3f} | {lr:g} | "
              f"{' / '.join(f'{x:.3f}' for x in losses)} | {statistics.mean(losses):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--out", help="result file (JSON lines; cells already there are skipped)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 2.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 8e-3])
    parser.add_argument("--mechanisms", nargs="+", default=["dpsgd", "bandmf"],
                        help="dpsgd, bandmf, blt, or blt0 (BLT with buffers 0, the noise regenerated)")
    parser.add_argument("--steps", type=int, default=None, help="override privacy.steps")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adam", "sgd"),
                        help="sgd: momentum betas[0] of the config (the workload the strategies are optimised for)")
    parser.add_argument("--data", default=None, help="the prepared (or demo) data folder; its privacy ledger "
                        "records every cell (default: the config's data.path)")
    parser.add_argument("--markdown", nargs="+", metavar="FILE",
                        help="only print the cells of these result files as a markdown table")
    parser.add_argument("--overhead", action="store_true",
                        help="only time the --mechanisms' steps against DP-SGD's in this process (first --epsilons value)")
    args = parser.parse_args()
    if args.markdown:
        markdown(args.markdown)
        return
    torch.set_num_threads(1)
    config_dir = Path(args.config).resolve().parent
    base = configio.read_yaml(args.config)
    if args.overhead:
        mechanisms = ("dpsgd", *[m for m in args.mechanisms if m != "dpsgd"])
        overhead(base, config_dir, args.data, args.epsilons[0], rounds=len(mechanisms), steps=args.steps or 10,
                 mechanisms=mechanisms)
        return
    if not args.out:
        parser.error("--out is required to run cells")
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []

    def measured(mechanism, epsilon, lr, seed):
        for row in done:
            if (row["mechanism"], row["target_epsilon"], row["lr"], row["seed"], row.get("optimizer", "adamw")) == (
                    mechanism, epsilon, lr, seed, args.optimizer):
                return row
        with tempfile.TemporaryDirectory() as tmp:
            cfg = cell_config(base, config_dir, Path(tmp) / "run", args.data, mechanism, epsilon, lr, seed, args.steps,
                              args.optimizer)
            row = {"mechanism": mechanism, "optimizer": args.optimizer, "target_epsilon": epsilon, "lr": lr, "seed": seed,
                   "steps": cfg.privacy.steps, **run_cell(cfg, config_dir)}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.append(row)
        print(json.dumps(row), flush=True)
        return row

    print(f"{'mechanism':8} {'ε':>4} {'lr':>7} {'bands':>5} {'σ':>6} {'held-out loss (seeds)':>28} "
          f"{'mean':>6} {'step s':>7} {'buffers/params':>14}")
    for epsilon in args.epsilons:
        for mechanism in args.mechanisms:
            first = {lr: measured(mechanism, epsilon, lr, args.seeds[0]) for lr in args.lrs}
            lr = min(first, key=lambda k: first[k]["loss"])
            rows = [first[lr]] + [measured(mechanism, epsilon, lr, s) for s in args.seeds[1:]]
            losses = [r["loss"] for r in rows]
            print(f"{mechanism:8} {epsilon:4g} {lr:7.1e} {rows[0]['bands']:5d} {rows[0]['sigma']:6.3f} "
                  f"{' '.join(f'{x:.3f}' for x in losses):>28} {statistics.mean(losses):6.3f} "
                  f"{statistics.median(r['median_step_seconds'] for r in rows):7.3f} "
                  f"{rows[0]['noise_buffer_bytes'] / rows[0]['param_bytes']:14.1f}", flush=True)


if __name__ == "__main__":
    main()
