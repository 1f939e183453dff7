"""BandMF (correlated noise, cyclic Poisson sampling) against naive references.

The strategy's error against dense matrices, the realised noise against its factorisation (one
process and two Gloo processes), the sampling against its definition, and the accounting against
dp_accounting's composition of the same events and the exact Gaussian mechanism.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from dptrain.errors import UserError
from dptrain.privacy import bandmf
from dptrain.privacy.accounting import PrivacyLedger
from dptrain.privacy.bandmf import BandedNoise, optimize_coefficients, prefix_error
from dptrain.privacy.data_ledger import DataLedger
from dptrain.privacy.journal import record_entries
from dptrain.privacy.mechanism import Mechanism, plan_mechanism
from dptrain.privacy.noise import NoiseSource
from dptrain.privacy.randomness import Streams
from dptrain.privacy.sampling import CyclicPoissonSampler, UnitSampler
from dptrain.train.config import PrivacyConfig


def dense_strategy(coefficients, steps: int) -> np.ndarray:
    c = np.zeros((steps, steps))
    for j, value in enumerate(coefficients):
        c += np.diag(np.full(steps - j, value), -j)
    return c


# ---- the strategy matrix --------------------------------------------------------------------
@pytest.mark.parametrize("steps,bands", [(1, 1), (7, 1), (12, 3), (40, 6)])
def test_prefix_error_is_the_dense_frobenius_norm(steps, bands):
    rng = np.random.default_rng(steps)
    c = np.concatenate([[1.0], 0.3 * rng.random(bands - 1)])
    s = np.tril(np.ones((steps, steps)))
    expected = np.linalg.norm(s @ np.linalg.inv(dense_strategy(c, steps))) ** 2
    assert prefix_error(c, steps) == pytest.approx(expected, rel=1e-10)
    if bands == 1:
        assert prefix_error(c, steps) == pytest.approx(steps * (steps + 1) / 2)


@pytest.mark.parametrize("steps,bands", [(30, 4), (500, 16)])
def test_optimised_strategy_has_unit_columns_and_beats_dpsgd_and_its_start(steps, bands):
    c = optimize_coefficients(steps, bands)
    assert c == optimize_coefficients(steps, bands)  # deterministic: a resume plans the same C
    assert c[0] > 0 and math.isclose(math.fsum(x * x for x in c), 1.0, rel_tol=1e-12)
    dense = dense_strategy(c, min(steps, 60))
    assert np.linalg.norm(dense, axis=0).max() == pytest.approx(1.0)  # sensitivity 1
    start = bandmf.square_root_coefficients(bands)
    start /= np.linalg.norm(start)
    error = prefix_error(c, steps)
    assert error <= prefix_error(start, steps) * (1 + 1e-9)
    assert error < 0.5 * steps * (steps + 1) / 2  # at least halves DP-SGD's noise in the iterates
    fewer = prefix_error(optimize_coefficients(steps, bands // 2), steps)
    assert error <= fewer * (1 + 1e-6)  # more bands can only help (they include fewer)


def test_band_choice_reduces_the_error_at_the_same_budget_and_never_exceeds_the_data():
    choices = bandmf.choose_bands(8.0, 1e-5, 200, 10_000, 100)
    assert {c.bands for c in choices} == {1, 2, 4, 8, 16, 32, 64}
    dpsgd = next(c for c in choices if c.bands == 1)
    assert choices[0].error < dpsgd.error
    # q_b = b B / N <= 1 bounds the bands: 10 examples, batch 4, at most 2 parts
    assert bandmf.candidate_bands(100, 10, 4) == [1, 2]


# ---- the noise --------------------------------------------------------------------------------
def realised(noise, steps: int, size: int) -> np.ndarray:
    rows = []
    for t in range(steps):
        draw = noise.for_step(t)
        rows.append(torch.cat([draw((size // 2,)), draw((size - size // 2,))]).double().numpy())
    return np.stack(rows)


def test_noise_is_c_inverse_z_exactly_and_its_covariance_is_the_factorisation():
    steps, bands, size = 8, 3, 40_000
    c = optimize_coefficients(steps, bands)
    w = realised(BandedNoise(NoiseSource(Streams(5)), c), steps, size)
    z = realised(NoiseSource(Streams(5)), steps, size)
    cm = dense_strategy(c, steps)
    np.testing.assert_allclose(cm @ w, z, atol=1e-4)  # C w = z: the same draws, correlated by C⁻¹
    inverse = np.linalg.inv(cm)
    expected = inverse @ inverse.T
    empirical = w @ w.T / size
    scale = np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
    assert np.abs(empirical - expected).max() / scale.max() < 6 / math.sqrt(size)
    # and each step's noise is Gaussian with the variance of the factorisation
    for t in (0, steps - 1):
        assert stats.kstest(w[t] / math.sqrt(expected[t, t]), "norm").pvalue > 1e-4


def _banded(coefficients):
    return lambda source: BandedNoise(source, coefficients)


def _blt(decays, scales):
    from dptrain.privacy.blt import BLT, BLTNoise

    return lambda source: BLTNoise(source, BLT(decays, scales))


# the shared correlated-noise state (dptrain.privacy.correlated), for both strategies: two buffers each
@pytest.mark.parametrize("make,other", [(_banded(optimize_coefficients(6, 3)), _banded(optimize_coefficients(6, 2))),
                                        (_blt((0.9, 0.5), (0.3, 0.2)), _blt((0.8,), (0.4,)))])
def test_noise_state_resumes_exactly_and_refuses_steps_out_of_order(make, other):
    straight = realised(make(NoiseSource(Streams(9))), 6, 10)
    first = make(NoiseSource(Streams(9)))
    realised(first, 4, 10)
    state = first.state_dict()
    assert first.buffer_bytes() == 2 * 10 * 4  # two buffers of the noised tensors, float32
    second = make(NoiseSource(Streams(9)))
    second.load_state_dict(state)
    rest = np.stack([torch.cat([d((5,)), d((5,))]).double().numpy() for d in (second.for_step(4), second.for_step(5))])
    np.testing.assert_array_equal(rest, straight[4:])
    with pytest.raises(RuntimeError, match="exactly once"):
        second.for_step(2)
    with pytest.raises(UserError, match="another strategy"):
        other(NoiseSource(Streams(9))).load_state_dict(state)


@pytest.mark.gpu
def test_noise_on_cuda_is_the_cpu_noise():
    """Drawn on the CPU, correlated on the device with device buffers: the same w to float32 rounding."""
    c = optimize_coefficients(5, 3)
    on = {dev: BandedNoise(NoiseSource(Streams(21)), c) for dev in ("cpu", "cuda")}
    for t in range(5):
        draws = {dev: noise.for_step(t)((1000,), dev) for dev, noise in on.items()}
        assert draws["cuda"].device.type == "cuda"
        torch.testing.assert_close(draws["cuda"].cpu(), draws["cpu"], rtol=1e-5, atol=1e-6)


# ---- the sampling -----------------------------------------------------------------------------
def test_cyclic_poisson_samples_each_part_in_its_turn_at_rate_b_times_q():
    n, batch, bands, rounds = 3000, 60, 4, 150
    sampler = CyclicPoissonSampler(n, batch, bands, Streams(11))
    assert sampler.sampling_rate == pytest.approx(bands * batch / n)
    parts = [set(sampler.members(j).tolist()) for j in range(bands)]
    assert sum(len(p) for p in parts) == n and len(set().union(*parts)) == n
    # parts are uniform and independent: sizes Binomial(n, 1/b)
    for p in parts:
        assert abs(len(p) - n / bands) < 5 * math.sqrt(n / bands)
    hits = np.zeros(n)
    for t in range(rounds * bands):
        batch_t = sampler.sample()
        assert set(batch_t.tolist()) <= parts[t % bands]  # only the part whose turn it is
        hits[batch_t] += 1
    # every example joins each of its rounds with probability q_b
    rate = hits.sum() / (n * rounds)
    assert abs(rate - sampler.sampling_rate) < 5 * math.sqrt(sampler.sampling_rate / (n * rounds))


def test_cyclic_sampler_is_replayable_and_secure_parts_live_in_the_private_state():
    keyed = CyclicPoissonSampler(500, 10, 5, Streams(3))
    again = CyclicPoissonSampler(500, 10, 5, Streams(3))
    assert all(np.array_equal(keyed.batch_at(t)[0], again.batch_at(t)[0]) for t in range(7))
    assert "parts" not in keyed.state_dict()  # keyed parts are drawn again from the secret
    secure = CyclicPoissonSampler(500, 10, 5, None, secure=True)
    secure.sample()
    state = secure.state_dict()
    restored = CyclicPoissonSampler(500, 10, 5, None, secure=True)
    restored.load_state_dict(state)
    assert all(np.array_equal(secure.members(j), restored.members(j)) for j in range(5))
    with pytest.raises(UserError, match="parts"):
        restored.load_state_dict({**state, "parts": b""})
    with pytest.raises(UserError, match="each part must hold a batch"):
        CyclicPoissonSampler(20, 10, 3, Streams(1))


def test_units_are_partitioned_like_sequences():
    starts, counts = np.arange(0, 300, 3), np.full(100, 3)
    sampler = UnitSampler(starts, counts, 5, 2, Streams(4), bands=4)
    part = set(sampler.units.members(1).tolist())
    for _ in range(2):
        sampler.sample()
    rows = sampler.rows_at(1)
    assert {int(r[0]) // 3 for r in rows} <= part


# ---- the accounting --------------------------------------------------------------------------
def mechanism(bands: int, sigma: float = 1.0, steps: int = 64, n: int = 10_000, batch: int = 100) -> Mechanism:
    return Mechanism(sigma, 1.0, batch, n, bands=bands, coefficients=optimize_coefficients(steps, bands))


def test_a_run_is_its_rounds_of_subsampled_gaussian_charged_at_each_rounds_first_step():
    m = mechanism(8)
    assert m.kind == "bandmf" and m.sampling_rate == pytest.approx(8 * 100 / 10_000)
    assert m.step_run(64).count == 8 and m.step_run(65).count == 9 and m.step_run(3).count == 1
    ledger = PrivacyLedger()
    for step in range(1, 21):
        ledger.add(m.run_of_step(step))
        assert ledger.steps == math.ceil(step / 8)  # every prefix is covered
    assert mechanism(1).step_run(64).count == 64 and mechanism(1).kind == "dpsgd"


@pytest.mark.parametrize("sigma,steps,bands", [(0.8, 64, 8), (1.5, 200, 16)])
def test_epsilon_matches_dp_accountings_composition_of_the_same_events(sigma, steps, bands):
    """jax_privacy's amplified_bandmf_event is dpsgd_event(σ, q_b, ⌈T/b⌉): composed here by
    dp_accounting's PLD directly, it must agree with the certified bound, never exceed it by much."""
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    m = mechanism(bands, sigma, steps)
    ledger = PrivacyLedger()
    ledger.add(m.step_run(steps))
    ours = ledger.epsilon(1e-6)
    acc = PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(m.sampling_rate, dp_accounting.GaussianDpEvent(sigma)),
                math.ceil(steps / bands))
    reference = acc.get_epsilon(1e-6)
    assert reference * (1 - 2e-3) <= ours <= reference * 1.01


