"""A run survives pre-emption, damaged checkpoints and mistakes: each case is one line and a
non-zero exit, never a NaN reported with exit 0, and nothing already saved is lost."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dptrain import configio
from dptrain.cli import main
from dptrain.errors import UserError
from dptrain.train.config import TrainConfig
from dptrain.train.trainer import Trainer
from tiny_runs import demo_data, tiny_run_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"privacy": {"noise_multiplier": 1.0, "delta": 1e-5, "expected_batch_size": 16, "steps": 4},
            "runtime": {"micro_batch_size": 16, "device": "cpu"},
            "eval": {"every": 0, "max_sequences": 8},
            "checkpoint": {"every": 1, "keep_last": 4}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("demo"))


def make_config(data_dir, out_dir, **sections):
    return tiny_run_config(data_dir, out_dir, DEFAULTS, **sections)


def checkpoints(out_dir):
    return sorted((out_dir / "checkpoints").glob("step-*"))


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(data_dir, tmp_path, capsys):
    cfg = make_config(data_dir, tmp_path / "run", runtime={"seed": 4})
    trainer = Trainer(cfg)
    for _ in range(3):
        trainer.train_step()
        trainer.save_checkpoint()
    trainer.close()
    latest = checkpoints(tmp_path / "run")[-1]
    weights = latest / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4096:] = b"\xff" * 4096  # 4 KB of 0xFF inside the tensors: still a readable file
    weights.write_bytes(bytes(raw))
    resumed = Trainer(cfg)
    assert resumed.step == 2  # from the newest intact checkpoint
    assert "damaged" in capsys.readouterr().err
    aside = list((tmp_path / "run" / "checkpoints").glob("damaged-step-00000003-*"))
    assert len(aside) == 1 and (aside[0] / "model.safetensors").is_file()  # set aside, not deleted
    report = resumed.fit()
    assert report["steps"] == 4


def test_non_finite_weights_are_refused_even_with_matching_checksums(data_dir, tmp_path):
    cfg = make_config(data_dir, tmp_path / "run", privacy={"steps": 1})
    Trainer(cfg).fit()
    (latest,) = checkpoints(tmp_path / "run")
    state = load_file(latest / "model.safetensors")
    name = next(iter(state))
    state[name][0] = float("nan")
    save_file(state, latest / "model.safetensors")
    from dptrain.checkpoint import damage, write_checksums

    write_checksums(latest)
    assert "non-finite" in damage(latest)
    with pytest.raises(UserError, match="non-finite"):
        from dptrain.checkpoint import load_model

        load_model(latest)


def test_a_diverging_run_stops_with_an_error_not_a_nan_report(data_dir, tmp_path):
    trainer = Trainer(make_config(data_dir, tmp_path / "run", eval={"every": 2, "max_sequences": 8}))
    step = trainer.train_step

    def diverging_step():
        result = step()
        if trainer.step == 2:  # an update that overflowed
            with torch.no_grad():
                trainer.model.layers[0].mlp.down_proj.weight.fill_(float("inf"))
        return result

    trainer.train_step = diverging_step
    with pytest.raises(UserError, match="diverged"):
        trainer.fit()
    assert not (tmp_path / "run" / "privacy_report.json").exists()
    assert [c.name for c in checkpoints(tmp_path / "run")] == ["step-00000001"]  # none written after
    # and with no evaluation due, the checkpoint itself refuses non-finite parameters
    trainer = Trainer(make_config(data_dir, tmp_path / "run2"))
    trainer.train_step()
    with torch.no_grad():
        trainer.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="not finite"):
        trainer.save_checkpoint()


def test_leftover_temporary_checkpoint_folders_are_removed_at_start(data_dir, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for name in (".step-00000002.tmp-abc", ".step-00000002.tmp", ".step-00000001.old-99"):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"x" * 100)
    Trainer(make_config(data_dir, tmp_path / "run")).close()
    assert not list(root.glob(".step-*"))


@pytest.mark.parametrize("override,message", [
    ("optimizer.lr=-1", "lr must be positive"), ("optimizer.lr=0", "lr must be positive"),
    ("runtime.micro_batch_size=0", "micro_batch_size"), ("checkpoint.keep_last=0", "keep_last"),
    ("logging.every=0", "logging.every"),
])
def test_impossible_settings_are_one_line_before_any_compute(data_dir, tmp_path, capsys, override, message):
    cfg = configio.to_dict(make_config(data_dir, tmp_path / "run"))
    configio.write_yaml(cfg, tmp_path / "train.yaml")
    assert main(["train", str(tmp_path / "train.yaml"), override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_out_dir_that_is_a_file_is_one_line(data_dir, tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    configio.write_yaml(configio.to_dict(make_config(data_dir, tmp_path / "run")), tmp_path / "train.yaml")
    assert main(["train", str(tmp_path / "train.yaml")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_the_rerun_resumes(data_dir, tmp_path, signum):
    cfg = configio.to_dict(make_config(data_dir, tmp_path / "run", privacy={"steps": 400},
                                       checkpoint={"every": 0, "keep_last": 1}))
    configio.write_yaml(cfg, tmp_path / "train.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dptrain", "train", str(tmp_path / "train.yaml")]
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "run" / "privacy_journal.jsonl"
    deadline = time.monotonic() + 120
    while not (journal.is_file() and journal.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)  # until two steps are taken
    run.send_signal(signum)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signum, err[-2000:]
    assert "run the same command again to resume" in err and "Traceback" not in err
    (saved,) = checkpoints(tmp_path / "run")
    step = int(saved.name.split("-")[1])
    assert 2 <= step < 400 and json.loads(journal.read_text().splitlines()[-1])["step"] == step
    state = torch.load(saved / "train_state.pt", weights_only=True)
    assert state["step"] == step
    resumed = Trainer(configio.from_dict(TrainConfig, cfg))  # the same command resumes there
    assert resumed.step == step and resumed.ledger.steps == step


def test_a_demo_packed_by_sequence_points_the_group_unit_at_demo_unit(data_dir):
    from dptrain.data import PackedDataset
    from dptrain.train.batches import unit_ranges

    data = PackedDataset(data_dir)
    with pytest.raises(UserError, match="data.demo_unit: group"):
        unit_ranges(data, "group", demo=True)
    with pytest.raises(UserError, match="dptrain data prepare --unit group"):
        unit_ranges(data, "group")


def test_a_checkpoint_shared_without_its_private_state_is_intact_and_any_other_gap_is_not(data_dir, tmp_path):
    import shutil

    from dptrain.checkpoint import damage

    Trainer(make_config(data_dir, tmp_path / "run", privacy={"steps": 1})).fit()
    (latest,) = checkpoints(tmp_path / "run")
    shared = tmp_path / "shared"
    shutil.copytree(latest, shared, ignore=shutil.ignore_patterns("train_state.pt"))
    assert damage(shared) is None
    (shared / "privacy_ledger.json").unlink()
    assert "privacy_ledger.json is missing" in damage(shared)
