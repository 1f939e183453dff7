import json

import pytest

from dptrain.cli import main
from dptrain.privacy.accounting import epsilon

BASE = ["--sampling-rate", "0.01", "--steps", "1000", "--delta", "1e-6"]


def test_epsilon_json_all_accountants(capsys):
    assert main(["privacy", "epsilon", "--noise-multiplier", "1.0", *BASE, "--accountant", "all",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["epsilon"]) == {"pld", "rdp", "prv"}
    assert out["epsilon"]["pld"] == epsilon(1.0, 0.01, 1000, 1e-6)
    assert out["epsilon"]["pld"] <= out["epsilon"]["rdp"]
    assert out["upper_bounds"] == ["pld", "rdp"]


def test_epsilon_text_labels_estimates(capsys):
    assert main(["privacy", "epsilon", "--noise-multiplier", "1.0", *BASE, "--accountant", "all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.endswith("(upper bound)") for line in lines] == [True, True, False]
    assert "(prv)" in lines[2] and lines[2].endswith("(estimate, not a guarantee)")


def test_epsilon_truncated_reports_only_pld(capsys):
    assert main(["privacy", "epsilon", "--noise-multiplier", "1.0", *BASE, "--accountant", "all",
                 "--dataset-size", "100000", "--max-batch-size", "1300"]) == 0
    out = capsys.readouterr().out
    assert "epsilon (pld)" in out and "not applicable" in out and "epsilon (rdp)" not in out


def test_noise_round_trip(capsys):
    assert main(["privacy", "noise", "--epsilon", "3", *BASE, "--accountant", "rdp",
                 "--json"]) == 0
    sigma = json.loads(capsys.readouterr().out)["noise_multiplier"]["rdp"]
    assert epsilon(sigma, 0.01, 1000, 1e-6, "rdp") <= 3


@pytest.mark.parametrize("argv", [
    ["privacy", "epsilon", "--noise-multiplier", "1.0", "--sampling-rate", "1.5", "--steps", "10",
     "--delta", "1e-6"],
    ["privacy", "noise", "--epsilon", "-1", *BASE],
    ["privacy", "epsilon", "--noise-multiplier", "1.0", *BASE, "--accountant", "rdp",
     "--dataset-size", "1000", "--max-batch-size", "20"],
    ["privacy", "epsilon", "--noise-multiplier", "1.0", *BASE, "--max-batch-size", "20"],
])
def test_bad_input_is_one_line_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dptrain privacy: error:") and err.count("\n") == 1


@pytest.mark.parametrize("argv, problem", [
    (["privacy", "epsilon", "--noise-multiplier", "1e-300", *BASE], "noise multiplier 1e-300"),
    (["privacy", "epsilon", "--noise-multiplier", "1e300", *BASE], "noise multiplier 1e+300"),
    (["privacy", "epsilon", "--noise-multiplier", "1.0", "--sampling-rate", "0.01", "--steps", "1000",
      "--delta", "0.5"], "delta 0.5 is no guarantee"),
    (["privacy", "noise", "--epsilon", "1", "--sampling-rate", "0.01", "--steps", "1000",
      "--delta", "0.5"], "delta 0.5 is no guarantee"),
])
def test_extreme_sigma_and_delta_are_named_in_one_line(argv, problem, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and problem in err and err.count("\n") == 1


def test_delta_at_least_one_over_n_is_flagged(capsys):
    assert main(["privacy", "epsilon", "--noise-multiplier", "1.0", "--sampling-rate", "0.01",
                 "--steps", "100", "--delta", "1e-3", "--dataset-size", "1000",
                 "--max-batch-size", "30"]) == 0
    out, err = capsys.readouterr()
    assert "epsilon (pld)" in out
    assert err.startswith("warning: delta 0.001 >= 1/N") and err.count("\n") == 1
