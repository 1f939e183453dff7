"""The mechanism object and the data's ledger, against plain references."""
import json
import math
import multiprocessing as mp
from types import SimpleNamespace

import pytest
import torch

from dptrain.errors import UserError
from dptrain.privacy.accounting import PrivacyLedger, epsilon_of_runs, make_run
from dptrain.privacy.data_ledger import DataLedger
from dptrain.privacy.mechanism import Mechanism, add_gaussian_noise, clip_coefficients, plan_mechanism


def privacy(**kw):
    base = dict(expected_batch_size=16, steps=50, delta=1e-5, target_epsilon=4.0, noise_multiplier=None,
                max_grad_norm=1.0, accountant="pld", max_batch_size=None, unit="sequence",
                max_sequences_per_unit=1, mechanism="dpsgd", bands=None)
    return SimpleNamespace(**{**base, **kw})


def test_clip_coefficients_match_a_plain_loop():
    norms = torch.tensor([0.5, 2.0, 4.0, float("nan"), float("inf"), 1.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0, 0.0], dtype=torch.float64)
    coef, finite = clip_coefficients(norms, weights, 1.5)
    for i in range(len(norms)):
        n, w = float(norms[i]), float(weights[i])
        want = w * min(1.0, 1.5 / n) if math.isfinite(n) else 0.0
        assert float(coef[i]) == pytest.approx(want, rel=1e-15) and bool(finite[i]) == math.isfinite(n)


def test_privatize_adds_the_noise_once_and_divides_by_the_expected_batch():
    mechanism = Mechanism(0.7, 2.0, 8, 100)
    sums = [torch.full((3, 4), 8.0, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    draws = []

    def noise(shape, device, dtype):
        draws.append(torch.randn(shape, dtype=dtype))
        return draws[-1]

    mechanism.privatize(sums, noise)
    assert len(draws) == 2  # one draw per tensor, once
    assert torch.allclose(sums[0], (8.0 + 0.7 * 2.0 * draws[0]) / 8)
    assert torch.allclose(sums[1], 0.7 * 2.0 * draws[1] / 8)
    other = [torch.ones(2)]
    mechanism.privatize(other, None)  # a rank that adds no noise only divides
    assert torch.equal(other[0], torch.full((2,), 1 / 8))
    with pytest.raises(UserError):
        add_gaussian_noise(sums, math.nan, noise)


def test_a_mechanism_refuses_what_cannot_be_accounted():
    for bad in (dict(noise_multiplier=-1.0), dict(noise_multiplier=math.inf), dict(max_grad_norm=0.0),
                dict(expected_batch_size=101), dict(unit="person"), dict(sequences_per_unit=2)):
        fields = {**dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=10, num_examples=100), **bad}
        with pytest.raises(UserError):
            Mechanism(**fields)
    m = Mechanism(1.0, 1.0, 10, 100, max_batch_size=20)
    assert m.sampling_rate == 0.1 and m.truncation == {"dataset_size": 100, "max_batch_size": 20}
    assert m.journal_fields()["max_batch_size"] == 20 and "unit" not in m.journal_fields()


def test_plan_calibrates_within_the_budget_and_refuses_impossible_plans():
    plan = plan_mechanism(privacy(), 1000, 16)
    m = plan.mechanism
    assert plan.epsilon <= 4.0
    assert plan.epsilon == pytest.approx(epsilon_of_runs([make_run(m.noise_multiplier, 0.016, 50)], 1e-5), rel=1e-9)
    # a σ just below the calibrated one would overspend: the calibration is tight from above
    assert epsilon_of_runs([make_run(m.noise_multiplier * 0.99, 0.016, 50)], 1e-5) > 4.0
    with pytest.raises(UserError, match="target_epsilon"):
        plan_mechanism(privacy(noise_multiplier=0.3), 1000, 16)
    with pytest.raises(UserError, match="1/N"):
        plan_mechanism(privacy(delta=1e-3), 1000, 16)
    parent = PrivacyLedger()
    parent.add(make_run(1.0, 0.016, 30))
    with pytest.raises(UserError, match="noise_multiplier"):
        plan_mechanism(privacy(), 1000, 16, spent=parent)
    with pytest.raises(UserError, match="already spent"):
        plan_mechanism(privacy(noise_multiplier=m.noise_multiplier), 1000, 16, spent=parent)
    with pytest.raises(UserError, match="multiple"):
        plan_mechanism(privacy(unit="group", max_sequences_per_unit=3), 1000, 16)
    free = plan_mechanism(privacy(), 1000, 16, noise_free=True)
    assert free.mechanism.noise_multiplier == 0 and free.epsilon == math.inf


def entry(run, step, draw="d", sigma=1.0, q=0.01):
    return {"run": run, "draw": draw, "step": step, "layout": "one-stream", "noise_multiplier": sigma,
            "sampling_rate": q, "dataset_size": None, "max_batch_size": None}


def test_the_data_ledger_counts_each_release_once_and_every_run(tmp_path):
    ledger = DataLedger(tmp_path)
    ledger.append([entry("a", 1), entry("a", 2)])
    ledger.append([entry("a", 2), entry("a", 3)])  # a resume replaying step 2 exactly
    ledger.append([entry("b", 1), entry("b", 2, sigma=2.0)])  # another run, same draw id (same seed)
    assert ledger.spent().steps == 5 and ledger.runs() == ["a", "b"]
    want = epsilon_of_runs([make_run(1.0, 0.01, 4), make_run(2.0, 0.01, 1)], 1e-6)
    assert ledger.spent().epsilon(1e-6) == pytest.approx(want, rel=1e-12)
    with ledger.path.open("a") as f:
        f.write('{"run": "c", "st')  # torn by a crash mid-line
    assert ledger.spent().steps == 5
    ledger.path.write_text(ledger.path.read_text() + "\n" + json.dumps(entry("c", 1)) + "\n")
    with pytest.raises(UserError, match="corrupt"):
        ledger.entries()


def _append_many(folder, run, n):
    ledger = DataLedger(folder)
    for step in range(1, n + 1):
        ledger.append([entry(run, step)])


def test_concurrent_runs_append_whole_lines(tmp_path):
    procs = [mp.get_context("forkserver").Process(target=_append_many, args=(tmp_path, run, 200)) for run in "xy"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    entries = DataLedger(tmp_path).entries()
    assert len(entries) == 400 and DataLedger(tmp_path).spent().steps == 400
