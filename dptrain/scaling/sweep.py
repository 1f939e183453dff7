"""Scaling sweeps: a YAML spec expands into training runs (model x batch x sigma_bar x steps x
learning rate x seed), each trained with the real `Trainer` in a folder of its own; a finished run
writes its row there (`result.json`) and appends it to the results CSV.

A run's id is derived from its spec entry and its index is its place in the expansion, so runs are
independent jobs (a SLURM array, an indexed k8s Job, local processes or one after another): finished
runs are skipped, and an interrupted run resumes from its last checkpoint (`checkpoint.every`). The
noise is set through the noise-batch ratio: sigma = sigma_bar * B (`privacy.noise_multiplier`), no
target epsilon is needed. On private data every run is charged to the data's own ledger, like any run.
"""
from __future__ import annotations

import copy
import datetime
import itertools
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dptrain import configio
from dptrain.errors import UserError
from dptrain.model import parameter_counts
from dptrain.progress import progress_bar
from dptrain.scaling.results import RESULT_FILE, RunResult, append_results, read_results, write_run_result
from dptrain.train.config import TrainConfig


@dataclass
class SweepSpec:
    base: dict[str, Any]  # training config shared by every run; `model` and the noise are set per run
    models: list[str]  # model YAML paths, relative to the spec's folder
    batch_sizes: list[int]
    sigma_bars: list[float]  # noise-batch ratios sigma / B; 0 = a noise-free (not private) run
    steps: list[int]
    seeds: list[int] = field(default_factory=lambda: [0])
    # peak learning rates to try in every cell (the fit keeps each cell's best); None: the base's
    learning_rates: list[float] | None = None
    results: str = "results.csv"  # relative to the spec's folder

    def __post_init__(self):
        for name in ("models", "batch_sizes", "sigma_bars", "steps", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if any(b <= 0 for b in self.batch_sizes) or any(t <= 0 for t in self.steps):
            raise ValueError("batch sizes and step counts must be positive")
        if self.learning_rates is not None and (not self.learning_rates or not all(
                lr > 0 for lr in self.learning_rates)):
            raise ValueError("learning_rates must be a non-empty list of positive numbers (or left out)")
        if any(not s >= 0 for s in self.sigma_bars):
            raise ValueError("sigma_bars must be >= 0 (0: a noise-free run, which measures the "
                             "irreducible loss and is not private)")


@dataclass(frozen=True)
class SweepRun:
    run_id: str
    model_path: Path
    batch_size: int
    sigma_bar: float
    steps: int
    seed: int
    lr: float | None = None  # None: the base config's

    @property
    def model_name(self) -> str:
        return self.model_path.stem

    @property
    def sigma(self) -> float:
        return self.sigma_bar * self.batch_size


def load_spec(path: str | Path) -> SweepSpec:
    return configio.load(SweepSpec, path)


def run_id(model: str, batch_size: int, sigma_bar: float, steps: int, seed: int, lr: float | None = None) -> str:
    return f"{model}-B{batch_size}-sb{sigma_bar:.3g}-T{steps}-s{seed}" + (f"-lr{lr:.3g}" if lr else "")


def expand(spec: SweepSpec, spec_dir: Path) -> list[SweepRun]:
    """Every run of the spec, smallest compute first (models in spec order, then B, T, sigma_bar,
    seed, learning rate); a run's place in this list is its job index."""
    runs = []
    for model, b, t, sb, seed, lr in itertools.product(spec.models, spec.batch_sizes, spec.steps,
                                                       spec.sigma_bars, spec.seeds,
                                                       spec.learning_rates or [None]):
        path = Path(model) if Path(model).is_absolute() else spec_dir / model
        if not path.is_file():
            raise UserError(f"sweep model config not found: {path}")
        runs.append(SweepRun(run_id(path.stem, b, sb, t, seed, lr), path, b, sb, t, seed, lr))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise UserError("two sweep entries share a run id (duplicate models or values in the spec)")
    return runs


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def train_config(spec: SweepSpec, run: SweepRun) -> TrainConfig:
    """The base config with this run's model, batch, steps, noise and output folder."""
    raw = _merge(spec.base, {
        "model": str(run.model_path),
        # its checkpoints, privacy journal and result; a folder of its own keeps runs from resuming another
        "out_dir": str(Path(spec.base.get("out_dir", "runs/sweep")) / run.run_id),
        # A training config cannot ask for sigma = 0; a noise-free run sets it after construction.
        "privacy": {"expected_batch_size": run.batch_size, "steps": run.steps,
                    "noise_multiplier": run.sigma or 1.0, "target_epsilon": None},
        # No runtime.seed: each run draws its own secret, so runs at different σ never share noise or
        # batches; the spec's seed fixes only the (public) initial weights, shared across the grid.
        "runtime": {"seed": None, "init_seed": run.seed},
        "logging": {"run_name": run.run_id, "progress": False},
        **({"optimizer": {"lr": run.lr}} if run.lr else {}),
    })
    return configio.from_dict(TrainConfig, raw, "base")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} {torch.get_num_threads()} threads"


