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


def test_order_rotates_every_repeat():
    from dptrain.dp.benchmark import rotated

    names = ["nonprivate", "dptrain", "opacus-ghost"]
    orders = [rotated(names, r) for r in range(4)]
    assert orders[0] == names and orders[3] == names
    assert [o[0] for o in orders[:3]] == names  # each method runs first once in three repeats


def test_threads_are_pinned_and_the_spread_reported(tmp_path, capsys):
    import json

    import torch

    before = torch.get_num_threads()
    out = tmp_path / "bench.json"
    assert main(["bench", "--config", TINY, "--seq-len", "16", "--micro-batch", "2", "--steps", "3",
                 "--methods", "nonprivate,dptrain", "--json", str(out)]) == 0
    assert "(1 thread)" in capsys.readouterr().out  # one per process on CPU by default
    result = json.loads(out.read_text())
    assert result["threads"] == 1 and torch.get_num_threads() == before  # restored afterwards
    for name, s in result["seconds_spread"].items():
        assert s["min"] <= s["median"] == result["seconds_per_step"][name] <= s["max"]
    assert result["mfu"] == {} and result["peak_flops"] is None  # no peak known for a CPU
    assert main(["bench", "--config", TINY, "--seq-len", "16", "--micro-batch", "2", "--steps", "1",
                 "--methods", "dptrain", "--threads", "2", "--peak-tflops", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["threads"] == 2 and 0 < result["mfu"]["dptrain"] < 1
    assert main(["bench", "--config", TINY, "--threads", "0"]) == 2
