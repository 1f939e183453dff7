"""`dptrain sweep design`: a scaling sweep sized to a compute budget on the user's own data.

The spec it writes is what the planner's law needs and no more: a ladder of model sizes (from the
smallest up, as many as the budget pays for, at least three), noise-batch ratios sigma_bar that span
the ε range the user will plan for (and 0, the noise-free anchor), a small learning-rate grid (the
fit keeps each cell's best, as McKenna et al. 2025 do) and one run length with a constant learning
rate after warm-up, so that every evaluated step is the end point of a run that long. Its cost is
counted from step and evaluation times measured here, on random tokens, with the DP engine: nothing
is read from the data but its size, sequence length and vocabulary, and nothing is trained on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from dptrain.errors import UserError

# (hidden, MLP, layers, heads, head_dim): the shipped ladder's shapes (configs/model/ladder-*.yaml),
# from 18K to 3.6M parameters at a 2,048-piece vocabulary
RUNGS = [(8, 32, 2, 2, 4), (16, 64, 2, 2, 8), (32, 128, 2, 2, 16), (64, 256, 3, 4, 16),
         (96, 384, 4, 4, 24), (128, 512, 6, 4, 32), (192, 768, 6, 6, 32)]
MIN_SIZES = 3  # a size exponent needs three sizes to be more than a line through two points
STEP_CHOICES = (1000, 500, 250)  # run lengths tried, longest first
EVAL_EVERY = 50
EVAL_SEQUENCES = 512
SIGMA_LEVELS = 3  # private noise levels, log-spaced, beside the noise-free runs
BATCH_SPREAD = 8  # the plans the law serves may use batches up to this many times the sweep's
STARTUP_SECONDS = 10.0  # per run: imports, data, checkpoints, the result


@dataclass(frozen=True)
class Design:
    sizes: list[dict]  # per rung: name, config dict, params, step and eval seconds
    steps: int
    sigma_bars: list[float]
    learning_rates: list[float]
    batch: int
    seconds: float  # estimated device-seconds of the main grid
    repeats: list[dict]  # the sizes repeated at a second seed (every rate, the middle noise level)
    repeat_seconds: float

    @property
    def runs(self) -> int:
        return len(self.sizes) * len(self.sigma_bars) * len(self.learning_rates)


def parse_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = sorted(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--epsilon {text!r}: expected LO,HI (two numbers, e.g. 2,16)") from None
    if not (0 < lo and math.isfinite(hi)):
        raise UserError(f"--epsilon {text}: both ends must be positive and finite")
    return lo, hi


def rung_config(shape: tuple, vocab_size: int, seq_len: int) -> dict:
    hidden, mlp, layers, heads, head_dim = shape
    return {"vocab_size": int(vocab_size), "hidden_size": hidden, "intermediate_size": mlp,
            "num_layers": layers, "num_heads": heads, "num_kv_heads": 1, "head_dim": head_dim,
            "max_seq_len": max(128, 2 ** math.ceil(math.log2(seq_len))),
            "query_pre_attn_scalar": float(head_dim), "tie_embeddings": True}


def measure_seconds(config: dict, batch: int, seq_len: int, device: torch.device, repeats: int = 3) -> tuple[float, float]:
    """(seconds per private step at `batch`, seconds per evaluation of EVAL_SEQUENCES) of this model
    here, on random tokens: per-example clipping, noise and AdamW, as the trainer does them."""
    from dptrain.dp.benchmark import timed_call
    from dptrain.dp.engine import DPEngine
    from dptrain.model import Decoder, DecoderConfig

    model = Decoder(DecoderConfig(**config)).to(device)
    engine = DPEngine(model, 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(config["vocab_size"], (batch, seq_len), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        engine.zero_grad()
        engine.clipped_grad_sum(inputs, targets)
        for p in engine.parameters:
            p.grad.add_(torch.randn_like(p.grad))
        optimizer.step()

    def evaluate():
        with torch.no_grad():
            for start in range(0, EVAL_SEQUENCES, 128):
                model(torch.randint(config["vocab_size"], (128, seq_len - 1), device=device))

    def timed(fn) -> float:
        fn()  # warm-up
        return min(timed_call(fn, device) for _ in range(repeats))

    return timed(step), timed(evaluate)


def sigma_bar_levels(epsilons: tuple[float, float], delta: float, data_size: int, batch: int, steps: int) -> list[float]:
    """0 and SIGMA_LEVELS log-spaced sigma_bar from the loosest plan the law serves (ε high, a batch
    BATCH_SPREAD times the sweep's, half the steps) to the tightest (ε low, the sweep's batch, twice
    the steps): sigma_bar = sigma(ε, δ, q = B/N, T) / B."""
    from dptrain.scaling.noise import calibrate_rdp

    big = min(batch * BATCH_SPREAD, data_size)
    lo = float(calibrate_rdp(epsilons[1], delta, [big / data_size], [max(1, steps // 2)])[0]) / big
    hi = float(calibrate_rdp(epsilons[0], delta, [batch / data_size], [2 * steps])[0]) / batch
    if not (math.isfinite(hi) and hi < 1e5):
        raise UserError(f"ε {epsilons[0]:g} is out of reach at batch {batch} on {data_size:,} sequences "
                        "(the noise would be unbounded): raise the lower end of --epsilon")
    return [0.0] + [float(f"{x:.3g}") for x in np.geomspace(lo, hi, SIGMA_LEVELS)]


def run_seconds(rung: dict, steps: int) -> float:
    return STARTUP_SECONDS + steps * rung["step_s"] + (steps // EVAL_EVERY + 1) * rung["eval_s"]


def choose_repeats(sizes: list[dict], steps: int, learning_rates: list[float], left_s: float) -> tuple[list[dict], float]:
    """The smallest sizes, as many as the rest of the budget pays for, repeated at seed 1 with every
    rate: the seed spread the law's interval needs (each cell's best rate, twice)."""
    chosen, cost = [], 0.0
    for rung in sizes:
        extra = len(learning_rates) * run_seconds(rung, steps)
        if cost + extra > left_s:
            break
        chosen.append(rung)
        cost += extra
    return chosen, cost


def choose(rungs: list[dict], sigma_bars: list[float], learning_rates: list[float], budget_s: float) -> tuple[list[dict], int, float]:
    """The most sizes (at least MIN_SIZES, smallest first), then the longest runs, that the budget
    pays for: (sizes, steps, estimated seconds)."""
    per_cell = len(sigma_bars) * len(learning_rates)
    for steps in STEP_CHOICES:
        for k in range(len(rungs), MIN_SIZES - 1, -1):
            cost = per_cell * sum(run_seconds(r, steps) for r in rungs[:k])
            if cost <= budget_s:
                return rungs[:k], steps, cost
    smallest = per_cell * sum(STARTUP_SECONDS + STEP_CHOICES[-1] * r["step_s"] for r in rungs[:MIN_SIZES])
    raise UserError(f"the budget ({budget_s / 3600:.2g} device-hours) is below the smallest useful sweep: "
                    f"{MIN_SIZES} sizes x {len(sigma_bars)} noise levels x {len(learning_rates)} learning rates "
                    f"at {STEP_CHOICES[-1]} steps needs about {smallest / 3600:.2g}; give more hours or fewer "
                    "--learning-rates")


def design_sweep(data: str | Path, out: str | Path, hours: float, gpu: bool, epsilons: tuple[float, float],
                 delta: float | None, batch: int, learning_rates: list[float], runs_dir: str | None = None,
                 progress: bool = True) -> Design:
    """Measure, choose and write the spec (and its model ladder in models/ beside it)."""
    from dptrain.data.packed import PackedDataset
    from dptrain.model import DecoderConfig, parameter_counts

    train = PackedDataset(data, "train")
    if "eval" not in train.manifest["splits"] or not train.manifest["splits"]["eval"]["num_sequences"]:
        raise UserError(f"{data} has no held-out split: prepare it with --eval-fraction > 0 (sweeps measure held-out loss)")
    n, seq_len = len(train), train.seq_len
    if not learning_rates or not all(lr > 0 for lr in learning_rates):
        raise UserError("--learning-rates: give positive numbers, e.g. 3e-3,6e-3,1.2e-2")
    if not 1 <= batch <= n:
        raise UserError(f"--batch {batch}: must be between 1 and the data's {n:,} training sequences")
    delta = delta if delta is not None else float(f"{n ** -1.1:.2g}")
    if not 0 < delta < 1 / n:
        raise UserError(f"--delta {delta:g}: must be in (0, 1/N) = (0, {1 / n:.3g})")
    device = torch.device("cuda" if gpu else "cpu")
    if gpu and not torch.cuda.is_available():
        raise UserError("--gpu-hours: no CUDA device here to measure step times on")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each sweep run gets one core
    runs_per_size = (SIGMA_LEVELS + 1) * len(learning_rates)
    try:
        rungs = []
        for i, shape in enumerate(RUNGS):
            config = rung_config(shape, train.vocab_size, seq_len)
            step_s, eval_s = measure_seconds(config, batch, seq_len, device)
            rungs.append({"name": f"rung-{i}", "config": config, "step_s": step_s, "eval_s": eval_s,
                          "params": parameter_counts(DecoderConfig(**config))["total"]})
            if progress:
                print(f"rung-{i}: {rungs[-1]['params']:,} parameters, {step_s * 1e3:.1f} ms per step, "
                      f"{eval_s:.2f} s per evaluation")
            if len(rungs) >= MIN_SIZES and STARTUP_SECONDS + STEP_CHOICES[-1] * step_s > hours * 3600 / runs_per_size:
                break  # one more size would not fit even at the shortest runs: no need to time larger ones
    finally:
        torch.set_num_threads(threads)
    sigma_bars = sigma_bar_levels(epsilons, delta, n, batch, STEP_CHOICES[0])
    sizes, steps, seconds = choose(rungs, sigma_bars, learning_rates, hours * 3600)
    repeats, repeat_seconds = choose_repeats(sizes, steps, learning_rates, hours * 3600 - seconds)
    design = Design(sizes, steps, sigma_bars, list(learning_rates), batch, seconds, repeats, repeat_seconds)
    write_spec(Path(out), design, str(data), delta, device.type, runs_dir, epsilons, hours, n)
    if progress:
        print(f"{design.runs} runs: {len(sizes)} sizes ({sizes[0]['params']:,}..{sizes[-1]['params']:,}) x "
              f"sigma_bar {', '.join(f'{s:g}' for s in sigma_bars)} x lr {', '.join(f'{x:g}' for x in learning_rates)}, "
              f"T {steps}, batch {batch}: about {seconds / 3600:.2f} {'GPU' if gpu else 'core'}-hours")
        print(f"seed repeats: {len(repeats)} size(s) x {len(learning_rates)} rates at seed 1, about "
              f"{repeat_seconds / 3600:.2f} more" if repeats else
              "seed repeats: none fit the budget (the law's interval will lack the seed spread)")
        print(f"wrote {out}{' and its -seeds companion' if repeats else ''}; next: dptrain sweep run {out} "
              "--jobs N (or a job array: see launch/), and the same for the companion")
    return design


def write_spec(out: Path, d: Design, data: str, delta: float, device: str, runs_dir: str | None,
               epsilons: tuple[float, float], hours: float, data_size: int) -> None:
    models = out.parent / "models"
    models.mkdir(parents=True, exist_ok=True)
    for rung in d.sizes:
        (models / f"{rung['name']}.yaml").write_text(
            f"# {rung['params']:,} parameters; written by `dptrain sweep design`\n"
            + yaml.safe_dump(rung["config"], sort_keys=False))
    spec = {
        "results": f"{out.stem}-results.csv",
        "models": [f"models/{r['name']}.yaml" for r in d.sizes],
        "batch_sizes": [d.batch],
        "sigma_bars": d.sigma_bars,
        "steps": [d.steps],
        "learning_rates": d.learning_rates,
        "seeds": [0],
        "base": {
            "out_dir": runs_dir or f"runs/{out.stem}",
            "data": {"source": "prepared", "path": data},
            "privacy": {"delta": delta, "max_grad_norm": 1.0, "accountant": "rdp"},
            "optimizer": {"name": "adamw", "lr": d.learning_rates[0], "betas": [0.9, 0.95], "weight_decay": 0.0},
            # constant after warm-up: every evaluated step is the end point of a run that long
            "schedule": {"warmup_steps": 20, "decay": "constant"},
            "runtime": {"micro_batch_size": d.batch, "device": device, "threads": 1},
            "eval": {"every": EVAL_EVERY, "max_sequences": EVAL_SEQUENCES, "micro_batch_size": 128},
            "checkpoint": {"every": max(EVAL_EVERY, d.steps // 4), "keep_last": 1},
            "logging": {"wandb": "disabled"},
        },
    }
    unit = "GPU" if device == "cuda" else "core"
    times = ", ".join(f"{r['name']} {r['step_s'] * 1e3:.0f} ms" for r in d.sizes)
    header = (f"# Written by `dptrain sweep design` for {hours:g} {unit}-hours on {data} ({data_size:,} training\n"
              f"# sequences), ε {epsilons[0]:g}..{epsilons[1]:g} at δ {delta:g}: {d.runs} runs, about "
              f"{d.seconds / 3600:.2f} {unit}-hours by\n# step times measured on this machine "
              f"({times}).\n"
              f"# Run: dptrain sweep run {out} [--jobs N]; as a job array of `dptrain sweep run {out} --index I`\n"
              f"# (see launch/). Then: dptrain fit {spec['base']['out_dir']} --spec {out} --data {data} --out law.json\n")
    out.write_text(header + yaml.safe_dump(spec, sort_keys=False))
    if d.repeats:
        mid = d.sigma_bars[1 + len(d.sigma_bars[1:]) // 2]
        seeds = dict(spec, models=[f"models/{r['name']}.yaml" for r in d.repeats], sigma_bars=[mid], seeds=[1])
        companion = out.with_name(f"{out.stem}-seeds.yaml")
        companion.write_text(
            f"# Written by `dptrain sweep design` with {out.name}: its smallest sizes again at seed 1, every\n"
            f"# rate, sigma_bar {mid:g} ({len(d.repeats) * len(d.learning_rates)} runs, about "
            f"{d.repeat_seconds / 3600:.2f} {unit}-hours):\n# the seed spread in the law's interval. Same "
            "results table and runs folder.\n" + yaml.safe_dump(seeds, sort_keys=False))
