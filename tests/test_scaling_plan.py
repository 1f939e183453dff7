"""The planner against the qualitative findings of McKenna et al. 2025, on a law of that shape."""
import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from dptrain.errors import UserError
from dptrain.scaling.plan import (chinchilla_params, model_configs, plan, saturation,
                                  training_config)
from dptrain.scaling.synthetic import illustrative_law

LAW = illustrative_law()
BUDGET = dict(delta=1e-8, data_size=10**7, seq_len=256)
EPSILONS = (0.5, 2.0, 8.0)


@pytest.fixture(scope="module")
def best():
    return {(c, e): plan(LAW, c, e, top=1, configs={}, **BUDGET)[0]
            for c in (1e17, 1e19) for e in EPSILONS}


def test_tighter_budget_smaller_model_larger_batch(best):
    for c in (1e17, 1e19):
        rows = [best[c, e] for e in EPSILONS]  # loosest budget last
        assert all(a.params <= b.params * 1.001 for a, b in zip(rows, rows[1:]))
        assert all(a.batch_size >= b.batch_size for a, b in zip(rows, rows[1:]))
        assert all(a.loss > b.loss for a, b in zip(rows, rows[1:]))
    # and across the sweep the effect is real, not a tie everywhere
    assert best[1e19, 0.5].params < best[1e19, 8.0].params


def test_private_optimum_much_smaller_than_nonprivate(best):
    for (c, _), p in best.items():
        assert chinchilla_params(c) / p.params > 10
        assert p.tokens_per_param > 1000  # far more than Chinchilla's 20


def test_plans_spend_compute_and_meet_budget(best):
    for (c, eps), p in best.items():
        assert p.compute <= c * (1 + 1e-9) and p.compute >= c / 100
        assert p.compute == pytest.approx(6 * p.params * p.batch_size * BUDGET["seq_len"] * p.steps)
        assert p.sigma_bar == pytest.approx(p.sigma / p.batch_size)
        accountant = rdp_privacy_accountant.RdpAccountant()  # independent check of the budget
        accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            p.batch_size / BUDGET["data_size"], dp_accounting.GaussianDpEvent(p.sigma)), p.steps))
        assert accountant.get_epsilon(BUDGET["delta"]) <= eps * (1 + 1e-6)


def test_returns_saturate():
    rows = saturation(LAW, 1e17, 1.0, factors=(1, 10, 100, 1000, 10000), **BUDGET)
    gains = [g for _, _, g in rows[1:]]
    assert gains[0] > 0.05  # 1e17 -> 1e18 still pays
    assert all(g >= -1e-12 for g in gains)  # more compute never hurts: plans may spend less
    assert gains[-1] < 0.01  # 1e20 -> 1e21: saturated


def test_top_rows_sorted_and_mapped_to_configs():
    configs = model_configs()
    assert {"tiny", "small", "vaultgemma-1b"} <= set(configs)
    rows = plan(LAW, 1e18, 2.0, top=5, configs=configs, **BUDGET)
    assert len(rows) == 5 and [r.loss for r in rows] == sorted(r.loss for r in rows)
    assert rows[0].nearest_config in configs
    cfg = training_config(rows[0], 2.0, 1e-8, 256, "data/prepared")
    assert cfg["model"].endswith(f"configs/model/{rows[0].nearest_config}.yaml")
    assert cfg["privacy"]["expected_batch_size"] == rows[0].batch_size
    assert cfg["privacy"]["steps"] == rows[0].steps
    assert cfg["data"] == {"path": "data/prepared", "source": "prepared"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(compute=1e3), "below the cheapest plan searched"),
    (dict(epsilon=-1.0), "epsilon"),
    (dict(data_size=4), "data size"),
])
def test_impossible_budgets(kwargs, message):
    args = dict(compute=1e18, epsilon=1.0, **BUDGET) | kwargs
    with pytest.raises(UserError, match=message):
        plan(LAW, **args)
