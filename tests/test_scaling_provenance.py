"""A law knows what it was fitted on, and the planner checks the user's data against it."""
import json
from pathlib import Path

import pytest
import yaml

from dptrain.cli import main
from dptrain.scaling.law import save_laws
from dptrain.scaling.provenance import UNKNOWN, check_against, fit_provenance
from dptrain.scaling.synthetic import illustrative_law, synthetic_runs
from tiny_runs import demo_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("demo"))  # 32-token sequences, 512 pieces


@pytest.fixture(scope="module")
def spec(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "results": "results.csv", "models": [str(REPO / "configs/model/ladder-0.yaml")],
        "batch_sizes": [32], "sigma_bars": [0.0, 0.004], "steps": [100],
        "base": {"data": {"source": "prepared", "path": str(data)},
                 "privacy": {"delta": 1e-6, "max_grad_norm": 0.5},
                 "optimizer": {"name": "adamw", "lr": 2e-3, "betas": [0.9, 0.99]},
                 "schedule": {"warmup_steps": 10, "decay": "constant"}}}))
    return path


@pytest.fixture(scope="module")
def fitted_on(data, spec):
    runs = synthetic_runs(illustrative_law(), sizes=(2e5, 1e6), sigma_bars=(1e-4,), steps=(100,), seq_len=31)
    return fit_provenance(runs, ["results.csv"], [str(spec)], corpus="the demo corpus")


def _law_file(folder, fitted_on, validated=True):
    law = illustrative_law()
    if validated:
        law.holdout = {rule: {"runs": [], "mean_abs_rel_error": 0.01, "max_abs_rel_error": 0.02}
                       for rule in ("largest-model", "late")}
    path = folder / "law.json"
    save_laws(path, {"parametric": law}, "parametric", fitted_on)
    return path


def test_fit_records_corpus_tokenizer_protocol_and_compute(fitted_on, data):
    manifest = json.loads((data / "manifest.json").read_text())
    assert fitted_on["corpus"]["name"] == "the demo corpus"
    assert fitted_on["corpus"]["fingerprint"] == manifest["fingerprint"]  # the spec's data folder
    assert fitted_on["tokenizer"] == {"vocab_size": 512, "sha256": manifest["tokenizer"]["sha256"]}
    assert fitted_on["seq_len"] == 32
    assert fitted_on["optimizer"] == {"name": "adamw", "lr": 2e-3, "betas": [0.9, 0.99], "weight_decay": 0.0}
    assert fitted_on["schedule"]["decay"] == "constant" and fitted_on["schedule"]["warmup_steps"] == 10
    assert fitted_on["clip_norm"] == 0.5 and "0.002" in fitted_on["lr_rule"]
    assert fitted_on["compute"]["per_run"] == [6.0 * 2e5 * 256 * 31 * 100, 6.0 * 1e6 * 256 * 31 * 100]


def test_what_cannot_be_known_is_unknown():
    runs = synthetic_runs(illustrative_law(), sizes=(2e5,), sigma_bars=(1e-4,), steps=(100,), seq_len=63)
    rec = fit_provenance(runs)
    assert rec["seq_len"] == 64  # from the results: tokens predicted per sequence + 1
    assert rec["corpus"] == {"name": UNKNOWN, "fingerprint": UNKNOWN}
    assert rec["optimizer"] == rec["schedule"] == rec["lr_rule"] == rec["clip_norm"] == UNKNOWN


def test_plan_on_the_laws_own_data_is_validated(fitted_on, data, tmp_path, capsys):
    law = _law_file(tmp_path, fitted_on)
    n = json.loads((data / "manifest.json").read_text())["splits"]["train"]["num_sequences"]
    config = tmp_path / "train.yaml"
    assert main(["plan", "--compute", "1e13", "--epsilon", "8", "--delta", "1e-7", "--data-size", str(n),
                 "--law", str(law), "--data", str(data), "--json", "--allow-extrapolation",
                 "--write-config", str(config)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data_check"] == {"matches": True, "differences": []} and out["validated_for_this_plan"]
    assert out["plans"][0]["seq_len"] == 32 and "seq_len" not in out["plans"][0]["outside"]
    assert out["law_fitted_on"]["corpus"]["name"] == "the demo corpus"
    written = yaml.safe_load(config.read_text())
    # the optimizer, schedule and clip norm the law was fitted with travel with the plan
    assert written["optimizer"] == fitted_on["optimizer"] and written["schedule"] == fitted_on["schedule"]
    assert written["privacy"]["max_grad_norm"] == 0.5 and written["data"]["path"] == str(data)
    assert "; validated, on data that is the law's corpus" in config.read_text()


def test_plan_says_plainly_when_the_data_or_length_differ(fitted_on, data, tmp_path, capsys):
    other = {**fitted_on, "corpus": {"name": "python source", "fingerprint": "0" * 64}, "seq_len": 64}
    law = _law_file(tmp_path, other)
    n = json.loads((data / "manifest.json").read_text())["splits"]["train"]["num_sequences"]
    config = tmp_path / "train.yaml"
    argv = ["plan", "--compute", "1e13", "--epsilon", "8", "--delta", "1e-7", "--data-size", str(n),
            "--law", str(law), "--data", str(data), "--allow-extrapolation"]
    assert main([*argv, "--write-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "the law was fitted on python source at 64 tokens; your data is" in out
    assert "predictions are unvalidated" in out and "inside the fitted range" not in out
    assert "seq_len 2x" in out  # 32 against 64 tokens: outside the fitted range
    header = config.read_text().split("\nmodel:")[0]
    assert "not validated for this plan" in header and "predictions are unvalidated" in header
    assert "; validated" not in header
    # a sequence length 32x the law's: refused like any plan far outside the fitted range
    assert main(["plan", "--compute", "1e13", "--epsilon", "8", "--delta", "1e-7", "--data-size", "100000",
                 "--seq-len", "2048", "--law", str(law)]) == 2
    assert "seq_len 32x" in capsys.readouterr().err
    assert main(["plan", "--compute", "1e13", "--epsilon", "8", "--delta", "1e-7", "--data-size", "100000",
                 "--seq-len", "2048", "--law", str(law), "--json", "--allow-extrapolation"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert not out["data_check"]["matches"] and out["plans"][0]["outside"]["seq_len"] == 32
    assert any("at 2048 tokens per sequence" in d for d in out["data_check"]["differences"])


def test_a_law_without_a_record_is_unvalidated(data):
    check = check_against(None, 32, data)
    assert not check["matches"] and "does not record" in check["differences"][0]
    unknown = check_against({"corpus": {"name": "x", "fingerprint": UNKNOWN}, "tokenizer": {"vocab_size": 512},
                             "seq_len": 32}, 32, data)
    assert not unknown["matches"] and "fingerprint is unknown" in unknown["differences"][0]


def test_the_shipped_law_records_its_sweep():
    from dptrain.scaling.law import load_law
    from dptrain.scaling.plan import SHIPPED_LAW

    rec = load_law(SHIPPED_LAW).fitted_on
    assert rec["seq_len"] == 64 and rec["tokenizer"]["vocab_size"] == 2048
    assert rec["optimizer"]["lr"] == 3e-3 and rec["schedule"]["decay"] == "constant" and rec["clip_norm"] == 1.0
    assert "standard library" in rec["corpus"]["name"] and len(rec["corpus"]["fingerprint"]) == 64
