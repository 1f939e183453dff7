"""The sweep results table: one CSV row per finished training run.

`eval_curve` holds the eval-loss curve as a JSON list of `[step, loss]` pairs. `run_id` is the key:
`append_results` skips runs whose id is already in the file, so a restarted sweep can re-append.
"""
from __future__ import annotations

import csv
import fcntl
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from dptrain.errors import UserError


@dataclass(frozen=True)
class RunResult:
    run_id: str
    model: str  # model config name, e.g. "tiny"
    params_total: int
    params_nonembed: int
    batch_size: int  # expected batch size B (Poisson sampling)
    steps: int  # T
    sigma: float  # noise multiplier
    sigma_bar: float  # noise-batch ratio sigma / B
    seq_len: int
    tokens: int  # B * seq_len * steps
    eval_curve: tuple[tuple[int, float], ...]
    wall_time_s: float
    device: str
    date: str  # ISO 8601
    lr: float | None = None  # peak learning rate (None: not recorded, in results from before it was)

    def params(self, key: str = "total") -> int:
        return self.params_total if key == "total" else self.params_nonembed

    def final_loss(self, window: int = 3) -> float:
        """Mean of the last `window` eval points: the run's loss at T with eval noise damped."""
        tail = [loss for _, loss in self.eval_curve[-window:]]
        return sum(tail) / len(tail)


COLUMNS = [f.name for f in fields(RunResult)]
OPTIONAL = {"lr"}  # columns older results files lack
_INT = {"params_total", "params_nonembed", "batch_size", "steps", "seq_len", "tokens"}
_FLOAT = {"sigma", "sigma_bar", "wall_time_s"}


def _parse_curve(text: str) -> tuple[tuple[int, float], ...]:
    points = json.loads(text)
    if not isinstance(points, list) or not points:
        raise ValueError("expected a non-empty JSON list of [step, loss]")
    curve = []
    for point in points:
        step, loss = point
        if not float(step).is_integer() or step < 0:
            raise ValueError(f"step {step!r} is not a non-negative integer")
        if not (math.isfinite(loss) and loss > 0):
            raise ValueError(f"loss {loss!r} is not finite and positive")
        curve.append((int(step), float(loss)))
    if any(b[0] <= a[0] for a, b in zip(curve, curve[1:])):
        raise ValueError("steps must increase")
    return tuple(curve)


def _parse_row(row: dict[str, str]) -> RunResult:
    values: dict = {}
    for name in COLUMNS:
        text = (row.get(name) or "").strip()
        try:
            if name in _INT:
                values[name] = int(text)
                if values[name] <= 0:
                    raise ValueError("must be positive")
            elif name in _FLOAT:
                values[name] = float(text)
                if not math.isfinite(values[name]) or values[name] < 0:
                    raise ValueError("must be finite and >= 0")
            elif name in OPTIONAL:
                values[name] = float(text) if text else None
                if values[name] is not None and not (math.isfinite(values[name]) and values[name] > 0):
                    raise ValueError("must be finite and > 0")
            elif name == "eval_curve":
                values[name] = _parse_curve(text)
            else:
                values[name] = text
        except (ValueError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"column {name!r}: {err}") from None
    if not values["run_id"]:
        raise ValueError("column 'run_id' is empty")
    expected = values["sigma"] / values["batch_size"]
    if not math.isclose(values["sigma_bar"], expected, rel_tol=1e-4, abs_tol=1e-15):
        raise ValueError(f"sigma_bar {values['sigma_bar']} != sigma / batch_size = {expected:.6g}")
    return RunResult(**values)


