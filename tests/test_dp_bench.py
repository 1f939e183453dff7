"""`dptrain bench` runs end to end on a tiny model and prints every method's figures."""
from __future__ import annotations

from pathlib import Path

from dptrain.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml")


def test_bench_cli_tiny(capsys):
    code = main(["bench", "--config", TINY, "--seq-len", "16", "--micro-batch", "2", "--steps", "1",
                 "--methods", "nonprivate,dptrain,opacus-ghost,naive"])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("nonprivate", "dptrain", "opacus-ghost", "naive", "ratio DP/non-private time",
                 "ratio opacus-ghost/dptrain", "untied copy"):
        assert name in out


def test_bench_rejects_unknown_method(capsys):
    assert main(["bench", "--config", TINY, "--methods", "nonprivate,jax"]) == 2
    assert "unknown method 'jax'" in capsys.readouterr().err


def test_bench_reports_unit_clipping_ratio(capsys):
    code = main(["bench", "--config", TINY, "--seq-len", "16", "--micro-batch", "4", "--steps", "1",
                 "--methods", "dptrain,dptrain-unit4"])
    out = capsys.readouterr().out
    assert code == 0 and "ratio dptrain-unit4/dptrain time" in out
    assert main(["bench", "--config", TINY, "--seq-len", "16", "--micro-batch", "2", "--methods",
                 "dptrain,dptrain-unit4"]) == 2
    assert "multiple of 4" in capsys.readouterr().err
