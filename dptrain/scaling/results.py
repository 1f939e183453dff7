"""The sweep results table: one CSV row per finished training run.

`eval_curve` holds the eval-loss curve as a JSON list of `[step, loss]` pairs. `run_id` is the key:
`append_results` skips runs whose id is already in the file, so a restarted sweep can re-append.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
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

    def params(self, key: str = "total") -> int:
        return self.params_total if key == "total" else self.params_nonembed

    def final_loss(self, window: int = 3) -> float:
        """Mean of the last `window` eval points: the run's loss at T with eval noise damped."""
        tail = [loss for _, loss in self.eval_curve[-window:]]
        return sum(tail) / len(tail)


COLUMNS = [f.name for f in fields(RunResult)]
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
        missing = set(COLUMNS) - set(reader.fieldnames or [])
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
    row = {k: str(v) for k, v in asdict(run).items()}
    row["eval_curve"] = json.dumps([[s, l] for s, l in run.eval_curve])
    return row


def append_results(path: str | Path, runs: list[RunResult]) -> int:
    """Append the runs not yet in the file (by run_id); returns how many were written."""
    path = Path(path)
    present = {r.run_id for r in read_results(path)} if path.exists() else set()
    new = []
    for run in runs:
        if run.run_id not in present:
            new.append(run)
            present.add(run.run_id)
    write_header = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if write_header:
            writer.writeheader()
        for run in new:
            writer.writerow(_to_row(run))
    return len(new)
