import csv
import json

import pytest

from dptrain.errors import UserError
from dptrain.scaling.results import COLUMNS, append_results, read_results
from dptrain.scaling.synthetic import illustrative_law, synthetic_runs


@pytest.fixture
def runs():
    return synthetic_runs(illustrative_law(), sizes=(2e5, 6e5), sigma_bars=(1e-4,), steps=(100,), evals=5)


def test_round_trip_and_append_skips_known_runs(tmp_path, runs):
    path = tmp_path / "results.csv"
    assert append_results(path, runs[:1]) == 1
    assert append_results(path, runs) == len(runs) - 1  # first run already there
    assert append_results(path, runs + runs) == 0
    assert read_results(path) == runs
    with path.open() as f:
        assert next(csv.reader(f)) == COLUMNS
        assert sum(1 for _ in f) == len(runs)


def _write(path, runs, **changes):
    append_results(path, runs)
    rows = list(csv.DictReader(path.open()))
    rows[0].update(changes)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("changes, message", [
    ({"eval_curve": "[[1, 2.0], [1, 1.5]]"}, "steps must increase"),
    ({"eval_curve": "not json"}, "eval_curve"),
    ({"eval_curve": "[[1, -2.0]]"}, "finite and positive"),
    ({"batch_size": "0"}, "batch_size"),
    ({"steps": "ten"}, "steps"),
    ({"sigma_bar": "0.5"}, "sigma / batch_size"),
    ({"run_id": ""}, "run_id"),
])
def test_malformed_rows_name_line_and_column(tmp_path, runs, changes, message):
    path = tmp_path / "bad.csv"
    _write(path, runs, **changes)
    with pytest.raises(UserError, match=message) as err:
        read_results(path)
    assert "line 2" in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_columns(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_results(tmp_path / "none.csv")
    (tmp_path / "cols.csv").write_text("run_id,model\nx,y\n")
    with pytest.raises(UserError, match="missing columns"):
        read_results(tmp_path / "cols.csv")


def test_final_loss_is_mean_of_last_points(runs):
    run = runs[0]
    assert run.final_loss(2) == pytest.approx(sum(l for _, l in run.eval_curve[-2:]) / 2)
    assert json.loads(json.dumps(run.eval_curve))  # curve is JSON-serialisable as stored
