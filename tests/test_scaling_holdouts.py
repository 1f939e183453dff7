"""Holdout rules the runs can support, and the default method chosen by leave-one-cell-out error
with a nested estimate of that choice's error.

The fits here are cheap stand-ins (the true exponents held, four coefficients by least squares on
the final losses): what is tested is the bookkeeping around them, not the fits."""
import dataclasses
import json

import numpy as np
import pytest

from dptrain.cli import main
from dptrain.errors import UserError
from dptrain.scaling import fit
from dptrain.scaling.fit import (UnsupportedHoldout, choose_method, default_method, fit_all, split_holdout,
                                 validity_range)
from dptrain.scaling.law import ParametricLaw, law_from_dict, load_law, save_laws, squashed_noise
from dptrain.scaling.results import append_results
from dptrain.scaling.synthetic import illustrative_law, synthetic_runs

TRUE = illustrative_law()


def cheap_fit(runs, params_key="total"):
    """The true law's exponents and its coefficients E, A, B, C fitted to the final losses by least
    squares; like every method, it needs two model sizes."""
    m, t, sb = (np.array([getattr(r, k) for r in runs], dtype=float) for k in ("params_total", "steps", "sigma_bar"))
    if len(set(m)) < 2:
        raise UserError("the cheap fit needs runs of at least two model sizes")
    p = TRUE.params
    noise = squashed_noise(sb, p["center"], p["log_width"]) ** p["gamma"] * m ** -p["gamma2"]
    x = np.stack([np.ones_like(m), m ** -p["alpha"], t ** -p["beta"], noise], axis=1)
    coef = np.linalg.lstsq(x, [r.final_loss() for r in runs], rcond=None)[0]
    logs = {k: float(np.log(max(c, 1e-12))) for k, c in zip(("log_E", "log_A", "log_B", "log_C"), coef)}
    return ParametricLaw("parametric", params_key, validity_range(runs, params_key), params={**p, **logs})


def fussy_fit(runs, params_key="total"):
    """A method that cannot fit fewer than 5 runs (as the ceiling fit cannot fit runs without noise)."""
    if len(runs) < 5:
        raise UserError("the fussy fit needs 5 runs")
    return dataclasses.replace(cheap_fit(runs, params_key), method="ceiling")


@pytest.fixture
def cheap(monkeypatch):
    monkeypatch.setitem(fit.FITTERS, "parametric", cheap_fit)
    monkeypatch.setitem(fit.FITTERS, "ceiling", fussy_fit)


def runs_of(sizes=(2e5, 1e6), sigma_bars=(1e-5, 1e-3), steps=(1000,), seed=0):
    return synthetic_runs(TRUE, sizes=sizes, sigma_bars=sigma_bars, steps=steps, evals=10, seed=seed)


def only_at_its_end(run):
    """`run` evaluated only in its second half."""
    return dataclasses.replace(run, eval_curve=tuple(p for p in run.eval_curve if p[0] > run.steps / 2))


@pytest.mark.parametrize("runs, rule, why", [
    (runs_of(sizes=(40528,)), "largest-model", "the runs have one model size (40.5K)"),
    (runs_of(), "largest-model", "the 2 runs it leaves to fit have one model size (200K); every method needs two"),
    (runs_of(), "longest", "the runs have one length (1000 steps)"),
    ([only_at_its_end(runs_of()[0])] + runs_of()[1:], "late",
     "1 of 4 runs have no eval point after step 0 in their first half (m2e+05-sb1e-05-t1000)"),
    (runs_of(sigma_bars=(1e-5,)), "0.9", "it holds out all 2 runs"),
    # 3 runs, the random one held out is the only run of the larger size
    (runs_of(sizes=(2e5,), sigma_bars=(1e-5, 1e-3)) + runs_of(sizes=(1e6,), sigma_bars=(1e-4,)), "0.2",
     "the 2 runs it leaves to fit have one model size (200K)"),
])
def test_a_rule_the_runs_cannot_support_says_why(runs, rule, why):
    with pytest.raises(UnsupportedHoldout) as err:
        split_holdout(runs, rule)
    assert why in str(err.value)


