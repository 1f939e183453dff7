"""`dptrain audit`: canaries reach the real trainer by fair coins; the bound has power and stays honest."""
import json

import numpy as np
import pytest
import torch

from dptrain import configio
from dptrain.audit.dataset import write_canary_dataset
from dptrain.audit.pipeline import (FIRST_ORDINARY_ID, epsilon_by_step, finish_audit, keep_initial_weights,
                                    prepare_audit)
from dptrain.cli import main
from dptrain.data import PackedDataset, prepare, train_tokenizer
from dptrain.errors import UserError
from dptrain.privacy.accounting import PrivacyLedger, epsilon
from dptrain.privacy.data_ledger import DataLedger
from dptrain.train.config import TrainConfig
from dptrain.train.trainer import Trainer

VOCAB, SEQ = 512, 32
CANARIES = 100


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A deliberately small private set (~20 sequences), so every canary is drawn ~10 times."""
    from dptrain.data.demo import write_demo_corpus

    root = tmp_path_factory.mktemp("audit-base")
    corpus = write_demo_corpus(root / "corpus", num_records=16, num_public_paragraphs=400)
    lines = corpus["public"].read_text().splitlines()
    docs = lines[:12]
    (root / "tok.txt").write_text("\n".join(lines[12:]) + "\n")  # the tokenizer never sees the data
    tokenizer = train_tokenizer([root / "tok.txt"], VOCAB, root / "tok.model")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return prepare([root / "docs.jsonl"], tokenizer, SEQ, root / "prepared", progress=False)


def make_config(data_dir, out_dir, **privacy) -> TrainConfig:
    return configio.from_dict(TrainConfig, {
        "model": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_seq_len=64, query_pre_attn_scalar=16.0),
        "data": {"path": str(data_dir)},
        "privacy": {"delta": 1e-6, "expected_batch_size": 32, "steps": 24, **privacy},
        "optimizer": {"lr": 2e-2},
        "out_dir": str(out_dir),
        "runtime": {"micro_batch_size": 32, "device": "cpu", "seed": 0},  # a reproducible test run
        "eval": {"every": 0},
        "logging": {"wandb": "disabled", "progress": False},
        "checkpoint": {"every": 0, "keep_last": 1},
    })


def owner_only(path) -> bool:
    """Files 0600 and folders 0700, all the way down."""
    mode = path.stat().st_mode & 0o777
    if path.is_dir():
        return mode == 0o700 and all(owner_only(p) for p in path.iterdir())
    return mode == 0o600


def run_audit(cfg, noise_free=False):
    setup = prepare_audit(cfg, CANARIES, seed=7)
    trainer = Trainer(setup.cfg, noise_free=noise_free)  # noise_free: the non-private control, clipping only
    initial = keep_initial_weights(trainer, setup)
    trainer.fit()
    return setup, trainer, finish_audit(trainer, setup, initial, progress=False)


def test_canary_folder_holds_exactly_the_included_canaries(base_dir, tmp_path):
    base = PackedDataset(base_dir)
    canaries = torch.randint(FIRST_ORDINARY_ID, VOCAB, (10, SEQ))
    included = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 1], dtype=bool)
    out = PackedDataset(write_canary_dataset(base_dir, canaries, included, tmp_path / "d"))
    assert len(out) == len(base) + included.sum()
    assert torch.equal(out.batch(np.arange(len(base))), base.batch(np.arange(len(base))))
    assert torch.equal(out.batch(np.arange(len(base), len(out))), canaries[torch.from_numpy(included)])
    # each canary is a document of its own, starting at its sequence
    assert out.documents(len(base) + 2).tolist() == [out.document_table[-3, 0]]
    with pytest.raises(UserError):
        write_canary_dataset(base_dir, canaries[:, :5], included, tmp_path / "e")


def test_without_noise_the_audit_certifies_a_clearly_positive_epsilon(base_dir, tmp_path):
    setup, trainer, report = run_audit(make_config(base_dir, tmp_path, noise_multiplier=1.0), noise_free=True)
    assert 20 < setup.included.sum() < 80
    assert report["accountant_epsilon"] == float("inf")
    # with 100 canaries no test can certify more than ~3.2; the control reaches most of it
    assert report["epsilon_lower_bound"] > 1.5
    for name in ("loss", "gradient"):
        a = report["scorers"][name]
        assert a["mean_score_included"] > a["mean_score_excluded"]
    for name in ("audit_report.json", "audit_scores_loss.png", "audit_scores_gradient.png", "epsilon_by_step.png"):
        assert (trainer.out_dir / name).stat().st_size > 0
    merged = json.loads((trainer.out_dir / "privacy_report.json").read_text())
    assert merged["audit"]["epsilon_lower_bound"] == report["epsilon_lower_bound"]
    assert "audit: ε ≥" in (trainer.out_dir / "privacy_report.txt").read_text()
    # what derives from the private data or the secret coins is owner-only, and listed, not published
    private = trainer.out_dir / "private" / "audit"
    assert setup.folder == private and not (trainer.out_dir / "audit").exists()
    assert (private / "canaries.npz").is_file() and (private / "initial" / "model.safetensors").is_file()
    assert len(PackedDataset(private / "data")) == len(PackedDataset(base_dir)) + setup.included.sum()
    assert owner_only(trainer.out_dir / "private")
    # the audit's steps are spent on the base data: its own ledger records them, not the copy's
    mine = [e for e in DataLedger(base_dir).entries() if e["run"] == trainer.run_id]
    assert [e["step"] for e in mine] == list(range(1, trainer.step + 1))
    assert not (private / "data" / "privacy_spent.jsonl").exists()
    assert set(report["kept_private"]) == {"private/audit/canaries.npz", "private/audit/data/",
                                           "private/audit/initial/"}
    assert configio.read_yaml(trainer.out_dir / "train_config.yaml")["data"]["path"] == str(private / "data")
    # a rerun finds canaries, coins and initial weights there and resumes the finished run
    again = prepare_audit(make_config(base_dir, tmp_path, noise_multiplier=1.0), CANARIES)
    assert torch.equal(again.canaries, setup.canaries) and (again.included == setup.included).all()
    resumed = Trainer(again.cfg, noise_free=True)
    assert resumed.step == trainer.step
    assert keep_initial_weights(resumed, again) == private / "initial"


@pytest.mark.slow
def test_dp_training_stays_below_its_claimed_epsilon(base_dir, tmp_path):
    # the same canaries and coins as the control above, now with noise calibrated to ε = 1
    _, trainer, report = run_audit(make_config(base_dir, tmp_path, target_epsilon=1.0))
    assert trainer.noise_multiplier > 1
    assert report["accountant_epsilon"] <= 1.0
    assert report["epsilon_lower_bound"] <= report["accountant_epsilon"]
    assert report["consistent_with_accountant"]


def test_epsilon_by_step_matches_the_accountant_at_every_point():
    ledger = PrivacyLedger()
    ledger.record(1.2, 0.05, count=30)
    ledger.record(0.9, 0.05, count=10)
    steps, eps = epsilon_by_step(ledger.runs, 1e-5, "rdp", points=4)
    assert steps == [0, 10, 20, 30, 40]
    assert eps[:4] == pytest.approx([0.0] + [epsilon(1.2, 0.05, s, 1e-5, "rdp") for s in (10, 20, 30)])
    assert eps[4] == pytest.approx(ledger.epsilon(1e-5, "rdp"))
    assert all(a < b for a, b in zip(eps, eps[1:]))


def test_audit_reuses_its_canaries_and_refuses_a_different_count(base_dir, tmp_path):
    cfg = make_config(base_dir, tmp_path, noise_multiplier=1.0)
    first = prepare_audit(cfg, 12)
    again = prepare_audit(cfg, 12)
    assert torch.equal(first.canaries, again.canaries) and (first.included == again.included).all()
    assert first.canaries.min() >= FIRST_ORDINARY_ID
    with pytest.raises(UserError, match="holds 12 canaries"):
        prepare_audit(cfg, 20)


def test_audit_refuses_a_public_copy_left_by_the_old_layout(base_dir, tmp_path):
    (tmp_path / "audit").mkdir()
    np.savez(tmp_path / "audit" / "canaries.npz", tokens=np.zeros((2, SEQ)), included=np.array([True, False]))
    with pytest.raises(UserError, match="published copy"):
        prepare_audit(make_config(base_dir, tmp_path, noise_multiplier=1.0), 2)


def test_cli_rejects_bad_options(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "missing.yaml"), "--scorers", "loss,magic"]) == 2
    assert "--scorers" in capsys.readouterr().err


def test_each_scorer_is_tested_at_a_bonferroni_share_of_the_significance():
    from dptrain.audit.one_run import best_epsilon_lower_bound
    from dptrain.audit.pipeline import audit_bounds

    rng = np.random.default_rng(0)
    included = rng.integers(0, 2, 400).astype(bool)
    strong = rng.normal(size=400) + 2.0 * included
    weak = rng.normal(size=400) + 0.5 * included
    both = audit_bounds({"loss": weak, "gradient": strong}, included, 1e-6, 0.05)
    alone = best_epsilon_lower_bound(strong, included, delta=1e-6, significance=0.025)
    assert both["best_scorer"] == "gradient" and both["significance_per_scorer"] == 0.025
    assert both["epsilon_lower_bound"] == alone.epsilon > 0
    assert best_epsilon_lower_bound(strong, included, delta=1e-6, significance=0.05).epsilon > alone.epsilon
