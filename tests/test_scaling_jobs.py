"""Sweeps as independent jobs (an index per run, parallel processes, resumed runs, a result in each
run's folder), learning-rate grids folded to each cell's best, fits from run folders, and
`dptrain sweep design` sized to a budget."""
import csv
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from dptrain.cli import main
from dptrain.errors import UserError
from dptrain.scaling import design
from dptrain.scaling.provenance import fit_provenance, learning_rate_for
from dptrain.scaling.results import (RESULT_FILE, append_results, best_learning_rates, collect_results,
                                     read_results, write_run_result)
from dptrain.scaling.sweep import execute, expand, load_spec
from dptrain.scaling.synthetic import illustrative_law, synthetic_runs

MICRO_MODEL = dict(vocab_size=2048, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                   num_kv_heads=1, head_dim=16, max_seq_len=64, query_pre_attn_scalar=16.0)


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    from dptrain.data.demo import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("demo"), seq_len=32, vocab_size=2048, num_records=400)


def write_spec(folder: Path, data, steps=3, lrs=(1e-3, 4e-3), checkpoint_every=0) -> str:
    (folder / "micro.yaml").write_text(yaml.safe_dump(MICRO_MODEL))
    spec = {"results": "results.csv", "models": ["micro.yaml"], "batch_sizes": [8], "sigma_bars": [0.1],
            "steps": [steps], "learning_rates": list(lrs),
            "base": {"data": {"path": str(data)}, "out_dir": str(folder / "runs"), "privacy": {"delta": 1e-5},
                     "runtime": {"micro_batch_size": 8, "device": "cpu", "threads": 1},
                     "eval": {"every": 2, "max_sequences": 8}, "checkpoint": {"every": checkpoint_every},
                     "logging": {"wandb": "disabled"}}}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_learning_rates_expand_into_runs_with_their_rate(micro_data, tmp_path, capsys):
    spec = write_spec(tmp_path, micro_data)
    runs = expand(load_spec(spec), tmp_path)
    assert [(r.run_id, r.lr) for r in runs] == [("micro-B8-sb0.1-T3-s0-lr0.001", 1e-3),
                                                ("micro-B8-sb0.1-T3-s0-lr0.004", 4e-3)]
    assert main(["sweep", "run", spec, "--count"]) == 0
    assert capsys.readouterr().out.strip() == "2"
    assert main(["sweep", "run", spec, "--index", "1"]) == 0  # only run 1, as a job array's task
    folder = tmp_path / "runs" / runs[1].run_id
    row = json.loads((folder / RESULT_FILE).read_text())
    assert row["run_id"] == runs[1].run_id and float(row["lr"]) == 4e-3
    assert [r.run_id for r in read_results(tmp_path / "results.csv")] == [runs[1].run_id]
    assert not (tmp_path / "runs" / runs[0].run_id / RESULT_FILE).exists()
    assert main(["sweep", "run", spec, "--index", "1"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["sweep", "run", spec, "--index", "2"]) == 2
    assert "runs 0..1" in capsys.readouterr().err
    # a finished run's folder counts as done even when the table lost its row
    (tmp_path / "results.csv").unlink()
    assert main(["sweep", "run", spec, "--dry-run"]) == 0
    assert runs[1].run_id not in capsys.readouterr().out


def test_parallel_jobs_train_every_run_once(micro_data, tmp_path):
    spec = write_spec(tmp_path, micro_data)
    assert main(["sweep", "run", spec, "--jobs", "2"]) == 0
    rows = read_results(tmp_path / "results.csv")
    assert sorted(r.run_id for r in rows) == sorted(r.run_id for r in expand(load_spec(spec), tmp_path))
    assert {r.lr for r in rows} == {1e-3, 4e-3}
    assert len(collect_results([tmp_path / "runs"])) == 2  # one result.json per run folder


class Crash(Exception):
    pass


def test_an_interrupted_run_resumes_from_its_checkpoint(micro_data, tmp_path):
    spec_path = write_spec(tmp_path, micro_data, steps=6, lrs=(1e-3,), checkpoint_every=2)
    spec = load_spec(spec_path)
    run = expand(spec, tmp_path)[0]
    seen = []

    def crash_after_three():
        seen.append(1)
        if len(seen) == 3:
            raise Crash

    with pytest.raises(Crash):
        execute(spec, run, on_step=crash_after_three)
    folder = tmp_path / "runs" / run.run_id
    assert not (folder / RESULT_FILE).exists()
    steps = []
    row = execute(spec, run, on_step=lambda: steps.append(1))
    assert len(steps) == 4  # resumed at step 2, the last checkpoint before the crash at 3
    assert [s for s, _ in row.eval_curve] == [0, 2, 4, 6]  # the curve so far came back with it
    assert (folder / RESULT_FILE).is_file()


def test_best_learning_rate_per_cell_is_the_pointwise_best():
    base = synthetic_runs(illustrative_law())[:2]
    runs = []
    for run in base:
        for lr, shift in ((1e-3, 0.10), (4e-3, 0.0)):
            curve = tuple((s, l + shift + (0.3 if lr == 4e-3 and s == run.eval_curve[0][0] else 0)) for s, l in run.eval_curve)
            runs.append(dataclasses.replace(run, run_id=f"{run.run_id}-lr{lr:.3g}", lr=lr, eval_curve=curve))
    folded, choice = best_learning_rates(runs)
    assert len(folded) == 2 and choice["grid"] == [1e-3, 4e-3]
    for run, fold in zip(base, folded):
        assert fold.run_id == f"{run.run_id}-best-lr" and fold.lr == 4e-3
        # the first point: the lower rate's point (the other is worse there); later: the higher rate's
        assert fold.eval_curve[0][1] == pytest.approx(run.eval_curve[0][1] + 0.10)
        assert fold.eval_curve[-1][1] == pytest.approx(run.eval_curve[-1][1])
    assert [c["lr"] for c in choice["best"]] == [4e-3, 4e-3]
    assert best_learning_rates(base) == (base, None)  # one rate per cell: nothing to fold


def test_plans_take_the_nearest_cells_rate():
    fitted_on = {"learning_rates": {"grid": [1e-3, 4e-3], "best": [
        {"params": 1e4, "sigma_bar": 0.0, "batch": 32, "lr": 4e-3},
        {"params": 1e6, "sigma_bar": 0.0, "batch": 32, "lr": 1e-3},
        {"params": 1e6, "sigma_bar": 0.02, "batch": 32, "lr": 4e-3}]}}
    assert learning_rate_for(fitted_on, 2e4, 0.0) == 4e-3
    assert learning_rate_for(fitted_on, 8e5, 1e-5) == 1e-3
    assert learning_rate_for(fitted_on, 8e5, 0.03) == 4e-3
    assert learning_rate_for({"optimizer": {"lr": 3e-3}}, 1e5, 0.0) == 3e-3
    assert learning_rate_for(None, 1e5, 0.0) is None
    prov = fit_provenance(synthetic_runs(illustrative_law())[:3], learning_rates=fitted_on["learning_rates"])
    assert "best of 0.001, 0.004" in prov["lr_rule"] and prov["learning_rates"]["grid"] == [1e-3, 4e-3]


def test_fit_reads_run_folders(tmp_path, capsys):
    runs = synthetic_runs(illustrative_law())
    for run in runs:
        folder = tmp_path / "sweep" / run.run_id
        folder.mkdir(parents=True)
        write_run_result(folder, run)
    (tmp_path / "sweep" / "unfinished").mkdir()  # a run still going: no result yet, skipped
    assert {r.run_id for r in collect_results([tmp_path / "sweep"])} == {r.run_id for r in runs}
    assert main(["fit", str(tmp_path / "sweep"), "--out", str(tmp_path / "law.json"), "--methods",
                 "parametric", "--holdout", "none", "--no-calibration"]) == 0
    assert json.loads((tmp_path / "law.json").read_text())["default"] == "parametric"
    # the same runs again through a CSV: refused, a run is fitted once
    append_results(tmp_path / "r.csv", runs)
    assert main(["fit", str(tmp_path / "sweep"), str(tmp_path / "r.csv"), "--out", str(tmp_path / "x.json")]) == 2
    assert "fitted only once" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no finished sweep run"):
        collect_results([tmp_path / "empty"])
    (tmp_path / "sweep" / "unfinished" / RESULT_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not a sweep run's result"):
        collect_results([tmp_path / "sweep"])


def test_an_older_table_without_the_rate_column_keeps_its_header(tmp_path):
    runs = synthetic_runs(illustrative_law())[:2]
    path = tmp_path / "old.csv"
    append_results(path, runs[:1])
    rows = list(csv.reader(path.open()))
    with path.open("w", newline="") as f:  # the table as written before rates were recorded
        csv.writer(f).writerows([r[:-1] for r in rows])
    append_results(path, [dataclasses.replace(runs[1], lr=1e-3)])
    assert [r.lr for r in read_results(path)] == [None, None]
    assert next(csv.reader(path.open()))[-1] == "date"


FAKE_TIMES = [(0.05, 0.2), (0.06, 0.2), (0.09, 0.3), (0.15, 0.5), (0.26, 1.1), (0.57, 2.2), (0.9, 3.8)]


@pytest.fixture
def fake_timing(monkeypatch):
    calls = []

    def measured(config, batch, seq_len, device, repeats=3):
        calls.append(config["hidden_size"])
        return FAKE_TIMES[[r[0] for r in design.RUNGS].index(config["hidden_size"])]

    monkeypatch.setattr(design, "measure_seconds", measured)
    return calls


def test_design_sizes_the_sweep_to_the_budget(micro_data, tmp_path, fake_timing):
    small = design.design_sweep(micro_data, tmp_path / "a" / "spec.yaml", hours=0.5, gpu=False,
                                epsilons=(2, 16), delta=None, batch=8, learning_rates=[3e-3, 6e-3], progress=False)
    large = design.design_sweep(micro_data, tmp_path / "b" / "spec.yaml", hours=4, gpu=False,
                                epsilons=(2, 16), delta=None, batch=8, learning_rates=[3e-3, 6e-3], progress=False)
    for d, hours in ((small, 0.5), (large, 4)):
        assert d.seconds <= hours * 3600 and len(d.sizes) >= design.MIN_SIZES
        assert d.runs == len(d.sizes) * 4 * 2
    assert len(large.sizes) > len(small.sizes) or large.steps > small.steps
    sb = large.sigma_bars
    assert sb[0] == 0 and all(a < b for a, b in zip(sb[1:], sb[2:]))
    spec = load_spec(tmp_path / "b" / "spec.yaml")  # loads, and every run's config is valid
    runs = expand(spec, tmp_path / "b")
    assert len(runs) == large.runs and {r.lr for r in runs} == {3e-3, 6e-3}
    assert spec.base["schedule"]["decay"] == "constant" and spec.base["runtime"]["threads"] == 1
    header = (tmp_path / "b" / "spec.yaml").read_text().splitlines()[0]
    assert "4 core-hours" in header
    # what the main grid leaves pays for seed repeats: the smallest sizes again, every rate
    assert large.repeats and large.seconds + large.repeat_seconds <= 4 * 3600
    seeds = load_spec(tmp_path / "b" / "spec-seeds.yaml")
    assert seeds.seeds == [1] and len(seeds.sigma_bars) == 1 and seeds.results == spec.results
    assert len(expand(seeds, tmp_path / "b")) == len(large.repeats) * 2


def test_design_refuses_what_it_cannot_do(micro_data, tmp_path, fake_timing, capsys):
    with pytest.raises(UserError, match="below the smallest useful sweep"):
        design.design_sweep(micro_data, tmp_path / "s.yaml", hours=0.01, gpu=False, epsilons=(2, 16),
                            delta=None, batch=8, learning_rates=[3e-3], progress=False)
    assert main(["sweep", "design", "--data", str(micro_data), "--out", str(tmp_path / "s.yaml")]) == 2
    assert "--core-hours or --gpu-hours" in capsys.readouterr().err
    assert main(["sweep", "design", "--data", str(micro_data), "--core-hours", "1", "--epsilon", "2",
                 "--out", str(tmp_path / "s.yaml")]) == 2
    assert "LO,HI" in capsys.readouterr().err
    assert main(["sweep", "design", "--data", str(micro_data), "--core-hours", "1", "--delta", "0.5",
                 "--out", str(tmp_path / "s.yaml")]) == 2
    assert not (tmp_path / "s.yaml").exists()


def test_written_plan_config_takes_the_nearest_cells_rate():
    from dptrain.scaling.plan import Plan, training_config

    fitted_on = {"optimizer": {"name": "adamw", "lr": 6e-3, "betas": [0.9, 0.95], "weight_decay": 0.0},
                 "learning_rates": {"grid": [6e-3, 2.4e-2], "best": [
                     {"params": 2e4, "sigma_bar": 0.005, "batch": 32, "lr": 2.4e-2},
                     {"params": 3e5, "sigma_bar": 0.005, "batch": 32, "lr": 6e-3}]}}
    fields = {f: 0 for f in Plan.__dataclass_fields__}
    small = Plan(**{**fields, "params": 2.5e4, "batch_size": 32, "steps": 500, "sigma": 0.16, "sigma_bar": 0.005,
                    "loss": 4.0, "nearest_config": "ladder-0", "accountant": "rdp"})
    large = dataclasses.replace(small, params=2.5e5, nearest_config="ladder-2")
    assert training_config(small, 8, 1e-6, 64, "data", fitted_on=fitted_on)["optimizer"]["lr"] == 2.4e-2
    assert training_config(large, 8, 1e-6, 64, "data", fitted_on=fitted_on)["optimizer"]["lr"] == 6e-3


def test_a_plan_outside_the_fitted_batches_says_what_it_assumes():
    from dptrain.scaling.plan import _with_honesty, describe_extrapolation, plan

    law = illustrative_law({"M": [1e5, 1e8], "T": [10, 1e5], "sigma_bar": [1e-6, 1e-1], "batch": [32, 32]})
    best = plan(law, 1e15, 8, 1e-6, 1_000_000, 64, top=1)[0]
    assert best.batch_size != 32 and "outside the fitted batches (32..32)" in describe_extrapolation(best)
    at_32 = plan(law, 1e15, 8, 1e-6, 1_000_000, 64, top=1, max_batch=32)[0]
    assert at_32.batch_size == 32 and not at_32.assumes
    assert not _with_honesty(illustrative_law(), best).assumes  # a law with no batch range assumes nothing
