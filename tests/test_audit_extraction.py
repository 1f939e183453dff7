"""`dptrain memorization`: extraction test and planted-secret exposure on a real checkpoint."""
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dptrain import configio
from dptrain.audit.extraction import _split_ids, demo_secret_candidates, resolve_checkpoint, secret_exposures
from dptrain.checkpoint import load_model
from dptrain.cli import main
from dptrain.data.demo import make_canaries
from dptrain.data.tokenizer import load_tokenizer
from dptrain.errors import UserError
from dptrain.train.config import TrainConfig
from dptrain.train.trainer import Trainer

VOCAB = 512


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    cfg = configio.from_dict(TrainConfig, {
        "model": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_seq_len=64, query_pre_attn_scalar=16.0),
        "data": {"path": str(root / "demo"), "source": "demo", "demo_seq_len": 32, "demo_vocab_size": VOCAB},
        "privacy": {"noise_multiplier": 1.0, "delta": 1e-5, "expected_batch_size": 16, "steps": 3},
        "out_dir": str(root / "run"),
        "runtime": {"micro_batch_size": 16, "device": "cpu", "seed": 0},  # a reproducible test run
        "eval": {"every": 0, "max_sequences": 8},
        "logging": {"wandb": "disabled", "progress": False},
        "checkpoint": {"every": 0, "keep_last": 1},
    })
    from dptrain.data.demo import prepare_demo

    prepare_demo(root / "demo", seq_len=32, vocab_size=VOCAB, num_records=400)
    Trainer(cfg).fit()
    return root / "run"


def test_reference_secrets_follow_the_demo_format():
    pattern = re.compile(r"\d{4}-[A-Z]+-\d{4}")
    assert all(pattern.fullmatch(c["secret"]) for c in make_canaries(0))
    refs = demo_secret_candidates(0)
    drawn = [next(refs) for _ in range(200)]
    assert all(pattern.fullmatch(s) for s in drawn) and len(set(drawn)) == 200


def test_exposure_equals_a_naive_ranking(run_dir):
    checkpoint = resolve_checkpoint(run_dir)
    model = load_model(checkpoint).eval()
    sp = load_tokenizer(checkpoint / "tokenizer.model")
    canary = json.loads((next(run_dir.parent.glob("demo/prepared-*")) / "canaries.json").read_text())[5]
    [result] = secret_exposures(model, sp, [canary], num_references=40, seed=3, progress=False)

    @torch.no_grad()
    def log_likelihood(secret: str) -> float:  # one full forward over the whole text, summed by hand
        context, ids = _split_ids(sp, canary["prefix"], secret)
        row = torch.tensor([context + ids])
        logp = F.log_softmax(model(row)[0].double(), dim=-1)
        return sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(ids))

    refs = demo_secret_candidates(3)
    others = [s for s in (next(refs) for _ in range(41)) if s != canary["secret"]][:40]
    own = log_likelihood(canary["secret"])
    lls = np.array([log_likelihood(s) for s in others])
    rank = 1 + (lls > own + 1e-6).sum() + 0.5 * (np.abs(lls - own) <= 1e-6).sum()
    assert result["rank"] == rank
    assert result["exposure"] == pytest.approx(math.log2(41) - math.log2(rank))
    assert result["canary_log_likelihood"] == pytest.approx(own, abs=1e-3)


def owner_only(path) -> bool:
    """Files 0600 and folders 0700, all the way down."""
    mode = path.stat().st_mode & 0o777
    if path.is_dir():
        return mode == 0o700 and all(owner_only(p) for p in path.iterdir())
    return mode == 0o600


def published(folder) -> dict:
    """The bytes of every privacy report and the names of every file in a published folder."""
    return {p.relative_to(folder): (p.read_bytes() if p.name.startswith("privacy_report") else None)
            for p in folder.rglob("*") if "private" not in p.relative_to(folder).parts}


def test_cli_keeps_per_sequence_results_private_and_publishes_nothing(run_dir, capsys):
    checkpoint = resolve_checkpoint(run_dir)
    before = published(run_dir)
    args = ["memorization", str(run_dir), "--prefix-len", "8", "--suffix-len", "8", "--num-sequences", "24",
            "--references", "30", "--no-progress"]
    assert main(args) == 0
    private = run_dir / "private" / "memorization" / checkpoint.name
    stdout = capsys.readouterr().out
    assert str(private) in stdout and "owner-only" in stdout
    assert "mean exposure" not in stdout  # the numbers stay in the private folder
    assert "mean exposure" in (private / "memorization.txt").read_text()
    report = json.loads((private / "memorization.json").read_text())
    e = report["extraction"]
    assert e["num_sequences"] == 24 and 0 <= e["exact_rate"] <= e["approx_rate"] <= 1
    assert len(e["normalized_distances"]) == 24
    secrets = report["secrets"]["canaries"]
    assert len(secrets) == 16 and {s["train_repeats"] for s in secrets} == {0, 1, 4, 16}
    assert all(0 <= s["exposure"] <= math.log2(31) + 1e-9 for s in secrets)
    curve = report["epsilon_by_step"]
    assert curve["steps"] == [0, 1, 2, 3] and curve["epsilon"][0] == 0.0
    assert curve["epsilon"][-1] == pytest.approx(
        json.loads((checkpoint / "privacy_report.json").read_text())["epsilon"]["pld"])
    assert set(report["figures"]) == {"extraction", "exposure", "epsilon_curve"}
    for name in report["figures"].values():
        assert (private / name).stat().st_size > 0
    # owner-only from the run's private folder down; the published folders gained nothing
    assert owner_only(run_dir / "private")
    assert published(run_dir) == before
    for folder in (checkpoint, run_dir):
        merged = json.loads((folder / "privacy_report.json").read_text())
        assert "memorization" not in merged and "normalized_distances" not in json.dumps(merged)


def test_out_folder_is_made_private_and_must_not_hold_other_files(run_dir, tmp_path, capsys):
    from dptrain.audit.extraction import output_folder, run_memorization

    checkpoint = resolve_checkpoint(run_dir)
    out = tmp_path / "mine" / "memorization"
    report = run_memorization(run_dir, out=out, num_sequences=4, prefix_len=8, suffix_len=8, num_references=5,
                              progress=False)
    assert report["folder"] == str(out) and (out / "memorization.json").is_file()
    assert owner_only(out)
    assert output_folder(checkpoint, out) == out  # a rerun may replace its own results
    with pytest.raises(UserError, match="holds other files"):
        output_folder(checkpoint, checkpoint)  # never beside the published weights
    # a checkpoint outside a run folder has no private area: --out is required
    lone = tmp_path / "lone"
    shutil.copytree(resolve_checkpoint(run_dir), lone, ignore=shutil.ignore_patterns("train_state.pt"))
    assert main(["memorization", str(lone), "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(run_dir, tmp_path, capsys):
    assert main(["memorization", str(tmp_path)]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    with pytest.raises(UserError, match="windows of 100 tokens"):
        from dptrain.audit.extraction import run_memorization

        run_memorization(run_dir, num_sequences=4, progress=False)
