"""Both fits on synthetic sweeps drawn from a known law plus 0.5% noise."""
import dataclasses
import warnings

import numpy as np
import pytest

from dptrain.errors import UserError
from dptrain.scaling.fit import applicable_methods, fit_all, fit_semiparametric, smooth_curve, split_holdout
from dptrain.scaling.law import ExtrapolationWarning, load_law, save_laws
from dptrain.scaling.synthetic import illustrative_law, synthetic_runs

TRUE = illustrative_law()


@pytest.fixture(scope="module")
def runs():
    return synthetic_runs(TRUE, seed=1)


@pytest.fixture(scope="module")
def laws(runs):
    # every method the runs inform; bootstrap refits only for the parametric law, whose interval
    # is the one tested (the other methods' refits would go unread)
    holdout = ("0.2", "late")
    laws = fit_all(runs, holdout=holdout, methods=("parametric",), bootstrap=5)
    others = [name for name in applicable_methods(runs) if name != "parametric"]
    laws.update(fit_all(runs, holdout=holdout, methods=others, bootstrap=0))
    assert list(laws) == applicable_methods(runs)
    return laws


def _inside_grid(law):
    v = law.validity
    m, t, sb = np.meshgrid(np.geomspace(*v["M"], 5), np.geomspace(v["T"][1] / 20, v["T"][1], 5),
                           np.geomspace(*v["sigma_bar"], 5))
    return m.ravel(), t.ravel(), sb.ravel()


def test_parametric_recovers_the_law(laws):
    law = laws["parametric"]
    m, t, sb = _inside_grid(law)
    rel = np.abs(law.predict(m, t, sb) / TRUE.predict(m, t, sb, warn=False) - 1)
    assert rel.max() < 0.02
    for name in ("alpha", "beta", "gamma2"):
        assert law.params[name] == pytest.approx(TRUE.params[name], abs=0.05)


def test_bootstrap_interval_brackets_the_fit(laws):
    law = laws["parametric"]
    assert len(law.bootstrap) == 5 and laws["semiparametric"].interval(1e6, 500, 1e-4) is None
    m, t, sb = _inside_grid(law)
    for point in list(zip(m, t, sb))[::25]:
        low, high = law.interval(*point)
        assert low < high and low <= law.predict(*point) * 1.001 and high >= law.predict(*point) * 0.999
    v = law.validity
    assert law.outside_factors(v["M"][1] * 4, v["T"][0], v["sigma_bar"][0] / 2) == {
        "M": pytest.approx(4.0), "T": 1.0, "sigma_bar": pytest.approx(2.0)}


def test_irreducible_loss_comes_from_noise_free_runs():
    noise_free = synthetic_runs(TRUE, sigma_bars=(0.0, 1e-5, 1e-4, 1e-3), seed=1)
    law = fit_all(noise_free, holdout=None, methods=("parametric",), bootstrap=0)["parametric"]
    assert law.irreducible_from == "noise-free runs"
    assert np.exp(law.params["log_E"]) == pytest.approx(np.exp(TRUE.params["log_E"]), rel=0.05)
    # the noise term is fitted, not fixed, and still costs something at the smallest ratio fitted
    m, t = 1e6, 4000
    assert law.predict(m, t, 1e-5) > law.predict(m, t, 0.0) * 1.0005
    joint = fit_all(synthetic_runs(TRUE, seed=1), holdout=None, methods=("parametric",),
                    bootstrap=0)["parametric"]
    assert joint.irreducible_from == "joint fit"


def test_law_files_without_a_fitted_squash_still_load(laws, tmp_path):
    from dptrain.scaling.law import FIXED_SQUASH, law_from_dict

    doc = laws["parametric"].to_dict()
    old = {**doc, "params": {k: v for k, v in doc["params"].items() if k not in FIXED_SQUASH}}
    del old["irreducible_from"]

    old["holdout"] = {"rule": "0.2", **doc["holdout"]["0.2"]}  # one rule, before rules were keyed
    law = law_from_dict(old)
    assert {k: law.params[k] for k in FIXED_SQUASH} == FIXED_SQUASH
    assert law.holdout == {"0.2": doc["holdout"]["0.2"]}


def test_semiparametric_recovers_the_law(laws):
    law = laws["semiparametric"]
    m, t, sb = _inside_grid(law)
    rel = np.abs(law.predict(m, t, sb) / TRUE.predict(m, t, sb, warn=False) - 1)
    assert np.median(rel) < 0.03 and rel.max() < 0.10


