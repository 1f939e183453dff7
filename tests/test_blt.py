"""BLT (buffered Toeplitz noise, cyclic parts, no amplification) against naive references.

The sensitivity against every participation pattern, the realised noise against dense C⁻¹z and its
covariance, the rounds' charges against the exact Gaussian mechanism (closed form), and a run that
resumes bit for bit and charges its data what its own ledger does. Two Gloo processes, and the
noise state's resume (shared with BandMF): test_bandmf.py.
"""
import itertools
import math

import numpy as np
import pytest
from scipy import stats
from scipy.stats import norm

from dptrain.errors import UserError
from dptrain.privacy.accounting import PrivacyLedger, epsilon_of_runs, make_run
from dptrain.privacy.blt import BLT, BLTNoise, RegeneratedNoise, loss, optimize_blt, round_charge
from dptrain.privacy.correlated import noise_error
from dptrain.privacy.mechanism import Mechanism, plan_mechanism
from dptrain.privacy.noise import NoiseSource
from dptrain.privacy.randomness import Streams
from dptrain.train.config import PrivacyConfig
from test_bandmf import BANDMF, realised, straight_and_resumed
from test_bandmf import data_dir  # noqa: F401,F811 (the same demo data fixture)

STRATEGY = BLT((0.9, 0.5), (0.3, 0.2))