def test_sampling_everything_in_its_turn_is_the_exact_gaussian_mechanism():
    """q_b = 1 (each part whole at its turn): ⌈T/b⌉ Gaussian releases of sensitivity 1, whose
    exact ε solves Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2) = δ with μ = √rounds / σ (Balle & Wang 2018)."""
    from scipy.optimize import brentq

    bands, steps, sigma, delta = 4, 32, 2.0, 1e-5
    m = Mechanism(sigma, 1.0, 25, 100, bands=bands, coefficients=optimize_coefficients(steps, bands))
    assert m.sampling_rate == 1.0
    ledger = PrivacyLedger()
    ledger.add(m.step_run(steps))
    mu = math.sqrt(steps / bands) / sigma
    exact = brentq(lambda e: stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2) - delta,
                   1e-6, 100)
    assert exact <= ledger.epsilon(delta) <= exact * 1.01


def test_lost_steps_and_second_releases_are_charged_without_amplification(tmp_path):
    m = mechanism(4)
    fields = {"draw": "d1", "layout": "one-stream", **m.journal_fields()}
    assert fields["bands"] == 4
    lost = PrivacyLedger()
    record_entries(lost, [{"step": 5, **fields}, {"step": 6, **fields}])
    assert [(r.sampling_rate, r.count) for r in lost.runs] == [(1.0, 2)]
    data = DataLedger(tmp_path)
    data.append([{"run": "a", "step": s, **fields} for s in range(1, 10)])  # rounds open at 1, 5, 9
    data.append([{"run": "a", "step": 6, **fields, "draw": "d2"}])         # step 6 again, another draw
    data.append([{"run": "a", "step": 3, **fields}])                       # an exact replay: nothing new
    assert sorted((r.sampling_rate, r.count) for r in data.spent().runs) == [(m.sampling_rate, 3), (1.0, 1)]