def test_a_misspelled_rule_is_an_error_before_any_fit(monkeypatch):
    calls = []
    monkeypatch.setitem(fit.FITTERS, "parametric", lambda runs, key: calls.append(1) or cheap_fit(runs, key))
    for bad in ("largest", "1.5", "0"):
        with pytest.raises(UserError, match="holdout") as err:
            fit_all(runs_of(), holdout=("late", bad), methods=("parametric",), bootstrap=0)
        assert not isinstance(err.value, UnsupportedHoldout)
    assert not calls


def test_skipped_rules_are_recorded_per_method_and_saved(cheap, tmp_path):
    runs = runs_of(sizes=(2e5, 1e6, 5e6), steps=(500, 1000))  # 12 runs
    laws = fit_all(runs, holdout=("largest-model", "longest", "0.7"), methods=("parametric", "ceiling"), bootstrap=0)
    # every method is measured on the rules the runs support
    assert set(laws["parametric"].holdout) == {"largest-model", "longest", "0.7"}
    assert laws["parametric"].skipped_holdouts == {}
    # the fussy method cannot fit the 4 runs the 0.7 rule leaves: skipped for it alone, with the reason
    assert set(laws["ceiling"].holdout) == {"largest-model", "longest"}
    assert laws["ceiling"].skipped_holdouts == {
        "0.7": "the 4 runs it leaves cannot be fitted: the fussy fit needs 5 runs"}
    save_laws(tmp_path / "law.json", laws, "parametric")
    assert load_law(tmp_path / "law.json", "ceiling").skipped_holdouts == laws["ceiling"].skipped_holdouts
    # a file from before skipped rules were recorded still loads
    old = {k: v for k, v in laws["ceiling"].to_dict().items() if k != "skipped_holdouts"}
    assert law_from_dict(old).skipped_holdouts == {}