def toeplitz(column) -> np.ndarray:
    n = len(column)
    return np.array([[column[i - j] if i >= j else 0.0 for j in range(n)] for i in range(n)])


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact ε(δ) of the Gaussian mechanism with μ = sensitivity / σ (Balle & Wang 2018)."""
    from scipy.optimize import brentq

    def gap(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return 0.0 if gap(0.0) <= 0 else brentq(gap, 0.0, 500.0, xtol=1e-12)


def minsep_sensitivity(c, parts: int) -> float:
    """The theorem's bound (Kalinin & Lampert 2024): for a non-negative, non-increasing first column,
    max ‖C u‖ over participations at least `parts` apart is attained at 0, P, 2P, ..."""
    c = np.asarray(c, dtype=np.float64)
    assert (c >= 0).all() and (np.diff(c) <= 1e-15).all(), "the bound needs a non-increasing column"
    v = np.zeros(len(c))
    for start in range(0, len(c), parts):
        v[start:] += c[:len(c) - start]
    return float(np.sqrt(v @ v))


# ---- the strategy -------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,parts", [(9, 1), (11, 3), (12, 4), (10, 10)])
def test_minsep_sensitivity_is_the_worst_of_every_participation_pattern(steps, parts):
    rng = np.random.default_rng(steps)
    other = np.r_[1.0, np.sort(rng.uniform(0, 1, steps - 1))[::-1]]  # any non-increasing column
    for c in (STRATEGY.strategy_coefficients(steps), other):
        cm = toeplitz(c)
        worst = 0.0
        for pattern in itertools.product((0, 1), repeat=steps):
            ones = np.flatnonzero(pattern)
            if len(ones) > 1 and np.diff(ones).min() < parts:
                continue
            worst = max(worst, float(np.linalg.norm(cm @ np.array(pattern, dtype=float))))
        assert minsep_sensitivity(c, parts) == pytest.approx(worst, rel=1e-12)
    if steps % parts == 0:  # the rounds' shares add up to the same sensitivity
        assert STRATEGY.round_shares(parts, steps // parts).sum() == pytest.approx(
            minsep_sensitivity(STRATEGY.strategy_coefficients(steps), parts) ** 2, rel=1e-12)


def test_strategy_and_noise_coefficients_invert_each_other_and_rows_are_bounded():
    steps = 30
    c, h = STRATEGY.strategy_coefficients(steps), STRATEGY.noise_coefficients(steps)
    np.testing.assert_allclose(toeplitz(c) @ toeplitz(h), np.eye(steps), atol=1e-12)
    assert c[0] == 1 and c[1] == pytest.approx(0.5) and c[2] == pytest.approx(0.3 * 0.9 + 0.2 * 0.5)
    # any participation P apart: every row of C u stays under the bound a second release is charged at
    for parts in (1, 3, 7):
        latest = max(sum(c[t - s] for s in range(t, -1, -parts)) for t in range(steps))
        assert latest <= STRATEGY.row_bound(parts) + 1e-12
    with pytest.raises(UserError, match="decays in"):
        BLT((1.2,), (0.5,))
    with pytest.raises(UserError, match="summing to at most 1"):
        BLT((0.5, 0.5), (0.7, 0.6))


def test_optimised_blt_is_valid_deterministic_and_beats_independent_noise():
    steps, parts = 200, 20
    blt = optimize_blt(steps, parts, 2)
    assert blt == optimize_blt(steps, parts, 2)  # a resume plans the same strategy
    c = blt.strategy_coefficients(steps)
    assert (c > 0).all() and (np.diff(c) <= 1e-15).all()  # what the sensitivity bound needs
    identity = np.zeros(steps)
    identity[0] = 1.0
    independent = math.ceil(steps / parts) * noise_error(identity)  # DP-SGD without amplification
    assert loss(blt, steps, parts) < 0.2 * independent


def test_the_lag_strategy_minimises_the_loss_over_its_one_parameter():
    steps, parts = 200, 20
    lagged = optimize_blt(steps, parts, 0)
    assert lagged.lag is not None and lagged == optimize_blt(steps, parts, 0)
    assert STRATEGY.lag is None and BLT((0.5,), (0.4,)).lag is None
    grid = min(loss(BLT((lam,), (lam,)), steps, parts) for lam in np.linspace(0.005, 0.995, 199))
    assert loss(lagged, steps, parts) <= grid * (1 + 1e-9)
    # one free buffer (θ, ω) can only do better; it is the same noise with a model-sized buffer
    assert loss(optimize_blt(steps, parts, 1), steps, parts) <= loss(lagged, steps, parts) * (1 + 1e-6)
    np.testing.assert_allclose(lagged.noise_coefficients(5), [1, -lagged.lag, 0, 0, 0], atol=1e-12)
    base = dict(target_epsilon=4.0, delta=1e-5, expected_batch_size=100, steps=25)
    assert PrivacyConfig(**base, mechanism="blt", buffers=0).buffers == 0
    for wrong in (dict(mechanism="blt", buffers=-1), dict(mechanism="blt", buffers=9), dict(buffers=0)):
        with pytest.raises(ValueError, match=r"buffers applies to mechanism blt only, and must lie in \[0, 8\]"):
            PrivacyConfig(**base, **wrong)


# ---- the noise --------------------------------------------------------------------------------
def test_regenerated_noise_is_the_one_buffer_noise_without_the_buffer():
    """buffers 0: w_t = z_t − λ z_{t−1}, z_{t−1} drawn again from its stream: C⁻¹z with nothing kept."""
    lagged, steps, size = BLT((0.7,), (0.7,)), 8, 40_000
    regenerated = RegeneratedNoise(NoiseSource(Streams(5)), lagged)
    w = realised(regenerated, steps, size)
    assert regenerated.buffer_bytes() == 0 and regenerated.next_step == steps
    z = realised(NoiseSource(Streams(5)), steps, size)
    np.testing.assert_array_equal(w[0], z[0])
    np.testing.assert_allclose(toeplitz(lagged.strategy_coefficients(steps)) @ w, z, atol=1e-4)  # C w = z
    np.testing.assert_allclose(w, realised(BLTNoise(NoiseSource(Streams(5)), lagged), steps, size), atol=1e-5)
    # neighbouring steps' noise correlates at −λ / (1 + λ²), steps two apart not at all
    corr = np.corrcoef(w[1:])
    assert corr[0, 1] == pytest.approx(-0.7 / 1.49, abs=5 / math.sqrt(size)) and abs(corr[0, 2]) < 5 / math.sqrt(size)
    # secure randomness cannot draw again: the mechanism keeps the one buffer there instead
    m = Mechanism(1.0, 1.0, 100, 1000, bands=10, blt=lagged)
    assert isinstance(m.noise_source(Streams(5), secure=False), RegeneratedNoise)
    assert isinstance(m.noise_source(None, secure=True), BLTNoise)
    with pytest.raises(ValueError, match="replayable"):
        RegeneratedNoise(NoiseSource(secure=True), lagged)
    # a run cannot resume one form's state in the other (keyed and secure randomness swapped)
    stored = BLTNoise(NoiseSource(Streams(5)), lagged)
    realised(stored, 2, 10)
    with pytest.raises(UserError, match="another form"):
        RegeneratedNoise(NoiseSource(Streams(5)), lagged).load_state_dict(stored.state_dict())
    with pytest.raises(UserError, match="another form"):
        BLTNoise(NoiseSource(Streams(5)), lagged).load_state_dict(regenerated.state_dict())


def test_noise_is_c_inverse_z_exactly_and_its_covariance_is_the_factorisation():
    steps, size = 8, 40_000
    w = realised(BLTNoise(NoiseSource(Streams(5)), STRATEGY), steps, size)
    z = realised(NoiseSource(Streams(5)), steps, size)
    cm = toeplitz(STRATEGY.strategy_coefficients(steps))
    np.testing.assert_allclose(cm @ w, z, atol=1e-4)  # C w = z: the same draws, correlated by C⁻¹
    inverse = np.linalg.inv(cm)
    expected = inverse @ inverse.T
    empirical = w @ w.T / size
    assert np.abs(empirical - expected).max() < 6 / math.sqrt(size) * expected.diagonal().max()
    for t in (0, steps - 1):
        assert stats.kstest(w[t] / math.sqrt(expected[t, t]), "norm").pvalue > 1e-4


# ---- the accounting ---------------------------------------------------------------------------
def blt_mechanism(sigma=1.0, steps=20, n=1000, batch=100) -> Mechanism:
    return Mechanism(sigma, 1.0, batch, n, bands=n // batch, blt=STRATEGY)


@pytest.mark.parametrize("sigma,steps", [(2.0, 20), (5.0, 35)])
def test_rounds_compose_to_the_exact_gaussian_mechanism_at_every_prefix(sigma, steps):
    m = blt_mechanism(sigma)
    parts = m.bands
    ledger = PrivacyLedger()
    for step in range(1, steps + 1):
        ledger.add(m.run_of_step(step))
        rounds = math.ceil(step / parts)
        sens = minsep_sensitivity(STRATEGY.strategy_coefficients(rounds * parts), parts)
        if step in (1, parts, steps):
            exact = gaussian_epsilon(sens / sigma, 1e-5)
            got = ledger.epsilon(1e-5)
            assert exact <= got <= exact * 1.01 + 1e-6  # an upper bound, and tight
    assert m.step_run(steps).noise_multiplier == pytest.approx(sigma / sens, rel=1e-12)
    assert epsilon_of_runs([m.step_run(steps)], 1e-5) == pytest.approx(ledger.epsilon(1e-5), rel=1e-9)


def test_unsubsampled_gaussians_compose_into_one_exactly():
    runs = [make_run(2.0, 1.0, 3), make_run(1.5, 1.0, 1), make_run(4.0, 1.0, 2)]
    mu = math.sqrt(3 / 4 + 1 / 1.5 ** 2 + 2 / 16)
    for accountant in ("pld", "rdp"):
        got = epsilon_of_runs(runs, 1e-6, accountant)
        assert got >= gaussian_epsilon(mu, 1e-6) * (1 - 1e-9)
    assert epsilon_of_runs(runs, 1e-6) <= gaussian_epsilon(mu, 1e-6) * 1.01
    with_subsampled = [*runs, make_run(1.0, 0.01, 100)]
    assert epsilon_of_runs(with_subsampled, 1e-6) > epsilon_of_runs(runs, 1e-6)


def test_the_datas_ledger_charges_rounds_replays_once_and_second_releases_at_a_rows_sensitivity(tmp_path):
    from dptrain.privacy.data_ledger import DataLedger
    from dptrain.privacy.journal import record_entries

    m = blt_mechanism(3.0)  # 10 parts
    fields = {"draw": "d1", "layout": "one-stream", **m.journal_fields()}
    data = DataLedger(tmp_path)
    data.append([{"run": "a", "step": s, **fields} for s in range(1, 21)])  # rounds open at 1 and 11
    data.append([{"run": "a", "step": 3, **fields}])                        # an exact replay: nothing new
    assert data.spent().epsilon(1e-5) == pytest.approx(epsilon_of_runs([m.step_run(20)], 1e-5), rel=1e-9)
    data.append([{"run": "a", "step": 12, **fields, "draw": "d2"}])         # step 12 again, another draw
    again = make_run(3.0 / STRATEGY.row_bound(10), 1.0, 1)
    want = epsilon_of_runs([m.step_run(20), again], 1e-5)
    assert data.spent().epsilon(1e-5) == pytest.approx(want, rel=1e-9)
    lost = PrivacyLedger()
    record_entries(lost, [{"step": 12, **fields}])  # what a resumed run that cannot replay it adds
    assert lost.runs == (again,)


def test_plan_calibrates_sigma_to_the_sensitivity_and_names_the_parts():
    privacy = PrivacyConfig(target_epsilon=4.0, delta=1e-5, expected_batch_size=100, steps=25, mechanism="blt",
                            buffers=2)
    plan = plan_mechanism(privacy, 1000, 10)
    m = plan.mechanism
    assert m.kind == "blt" and m.bands == 10 and m.blt.buffers == 2
    mu = m.sensitivity(25) / m.noise_multiplier
    assert gaussian_epsilon(mu, 1e-5) <= plan.epsilon <= 4.0
    assert plan.epsilon > 3.9  # calibrated, not merely safe
    assert round_charge(m.blt, m.bands, m.noise_multiplier, 2).count == 0  # charged at each round's first step
    with pytest.raises(ValueError, match="buffers applies to mechanism blt only"):
        PrivacyConfig(noise_multiplier=1.0, delta=1e-5, expected_batch_size=10, steps=5, buffers=2)


# ---- the trainer ------------------------------------------------------------------------------
# the BandMF runs' tiny set-up, with the mechanism swapped
BLT_RUN = {**BANDMF, "privacy": {**{k: v for k, v in BANDMF["privacy"].items() if k != "bands"},
                                 "mechanism": "blt", "buffers": 2}}


def test_a_blt_run_resumes_bit_for_bit_and_charges_its_data_as_its_ledger(data_dir, tmp_path):
    """With buffers 0 (its noise regenerated; two buffers resume in test_noise_state_resumes_exactly,
    the secure test below and the Gloo test of test_bandmf.py)."""
    from tiny_runs import tiny_run_config

    from dptrain.train.report import summary

    regenerated = {**BLT_RUN, "privacy": {**BLT_RUN["privacy"], "buffers": 0}}
    straight, resumed = straight_and_resumed(lambda name: tiny_run_config(data_dir, tmp_path / name, regenerated))
    m = resumed.mechanism
    assert m.kind == "blt" and m.bands == min(resumed.num_examples // 16, 6) and m.blt.lag is not None
    assert isinstance(resumed.noise, RegeneratedNoise) and resumed.noise.buffer_bytes() == 0
    report = resumed.report()
    assert report["mechanism"]["kind"] == "blt"
    assert f"no stored buffer (C⁻¹ = I − λS, λ {m.blt.lag:.4g}" in summary(report)
    want = gaussian_epsilon(m.sensitivity(6) / m.noise_multiplier, 1e-5)
    assert want <= report["epsilon"]["pld"] <= want * 1.01
    # the data's ledger (both runs' steps, from their journal lines) charges what the ledgers do
    both = straight.books.data.spent().epsilon(1e-5)
    assert both == pytest.approx(epsilon_of_runs([m.step_run(6)] * 2, 1e-5), rel=1e-9)


def test_secure_blt_keeps_its_parts_and_buffers_and_charges_lost_steps_at_a_rows_sensitivity(data_dir, tmp_path):
    from tiny_runs import tiny_run_config

    from dptrain.train.trainer import Trainer

    cfg = tiny_run_config(data_dir, tmp_path, BLT_RUN, privacy={"secure_randomness": True}, runtime={"seed": None})
    first = Trainer(cfg)
    first.train_step()
    first.save_checkpoint()
    parts = first.sampler.members(0).copy()
    first.train_step()
    first.train_step()  # steps 2 and 3 are released, then the process dies
    first.close()
    resumed = Trainer(cfg)
    m = resumed.mechanism
    assert resumed.step == 1 and resumed.noise.next_step == 1
    assert np.array_equal(parts, resumed.sampler.members(0))  # the OS draw, kept in the private state
    assert resumed.books.crash_released_steps == 2
    lost = make_run(m.noise_multiplier / m.blt.row_bound(m.bands), 1.0, 1)
    assert resumed.ledger.epsilon(1e-5) == pytest.approx(
        epsilon_of_runs([m.run_of_step(1), lost, lost], 1e-5), rel=1e-9)
    resumed.train_step()  # the buffers restored from the private state carry on
    assert resumed.noise.next_step == 2


# ---- the commands -------------------------------------------------------------------------------
def test_privacy_cli_accounts_and_calibrates_blt_as_its_gaussian(capsys):
    import json

    from dptrain.cli import main

    argv = ["--sampling-rate", "0.1", "--steps", "25", "--delta", "1e-5", "--mechanism", "blt", "--buffers", "2", "--json"]
    assert main(["privacy", "noise", "--epsilon", "4", *argv]) == 0
    noise = json.loads(capsys.readouterr().out)
    sigma = noise["noise_multiplier"]["pld"]
    assert main(["privacy", "epsilon", "--noise-multiplier", str(sigma), *argv]) == 0
    eps = json.loads(capsys.readouterr().out)
    # the same strategy as a training run plans (P = 1/q = 10 parts, 2 buffers)
    planned = plan_mechanism(PrivacyConfig(target_epsilon=4.0, delta=1e-5, expected_batch_size=100, steps=25,
                                           mechanism="blt", buffers=2), 1000, 10).mechanism
    assert eps["sensitivity"] == pytest.approx(planned.sensitivity(25), rel=1e-12)
    assert gaussian_epsilon(eps["sensitivity"] / sigma, 1e-5) <= eps["epsilon"]["pld"] <= 4.0
    assert main(["privacy", "epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.1", "--steps", "5",
                 "--delta", "1e-5", "--buffers", "2"]) == 2
    assert "--buffers applies to --mechanism blt only" in capsys.readouterr().err


def test_cost_counts_blt_buffers_and_a_planned_config_leaves_sigma_to_the_trainer(capsys):
    import json
    from pathlib import Path

    from dptrain.cli import main
    from dptrain.dp.cost import parameter_counts
    from dptrain.model import DecoderConfig
    from dptrain.scaling.law import load_law
    from dptrain.scaling.plan import SHIPPED_LAW, plan, training_config

    config = str(Path(__file__).resolve().parents[1] / "dptrain" / "assets" / "model" / "tiny.yaml")
    assert main(["cost", config, "--json", "--gpu-memory", "0.05", "--buffers", "3"]) == 0
    three = json.loads(capsys.readouterr().out)
    assert three["noise_buffer_bytes"] == 3 * 4 * parameter_counts(DecoderConfig.from_yaml(config))["total"]
    assert main(["cost", config, "--bands", "4", "--buffers", "3"]) == 2
    row = plan(load_law(str(SHIPPED_LAW), None), 2e12, 8.0, 1e-6, 100_000, 64, top=1)[0]
    cfg = training_config(row, 8.0, 1e-6, 64, "data", mechanism="blt")
    assert cfg["privacy"]["mechanism"] == "blt" and "noise_multiplier" not in cfg["privacy"]