def read_results(path: str | Path) -> list[RunResult]:
    """All runs in a results CSV; a missing file or a malformed row is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - OPTIONAL - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{path}: missing columns {sorted(missing)}")
        runs = []
        for line, row in enumerate(reader, start=2):
            try:
                runs.append(_parse_row(row))
            except ValueError as err:
                raise UserError(f"{path}, line {line}: {err}") from None
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: duplicate run_id values")
    return runs


def _to_row(run: RunResult) -> dict[str, str]:
    row = {k: "" if v is None else str(v) for k, v in asdict(run).items()}
    row["eval_curve"] = json.dumps([[s, l] for s, l in run.eval_curve])
    return row


def append_results(path: str | Path, runs: list[RunResult]) -> int:
    """Append the runs not yet in the file (by run_id); returns how many were written. Holds an
    exclusive lock on the file meanwhile: sweep jobs running at once append to one table."""
    path = Path(path)
    with path.open("a+", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        header = next(csv.reader(f), None)
        present = {r.run_id for r in read_results(path)} if header else set()
        new = []
        for run in runs:  # the first of each id not yet in the file
            if run.run_id not in present:
                new.append(run)
                present.add(run.run_id)
        # an older table without the optional columns keeps its header
        writer = csv.DictWriter(f, fieldnames=header or COLUMNS, extrasaction="ignore")
        if not header:
            writer.writeheader()
        for run in new:
            writer.writerow(_to_row(run))
    return len(new)


def best_learning_rates(runs: list[RunResult]) -> tuple[list[RunResult], dict | None]:
    """Runs that differ only in learning rate, folded into one: at every evaluated step the loss of
    the best rate (each step is the end point of a run that long under a constant rate after
    warm-up), as McKenna et al. (2025) take the best rate per configuration. Returns the folded
    runs and the choice ({"grid": rates, "best": one row per cell: its size, sigma_bar, batch and
    the rate best at its last step}), or the runs unchanged and None when no two differ only in rate."""
    groups: dict[tuple, list[RunResult]] = {}
    for run in runs:
        key = (run.model, run.params_total, run.batch_size, run.sigma_bar, run.steps, run.seq_len)
        groups.setdefault(key, []).append(run)
    if all(len({r.lr for r in g}) < 2 for g in groups.values()):
        return runs, None
    if any(r.lr is None for r in runs):
        raise UserError("some runs record no learning rate and others several: fit them apart")
    folded, best = [], []
    for (model, params, batch, sigma_bar, steps, _), group in groups.items():
        seeds = {}  # runs of one seed differing in rate; seeds are kept apart (their spread is measured)
        for run in group:
            seeds.setdefault(run.run_id.replace(f"-lr{run.lr:.3g}", ""), []).append(run)
        for name, tried in seeds.items():
            points = [dict(r.eval_curve) for r in tried]
            steps_all = sorted(set.intersection(*(set(p) for p in points)))
            curve = tuple((s, min(p[s] for p in points)) for s in steps_all)
            winner = min(tried, key=lambda r: r.final_loss())
            folded.append(replace(winner, run_id=f"{name}-best-lr", eval_curve=curve,
                                  wall_time_s=round(sum(r.wall_time_s for r in tried), 2)))
            best.append({"params": params, "sigma_bar": sigma_bar, "batch": batch, "lr": winner.lr,
                         "tried": sorted(r.lr for r in tried)})
    grid = sorted({r.lr for r in runs})
    return folded, {"grid": grid, "best": best}


RESULT_FILE = "result.json"  # a finished sweep run's row, in its own run folder


def write_run_result(folder: str | Path, run: RunResult) -> Path:
    """The run's row as JSON in its folder (atomically): `dptrain fit FOLDER` reads these."""
    path = Path(folder) / RESULT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_to_row(run), indent=1) + "\n")
    tmp.replace(path)
    return path


def read_run_result(path: str | Path) -> RunResult:
    path = Path(path)
    try:
        row = json.loads(path.read_text())
        return _parse_row({k: str(v) for k, v in row.items()})
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: not a sweep run's result ({err})") from None


def collect_results(paths: list[str | Path]) -> list[RunResult]:
    """The runs in results CSVs and in folders: a finished run's folder (its result.json) or any
    folder above run folders (every result.json under it). Unfinished runs have none and are skipped."""
    runs: list[RunResult] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.rglob(RESULT_FILE))
            if not found:
                raise UserError(f"{path}: no finished sweep run under it (no {RESULT_FILE})")
            runs += [read_run_result(p) for p in found]
        else:
            runs += read_results(path)
    return runs