def test_holdout_errors_are_small_and_recorded(laws, runs):
    for law, bound in ((laws["parametric"], 0.02), (laws["parametric-decay"], 0.02), (laws["semiparametric"], 0.06)):
        h = law.holdout["0.2"]
        assert len(h["runs"]) == round(0.2 * len(runs))
        assert h["mean_abs_rel_error"] < bound
        assert h["max_abs_rel_error"] >= h["mean_abs_rel_error"]
        # each run fitted on its first half, its end predicted: the right shape extrapolates in T
        assert len(law.holdout["late"]["runs"]) == len(runs)
    for name in ("parametric", "parametric-decay"):
        assert laws[name].holdout["late"]["mean_abs_rel_error"] < 0.02
    # the law's shape has no noise decay in T: the decaying shape finds (almost) none
    assert laws["parametric-decay"].params["gamma3"] < 0.1 and laws["parametric"].params["gamma3"] == 0


def test_a_noise_cost_that_shrinks_with_steps_needs_the_decaying_shape():
    """Runs drawn from a law whose noise term decays as T^-0.5: the paper's shape cannot follow it
    past the steps it was fitted on (the "late" holdout), the decaying shape can."""
    true = illustrative_law()
    true.params.update(gamma3=0.5, log_C=true.params["log_C"] + 0.5 * np.log(4000))
    runs = synthetic_runs(true, seed=2)
    laws = fit_all(runs, holdout=("late",), methods=("parametric", "parametric-decay"), bootstrap=0)
    decay, paper = (laws[k].holdout["late"]["mean_abs_rel_error"] for k in ("parametric-decay", "parametric"))
    assert decay < 0.02 and paper > 2 * decay
    assert laws["parametric-decay"].params["gamma3"] == pytest.approx(0.5, abs=0.15)


