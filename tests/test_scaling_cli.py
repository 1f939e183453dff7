"""`dptrain fit` and `dptrain plan` end to end on a synthetic sweep."""
import json

import pytest
import yaml

from dptrain.cli import main
from dptrain.scaling.results import append_results
from dptrain.scaling.synthetic import illustrative_law, synthetic_runs


@pytest.fixture(scope="module")
def law_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    runs = synthetic_runs(illustrative_law(), sizes=(2e5, 1e6, 5e6), sigma_bars=(1e-5, 1e-4, 1e-3),
                          steps=(1000,))
    append_results(folder / "results.csv", runs)
    # three methods, each refitted without each of the 9 cells and 3 sizes for its interval
    assert main(["fit", str(folder / "results.csv"), "--out", str(folder / "law.json"),
                 "--holdout", "largest-model", "--methods", "parametric-decay,ceiling,semiparametric"]) == 0
    return folder / "law.json"


def test_the_cli_offers_every_law_method(law_file, capsys):
    from dptrain.scaling import LAW_METHODS
    from dptrain.scaling.fit import FITTERS
    from dptrain.scaling.law import _KINDS

    assert tuple(FITTERS) == LAW_METHODS and set(_KINDS) == set(LAW_METHODS)
    assert main(["plan", "--compute", "1e17", "--epsilon", "2", "--delta", "1e-8", "--data-size",
                 "10000000", "--seq-len", "256", "--law", str(law_file), "--method", "ceiling",
                 "--allow-extrapolation", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["law_method"] == "ceiling"


def test_fit_writes_every_law_the_runs_inform(law_file, tmp_path, capsys):
    doc = json.loads(law_file.read_text())
    assert set(doc["laws"]) == {"parametric-decay", "ceiling", "semiparametric"}  # --methods
    assert doc["default"] in doc["laws"]
    for law in doc["laws"].values():
        assert set(law["holdout"]) == {"largest-model"}
        assert law["validity"]["M"] == [200000, 5000000]
        assert law["leave_one_cell_out"]["groups"] == 9 and law["leave_one_size_out"]["groups"] == 3
        assert len(law["calibration"]["cells"]) == 9
    assert doc["fitted_on"]["seq_len"] == 257 and doc["fitted_on"]["optimizer"] == "unknown"
    out = tmp_path / "all.json"
    assert main(["fit", str(law_file.parent / "results.csv"), "--out", str(out), "--holdout", "none",
                 "--no-calibration"]) == 0
    # one batch size: the batch exponent cannot be fitted, so parametric-batch is left out
    assert set(json.loads(out.read_text())["laws"]) == {"parametric", "parametric-decay", "ceiling", "semiparametric"}
    assert main(["fit", str(law_file.parent / "results.csv"), "--out", str(out), "--methods",
                 "parametric-batch"]) == 2
    assert "two batch sizes" in capsys.readouterr().err


def test_plan_json_config_and_plots(law_file, tmp_path, capsys):
    config, plots = tmp_path / "new" / "train.yaml", tmp_path / "plots"  # a folder not yet made
    assert main(["plan", "--compute", "1e17", "--epsilon", "2", "--delta", "1e-8",
                 "--data-size", "10000000", "--seq-len", "256", "--law", str(law_file), "--json",
                 "--top", "3", "--write-config", str(config), "--data-path", str(tmp_path / "data"),
                 "--plot-dir", str(plots), "--allow-extrapolation"]) == 0
    out = json.loads(capsys.readouterr().out)
    best = out["plans"][0]
    assert out["law_validity"]["T"] == [50, 1000] and best["steps"] > 1000
    assert best["outside"]["T"] == pytest.approx(best["steps"] / 1000)
    assert best["outside"]["M"] == 1.0 or best["params"] < 2e5 or best["params"] > 5e6
    low, high = best["interval"]  # calibrated on held-out cells
    assert low <= high and low < best["loss"] * 1.5 and high > best["loss"] / 1.5
    assert best["interval_kind"] == "calibrated"
    header = config.read_text().splitlines()[1]
    assert "outside the fitted range: " in header and "90% interval" in header
    assert len(out["plans"]) == 3 and out["nonprivate_params_chinchilla"] > out["plans"][0]["params"]
    written = yaml.safe_load(config.read_text())
    assert written["privacy"]["steps"] == out["plans"][0]["steps"]
    assert written["privacy"]["noise_multiplier"] == pytest.approx(out["plans"][0]["sigma"], rel=1e-5)
    for name in ("loss_vs_compute.png", "optimal_size_vs_compute.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_table(law_file, capsys):
    argv = ["plan", "--compute", "1e17", "--epsilon", "2", "--delta", "1e-8", "--data-size",
            "10000000", "--seq-len", "256", "--law", str(law_file), "--method", "semiparametric"]
    # its best plan runs 3.16x longer than the longest fitted run: refused unless allowed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "T 3.16x" in err and "--allow-extrapolation" in err
    assert main([*argv, "--allow-extrapolation"]) == 0
    out = capsys.readouterr().out
    assert "sigma_bar" in out and "non-private optimum (Chinchilla rule)" in out
    assert "saturated" in out and "3.16x" in out and "90% interval" in out


def test_search_bounds_are_options_and_flagged(law_file, capsys):
    assert main(["plan", "--compute", "1e16", "--epsilon", "2", "--delta", "1e-8", "--data-size",
                 "10000000", "--seq-len", "256", "--law", str(law_file), "--json", "--top", "3",
                 "--max-steps", "1000", "--max-batch", "4096"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert all(p["steps"] <= 1000 and p["batch_size"] <= 4096 for p in plans)
    assert any("steps max" in p["edges"] or "batch max" in p["edges"] for p in plans)


def test_smallest_model_searched_is_the_laws_smallest_by_default(law_file, capsys):
    argv = ["plan", "--compute", "3e14", "--epsilon", "2", "--delta", "1e-8", "--data-size", "10000000",
            "--seq-len", "256", "--law", str(law_file), "--json", "--top", "5", "--allow-extrapolation"]
    assert main(argv) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert min(p["params"] for p in plans) >= 2e5 * (1 - 1e-9)  # the law was fitted on 2e5..5e6
    assert "params min" in plans[0]["edges"]  # near the bound: a smaller model might do better
    assert main([*argv, "--min-params", "5e4"]) == 0  # a bound given by hand replaces the law's
    wider = json.loads(capsys.readouterr().out)["plans"]
    assert "params min" not in wider[0]["edges"] and wider[0]["params"] == plans[0]["params"]


@pytest.mark.parametrize("argv, message", [
    (["fit", "missing.csv", "--out", "x.json"], "not found"),
    (["plan", "--compute", "1e3", "--epsilon", "1", "--delta", "1e-8", "--data-size", "10000000",
      "--law", "LAW"], "below the cheapest plan searched"),
    (["plan", "--compute", "1e17", "--epsilon", "1", "--delta", "2", "--data-size", "10000000",
      "--law", "LAW"], "delta"),
])
def test_errors_are_one_line(law_file, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [str(law_file) if a == "LAW" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_malformed_csv(tmp_path, capsys):
    (tmp_path / "r.csv").write_text("run_id,model\n1,2\n")
    assert main(["fit", str(tmp_path / "r.csv"), "--out", str(tmp_path / "l.json")]) == 2
    assert "missing columns" in capsys.readouterr().err


def test_plan_in_units_costs_k_sequences_per_unit(law_file, tmp_path, capsys):
    from dptrain import configio
    from dptrain.train.config import TrainConfig

    common = ["plan", "--compute", "1e17", "--epsilon", "2", "--delta", "1e-8", "--data-size", "100000",
              "--law", str(law_file), "--json", "--top", "2", "--allow-extrapolation"]
    config = tmp_path / "train.yaml"
    assert main([*common, "--seq-len", "256", "--unit", "group", "--sequences-per-unit", "4",
                 "--write-config", str(config), "--data-path", str(tmp_path / "data")]) == 0
    by_user = json.loads(capsys.readouterr().out)["plans"]
    # a unit of 4 sequences of 256 tokens costs what one 1024-token example costs
    assert main([*common, "--seq-len", "1024"]) == 0
    by_sequence = json.loads(capsys.readouterr().out)["plans"]
    assert [(p["params"], p["batch_size"], p["steps"]) for p in by_user] == \
        [(p["params"], p["batch_size"], p["steps"]) for p in by_sequence]
    written = yaml.safe_load(config.read_text())
    assert written["privacy"]["unit"] == "group" and written["privacy"]["max_sequences_per_unit"] == 4
    assert written["privacy"]["expected_batch_size"] == by_user[0]["batch_size"]
    assert written["runtime"]["micro_batch_size"] % 4 == 0
    configio.from_dict(TrainConfig, {**written, "model": str(tmp_path / written["model"])})
    assert main([*common, "--unit", "sequence", "--sequences-per-unit", "2"]) == 2
    assert "--sequences-per-unit" in capsys.readouterr().err


PLAN = ["plan", "--data-size", "100000", "--seq-len", "256"]


@pytest.mark.parametrize("budget, problem", [
    (["--compute", "1e17", "--epsilon", "2", "--delta", "0.5"], "delta 0.5 >= 1/N = 1e-05"),
    (["--compute", "1e17", "--epsilon", "2", "--delta", "1e-5"], "delta 1e-05 >= 1/N"),
    (["--compute", "1e17", "--epsilon", "inf", "--delta", "1e-8"], "epsilon inf is no privacy guarantee"),
    (["--compute", "1e17", "--epsilon", "1e-4", "--delta", "1e-8"], "epsilon 0.0001 at delta 1e-08 is out of reach"),
    (["--compute", "1e6", "--epsilon", "2", "--delta", "1e-8"], "compute 1e+06 FLOPs is below the cheapest plan"),
    (["--compute", "1e30", "--epsilon", "2", "--delta", "1e-8"], "more than 100x what the dearest plan"),
    (["--compute", "nan", "--epsilon", "2", "--delta", "1e-8"], "--compute must be a finite number"),
    (["--compute", "1e13", "--epsilon", "2", "--delta", "1e-8", "--min-params", "1e9"],
     "on 1e+09 parameters (the smallest model searched, --min-params)"),
])
def test_impossible_plans_name_the_problem(law_file, tmp_path, capsys, budget, problem):
    config = tmp_path / "train.yaml"
    argv = [*PLAN, *budget, "--law", str(law_file), "--allow-extrapolation",
            "--write-config", str(config), "--data-path", str(tmp_path / "data")]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and problem in err and err.count("\n") == 1
    assert not config.exists()  # refused before anything is written