def test_plan_chooses_bands_for_the_budget_and_refuses_what_it_cannot_account():
    cfg = PrivacyConfig(expected_batch_size=50, steps=100, delta=1e-6, target_epsilon=4.0, mechanism="bandmf")
    plan = plan_mechanism(cfg, 20_000, 10)
    assert plan.mechanism.bands > 1 and plan.epsilon <= 4.0
    dpsgd = plan_mechanism(PrivacyConfig(expected_batch_size=50, steps=100, delta=1e-6, target_epsilon=4.0),
                           20_000, 10)
    assert plan.mechanism.noise_multiplier > dpsgd.mechanism.noise_multiplier  # fewer, denser rounds
    with pytest.raises(UserError, match="needs privacy.bands"):
        plan_mechanism(PrivacyConfig(expected_batch_size=50, steps=100, delta=1e-6, noise_multiplier=1.0,
                                     mechanism="bandmf"), 20_000, 10)
    with pytest.raises(UserError, match="truncated Poisson"):
        plan_mechanism(PrivacyConfig(expected_batch_size=50, steps=100, delta=1e-6, noise_multiplier=1.0,
                                     mechanism="bandmf", bands=4, max_batch_size=80), 20_000, 10)
    with pytest.raises(UserError, match="each of the b parts"):
        plan_mechanism(PrivacyConfig(expected_batch_size=50, steps=100, delta=1e-6, noise_multiplier=1.0,
                                     mechanism="bandmf", bands=8), 300, 10)
    with pytest.raises(ValueError, match="bandmf only"):
        PrivacyConfig(expected_batch_size=50, steps=100, delta=1e-6, noise_multiplier=1.0, bands=4)


