"""The private training loop: budget checks before compute, noise once per logical step, exact resume."""
import json

import numpy as np
import pytest
import torch
import yaml

from dptrain import configio
from dptrain.cli import main
from dptrain.errors import UserError
from dptrain.train.config import TrainConfig, load_train_config
from dptrain.train.trainer import Trainer
from tiny_runs import VOCAB, demo_by_user, demo_data, tiny_run_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("demo"))


DEFAULTS = {"privacy": {"noise_multiplier": 1.0, "delta": 1e-5, "expected_batch_size": 16, "steps": 6},
            "runtime": {"micro_batch_size": 8, "device": "cpu"},
            "eval": {"every": 0, "max_sequences": 16},
            "checkpoint": {"every": 3, "keep_last": 2}}


def make_config(data_dir, out_dir, **sections) -> TrainConfig:
    return tiny_run_config(data_dir, out_dir, DEFAULTS, **sections)


def weights(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_continues_bit_for_bit(data_dir, tmp_path):
    seeded = {"seed": 11}
    straight = Trainer(make_config(data_dir, tmp_path / "a", runtime=seeded))
    straight.fit()

    cfg = make_config(data_dir, tmp_path / "b", runtime=seeded)
    interrupted = Trainer(cfg)
    for _ in range(3):
        interrupted.train_step()
    interrupted.save_checkpoint()
    del interrupted  # a crash: only the checkpoint survives

    resumed = Trainer(cfg)
    assert resumed.step == 3
    resumed.fit()
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert straight.ledger.state_dict() == resumed.ledger.state_dict()
    assert straight.batch_sizes == resumed.batch_sizes


def test_noise_is_drawn_once_per_parameter_per_logical_step(data_dir, tmp_path):
    trainer = Trainer(make_config(data_dir, tmp_path, privacy={"expected_batch_size": 40},
                                  runtime={"micro_batch_size": 4}))
    calls = []
    for_step = trainer.noise.for_step

    def counting_for_step(step, rank=0):
        noise = for_step(step, rank)

        def counting(shape, device, dtype=torch.float32):
            calls.append(tuple(shape))
            return noise(shape, device, dtype)
        return counting

    trainer.noise.for_step = counting_for_step
    result = trainer.train_step()
    assert result.batch_size > 4  # several micro-batches went into this one step
    params = list(dict.fromkeys(trainer.model.parameters()))  # the tied weight once
    assert sorted(calls) == sorted(tuple(p.shape) for p in params)


def test_empty_batch_is_a_step_of_pure_noise(data_dir, tmp_path):
    trainer = Trainer(make_config(data_dir, tmp_path))
    trainer.sampler.sample = lambda: np.zeros(0, dtype=np.int64)
    before = weights(trainer)
    result = trainer.train_step()
    assert result.batch_size == 0 and trainer.step == 1 and trainer.ledger.steps == 1
    assert any(not torch.equal(before[k], v) for k, v in weights(trainer).items())


def test_calibrated_run_stays_within_budget_and_reports_it(data_dir, tmp_path):
    cfg = make_config(data_dir, tmp_path, privacy={"noise_multiplier": None, "target_epsilon": 4.0,
                                                   "steps": 3}, checkpoint={"every": 2, "keep_last": 2})
    trainer = Trainer(cfg)
    report = trainer.fit()
    assert report["steps"] == 3
    assert 0 < report["epsilon"]["pld"] <= 4.0
    assert report["epsilon"]["rdp"] >= report["epsilon"]["pld"]  # PLD is the tighter bound
    saved = json.loads((tmp_path / "privacy_report.json").read_text())
    assert saved["noise_multiplier"] == pytest.approx(trainer.noise_multiplier)
    text = (tmp_path / "privacy_report.txt").read_text()
    assert text.startswith(f"Privacy guarantee: ({report['epsilon']['pld']:.4g}, ")
    # PRV's point value is shown only as what it is
    assert saved["estimates"] == ["prv"] and "prv " in text and "(estimate, not a guarantee)" in text
    assert "pld " in text and "pld {:.4g} (estimate".format(report["epsilon"]["pld"]) not in text
    # a checkpoint before the end carries the bounds, not the (slow) estimate
    early = json.loads((tmp_path / "checkpoints" / "step-00000002" / "privacy_report.json").read_text())
    assert set(early["epsilon"]) == {"pld", "rdp"} and early["estimates"] == []
    final = json.loads((tmp_path / "checkpoints" / "step-00000003" / "privacy_report.json").read_text())
    assert final["epsilon"] == saved["epsilon"]


def test_only_upper_bounds_calibrate_and_check_the_budget(data_dir, tmp_path):
    with pytest.raises(UserError, match=r"privacy.accountant: 'prv' is not one of \['pld', 'rdp'\]"):
        Trainer(make_config(data_dir, tmp_path, privacy={"accountant": "prv"}))


@pytest.mark.slow
def test_truncated_poisson_is_counted(data_dir, tmp_path):
    cfg = make_config(data_dir, tmp_path, privacy={"expected_batch_size": 64, "max_batch_size": 64},
                      logging={"private_metrics": True},  # the count is a statistic of private batches
                      runtime={"seed": 0})  # a fixed draw in which some batches are cut
    trainer = Trainer(cfg)
    for _ in range(6):
        trainer.train_step()
    assert max(trainer.batch_sizes) <= 64
    assert trainer.sampler.truncated_steps > 0  # half the draws of Binomial(N, 64/N) exceed 64
    assert trainer.report()["truncated_steps"] == trainer.sampler.truncated_steps


@pytest.mark.parametrize("privacy, message", [
    ({"noise_multiplier": 0.3, "target_epsilon": 1.0}, "target_epsilon"),
    ({"noise_multiplier": None, "target_epsilon": 1e-4}, "no noise multiplier"),
    ({"expected_batch_size": 10**6}, "exceeds"),
    ({"delta": 0.5}, "1/N"),
    ({"unit": "group", "max_sequences_per_unit": 4}, "is packed by sequence"),
])
def test_impossible_plans_fail_before_any_compute(data_dir, tmp_path, privacy, message):
    with pytest.raises(UserError, match=message):
        Trainer(make_config(data_dir, tmp_path, privacy=privacy))
    assert not (tmp_path / "checkpoints").exists()


def test_missing_data_and_vocab_mismatch(data_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Trainer(make_config(tmp_path / "nowhere", tmp_path))
    cfg = make_config(data_dir, tmp_path)
    cfg.model.vocab_size = VOCAB * 2
    with pytest.raises(UserError, match="vocab_size"):
        Trainer(cfg)


def test_checkpoint_of_another_config_is_refused(data_dir, tmp_path):
    Trainer(make_config(data_dir, tmp_path)).save_checkpoint()
    with pytest.raises(UserError, match="privacy"):
        Trainer(make_config(data_dir, tmp_path, privacy={"noise_multiplier": 2.0}))


def test_corrupt_private_state_is_set_aside_or_named(data_dir, tmp_path):
    path = Trainer(make_config(data_dir, tmp_path)).save_checkpoint()
    (path / "train_state.pt").write_bytes(b"not a checkpoint")
    resumed = Trainer(make_config(data_dir, tmp_path))  # its checksum shows it: set aside, none left
    assert resumed.step == 0 and not path.exists() and list(path.parent.glob("damaged-step-00000000-*"))
    path = resumed.save_checkpoint()
    resumed.close()
    # a checkpoint written before checksums: the same damage is one line
    (path / "checksums.json").unlink()
    (path / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        Trainer(make_config(data_dir, tmp_path))


def test_train_cli_exports_and_reports(data_dir, tmp_path, capsys):
    from dptrain.privacy.accounting import StepRun
    from dptrain.privacy.running import running_epsilon

    cfg = make_config(data_dir, tmp_path / "run", privacy={"steps": 3},
                      export={"hf_dir": str(tmp_path / "hf"), "sample_prompt": "Patient", "sample_tokens": 5})
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(configio.to_dict(cfg)))
    assert main(["train", str(path), "eval.every=1", "logging.every=2"]) == 0
    out = capsys.readouterr().out
    assert "Privacy guarantee" in out and "sample (temperature 0.8): Patient" in out
    assert (tmp_path / "hf" / "config.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in r for r in rows)
    # the running epsilon, on the logged steps only (every 2 and the last), for the steps taken so far
    logged = {r["step"]: r["epsilon"] for r in rows if "epsilon" in r}
    assert sorted(logged) == [2, 3] and logged[2] < logged[3]
    q = json.loads((tmp_path / "run" / "privacy_report.json").read_text())["sampling_rate"]
    for step, eps in logged.items():
        assert eps == pytest.approx(running_epsilon([StepRun(1.0, q, step)], 1e-5), rel=1e-9)


def test_config_typo_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"model": "m.yaml", "data": {"path": "x"},
                                    "privacy": {"noise_multiplier": 1.0, "delta": 1e-6,
                                                "expected_batch_size": 8, "steps": 1, "stepz": 2}}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "privacy.stepz" in err[0]


def test_demo_config_is_valid():
    cfg = load_train_config("configs/demo.yaml")
    assert cfg.privacy.target_epsilon is not None and cfg.data.source == "demo"


@pytest.fixture(scope="module")
def group_data(data_dir, tmp_path_factory):
    """The demo corpus packed by user: no sequence mixes two users."""
    return demo_by_user(data_dir, tmp_path_factory.mktemp("by-user"), 32)


def test_data_packed_by_group_trains_at_sequence_level(group_data, tmp_path):
    from dptrain.data import PackedDataset

    assert PackedDataset(group_data).info["padding_tokens"] > 0
    trainer = Trainer(make_config(group_data, tmp_path / "run", privacy={"steps": 1, "expected_batch_size": 4}))
    trainer.train_step()
    assert np.isfinite(trainer.evaluate())
    assert trainer.report()["guarantee"].endswith("one training sequence")


def test_group_unit_step_is_the_naive_clipped_sum_of_sampled_units(group_data, tmp_path):
    from dptrain.dp.reference import naive_unit_clipped_grad_sum, unique_trainable
    from dptrain.train.batches import inputs_and_targets

    k = 2
    cfg = make_config(group_data, tmp_path, privacy={"unit": "group", "max_sequences_per_unit": k,
                                                     "expected_batch_size": 3, "steps": 2, "max_grad_norm": 0.5},
                      runtime={"micro_batch_size": 2 * k, "seed": 3})
    trainer = Trainer(cfg)
    starts, counts = trainer.unit_ranges
    assert trainer.num_examples == len(counts) and trainer.sampling_rate == 3 / len(counts)
    captured = []
    privatize = trainer.parallel.privatize

    residuals = []

    def capture(engine, mechanism, noise, step):
        assert mechanism.expected_batch_size == 3  # normalised by the expected number of units
        captured.append([p.grad.clone() for p in unique_trainable(trainer.model)])
        privatize(engine, mechanism, noise, step)
        residuals.append(torch.cat([(p.grad - c / 3).flatten() for p, c in
                                    zip(unique_trainable(trainer.model), captured[-1])]).double().numpy())
    trainer.parallel.privatize = capture
    compared = 0
    for step in range(2):
        rows = trainer.sampler.rows_at(step)
        before = {n: t.clone() for n, t in trainer.model.state_dict().items()}
        trainer.train_step()
        assert trainer.batch_sizes[-1] == len(rows)
        if not len(rows):
            continue
        for row in rows:  # one unit per row: min(k, its size) of its own sequences, then padding
            real = row[row >= 0]
            units = np.unique(np.searchsorted(starts, real, side="right") - 1)
            assert len(units) == 1 and len(real) == min(k, counts[units[0]])
        compared += 1
        model = trainer.model.__class__(trainer.model.cfg)
        model.load_state_dict(before)
        inputs, targets = inputs_and_targets(trainer.train_data, rows.reshape(-1), "cpu")
        _, ref = naive_unit_clipped_grad_sum(model, inputs, targets, 0.5, k)
        for got, want in zip(captured[-1], ref):
            assert float((got - want).norm() / want.norm().clamp(min=1e-30)) < 1e-5
    # on top of the units' clipped sum: noise σC once per step, divided by the expected units
    from scipy import stats
    std = trainer.noise_multiplier * 0.5 / 3
    for residual in residuals:
        assert stats.kstest(residual, "norm", args=(0, std)).pvalue > 1e-4
        for wrong in (std / k, std * k):  # divided by expected sequences, or noise per sequence
            assert stats.kstest(residual, "norm", args=(0, wrong)).pvalue < 1e-6
    report = trainer.report()
    assert report["guarantee"].endswith("one group (all documents sharing a value of 'user_id')")
    assert report["unit"]["num_units"] == len(counts) and report["unit"]["max_sequences_per_unit"] == k
    assert report["dataset_size"] == len(counts) and "units" not in report  # data statistics: private
    assert "sequences_per_unit_max" not in report["unit"]
    assert compared and report["sampling_rate"] == 3 / len(counts)
    from dptrain.train.report import summary
    text = summary(report)
    assert f"units: {len(counts)} groups; at most 2 sequences each used per step" in text
    assert "group privacy (a secret or person spanning g groups): g=2: (" in text
    assert "dataset " + str(len(counts)) + " groups" in text and "verified identity" in text


@pytest.mark.parametrize("sections, message", [
    ({"privacy": {"unit": "group", "max_sequences_per_unit": 3}}, "multiple of"),
    ({"privacy": {"unit": "group", "max_batch_size": 20}}, "truncated"),
    ({"privacy": {"max_sequences_per_unit": 2}}, "document or group only"),
    ({"privacy": {"unit": "document"}}, "packed by group"),
])
def test_unit_options_refused_with_one_line(group_data, tmp_path, sections, message):
    with pytest.raises(UserError, match=message):
        Trainer(make_config(group_data, tmp_path, **sections))


def test_group_unit_run_resumes_bit_for_bit(group_data, tmp_path):
    units = {"privacy": {"unit": "group", "max_sequences_per_unit": 2, "expected_batch_size": 3, "steps": 2},
             "runtime": {"micro_batch_size": 4, "seed": 5}, "checkpoint": {"every": 0}}
    straight = Trainer(make_config(group_data, tmp_path / "a", **units))
    for _ in range(2):
        straight.train_step()
    cfg = make_config(group_data, tmp_path / "b", **units)
    interrupted = Trainer(cfg)
    interrupted.train_step()
    interrupted.save_checkpoint()
    interrupted.close()
    resumed = Trainer(cfg)
    assert resumed.step == 1 and resumed.sampler.steps_taken == 1
    resumed.train_step()
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert straight.batch_sizes == resumed.batch_sizes



def test_sgd_takes_a_heavy_ball_step_on_the_private_gradient(data_dir, tmp_path):
    trainer = Trainer(make_config(data_dir, tmp_path, optimizer={"name": "sgd", "lr": 0.1, "betas": [0.8, 0.95]}))
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.defaults["momentum"] == 0.8
    before = weights(trainer)
    lr = trainer.optimizer.param_groups[0]["lr"]  # as the schedule sets it for step 1
    trainer.train_step()
    for name, p in trainer.model.named_parameters():
        # first step: the momentum buffer is the gradient itself
        torch.testing.assert_close(p.detach(), before[name] - lr * p.grad, rtol=0, atol=1e-6, msg=name)
