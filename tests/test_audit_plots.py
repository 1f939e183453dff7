import numpy as np
import pytest

from dptrain.audit.memorization import MemorizationResult
from dptrain.audit.plots import (plot_epsilon_curve, plot_exposure_by_run, plot_memorization,
                                 plot_score_histogram)
from dptrain.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000  # a real figure, not an empty canvas


def test_score_histogram(tmp_path):
    rng = np.random.default_rng(0)
    included = rng.integers(0, 2, 300).astype(bool)
    scores = rng.normal(size=300) + included
    assert_png(plot_score_histogram(scores, included, tmp_path / "sub" / "scores.png"))
    with pytest.raises(UserError):
        plot_score_histogram(scores, included[:-1], tmp_path / "bad.png")


def test_epsilon_curve(tmp_path):
    steps = [0, 100, 200, 300]
    assert_png(plot_epsilon_curve(steps, [0.0, 0.8, 1.2, 1.5], tmp_path / "eps.png", lower_bounds={300: 0.4}))
    with pytest.raises(UserError):
        plot_epsilon_curve(steps, [0.0, 1.0], tmp_path / "bad.png")


def test_memorization_summary(tmp_path):
    dist = [0.0, 0.04, 0.1, 0.5, 0.9, 0.96]
    result = MemorizationResult(6, 50, 50, 0.1, 1, 3, 1 / 6, 0.5, dist)
    assert_png(plot_memorization(result, tmp_path / "mem.png"))


def test_exposure_by_run(tmp_path):
    rng = np.random.default_rng(0)
    secrets = lambda slope: [{"train_repeats": r, "exposure": float(slope * r + rng.random())}  # noqa: E731
                             for r in (0, 1, 4, 16) for _ in range(4)]
    assert_png(plot_exposure_by_run({"sequence": secrets(0.5), "user": secrets(0.0)}, 1000, tmp_path / "runs.png"))
    with pytest.raises(UserError):
        plot_exposure_by_run({"sequence": secrets(0.5), "user": []}, 1000, tmp_path / "bad.png")