def execute(spec: SweepSpec, run: SweepRun, on_step=None) -> RunResult:
    """Train one run with the trainer's own step and evaluation (resuming its last checkpoint, if
    any), write its results row into its folder and return it. The loop is the trainer's minus logs
    and the end-of-run privacy report (which computes every accountant: a minute per run on CPU)."""
    from dptrain.train.trainer import Trainer

    cfg = train_config(spec, run)
    start = time.perf_counter()
    # sigma_bar = 0: clipped and normalised by the expected batch as always, and no noise (the
    # scaling law's noise-free point); its ledger records sigma = 0, so its epsilon is infinite.
    trainer = Trainer(cfg, noise_free=run.sigma_bar == 0)
    try:
        if trainer.eval_data is None:
            raise UserError("sweep runs need held-out data: the prepared data has no eval split")
        every = cfg.eval.every or run.steps
        if not trainer.eval_history:  # a resumed run has its curve so far
            trainer.record_eval()
        while trainer.step < run.steps:
            trainer.train_step()
            if trainer.step % every == 0 or trainer.step == run.steps:
                trainer.record_eval()
            if cfg.checkpoint.every and trainer.step % cfg.checkpoint.every == 0 and trainer.step < run.steps:
                trainer.save_checkpoint()
            if on_step:
                on_step()
        row = result_row(trainer, run.run_id, run.model_name, run.batch_size, run.steps, run.sigma,
                         run.sigma_bar, trainer.eval_history, time.perf_counter() - start)
        write_run_result(trainer.out_dir, row)
    finally:
        trainer.close()
    return row


def result_row(trainer, run_id: str, model: str, batch_size: int, steps: int, sigma: float,
               sigma_bar: float, curve, wall: float) -> RunResult:
    """The results row of a finished run of `trainer` (its model's size, its device, now)."""
    counts = parameter_counts(trainer.model_cfg)
    seq_len = trainer.train_data.seq_len - 1  # tokens predicted per sequence
    return RunResult(
        run_id=run_id, model=model, params_total=counts["total"],
        params_nonembed=counts["non_embedding"], batch_size=batch_size, steps=steps,
        sigma=sigma, sigma_bar=sigma_bar, seq_len=seq_len,
        tokens=batch_size * seq_len * steps,
        eval_curve=tuple((int(s), float(l)) for s, l in curve),
        wall_time_s=round(wall, 2), device=device_name(trainer.device),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        lr=trainer.cfg.optimizer.lr)


def run_folder(spec: SweepSpec, run: SweepRun) -> Path:
    return Path(train_config(spec, run).out_dir)


def finished(spec: SweepSpec, run: SweepRun, in_table: set[str]) -> bool:
    return run.run_id in in_table or (run_folder(spec, run) / RESULT_FILE).is_file()


def _table(spec_path: Path, spec: SweepSpec) -> tuple[Path, set[str]]:
    results = spec_path.parent / spec.results
    return results, ({r.run_id for r in read_results(results)} if results.exists() else set())


def run_sweep(spec_path: str | Path, only: list[str] | None = None, dry_run: bool = False,
              progress: bool = True, jobs: int = 1) -> list[SweepRun]:
    """Run every run of the spec not yet finished, one after another or `jobs` at a time (each in a
    process of its own: `dptrain sweep run SPEC --index I`); returns the runs that were (or, with
    dry_run, would be) trained."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    results, done = _table(spec_path, spec)
    runs = expand(spec, spec_path.parent)
    unknown = sorted(set(only or ()) - {r.model_name for r in runs})
    if unknown:
        raise UserError(f"--only names models not in the sweep: {', '.join(unknown)}")
    todo = [(i, r) for i, r in enumerate(runs) if not finished(spec, r, done) and (not only or r.model_name in only)]
    for _, run in todo:  # a bad base config fails here, before any run trains
        train_config(spec, run)
    if dry_run:
        return [r for _, r in todo]
    if jobs > 1:
        _run_processes(spec_path, todo, jobs, progress)
        return [r for _, r in todo]
    bar = progress_bar(total=sum(r.steps for _, r in todo), desc="sweep", unit="step", disable=not progress,
                       dynamic_ncols=True)
    for i, (_, run) in enumerate(todo, start=1):
        bar.set_postfix_str(f"run {i}/{len(todo)} {run.run_id}")
        row = execute(spec, run, on_step=lambda: bar.update(1))
        append_results(results, [row])
        bar.write(f"{run.run_id}: final loss {row.final_loss():.4f} in {row.wall_time_s:.0f} s")
    bar.close()
    return [r for _, r in todo]


def run_index(spec_path: str | Path, index: int) -> RunResult | None:
    """Train the spec's run number `index` (its place in the expansion; a job array's task id) unless
    it is finished; returns its row, or None when it was already done."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    runs = expand(spec, spec_path.parent)
    if not 0 <= index < len(runs):
        raise UserError(f"--index {index}: the sweep has runs 0..{len(runs) - 1}")
    results, done = _table(spec_path, spec)
    run = runs[index]
    if finished(spec, run, done):
        return None
    row = execute(spec, run)
    append_results(results, [row])
    return row


def _run_processes(spec_path: Path, todo: list[tuple[int, SweepRun]], jobs: int, progress: bool) -> None:
    """`jobs` local processes at a time, one run each; a failed run is named, the others go on."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor, as_completed

    def one(item):
        index, run = item
        proc = subprocess.run([sys.executable, "-m", "dptrain", "sweep", "run", str(spec_path), "--index", str(index)],
                              capture_output=True, text=True)
        return run, proc

    failed = []
    bar = progress_bar(total=len(todo), desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in as_completed([pool.submit(one, item) for item in todo]):
            run, proc = future.result()
            bar.update(1)
            if proc.returncode:
                failed.append(run.run_id)
                bar.write(f"{run.run_id}: failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
            else:
                bar.write(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else run.run_id)
    bar.close()
    if failed:
        raise UserError(f"{len(failed)} sweep run(s) failed: {', '.join(failed)}; run the sweep again to retry them")