# ---- the trainer: one process, resume, two Gloo processes --------------------------------------
BANDMF = {"privacy": {"noise_multiplier": 1.0, "delta": 1e-5, "expected_batch_size": 16, "steps": 6,
                      "mechanism": "bandmf", "bands": 3},
          "runtime": {"micro_batch_size": 8, "device": "cpu", "seed": 13},
          "eval": {"every": 0, "max_sequences": 16},
          "checkpoint": {"every": 0, "keep_last": 2}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tiny_runs import demo_data

    return demo_data(tmp_path_factory.mktemp("demo"))


def bandmf_config(data_dir, out_dir, **sections):
    from tiny_runs import tiny_run_config

    return tiny_run_config(data_dir, out_dir, BANDMF, **sections)


def straight_and_resumed(config):
    """Six steps straight, and four, a checkpoint, a new process's resume and two more: the two
    runs must end at the same weights (the correlated noise resumed from the private state)."""
    from dptrain.train.trainer import Trainer

    straight = Trainer(config("a"))
    for _ in range(6):
        straight.train_step()
    interrupted = Trainer(config("b"))
    for _ in range(4):
        interrupted.train_step()
    interrupted.save_checkpoint()
    interrupted.close()
    resumed = Trainer(config("b"))
    assert resumed.step == 4 and resumed.noise.next_step == 4
    for _ in range(2):
        resumed.train_step()
    for name, w in straight.model.state_dict().items():
        assert torch.equal(w, resumed.model.state_dict()[name]), name
    return straight, resumed


def test_a_bandmf_run_resumes_bit_for_bit_and_accounts_its_rounds(data_dir, tmp_path):
    straight, resumed = straight_and_resumed(lambda name: bandmf_config(data_dir, tmp_path / name))
    assert straight.ledger.steps == resumed.ledger.steps == 2  # rounds opened at steps 1 and 4
    report = resumed.report()
    assert report["mechanism"]["kind"] == "bandmf" and report["mechanism"]["bands"] == 3
    assert "cyclic Poisson" in report["sampling"]
    from dptrain.train.report import summary

    text = summary(report)
    assert "BandMF with 3 bands" in text and "accounted: 2 subsampled Gaussian releases" in text
    spent = resumed.books.data_epsilon(1e-5, "pld", 0.0)
    assert (spent["steps"], spent["runs"]) == (4, 2)  # both runs on this data, 2 rounds each


def test_secure_bandmf_keeps_its_parts_and_buffers_and_charges_lost_steps_unamplified(data_dir, tmp_path):
    from dptrain.train.trainer import Trainer

    cfg = bandmf_config(data_dir, tmp_path, privacy={"secure_randomness": True}, runtime={"seed": None})
    first = Trainer(cfg)
    first.train_step()
    first.save_checkpoint()
    parts = [first.sampler.members(j).copy() for j in range(3)]
    first.train_step()
    first.train_step()  # steps 2 and 3 are released, then the process dies
    first.close()
    resumed = Trainer(cfg)
    assert resumed.step == 1 and resumed.noise.next_step == 1
    assert all(np.array_equal(parts[j], resumed.sampler.members(j)) for j in range(3))  # the OS draw, kept
    assert resumed.books.crash_released_steps == 2
    rates = sorted((r.sampling_rate, r.count) for r in resumed.ledger.runs)
    assert rates == [(resumed.mechanism.sampling_rate, 1), (1.0, 2)]  # round 1, and 2 lost steps at q = 1
    resumed.train_step()  # the buffers restored from the private state carry on
    assert resumed.noise.next_step == 2


def _noise_worker(rank, world, mode, data_dir, out_dir, result_file, kind="bandmf"):
    """Two ranks, BandMF (or BLT, blt0 its regenerated form): (1) the noise of steps with no data,
    whole, as every rank sees it after the sum (ddp) or gathered from the shards (fsdp); (2) a run checkpointed at step 2, continued, and
    resumed from that checkpoint: the same weights."""
    import dataclasses

    import torch.distributed as dist

    from dptrain.train.trainer import Trainer
    from test_distributed import full_gradient, make_config

    def config(folder):
        cfg = make_config(data_dir, out_dir / folder, mode)
        cfg.privacy.mechanism, cfg.privacy.steps = "blt" if kind.startswith("blt") else kind, 6
        if kind == "bandmf":
            cfg.privacy.bands = 3
        else:
            cfg.privacy.buffers = 0 if kind == "blt0" else 2
        return cfg

    trainer = Trainer(config("noise"))
    unit = dataclasses.replace(trainer.mechanism, expected_batch_size=1)
    rows = []
    for step in range(6):
        trainer.engine.zero_grad()
        trainer.parallel.privatize(trainer.engine, unit, trainer.noise, step)
        rows.append(full_gradient(trainer).cpu())
    trainer.close()
    every = [None] * world
    dist.all_gather_object(every, torch.stack(rows))

    straight = Trainer(config("train"))
    for _ in range(2):
        straight.train_step()
    straight.save_checkpoint()
    for _ in range(2):
        straight.train_step()
    expected = straight.parallel.full_state_dict(straight.model)
    straight.close()
    resumed = Trainer(config("train"))
    at = resumed.step
    for _ in range(2):
        resumed.train_step()
    got = resumed.parallel.full_state_dict(resumed.model)
    if rank == 0:
        m = trainer.mechanism
        column = m.coefficients if m.blt is None else tuple(m.blt.strategy_coefficients(6))
        torch.save({"rows": every, "coefficients": column, "std": m.noise_std,
                    "resumed_at": at, "expected": expected, "got": got}, result_file)


@pytest.mark.slow
# blt: two buffers; blt0: no buffer, each rank's previous draw made again from its stream
@pytest.mark.parametrize("mode,kind", [("ddp", "bandmf"), ("fsdp", "bandmf"), ("ddp", "blt"), ("fsdp", "blt0")])
def test_two_gloo_ranks_add_the_factorised_noise_once_and_resume_it(tmp_path, mode, kind):
    from dptrain.data.demo import prepare_demo
    from test_distributed import VOCAB, run_distributed

    data = prepare_demo(tmp_path / "demo", seq_len=16, vocab_size=VOCAB, num_records=120)
    run_distributed(_noise_worker, 2, mode, data, tmp_path / "run", tmp_path / "result.pt", kind)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    ranks = result["rows"]
    assert torch.equal(ranks[0], ranks[1])  # one noise, the same whole on every rank
    w = ranks[0].double().numpy() / result["std"]
    z = dense_strategy(result["coefficients"], 6) @ w  # C w: i.i.d. N(0, 1) if added once
    n = z.shape[1]
    empirical = z @ z.T / n
    assert np.abs(empirical - np.eye(6)).max() < 6 * math.sqrt(2 / n)  # twice the noise would read 2
    assert stats.kstest(z.reshape(-1), "norm").pvalue > 1e-4
    assert result["resumed_at"] == 2
    for name, w in result["expected"].items():
        assert torch.equal(w, result["got"][name]), name


# ---- the commands -------------------------------------------------------------------------------
def test_privacy_cli_accounts_bandmf_rounds_and_calibrates_for_them(capsys):
    import json

    from dptrain.cli import main
    from dptrain.privacy.accounting import calibrate_noise, epsilon

    base = ["--sampling-rate", "0.01", "--steps", "64", "--delta", "1e-6", "--json"]
    assert main(["privacy", "epsilon", "--noise-multiplier", "0.8", *base, "--mechanism", "bandmf", "--bands", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"]["pld"] == pytest.approx(epsilon(0.8, 0.08, 8, 1e-6))  # 8 rounds at 8 q
    assert main(["privacy", "noise", "--epsilon", "2", *base, "--mechanism", "bandmf", "--bands", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["noise_multiplier"]["pld"] == pytest.approx(calibrate_noise(2.0, 1e-6, 0.04, 16))
    assert main(["privacy", "noise", "--epsilon", "2", *base, "--mechanism", "bandmf"]) == 2
    assert main(["privacy", "noise", "--epsilon", "2", *base, "--mechanism", "bandmf", "--bands", "200"]) == 2
    assert main(["privacy", "noise", "--epsilon", "2", *base, "--bands", "2"]) == 2
    assert "--bands" in capsys.readouterr().err


def test_cost_counts_the_noise_buffers_and_fits_fewer_sequences(capsys):
    import json

    from dptrain.cli import main
    from dptrain.dp.cost import parameter_counts
    from dptrain.model import DecoderConfig

    config = str(Path(__file__).resolve().parents[1] / "dptrain" / "assets" / "model" / "tiny.yaml")
    assert main(["cost", config, "--json", "--gpu-memory", "0.05"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(["cost", config, "--json", "--gpu-memory", "0.05", "--bands", "8"]) == 0
    eight = json.loads(capsys.readouterr().out)
    assert eight["noise_buffer_bytes"] == 7 * 4 * parameter_counts(DecoderConfig.from_yaml(config))["total"]
    assert one["noise_buffer_bytes"] == 0
    assert eight["largest_micro_batch"]["dptrain"] < one["largest_micro_batch"]["dptrain"]


def test_planned_bandmf_config_leaves_sigma_and_bands_to_the_trainer():
    from dptrain.scaling.plan import plan, training_config
    from dptrain.scaling.law import load_law
    from dptrain.scaling.plan import SHIPPED_LAW

    row = plan(load_law(str(SHIPPED_LAW), None), 2e12, 8.0, 1e-6, 100_000, 64, top=1)[0]
    cfg = training_config(row, 8.0, 1e-6, 64, "data", mechanism="bandmf")
    assert cfg["privacy"]["mechanism"] == "bandmf" and "noise_multiplier" not in cfg["privacy"]
    assert cfg["privacy"]["target_epsilon"] == 8.0