def test_fit_prints_each_skipped_rule_and_writes_an_unvalidated_law(cheap, tmp_path, capsys):
    runs = [only_at_its_end(r) for r in runs_of()]
    append_results(tmp_path / "results.csv", runs)
    out = tmp_path / "law.json"
    assert main(["fit", str(tmp_path / "results.csv"), "--out", str(out), "--methods", "parametric",
                 "--no-calibration", "--holdout", "largest-model,late"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ("skipped holdout 'largest-model': the 2 runs it leaves to fit have one model size (200K); "
            "every method needs two") in lines
    assert any(line.startswith("skipped holdout 'late': 4 of 4 runs have no eval point") for line in lines)
    assert any(line.startswith("not validated: every holdout rule was skipped") for line in lines)
    doc = json.loads(out.read_text())
    assert set(doc["laws"]["parametric"]["skipped_holdouts"]) == {"largest-model", "late"}
    assert doc["method_choice"]["rule"] == "none measured" and doc["default"] == "parametric"
    assert any(line.startswith("epsilon shape of the parametric law") for line in lines)
    assert main(["fit", str(tmp_path / "results.csv"), "--out", str(out), "--holdout", "late,largest"]) == 2
    assert "'largest'" in capsys.readouterr().err


def _law_with_cell_errors(method, by_cell):
    law = ParametricLaw(method, "total", {"M": [1, 2], "T": [1, 2], "sigma_bar": [0, 1]}, params=TRUE.params)
    law.leave_one_cell_out = {"by_cell": [{"cell": list(c), "errors": e} for c, e in by_cell.items()]}
    return law


def test_the_method_is_chosen_by_leave_one_cell_out_error_and_the_choice_is_scored_nested():
    cells = [(1e5, 1e-3, 32), (2e5, 1e-3, 32), (4e5, 1e-3, 32), (8e5, 1e-3, 32)]
    laws = {  # "ceiling" is best on three cells and far off on the fourth; "parametric" steady
        "parametric": _law_with_cell_errors("parametric", dict(zip(cells, ([0.02], [0.02], [0.02], [0.02])))),
        "ceiling": _law_with_cell_errors("ceiling", dict(zip(cells, ([0.01], [0.01], [0.01], [0.10])))),
        # a method that predicted only two of the cells: compared on those two alone
        "semiparametric": _law_with_cell_errors("semiparametric", dict(zip(cells[:1] + cells[2:3], ([0.0], [0.0])))),
    }
    chosen, record = choose_method({k: laws[k] for k in ("parametric", "ceiling")})
    assert chosen == "parametric" and record["lowest"] == "parametric" and record["cells"] == 4
    assert record["per_method"]["ceiling"] == {"mean_abs_rel_error": pytest.approx(0.0325), "max_abs_rel_error": 0.10}
    # nested: each cell scored with the method chosen without it. Without the fourth cell ceiling
    # looks better (0.01 against 0.02), and errs 0.10 there: the choice errs more than its winner
    nested = record["nested"]
    assert nested["mean_abs_rel_error"] == pytest.approx((0.02 * 3 + 0.10) / 4)
    assert nested["max_abs_rel_error"] == pytest.approx(0.10)
    assert nested["inner_choices"] == {"parametric": 3, "ceiling": 1}
    chosen, record = choose_method(laws)
    assert chosen == "semiparametric" and record["cells"] == 2
    # a tie goes to the method fitted first
    twin = _law_with_cell_errors("parametric-decay", dict(zip(cells, ([0.02],) * 4)))
    assert choose_method({"parametric": laws["parametric"], "parametric-decay": twin})[0] == "parametric"


def test_the_default_is_given_or_falls_back_and_says_how():
    laws = {"parametric": _law_with_cell_errors("parametric", {(1, 1, 1): [0.03], (2, 1, 1): [0.01]}),
            "ceiling": _law_with_cell_errors("ceiling", {(1, 1, 1): [0.02], (2, 1, 1): [0.01]})}
    name, record = default_method(laws)
    assert name == "ceiling" and record == {**choose_method(laws)[1], "chosen": "ceiling"}
    name, record = default_method(laws, "parametric")
    assert name == "parametric" and record["rule"] == "given (--default)" and record["lowest"] == "ceiling"
    # no leave-one-cell-out errors (--no-calibration): the worst holdout rule, as before
    for law, worst in zip(laws.values(), (0.01, 0.04)):
        law.leave_one_cell_out = {}
        law.holdout = {"late": {"mean_abs_rel_error": worst}, "0.2": {"mean_abs_rel_error": 0.005}}
    name, record = default_method(laws)
    assert name == "parametric" and record["rule"] == "worst holdout rule" and "flatter" in record["note"]
    for law in laws.values():
        law.holdout = {}
    assert default_method(laws)[0] == "parametric" and default_method({"ceiling": laws["ceiling"]})[0] == "ceiling"


def test_fit_saves_and_prints_the_method_choice(cheap, tmp_path, capsys):
    append_results(tmp_path / "results.csv", runs_of(sizes=(2e5, 1e6, 5e6), steps=(500, 1000)))
    out = tmp_path / "law.json"
    argv = ["fit", str(tmp_path / "results.csv"), "--out", str(out), "--methods", "parametric,ceiling",
            "--holdout", "largest-model"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    choice = doc["method_choice"]
    assert choice["rule"] == "leave-one-cell-out" and choice["chosen"] == doc["default"] == choice["lowest"]
    assert choice["cells"] == 6 and set(choice["per_method"]) == {"parametric", "ceiling"}
    assert choice["per_method"][choice["chosen"]]["mean_abs_rel_error"] == min(
        e["mean_abs_rel_error"] for e in choice["per_method"].values())
    assert sum(choice["nested"]["inner_choices"].values()) == 6  # one choice per cell
    assert f"default {doc['default']}: the lowest leave-one-cell-out mean error" in text
    assert f"nested leave-one-cell-out error of the method choice: {choice['nested']['mean_abs_rel_error']:.2%}" in text
    # the same fit again writes the same file
    first = out.read_text()
    assert main(argv) == 0 and out.read_text() == first
    capsys.readouterr()
    assert main([*argv, "--default", "ceiling"]) == 0
    assert json.loads(out.read_text())["method_choice"]["rule"] == "given (--default)"
    assert "default ceiling: given (--default)" in capsys.readouterr().out
    assert main([*argv, "--no-calibration"]) == 0
    assert json.loads(out.read_text())["method_choice"]["rule"] == "worst holdout rule"
    assert "the lowest worst holdout error (no leave-one-cell-out errors: --no-calibration)" in capsys.readouterr().out