def test_a_data_term_that_falls_with_the_batch_needs_the_batch_shape():
    """Runs at two batch sizes drawn from a law whose data term falls as b^-0.2: the paper's shape,
    which sees the batch only through sigma_bar, cannot tell them apart; the batch shape recovers the
    exponent, and then needs the batch to predict and checks it against its fitted range."""
    true = illustrative_law()
    true.params.update(beta_batch=0.2, log_B=true.params["log_B"] + 0.2 * np.log(128))
    runs = [dataclasses.replace(r, run_id=f"{r.run_id}-b{b}")
            for b in (32, 512) for r in synthetic_runs(true, batch_size=b, seed=3)]
    laws = fit_all(runs, holdout=("0.2",), methods=("parametric", "parametric-batch"), bootstrap=0)
    batch, paper = (laws[k].holdout["0.2"]["mean_abs_rel_error"] for k in ("parametric-batch", "parametric"))
    law = laws["parametric-batch"]
    assert batch < 0.02 and paper > 2 * batch
    assert law.params["beta_batch"] == pytest.approx(0.2, abs=0.05) and laws["parametric"].params["beta_batch"] == 0
    assert law.validity["batch"] == [32, 512]
    with pytest.raises(ValueError, match="batch size"):
        law.predict(1e6, 1000, 1e-4)
    assert law.predict(1e6, 1000, 1e-4, 64) == pytest.approx(float(true.predict(1e6, 1000, 1e-4, 64)), rel=0.02)
    assert law.outside_factors(1e6, 1000, 1e-4, 2048)["batch"] == pytest.approx(4.0)
    assert "batch" not in laws["parametric"].outside_factors(1e6, 1000, 1e-4, 2048)  # it does not read it
    # one batch size cannot identify the exponent: fit_all leaves the batch shape out
    assert "parametric-batch" in applicable_methods(runs)
    assert "parametric-batch" not in applicable_methods(runs[:len(runs) // 2])


def _ceiling_truth():
    from dptrain.scaling.law import CeilingLaw

    params = {"log_E": np.log(1.8), "log_A": np.log(126.0), "alpha": 0.3, "log_B": np.log(15.8),
              "beta": 0.4, "beta_batch": 0.1, "center": np.log(3e-4), "log_width": np.log(1.6),
              "gamma": 1.0, "log_F": np.log(6.0), "log_G": np.log(10.0), "phi": 0.3}
    return CeilingLaw("ceiling", "total", {"M": [1e5, 1e10], "T": [10, 1e7], "sigma_bar": [0, 1e-1],
                                           "batch": [1, 1e7]}, params=params)


def test_ceiling_gradient_is_the_objectives_derivative():
    from scipy.optimize import approx_fprime

    from dptrain.scaling.fit import _ceiling_objective

    rng = np.random.default_rng(0)
    with np.errstate(divide="ignore"):
        data = (np.log(rng.uniform(1e4, 1e6, 60)), np.log(rng.uniform(50, 1000, 60)),
                np.log(rng.choice([0.0, 1e-3, 4e-3, 1.6e-2], 60)), np.log(rng.choice([32.0, 128.0], 60)),
                np.log(rng.uniform(2, 4, 60)))
    theta = np.array([0.3, 3.0, 0.3, 2.8, 0.4, 0.05, -5.5, 0.1, 0.9, 1.1, 2.4, 0.35])
    numeric = approx_fprime(theta, lambda x: _ceiling_objective(x, *data)[0], 1e-7)
    np.testing.assert_allclose(_ceiling_objective(theta, *data)[1], numeric, atol=1e-6)


def test_the_ceiling_law_recovers_a_ceiling():
    """Runs (noise-free ones among them, two batch sizes) drawn from a ceiling law: the ceiling fit
    predicts them within 2% inside the fitted range, with E from the noise-free runs; the paper's
    additive shape, whose noise cost cannot shrink with the distance to the ceiling, does worse."""
    true = _ceiling_truth()
    runs = [dataclasses.replace(r, run_id=f"{r.run_id}-b{b}") for b in (64, 512)
            for r in synthetic_runs(true, sigma_bars=(0.0, 1e-5, 1e-4, 1e-3), batch_size=b, seed=4)]
    laws = fit_all(runs, holdout=("0.2",), methods=("parametric", "ceiling"), bootstrap=0)
    law = laws["ceiling"]
    assert law.irreducible_from == "noise-free runs" and law.reads_batch
    m, t, sb = _inside_grid(dataclasses.replace(law, validity={**law.validity, "sigma_bar": [1e-5, 1e-3]}))
    rel = np.abs(law.predict(m, t, sb, 128) / true.predict(m, t, sb, 128, warn=False) - 1)
    assert rel.max() < 0.02
    assert law.params["beta_batch"] == pytest.approx(0.1, abs=0.03)
    assert law.params["gamma"] == pytest.approx(1.0, abs=0.25)
    ceiling, paper = (laws[k].holdout["0.2"]["mean_abs_rel_error"] for k in ("ceiling", "parametric"))
    assert ceiling < 0.01 and paper > 2 * ceiling


def test_a_law_is_validated_only_on_a_larger_model_and_longer_runs(laws):
    law = laws["parametric"]
    assert not law.validated()  # only the random and late rules were measured
    ok = {"mean_abs_rel_error": 0.01, "max_abs_rel_error": 0.02, "runs": ["x"]}
    law2 = law.__class__(law.method, law.params_key, law.validity, params=law.params,
                         holdout={"largest-model": ok, "late": ok})
    assert law2.validated()
    law2.holdout["late"] = {**ok, "mean_abs_rel_error": 0.06}
    assert not law2.validated() and law2.worst_holdout_error() == 0.06


def test_semiparametric_is_monotone(laws):
    law = laws["semiparametric"]
    t = np.geomspace(*law.validity["T"], 30)
    assert np.all(np.diff(law.predict(1e6, t, 1e-4)) <= 1e-9)  # more steps: no higher loss
    sb = np.geomspace(*law.validity["sigma_bar"], 30)
    assert np.all(np.diff(law.predict(1e6, 2000, sb)) >= -1e-9)  # more noise: no lower loss


def test_smoothing_is_non_increasing(runs):
    _, loss = smooth_curve(runs[0])
    assert np.all(np.diff(loss) <= 0)


def test_warns_outside_range_only(laws):
    for law in laws.values():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            law.predict(*_inside_grid(law))
        for far in ((1e9, 1000, 1e-4), (1e6, 1e7, 1e-4), (1e6, 1000, 1e-1)):
            with pytest.warns(ExtrapolationWarning, match="outside its fitted range"):
                assert np.isfinite(law.predict(*far)).all()


def test_json_round_trip(laws, tmp_path):
    path = tmp_path / "law.json"
    save_laws(path, laws, default="parametric")
    assert load_law(path).method == "parametric"
    m, t, sb = _inside_grid(laws["parametric"])
    for name, law in laws.items():
        again = load_law(path, name)
        assert again.validity == law.validity and again.holdout == law.holdout
        np.testing.assert_allclose(again.predict(m, t, sb), law.predict(m, t, sb), rtol=1e-6)


def test_bad_law_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_law(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(UserError, match="not a valid scaling-law file"):
        load_law(tmp_path / "bad.json")


def test_holdout_rules(runs):
    train, held = split_holdout(runs, "largest-model")
    assert {r.params_total for r in held} == {max(r.params_total for r in runs)}
    assert len(train) + len(held) == len(runs)
    _, held = split_holdout(runs, "longest")
    assert {r.steps for r in held} == {max(r.steps for r in runs)}
    train, held = split_holdout(runs, "late")
    assert held == runs and [t.run_id for t in train] == [r.run_id for r in runs]
    for t, r in zip(train, runs):
        assert t.steps <= r.steps / 2 and t.eval_curve == tuple(p for p in r.eval_curve if p[0] <= r.steps / 2)
    for bad in ("1.5", "most", "0"):
        with pytest.raises(UserError, match="holdout"):
            split_holdout(runs, bad)


def test_semiparametric_needs_spread(runs):
    one_size = [r for r in runs if r.params_total == runs[0].params_total]
    with pytest.raises(UserError, match="two model sizes"):
        fit_semiparametric(one_size)
