"""The epsilon-shape check: at fixed compute a tighter privacy budget should plan a model no larger
(McKenna et al. 2025); and the refinement that keeps the planner's own grid from reversing it."""
import json
import math

import numpy as np
import pytest

from dptrain.cli import main
from dptrain.scaling.law import ParametricLaw
from dptrain.scaling.plan import SHAPE_SLACK, candidates, epsilon_shape, noise_grid, plan
from dptrain.scaling.synthetic import illustrative_law

# a small grid (steps up to 1e5, 1e6 examples): each epsilon costs well under a second
SEARCH = dict(delta=1e-7, data_size=10**6, seq_len=256, max_steps=10**5)


def test_a_law_of_the_papers_shape_plans_smaller_models_for_tighter_budgets():
    shape = epsilon_shape(illustrative_law(), 1e17, (0.5, 1, 2, 4, 8), **SEARCH)
    assert shape.verdict == "holds" and not shape.reversals
    assert all(r.interior for r in shape.rows)
    sizes = [r.params for r in shape.rows]  # tightest epsilon first
    assert sizes == sorted(sizes) and sizes[-1] > 2 * sizes[0]
    assert shape.describe().startswith("holds: over 5 interior optima")


def test_a_law_where_tighter_budgets_plan_larger_models_is_flagged():
    """A data term that barely falls with steps (beta 0.1) and a noise cost that switches on
    sharply (gamma 2.7, sigmoid width 0.73): a tighter epsilon cuts the steps to hold sigma_bar
    down, and the compute freed goes to a larger model and batch."""
    params = {"log_E": -10.0, "log_A": 8.47, "alpha": 0.65, "log_B": 2.2, "beta": 0.1, "log_C": -1.33,
              "gamma": 2.7, "gamma2": -0.5, "center": -5.65, "log_width": -0.32}
    law = ParametricLaw("parametric", "total", {"M": [2e5, 1e6], "T": [100, 1000], "sigma_bar": [1e-5, 1e-3]},
                        params=params)
    shape = epsilon_shape(law, 1e15, (1, 2, 4), 1e-6, 10**5, 256, max_steps=10**4)
    assert shape.verdict == "violated" and all(r.interior for r in shape.rows)
    tight, loose = shape.rows[0], shape.rows[-1]
    assert tight.params > 1.5 * loose.params and tight.steps < loose.steps / 2
    assert (1.0, 4.0, pytest.approx(tight.params / loose.params)) in shape.reversals
    assert "violated: a tighter epsilon plans a larger model" in shape.describe()


def test_an_optimum_on_the_lower_size_bound_is_not_compared():
    law = illustrative_law()
    low = epsilon_shape(law, 1e17, (1, 4), **SEARCH, min_params=3e6)  # the optimum lies below 3e6
    assert [r.edges for r in low.rows] == [("params min",), ("params min",)]
    assert not any(r.interior for r in low.rows) and low.verdict == "untested"
    assert "sit on a search bound: params min" in low.describe()
    free = epsilon_shape(law, 1e17, (1, 4), **SEARCH)
    assert all(r.interior and r.params < 3e6 for r in free.rows)


def coarse_best(law, compute, epsilon, delta, data_size, seq_len):
    """The best point of the planner's grid before refinement."""
    c = candidates(law, compute, noise_grid(epsilon, delta, data_size, max_steps=10**4), seq_len,
                   law.validity["M"][0])
    i = int(np.argmin(c["loss"]))
    return c["M"][i], c["loss"][i]


def test_the_refined_planner_does_not_reverse_where_its_grid_did():
    """The shipped sweep's parametric-batch law at C = 7.3e12: on the planner's grid (4 points per
    decade) two points 1.8x apart in M swap places as epsilon grows (3.6e4, 6.4e4, 3.6e4, 6.4e4),
    a tighter budget planning the larger model; the optimum between them is found by the finer
    grid around the best point, and rises with epsilon."""
    params = {"center": -5.84, "log_width": 0.210, "beta_batch": 0.0386, "log_E": -2.054, "log_A": 3.015,
              "alpha": 0.2425, "log_B": 3.272, "beta": 0.504, "log_C": -1.0016, "gamma": 1.297,
              "gamma2": -0.1437}
    law = ParametricLaw("parametric-batch", "total", {"M": [18344, 1689216], "T": [50, 1000],
                        "sigma_bar": [0.0, 0.016], "batch": [32, 180]}, params=params)
    budget = dict(delta=1e-6, data_size=102239, seq_len=64)
    epsilons = (4.0, 4.76, 5.66, 6.73)
    coarse = [coarse_best(law, 7.31e12, e, **budget) for e in epsilons]
    assert coarse[1][0] > 1.7 * coarse[2][0]  # the grid alone reverses
    shape = epsilon_shape(law, 7.31e12, epsilons, **budget, max_steps=10**4)
    assert shape.verdict == "holds" and all(r.interior for r in shape.rows)
    sizes = [r.params for r in shape.rows]
    assert all(a <= b * SHAPE_SLACK for a, b in zip(sizes, sizes[1:]))
    assert max(sizes) / min(sizes) < 1.3 < coarse[1][0] / coarse[2][0]
    for row, (_, loss) in zip(shape.rows, coarse):
        assert row.loss <= loss  # refining never makes the plan worse
    best = plan(law, 7.31e12, 5.66, **budget, top=3, configs={}, max_steps=10**4)
    assert [p.loss for p in best] == sorted(p.loss for p in best)
    assert all(math.isclose(p.compute, 6 * p.params * p.batch_size * 64 * p.steps) for p in best)


def test_plan_check_shape_text_and_json(capsys):
    argv = ["plan", "--compute", "1e13", "--epsilon", "4", "--delta", "1e-6", "--data-size", "102239",
            "--seq-len", "64", "--max-steps", "1e4", "--check-shape", "--shape-epsilons", "2,4,8"]
    assert main(argv) == 0  # the shipped law
    out = capsys.readouterr().out
    assert "epsilon shape at compute 1e+13" in out and out.count("  interior") + out.count("on bound:") >= 3
    assert "epsilon shape: " in out
    assert main([*argv, "--json"]) == 0
    shape = json.loads(capsys.readouterr().out)["epsilon_shape"]
    assert [r["epsilon"] for r in shape["rows"]] == [2.0, 4.0, 8.0]
    assert shape["verdict"] in ("holds", "violated", "untested") and shape["tie_factor"] == SHAPE_SLACK
    assert all(r["interior"] == (not r["edges"]) for r in shape["rows"])
    assert main([*argv[:-1], "8"]) == 2
    assert "--shape-epsilons 8" in capsys.readouterr().err
